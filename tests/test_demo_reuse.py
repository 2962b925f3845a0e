"""--skip-train in the demo benchmarks (benchmarks/demo_*.py) reuses only a training that finished.

A pass killed after the trainer exported its backbone but before the script wrote the run's log used to
stop the next `--skip-train` pass on the missing log, and a pass killed before its results file lost the
wall times of the runs it had finished. No training here: the files the scripts write are made by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from demo_frameworks import reuse_training, save_training, spread  # noqa: E402


@pytest.fixture
def run(tmp_path):
    run_dir, log = tmp_path / "demo_seed1", tmp_path / "logs" / "demo_seed1.train.log"
    run_dir.mkdir()
    log.parent.mkdir()
    return run_dir, log


def test_a_training_without_its_backbone_or_log_is_trained_again(run):
    run_dir, log = run
    assert reuse_training(run_dir, log) is None  # nothing yet
    (run_dir / "backbone_torchvision.pth").write_bytes(b"x")
    assert reuse_training(run_dir, log, earlier_wall=3.0) is None  # killed before the log was written
    (run_dir / "backbone_torchvision.pth").unlink()
    log.write_text("output")
    assert reuse_training(run_dir, log) is None  # a log but no exported backbone


def test_a_finished_training_keeps_its_own_wall_time(run):
    run_dir, log = run
    (run_dir / "backbone_torchvision.pth").write_bytes(b"x")
    save_training(log, "kNN top-1: random-init 10.00% -> trained 90.00%\n", 51.25)
    text, wall = reuse_training(run_dir, log, earlier_wall=99.0)
    assert text.startswith("kNN top-1") and wall == pytest.approx(51.25)


def test_a_run_from_before_the_wall_files_takes_the_earlier_results_wall_or_none(run):
    run_dir, log = run
    (run_dir / "backbone_torchvision.pth").write_bytes(b"x")
    log.write_text("output")
    assert reuse_training(run_dir, log, earlier_wall=42.0) == ("output", 42.0)
    assert reuse_training(run_dir, log) == ("output", None)


def test_spread_is_the_value_or_mean_with_range():
    assert spread([93.0]) == "93.00%"
    assert spread([90.0, 96.0, 93.0]) == "93.00% [90.00, 96.00]"
    assert spread([50.0, 61.0], "{:.0f}", " s") == "56 s [50, 61]"

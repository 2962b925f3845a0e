"""--skip-train in the demo benchmarks (benchmarks/demo_*.py) reuses only a training that finished.

A pass killed after the trainer exported its backbone but before the script wrote the run's log used to
stop the next `--skip-train` pass on the missing log, and a pass killed before its results file lost the
wall times of the runs it had finished. No training here: the files the scripts write are made by hand.
"""

from __future__ import annotations

import json
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


def _results(tmp_path, wall):
    """An earlier pass's results file holding `wall` for (configs/demo.json, seed 1) only."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"config": "configs/demo.json", "seed": 1, "train_wall_s": wall},
                                {"config": "configs/demo.json", "seed": 2, "train_wall_s": 7.0}]))
    return path


def test_a_training_without_its_backbone_or_log_is_trained_again(run, tmp_path):
    run_dir, log = run
    results = _results(tmp_path, 3.0)
    assert reuse_training(run_dir, log, results, "configs/demo.json", 1) is None  # nothing yet
    (run_dir / "backbone_torchvision.pth").write_bytes(b"x")
    assert reuse_training(run_dir, log, results, "configs/demo.json", 1) is None  # killed before the log
    (run_dir / "backbone_torchvision.pth").unlink()
    log.write_text("output")
    assert reuse_training(run_dir, log, results, "configs/demo.json", 1) is None  # a log, no exported backbone


def test_a_finished_training_keeps_its_own_wall_time(run, tmp_path):
    run_dir, log = run
    (run_dir / "backbone_torchvision.pth").write_bytes(b"x")
    save_training(log, "kNN top-1: random-init 10.00% -> trained 90.00%\n", 51.25)
    text, wall = reuse_training(run_dir, log, _results(tmp_path, 99.0), "configs/demo.json", 1)
    assert text.startswith("kNN top-1") and wall == pytest.approx(51.25)


def test_a_run_from_before_the_wall_files_takes_the_earlier_results_wall_or_none(run, tmp_path):
    run_dir, log = run
    (run_dir / "backbone_torchvision.pth").write_bytes(b"x")
    log.write_text("output")
    results = _results(tmp_path, 42.0)
    assert reuse_training(run_dir, log, results, "configs/demo.json", 1) == ("output", 42.0)
    assert reuse_training(run_dir, log, results, "configs/demo_byol.json", 1) == ("output", None)  # no record
    assert reuse_training(run_dir, log, tmp_path / "absent.json", "configs/demo.json", 1) == ("output", None)


def test_spread_is_the_value_or_mean_with_range():
    assert spread([93.0]) == "93.00%"
    assert spread([90.0, 96.0, 93.0]) == "93.00% [90.00, 96.00]"
    assert spread([50.0, 61.0], "{:.0f}", " s") == "56 s [50, 61]"


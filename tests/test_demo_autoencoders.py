"""benchmarks/demo_autoencoders.py: the TopK accuracy's course over training (the README's second table).

The spans and their means are checked against sums written out by hand; no training here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from demo_autoencoders import markdown, span_epochs, span_means  # noqa: E402


def _metrics(tmp_path, last_step: int) -> Path:
    """Steps 2, 4, ..., last_step logging train/topk_accuracy = step, with a kNN line at each."""
    path = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(2, last_step + 1, 2):
        lines.append(json.dumps({"step": step, "train/topk_accuracy": float(step)}))
        lines.append(json.dumps({"step": step, "eval/knn_top1": 99.0}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_span_epochs_cut_the_epochs_into_equal_runs_and_a_shorter_last():
    assert span_epochs(120, 6) == [range(i, i + 20) for i in range(0, 120, 20)]
    assert span_epochs(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert span_epochs(2, 6) == [range(0, 1), range(1, 2)]


def test_span_means_are_the_means_over_each_run_of_epochs(tmp_path):
    # 7 epochs of 4 steps (epoch e holds steps 4e+1 .. 4e+4), logged every 2 steps, in runs of 3 epochs
    metrics = _metrics(tmp_path, 28)
    by_hand = [[2, 4, 6, 8, 10, 12], [14, 16, 18, 20, 22, 24], [26, 28]]  # epochs 0-2, 3-5, 6
    assert span_means(metrics, "train/topk_accuracy", 4, 7, 3) == [sum(v) / len(v) for v in by_hand]


def test_a_run_of_epochs_without_logged_steps_is_none_not_dropped(tmp_path):
    metrics = _metrics(tmp_path, 12)  # a 7-epoch run cut short after epoch 2
    assert span_means(metrics, "train/topk_accuracy", 4, 7, 3) == [7.0, None, None]


def test_the_course_table_labels_its_columns_by_epoch(tmp_path):
    base = {"config": "configs/demo_mixedae.json", "epochs": 7, "knn_random_init": 50.0, "knn_trained": 60.0,
            "loss_recon_first_epoch": 1.0, "loss_recon_last_epoch": 0.5, "knn_command_top1": 60.0,
            "finetune_10pct_top1": 40.0, "train_wall_s": 10.0}
    # 7 epochs in the script's 6 runs: ceil(7 / 6) = 2 epochs each, then epoch 6 alone
    text = markdown([{**base, "seed": 0, "topk_accuracy_spans": [0.2, 0.3, None, 0.45]}])
    assert "| run | epochs 0-1 | epochs 2-3 | epochs 4-5 | epoch 6 |" in text
    assert "| `configs/demo_mixedae.json` seed 0 | 20.0% | 30.0% | - | 45.0% |" in text

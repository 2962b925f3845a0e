"""A trainer for a shipped config on synthetic data, in this process, set up for a test to drive
step by step (used by step_syncs.py, adios_ranks.py and test_adios.py).

No image grid, TensorBoard, progress bar or start-up kNN; no resume; engine and method in train
mode. `sizes` are the caller's data/model/batch overrides (applied before `overrides`).
"""

from __future__ import annotations

import tempfile

import mixfast  # noqa: F401  (torchvision compatibility shim first)

from mixfast.config import load_config
from mixfast.engine import distributed as dist_utils
from mixfast.train import Trainer


def tiny_trainer(config, sizes: list[str], overrides: list[str] = (), output_dir: str | None = None) -> Trainer:
    out = output_dir or tempfile.mkdtemp(prefix="mixfast-test-")
    cfg = load_config(config, [
        "data.name=synthetic", "data.num_workers=0", *sizes, f"train.output_dir={out}", "train.resume=none",
        "log.image_grid=false", "log.tensorboard=false", "log.progress=false", "eval.knn_at_start=false",
        *overrides])
    trainer = Trainer(cfg, dist_utils.init_distributed())
    trainer.engine.train()
    trainer.method.train()
    return trainer

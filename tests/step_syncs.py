"""Host syncs of one training step, counted in a fresh process (run by test_sync_free.py).

    python tests/step_syncs.py CONFIG [KEY=VALUE ...]

Builds the trainer for CONFIG on synthetic data, runs two steps (the first one warms up
lazy initialisation: optimizer state, kernels' first-call caches), then counts the host
syncs of the third step and of the logging read that follows it; prints them as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile

import mixfast  # noqa: F401  (torchvision compatibility shim first)
from mixfast.config import load_config
from mixfast.engine import distributed as dist_utils
from mixfast.engine.syncs import SyncCounter
from mixfast.train import Trainer


def main(config: str, overrides: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="mixfast-syncs-")
    cfg = load_config(config, [
        "data.name=synthetic", "data.synthetic_size=64", "data.num_workers=0", "train.batch_size=16",
        "model.width=8", f"train.output_dir={out}", "train.resume=none", "log.image_grid=false",
        "log.tensorboard=false", "log.progress=false", "eval.knn_at_start=false", *overrides])
    trainer = Trainer(cfg, dist_utils.init_distributed())
    trainer.engine.train()
    trainer.method.train()
    batches = iter(trainer.train_loader)
    for _ in range(2):
        trainer.read_metrics(trainer.train_step(next(batches)))
    batch = next(batches)
    with SyncCounter() as step:
        result = trainer.train_step(batch)
    with SyncCounter() as read:
        metrics = trainer.read_metrics(result)
    return {"step": dict(step.counts), "step_places": dict(step.places), "read": dict(read.counts),
            "loss": metrics["loss"], "metric_names": sorted(metrics)}


if __name__ == "__main__":
    print("SYNCS " + json.dumps(main(sys.argv[1], sys.argv[2:])), flush=True)

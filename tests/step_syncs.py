"""Host syncs of one training step, counted in a fresh process (run by test_sync_free.py).

    python tests/step_syncs.py CONFIG [KEY=VALUE ...]

Builds the trainer for CONFIG on synthetic data, runs two steps (the first one warms up
lazy initialisation: optimizer state, kernels' first-call caches), then counts the host
syncs of the third step and of the logging read that follows it; prints them as JSON.
"""

from __future__ import annotations

import json
import sys

from tiny_trainer import tiny_trainer  # tests/ is this script's directory

from mixfast.engine.syncs import SyncCounter


def main(config: str, overrides: list[str]) -> dict:
    trainer = tiny_trainer(config, ["data.synthetic_size=64", "train.batch_size=16", "model.width=8"], overrides)
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

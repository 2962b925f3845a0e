"""Digest of each rank's masker weights at the start and after each of 3 ADIOS steps (run by
test_train.py under the DeepSpeed launcher with 2 ranks).

    deepspeed --num_gpus 2 tests/adios_ranks.py CONFIG OUTPUT_DIR [KEY=VALUE ...]

The ranks read disjoint halves of every batch, so their local masker gradients differ: the
weights stay equal only if the gradients are averaged across ranks.
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tiny_trainer import tiny_trainer  # noqa: E402  (tests/ is this script's directory)

from mixfast.engine import distributed as dist_utils  # noqa: E402


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        if isinstance(p, torch.Tensor):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(config: str, out: str, extra: list[str]) -> None:
    trainer = tiny_trainer(config, [
        "data.synthetic_size=64", "data.image_size=32", "train.batch_size=16", "model.width=8",
        "model.head_hidden_dim=32", "model.feature_dim=16", "model.predictor_hidden_dim=8", "method.queue_size=64",
        "masker.width=8"], extra, output_dir=out)
    rank = dist_utils.rank()
    print(f"MASKER {rank} 0 {digest(trainer.method.masker.net)}", flush=True)
    batches = iter(trainer.train_loader)
    for step in range(1, 4):
        trainer.train_step(next(batches))
        print(f"MASKER {rank} {step} {digest(trainer.method.masker.net)}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], args[2:])

"""Run logs: TensorBoard scalars/images, a JSONL metrics file, console messages (rank 0)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from mixfast.engine import distributed as dist_utils


class MetricsLogger:
    """Writes every record to `metrics.jsonl` and TensorBoard; no-op on ranks other than 0."""

    def __init__(self, output_dir: str, tensorboard: bool):
        self.enabled = dist_utils.is_main()
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), "step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, grid, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def info(message: str) -> None:
    """A line on stdout from rank 0 (stdout, so it interleaves properly with tqdm on stderr)."""
    if dist_utils.is_main():
        print(f"[mixfast] {message}", flush=True)

"""Learning-rate schedule by optimizer step: linear warm-up then cosine (or constant)."""

from __future__ import annotations

import math

from mixfast.config import OptimConfig


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(total_steps: int, warmup_steps: int, cfg: OptimConfig):
    """For torch.optim.lr_scheduler.LambdaLR (DeepSpeed steps it and saves it in checkpoints)."""
    return lambda step: lr_at(step, total_steps, warmup_steps, cfg) / cfg.lr


def warmup_cosine(step: float, total_steps: float, warmup_steps: float, peak: float, start: float = 0.0,
                  floor: float = 0.0) -> float:
    """Linear warm-up from `start` (step 0) to `peak` (step `warmup_steps`), then cosine to `floor`
    at `total_steps` (the ADIOS masker's LinearWarmupCosineAnnealingLR, stepped per iteration; MAE's
    fine-tuning schedule in fractional epochs)."""
    if warmup_steps > 0 and step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    # the guard only keeps a zero-length cosine finite (integer steps: any span < 1 is <= 0 there)
    progress = min(1.0, (step - warmup_steps) / max(1e-12, total_steps - warmup_steps))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

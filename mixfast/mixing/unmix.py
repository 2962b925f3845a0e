"""Un-Mix sampling policy (Un-Mix, Shen et al.): λ ~ Beta(α, α); mixup with probability P,
else CutMix; partner = flip. The pixel work is `mixfast.ops.unmix`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixfast import ops
from mixfast.config import UnMixConfig
from mixfast.mixing.rng import STREAM_UNMIX, flip_permutation, step_generator, step_numpy_rng


@dataclass
class UnMixedBatch:
    mixed: torch.Tensor
    lam: float          # effective λ (recomputed from the box for CutMix)
    use_mixup: bool
    perm: torch.Tensor  # flip


class UnMixer:
    def __init__(self, cfg: UnMixConfig, seed: int, rank: int):
        self.cfg, self.seed, self.rank = cfg, seed, rank

    def plan(self, height: int, width: int, step: int) -> tuple[float, bool, tuple | None]:
        """This step's (λ, mixup or CutMix, CutMix box or None)."""
        rng = step_numpy_rng(self.seed, self.rank, STREAM_UNMIX, step)
        lam = float(rng.beta(self.cfg.alpha, self.cfg.alpha))
        use_mixup = bool(rng.random() < self.cfg.prob_mixup)
        box = None
        if not use_mixup:
            box = ops.rand_bbox(height, width, lam, generator=step_generator(self.seed, self.rank, STREAM_UNMIX, step))
        return lam, use_mixup, box

    def __call__(self, x: torch.Tensor, step: int) -> UnMixedBatch:
        lam, use_mixup, box = self.plan(x.size(2), x.size(3), step)
        mixed, lam_eff = ops.unmix(x, lam, use_mixup, box=box)
        return UnMixedBatch(mixed, float(lam_eff), use_mixup, flip_permutation(x.size(0), x.device))

"""MixMask sampling policy (MixMask paper, Vishniakov et al.): which mask, which ratio, which partner.

The tensor work (mask generation, upsampling, mixing, λ) is `mixfast.ops`; this module only
decides what to ask for. One mask per batch by default (the reference code), per sample
optionally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixfast import ops
from mixfast.ops.mix import to_device
from mixfast.config import MixMaskConfig
from mixfast.mixing.rng import STREAM_MIXMASK, STREAM_NOISE, flip_permutation, step_generator, step_numpy_rng
from mixfast.mixing.unmix import UnMixedBatch, UnMixer


@dataclass
class MaskedBatch:
    mixed: torch.Tensor
    masks: torch.Tensor            # bool [1 or B, g, g]
    perm: torch.Tensor             # filler of row i is x[perm[i]]
    pixel_lam: torch.Tensor        # float32 [1] or [B]: fraction of pixels from x_i
    weight_own: torch.Tensor       # loss weight of row i against its own key
    weight_filler: torch.Tensor    # loss weight of row i against key perm[i] (the switch term)


class MixMaskMixer:
    def __init__(self, cfg: MixMaskConfig, seed: int, rank: int):
        self.cfg, self.seed, self.rank = cfg, seed, rank

    def _ratio(self, step: int) -> float:
        if isinstance(self.cfg.ratio, float):
            return self.cfg.ratio
        lo, hi = self.cfg.ratio
        return float(step_numpy_rng(self.seed, self.rank, STREAM_MIXMASK, step).uniform(lo, hi))

    def mask_args(self, step: int) -> dict:
        """This step's mask arguments of ``ops.make_masks`` / ``ops.make_masks_and_mix``: grid, ratio (drawn
        per step from a range), kind, and the mask seed (one Philox stream per (seed, rank))."""
        return dict(grid=self.cfg.grid, ratio=self._ratio(step), kind=self.cfg.kind,
                    seed=self.seed * 65537 + self.rank, step=step)

    def _perm(self, b: int, device, step: int, random_partner: bool) -> torch.Tensor:
        if random_partner:
            gen = step_generator(self.seed, self.rank, STREAM_MIXMASK, step)
            return to_device(torch.randperm(b, generator=gen), torch.device(device))
        return flip_permutation(b, device)

    def _batch(self, mixed, masks, perm, lam) -> MaskedBatch:
        """Image filling: row i is scored against its own key (λ) and its filler's (1-λ)."""
        own = lam.expand(mixed.size(0))
        filler = (1 - lam).expand(mixed.size(0)) if self.cfg.switch else torch.zeros_like(own)
        return MaskedBatch(mixed, masks, perm, lam, own, filler)

    def with_unmix(self, x: torch.Tensor, step: int, unmixer: UnMixer) -> tuple[MaskedBatch, UnMixedBatch]:
        """Both branches of one step. MixMask takes a fresh random permutation, Un-Mix keeps
        flip (MixMask paper, Table 2: different permutations in the two branches do better).
        With image filling both mixtures come from one pass over `x` (`ops.mix_and_unmix`),
        bit-identical to the two separate ops."""
        if self.cfg.fill != "image":
            return self(x, step, random_partner=True), unmixer(x, step)
        b = x.size(0)
        args = self.mask_args(step)
        masks = ops.make_masks(b if self.cfg.per_sample else 1, args["grid"], args["ratio"], args["kind"],
                               seed=args["seed"], step=step, device=x.device)
        perm = self._perm(b, x.device, step, random_partner=True)
        lam_u, use_mixup, box = unmixer.plan(x.size(2), x.size(3), step)
        # perm comes from torch.randperm: not checked again (the check reads it on the host)
        mixed, _, lam, x_um, lam_u_eff = ops.mix_and_unmix(x, masks, perm, lam_u, use_mixup, box, validate=False)
        return (self._batch(mixed, masks, perm, lam),
                UnMixedBatch(x_um, float(lam_u_eff), use_mixup, flip_permutation(b, x.device)))

    def __call__(self, x: torch.Tensor, step: int, random_partner: bool) -> MaskedBatch:
        """Mix view `x` (normalized, [B,C,H,W]). `random_partner`: a fresh permutation
        (used together with Un-Mix, which keeps flip); otherwise flip."""
        b = x.size(0)
        mask_args = self.mask_args(step)
        perm = self._perm(b, x.device, step, random_partner)
        if self.cfg.fill == "image":
            # One op draws the masks and mixes (a single kernel launch on a GPU); the masks are
            # the bits ops.make_masks would draw. perm=None means flip and lets the kernels
            # read each pair of images once.
            mixed, _, lam, masks = ops.make_masks_and_mix(x, perm if random_partner else None, validate=False,
                                                          per_sample=self.cfg.per_sample, **mask_args)
            return self._batch(mixed, masks, perm, lam)
        else:
            masks = ops.make_masks(b if self.cfg.per_sample else 1, mask_args["grid"], mask_args["ratio"],
                                   mask_args["kind"], seed=mask_args["seed"], step=step, device=x.device)
            # Erase baselines (MSCN, the MixMask paper's comparison): no partner image, so no
            # switch term, and every row is scored only against its own key (weight 1).
            if self.cfg.fill == "zero":
                filler_img = torch.zeros_like(x)
            else:
                gen = step_generator(self.seed, self.rank, STREAM_NOISE, step)
                filler_img = to_device(torch.randn(x.shape, generator=gen, dtype=x.dtype), x.device)
            mixed, _, lam = ops.mix(x, masks, perm, filler=filler_img, validate=False)
            own, filler = torch.ones(b, device=x.device), torch.zeros(b, device=x.device)
        return MaskedBatch(mixed, masks, perm, lam, own, filler)

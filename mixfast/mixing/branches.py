"""This step's mixed branches of one view, for any framework (the MixMask paper's policy).

A branch is a batch of mixed images plus its soft pairing: row i is scored against the
target of its own image with weight `weight_own[i]` (λ) and against the target of its
filler image `perm[i]` with weight `weight_filler[i]` (1-λ, or 0 for the erase
baselines). Which targets those are (MoCo keys, SimCLR embeddings, BYOL/SimSiam
projections) is the framework's business; the policy here is shared:

    Un-Mix alone      mixup / CutMix with flip
    MixMask alone     block mask with flip
    both              Un-Mix keeps flip, MixMask takes a fresh random permutation (paper
                      Table 2), both mixtures from one pass over x (`ops.mix_and_unmix`)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixfast import ops
from mixfast.config import MixingConfig
from mixfast.mixing.mixmask import MixMaskMixer
from mixfast.mixing.unmix import UnMixer


@dataclass
class MixedBranch:
    name: str                    # "unmix" | "mixmask"
    x: torch.Tensor              # mixed images [B, C, H, W]
    perm: torch.Tensor           # long [B]: the filler of row i is image perm[i]
    weight_own: torch.Tensor     # float [B]
    weight_filler: torch.Tensor  # float [B]


class Mixtures:
    def __init__(self, cfg: MixingConfig, seed: int, rank: int):
        self.mixmask = MixMaskMixer(cfg.mixmask, seed, rank) if cfg.mixmask.enabled else None
        self.unmix = UnMixer(cfg.unmix, seed, rank) if cfg.unmix.enabled else None
        self.symmetrize = cfg.symmetrize

    @property
    def enabled(self) -> bool:
        return self.mixmask is not None or self.unmix is not None

    def __call__(self, x: torch.Tensor, step: int) -> tuple[list[MixedBranch], dict, dict]:
        """(branches, scalar stats for the logs, rows of the image grid). Every random
        choice is a pure function of (seed, rank, step)."""
        b, dev = x.size(0), x.device
        um = mm = None
        if self.unmix is not None and self.mixmask is not None:
            mm, um = self.mixmask.with_unmix(x, step, self.unmix)
        elif self.unmix is not None:
            um = self.unmix(x, step)
        elif self.mixmask is not None:
            mm = self.mixmask(x, step, random_partner=False)
        branches, stats = [], {}
        if um is not None:
            lam = torch.full((b,), um.lam, device=dev)
            branches.append(MixedBranch("unmix", um.mixed, um.perm, lam, 1 - lam))
            stats.update(lam_unmix=um.lam, unmix_is_mixup=float(um.use_mixup))
        if mm is not None:
            branches.append(MixedBranch("mixmask", mm.mixed, mm.perm, mm.weight_own.to(dev), mm.weight_filler.to(dev)))
            stats["lam_mixmask"] = mm.pixel_lam.float().mean()  # read by the trainer when it logs
        return branches, stats, self._grid_rows(x, mm, um)

    def _grid_rows(self, x: torch.Tensor, mm, um) -> dict:
        """Labelled rows of the first-batch image grid, in display order: the mask, the MixMask
        mixture and its switch image (same mask, roles swapped: drawn only for the grid, by a
        callable the trainer calls when it saves the grid), the Un-Mix mixture."""
        rows = {}
        if mm is not None:
            rows.update(mask=mm.masks, mixmask=mm.mixed)
            if self.mixmask.cfg.fill == "image":
                rows["switch"] = lambda: ops.mix(x, mm.masks, mm.perm, want_switch=True)[1]
        if um is not None:
            rows["unmix"] = um.mixed
        return rows

    def pairs(self, x1: torch.Tensor, x2: torch.Tensor,
              step: int) -> tuple[list[tuple[MixedBranch, int]], dict, dict]:
        """The branches of the SimCLR/BYOL/SimSiam step: [(branch, index of the view whose
        targets it is scored against)], stats, images (both views included). View 1's
        mixtures go against view 2; with `mixing.symmetrize` view 2 is mixed with the same
        masks, λ and permutations and goes against view 1."""
        branches, stats, mixed_rows = self(x1, step)
        images = {"view1": x1, "view2": x2, **mixed_rows}
        pairs = [(br, 1) for br in branches]
        if self.symmetrize and branches:
            pairs += [(br, 0) for br in self(x2, step)[0]]
        return pairs, stats, images

"""PNG grid of the first batch: views, masks, MixMask mixtures, switch images, Un-Mix."""

from __future__ import annotations

import os

import mixfast._compat  # noqa: F401  (torchvision import on CPU-only torch)

import torch
from torchvision.utils import save_image

from mixfast import ops
from mixfast.data.transforms import mean_std

_ROWS = 8


def _denormalize(x: torch.Tensor, recipe: str) -> torch.Tensor:
    mean, std = mean_std(recipe)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x.detach().float().cpu() * std + mean).clamp(0, 1)


def save_mix_grid(images: dict, path: str, recipe: str) -> str:
    """One column per image of the batch (first 8); rows: view 1, view 2, mask, MixMask
    mixture, switch image (same mask, roles swapped), Un-Mix or MixSiam mixture — whichever exist."""
    x1 = images["view1"][:_ROWS]
    rows = [_denormalize(x1, recipe), _denormalize(images["view2"][:_ROWS], recipe)]
    if "mixmask" in images:
        h, w = x1.shape[-2:]
        masks = ops.upsample_masks(images["mask"].cpu(), h, w).float()
        masks = masks.expand(len(images["view1"]), h, w)[:_ROWS]
        rows.append(masks[:, None].expand(-1, 3, h, w))
        rows.append(_denormalize(images["mixmask"][:_ROWS], recipe))
        # Switch image of row i: m ⊙ x_perm[i] + (1-m) ⊙ x_i, computed here only for display
        # (training derives switch features from the mixed batch, never re-encoding images).
        _, switch, _ = ops.mix(images["view1"], images["mask"], images["mixmask_perm"], want_switch=True)
        rows.append(_denormalize(switch[:_ROWS], recipe))
    for name in ("unmix", "mixsiam"):  # Un-Mix mixture; MixSiam's mixture of the two views
        if name in images:
            rows.append(_denormalize(images[name][:_ROWS], recipe))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(torch.cat(rows), path, nrow=x1.size(0), padding=1)
    return path

"""PNG grid of the first batch: one row per labelled tensor a method hands over.

The method decides what is shown (its `StepResult.images`, in display order); this module
only knows how to draw two kinds of rows:

* an image batch ``[B, 3, H, W]`` (normalized as the data recipe does): un-normalized;
* a mask batch ``bool [1 or B, g, g]``: upsampled to the images' size, white = kept;
* a soft mask batch ``float [B, H, W]`` in [0, 1] (learned masks): grey levels, white = 1.

A value may be a zero-argument callable returning such a tensor: rows that cost work to
produce (a switch image) are computed only when the grid is saved. Other values are skipped.
"""

from __future__ import annotations

import os
from typing import Callable, Union

import mixfast._compat  # noqa: F401  (torchvision import on CPU-only torch)

import torch
from torchvision.utils import save_image

from mixfast import ops
from mixfast.data.transforms import mean_std

_COLUMNS = 8
Row = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _denormalize(x: torch.Tensor, recipe: str) -> torch.Tensor:
    mean, std = mean_std(recipe)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x.detach().float().cpu() * std + mean).clamp(0, 1)


def _mask_row(masks: torch.Tensor, batch: int, h: int, w: int) -> torch.Tensor:
    up = ops.upsample_masks(masks.cpu(), h, w).float().expand(batch, h, w)[:_COLUMNS]
    return up[:, None].expand(-1, 3, h, w)


def grid_rows(images: dict[str, Row], recipe: str) -> list[torch.Tensor]:
    """The drawable rows of `images`, first `_COLUMNS` columns each, in the dict's order."""
    values = {name: (v() if callable(v) else v) for name, v in images.items()}
    batches = [v for v in values.values() if isinstance(v, torch.Tensor) and v.dim() == 4]
    if not batches:
        return []
    batch, (h, w) = batches[0].size(0), batches[0].shape[-2:]
    rows = []
    for v in values.values():
        if not isinstance(v, torch.Tensor):
            continue
        if v.dim() == 4 and v.size(1) == 3:
            rows.append(_denormalize(v[:_COLUMNS], recipe))
        elif v.dim() == 3 and v.dtype == torch.bool:
            rows.append(_mask_row(v, batch, h, w))
        elif v.dim() == 3 and v.is_floating_point() and v.shape[-2:] == (h, w):
            rows.append(v[:_COLUMNS].detach().float().cpu().clamp(0, 1)[:, None].expand(-1, 3, h, w))
    return rows


def save_mix_grid(images: dict[str, Row], path: str, recipe: str) -> str:
    """Write the grid of `images` (see the module docstring) to `path`; returns the path."""
    rows = grid_rows(images, recipe)
    if not rows:
        raise ValueError(f"no image rows to draw among {sorted(images)}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(torch.cat(rows), path, nrow=rows[0].size(0), padding=1)
    return path

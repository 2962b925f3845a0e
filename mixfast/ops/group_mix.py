"""MixedAE group mixing ("compose"): the balanced cell map of each group and the mixed image, in one pass.

`group_cell_map(num_groups, group_size, cells_side, *, seed, step)` draws the map exactly as the reference
(`reference.group_cell_map`, the specification) does, bit for bit, but vectorized over groups: Philox4x32-10 in
numpy uint64 (a 32 x 32-bit product is exact in 64 bits), and the two random permutations of a group (image order,
cell order) as stable argsorts of 64-bit random keys.

`group_mix(x, cell_map, token_patch)` is one `torch.index_select` over the rows of x that lie within one cell:
NCHW x is viewed as rows of W/s pixels of one channel (`[B*C*H*s, W/s]`), channels_last x as rows of W/s pixels of all
channels (`[B*H*s, (W/s)*C]`, the same memory), and an index of one entry per output row (built on x's device from
the cell map, vectorized) names the source row. Every output pixel is read once from its source and written once, in
contiguous runs, in x's memory format; no Python loop over images or cells. The gradient to x is index_select's (an
index_add of the output gradient into the chosen rows; each input row is chosen at most once, so it is exact: the
indicator). On the 2-core CPU (1 thread, a load of 3-5 from other jobs; 32 groups of 4 images of 3 x 224 x 224,
7 x 7 cells): 3-5 ms fp32 NCHW (rows of 32 pixels) and 1.2-1.3 ms bf16 channels_last, against 0.7 / 1.4 ms for a plain
copy of the 32 output images; a `torch.gather` over a cell-split 7-D view with a broadcast index took 83 / 14 ms and a
`torch.where` chain over the group 36-72 / 33 ms. Not yet measured on a GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from mixfast.ops import reference
from mixfast.ops.reference import check_group_cell_map_args, check_group_mix_args, mask_key

__all__ = ["group_cell_map", "group_mix"]

_U32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _philox_np(c0: np.ndarray, c1: np.ndarray, c2: int, c3: int, k0: int, k1: int) -> np.ndarray:
    """Philox4x32-10 of uint64 arrays of counters (each < 2^32), as `reference.philox4x32_10`: [..., 4] words."""
    c0, c1 = c0.astype(np.uint64), c1.astype(np.uint64)
    c2, c3 = np.full_like(c0, c2), np.full_like(c0, c3)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _U32, (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _U32
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=-1)


def group_cell_map(num_groups: int, group_size: int, cells_side: int, *, seed: int, step: int) -> torch.Tensor:
    """Balanced cell -> image map of every group: CPU int64 ``[num_groups, cells_side, cells_side]``, equal to
    :func:`mixfast.ops.reference.group_cell_map` (its docstring defines the draw)."""
    check_group_cell_map_args(num_groups, group_size, cells_side, seed, step)
    k0, k1 = mask_key(seed, step)
    n = cells_side * cells_side
    nkeys = group_size + n
    draws = (2 * nkeys + 3) // 4
    groups = np.arange(num_groups, dtype=np.uint64)[:, None]
    counters = np.arange(draws, dtype=np.uint64)[None, :]
    words = _philox_np(np.broadcast_to(counters, (num_groups, draws)), np.broadcast_to(groups, (num_groups, draws)),
                       reference.GROUP_MAP_STREAM, 0, k0, k1).reshape(num_groups, 4 * draws)[:, :2 * nkeys]
    keys = (words[:, 0::2] << np.uint64(32)) | words[:, 1::2]  # [G, group_size + n]
    order = np.argsort(keys[:, :group_size], axis=1, kind="stable")  # image order
    labels = order[:, np.arange(n) % group_size]  # label of the c-th cell in cell order
    cells = np.argsort(keys[:, group_size:], axis=1, kind="stable")  # cell order
    out = np.empty((num_groups, n), dtype=np.int64)
    np.put_along_axis(out, cells, labels, axis=1)
    return torch.from_numpy(out).view(num_groups, cells_side, cells_side)


def group_mix(x: torch.Tensor, cell_map: torch.Tensor, token_patch: int, group_size: Optional[int] = None,
              validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One mixed image per group and its token segment ids: ``(mixed [G, C, H, W], segment_ids [G, L])``, as
    :func:`mixfast.ops.reference.group_mix` specifies (NCHW or channels_last, any float dtype, any device; the cell
    map may live on the CPU). ``validate=False`` skips the range check of the cell map's entries, which reads the map
    on the host (a device sync for a map on a GPU); shapes are always checked. An out-of-range entry is then
    undefined behaviour (on a GPU, a device-side assert)."""
    G, gs = check_group_mix_args(x, cell_map, token_patch, group_size, check_values=validate)
    B, C, H, W = x.shape
    cs = cell_map.shape[1]
    ch, cw = H // cs, W // cs
    idx = cell_map.to(x.device, non_blocking=True)
    dev = x.device
    # source image of every (group, pixel row, cell column): [G, H, cs]
    src = (torch.arange(G, device=dev)[:, None, None] * gs + idx).repeat_interleave(ch, dim=1)
    y = torch.arange(H, device=dev)[:, None]
    cc = torch.arange(cs, device=dev)
    if reference._memory_format(x) == torch.channels_last:
        rows = x.permute(0, 2, 3, 1).reshape(B * H * cs, cw * C)  # a view: x is channels_last-dense
        index = ((src * H + y) * cs + cc).reshape(-1)  # row (b, y, cc) of the source
        mixed = torch.index_select(rows, 0, index).view(G, H, W, C).permute(0, 3, 1, 2)  # channels_last
    else:
        rows = x.contiguous().view(B * C * H * cs, cw)
        c = torch.arange(C, device=dev)[:, None, None]
        index = (((src[:, None] * C + c) * H + y) * cs + cc).reshape(-1)  # row (b, c, y, cc) of the source
        mixed = torch.index_select(rows, 0, index).view(G, C, H, W)
    tpc_h, tpc_w = ch // token_patch, cw // token_patch  # tokens per cell side
    seg = idx[:, :, None, :, None].expand(G, cs, tpc_h, cs, tpc_w).reshape(G, cs * tpc_h * cs * tpc_w)
    return mixed, seg

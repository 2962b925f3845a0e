"""How the fused soft-InfoNCE splits its streamed dimension over programs: one plan for every backend.

Plain Python (no torch, no Triton): the Triton launchers (``kernels/infonce.py``) and the CUDA
backend's host code (``mixfast/ops/infonce.py``) both call it, each with its own tile sizes,
so the two kernels see the same kind of split.

Each of ``programs`` row (or column) blocks streams ``extent`` columns (or rows) in tiles of
``block``; splitting that stream over ``splits`` programs gives the GPU enough programs for
about two waves, and the per-split partial results are combined afterwards in a fixed order
(deterministic). Every split is non-empty and a multiple of ``block`` long.
"""

from __future__ import annotations

from typing import Optional, Tuple

MAX_SPLITS = 64  # partial buffers grow with the split count; past a few waves more splits do not help


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(extent: int, block: int, programs: int, sms: Optional[int], splits: Optional[int] = None) -> Tuple[int, int]:
    """(elements per split, number of splits) for `programs` blocks each streaming `extent` in tiles of `block`.

    `splits` forces a count (tests); else ~2 waves over `sms` streaming multiprocessors, or 3 splits when there is
    no GPU (Triton's interpreter: several splits, so the combine is always exercised)."""
    tiles = _cdiv(extent, block)
    if splits is None:
        splits = 3 if sms is None else _cdiv(2 * sms, max(programs, 1))
    splits = max(1, min(splits, tiles, MAX_SPLITS))
    per = _cdiv(tiles, splits) * block
    return per, _cdiv(extent, per)

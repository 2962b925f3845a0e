"""Reference (pure PyTorch) implementations of mixfast's mixing and loss ops.

This module is the *specification* that faster backends (native / Triton kernels) are
tested against. Everything here favours clarity over speed, works in float64 where that
makes sense, and states the math it computes in its docstring: MixMask (Vishniakov et al.:
filling-based block masks, the switch image and λ) and Un-Mix (Shen et al.: mixup / CutMix
with the flipped batch).

Conventions
-----------
* ``x`` is a batch ``[B, C, H, W]`` of already-normalized images.
* A MixMask grid mask holds ``1`` where the pixel is **kept from the original image**
  ``x_i`` and ``0`` where it is taken from the filler ``x_perm[i]``.
* ``flip`` is the pairing ``i -> B-1-i`` (its own inverse).

Public functions: :func:`make_masks`, :func:`upsample_masks`, :func:`mix`,
:func:`rand_bbox`, :func:`unmix`, :func:`soft_infonce`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from kernels.layout import out_format

__all__ = [
    "make_masks",
    "upsample_masks",
    "mix",
    "rand_bbox",
    "unmix",
    "soft_infonce",
    "mask_key",
    "mask_spec",
    "MaskSpec",
    "philox4x32_10",
    "block_mask_rows",
    "discrete_mask_rows",
]

_MASK_KINDS = ("block", "discrete")
_MIN_GRID = 2
_MAX_GRID = 64
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

# BEiT block-masking constants (BEiT's masking generator, as the MixMask code uses it).
_BLOCK_MIN_PATCHES = 4
_BLOCK_ATTEMPTS = 10
# Redraws of an all-0 / all-1 mask before a fixed fallback (never reached in practice;
# bounded so that a GPU thread can never loop forever). Same in csrc/include/mixfast/block_mask.h.
_MAX_REDRAWS = 1000

_MIX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _splitmix64(z: int) -> int:
    """One step of SplitMix64 (Steele, Lea & Flood 2014) on a 64-bit unsigned integer."""
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def mask_key(seed: int, step: int) -> Tuple[int, int]:
    """Philox key ``(k0, k1)`` (two uint32) of the masks of training step ``step``.

    ``z = sm(sm(seed mod 2^64) XOR (step mod 2^64))`` with ``sm`` the SplitMix64 finalizer;
    ``k0`` is the low and ``k1`` the high 32 bits of ``z``. Negative integers are taken
    modulo 2^64 (two's complement). Computed here once and passed to every backend.
    """
    z = _splitmix64(_splitmix64(seed & _U64) ^ (step & _U64))
    return z & _U32, z >> 32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a result computed from ``x`` should have: channels_last iff ``x`` is
    channels_last-contiguous and not NCHW-contiguous (one rule for the reference and every
    backend, kept in the kernels' torch-only layout module)."""
    return out_format(x)


# ---------------------------------------------------------------------------------------
# counter-based RNG: Philox4x32-10
# ---------------------------------------------------------------------------------------

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def philox4x32_10(c0: int, c1: int, c2: int, c3: int, k0: int, k1: int) -> Tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al. 2011; the Random123 / cuRAND constants) of the counter
    ``(c0, c1, c2, c3)`` under the key ``(k0, k1)``: four uint32 words. Mirrored in
    ``csrc/include/mixfast/philox.h`` and ``kernels/mix.py``."""
    for _ in range(10):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _U32, (p0 >> 32) ^ c3 ^ k1, p0 & _U32
        k0 = (k0 + _PHILOX_W0) & _U32
        k1 = (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
#
# A mask is a pure function of (key, sample): every random number is a Philox word with
# counter (draw, sample, kind, 0), kind 0 = block, 1 = discrete. The float math that turns
# words into block sizes is float32, one correctly rounded operation at a time, in the
# order written below -- the CPU, CUDA and Triton backends do exactly the same operations,
# so every backend draws bit-identical masks. (exp is a fixed polynomial rather than a
# library call, because expf differs by an ulp between libm, CUDA and numpy.)

_F32 = np.float32
_TWO_M24 = _F32(2.0**-24)
_LOG_ASPECT_LO = _F32(float.fromhex("-0x1.34379p+0"))   # float32(log 0.3)
_LOG_ASPECT_SPAN = _F32(float.fromhex("0x1.34379p+1"))  # float32(log(1/0.3) - log 0.3)
# float32(1/k!) for k = 11, 10, ..., 0 (Horner order), as exact hex floats.
_EXP_COEFFS = tuple(_F32(float.fromhex(h)) for h in (
    "0x1.ae6456p-26", "0x1.27e4fcp-22", "0x1.71de3ap-19", "0x1.a01a02p-16", "0x1.a01a02p-13", "0x1.6c16c2p-10",
    "0x1.111112p-7", "0x1.555556p-5", "0x1.555556p-3", "0x1.0p-1", "0x1.0p+0", "0x1.0p+0"))


def _uniform01(word: int) -> np.float32:
    """Float32 in [0, 1): the top 24 bits of ``word`` times 2^-24 (exact)."""
    return _F32(word >> 8) * _TWO_M24


def _uniform_below(word: int, n: int) -> int:
    """Integer in [0, n) by multiply-shift: ``(word * n) >> 32``."""
    return (word * n) >> 32


def _exp_poly(t: np.float32) -> np.float32:
    """exp(t) for |t| <= 1.21: degree-11 Taylor polynomial by Horner in float32."""
    p = _EXP_COEFFS[0]
    for c in _EXP_COEFFS[1:]:
        p = p * t + c  # two float32 roundings (numpy never fuses)
    return p


def _round_half_even(v: np.float32) -> int:
    """Python's ``round`` (half to even) of a non-negative float32, with exact steps."""
    f = np.floor(v)
    d = v - f
    r = int(f)
    if d > 0.5 or (d == 0.5 and r & 1):
        r += 1
    return r


@dataclass(frozen=True)
class MaskSpec:
    """Integers that define a mask draw, computed once here and handed to every backend
    (the native struct ``mixfast::MaskSpec``)."""

    grid: int
    kind: int          # 0 block, 1 discrete
    num: int           # block: target number of ones, clamp(int(ratio*g^2), 1, g^2-1)
    min_patches: int   # block: min(4, num, (g-1)^2)
    threshold24: int   # discrete: a cell is 1 iff (word >> 8) < threshold24 = ceil(ratio * 2^24)
    key0: int
    key1: int


def mask_spec(grid: int, ratio: float, kind: str, seed: int, step: int) -> MaskSpec:
    """The :class:`MaskSpec` of ``make_masks(..., grid, ratio, kind, seed=seed, step=step)``.

    * ``num = clamp(int(ratio*g^2), 1, g^2-1)`` ones for a block mask.
    * ``min_patches = min(4, num, (g-1)^2)``. BEiT uses 4, but every block must satisfy
      ``h < g`` and ``w < g``, so the largest placeable block has ``(g-1)^2`` cells; at
      ``g = 2`` that is a single cell and no block of area >= 4 could ever be placed.
      Clamping to ``num`` keeps the first draw's range ``U(min_patches, num)``
      non-degenerate for tiny targets. For ``g >= 3`` and ``num >= 4`` this is BEiT's 4.
    * ``threshold24 = ceil(ratio * 2^24)``: ``u < ratio`` for ``u = (word >> 8) / 2^24``.
    """
    cells = grid * grid
    num = min(max(int(ratio * cells), 1), cells - 1)
    k0, k1 = mask_key(seed, step)
    return MaskSpec(
        grid=grid,
        kind=_MASK_KINDS.index(kind),
        num=num,
        min_patches=min(_BLOCK_MIN_PATCHES, num, (grid - 1) ** 2),
        threshold24=min(max(math.ceil(ratio * 2**24), 1), 2**24),
        key0=k0,
        key1=k1,
    )


def _block_candidate(spec: MaskSpec, sample: int, draw: int, rem: int) -> Tuple[int, int, int, int, bool]:
    """Attempt ``draw`` of the BEiT generator when ``rem`` cells are still wanted:
    ``(h, w, top, left, fits)``.

    With Philox words ``(w0, w1, w2, w3)`` of counter ``(draw, sample, 0, 0)``::

        area   = min_patches + (rem - min_patches) * u(w0)            random.uniform(a, b)
        aspect = exp(log 0.3 + (log(1/0.3) - log 0.3) * u(w1))
        h = round(sqrt(area * aspect)),  w = round(sqrt(area / aspect))
        fits = h < g and w < g                                        (strict, as BEiT)
        top  = randint(0, g - h) from w2,  left = randint(0, g - w) from w3
    """
    w0, w1, w2, w3 = philox4x32_10(draw, sample, 0, 0, spec.key0, spec.key1)
    area = _F32(spec.min_patches) + _F32(rem - spec.min_patches) * _uniform01(w0)
    aspect = _exp_poly(_LOG_ASPECT_LO + _LOG_ASPECT_SPAN * _uniform01(w1))
    h = _round_half_even(np.sqrt(area * aspect))
    w = _round_half_even(np.sqrt(area / aspect))
    g = spec.grid
    fits = h < g and w < g
    top = _uniform_below(w2, g - h + 1) if fits else 0
    left = _uniform_below(w3, g - w + 1) if fits else 0
    return h, w, top, left, fits


def block_mask_rows(spec: MaskSpec, sample: int) -> List[int]:
    """BEiT block mask (MixMask's "block" pattern) of ``sample``: ``g`` row bitmasks (bit ``c`` of row ``r`` =
    cell ``(r, c)``) with at most ``num`` ones.

    ``while count < num``: add one block -- up to 10 attempts (each one Philox draw, the
    draw index running on across the whole mask) of :func:`_block_candidate`, accepted when
    it fits and the number of cells it newly sets, ``fresh``, satisfies
    ``0 < fresh <= num - count``; stop when an addition adds nothing. The count never
    overshoots ``num``; it may undershoot when no block fits any more. An all-0 mask (the
    first block never placed) is redrawn with the draws continuing; after 1000 such
    redraws (never seen) the mask is a single 1 in cell (0, 0).
    """
    g = spec.grid
    draw = 0
    for _ in range(_MAX_REDRAWS):
        rows = [0] * g
        count = 0
        while count < spec.num:
            rem = spec.num - count
            added = 0
            for _attempt in range(_BLOCK_ATTEMPTS):
                h, w, top, left, fits = _block_candidate(spec, sample, draw, rem)
                draw += 1
                if not fits:
                    continue
                bits = ((1 << w) - 1) << left
                fresh = h * w - sum((rows[r] & bits).bit_count() for r in range(top, top + h))
                if 0 < fresh <= rem:
                    for r in range(top, top + h):
                        rows[r] |= bits
                    added = fresh
                    break
            if added == 0:
                break
            count += added
        if count > 0:
            return rows
    return [1] + [0] * (g - 1)


def discrete_mask_rows(spec: MaskSpec, sample: int) -> List[int]:
    """i.i.d. mask of ``sample``: cell ``k = r*g + c`` (row-major) is 1 iff
    ``(word >> 8) < threshold24``, i.e. ``u < ratio``, with ``word`` = word ``k % 4`` of the
    Philox draw ``(round * ceil(g^2/4) + k // 4, sample, 1, 0)``. Redrawn (``round + 1``)
    while all-0 or all-1; after 1000 constant draws (only for ratios within ~1e-3 of 0 or 1
    on tiny grids) the mask is one 1 in cell (0, 0) for ratio < 1/2, else all ones but it.

    Note: the public MixMask code draws ``P(1) = 1 - ratio``; mixfast uses ``P(1) = ratio``
    so that ``ratio`` is always the expected fraction kept from the original image. Both
    agree at the default 0.5.
    """
    g = spec.grid
    cells = g * g
    draws = (cells + 3) // 4
    for rnd in range(_MAX_REDRAWS):
        rows = [0] * g
        count = 0
        for q in range(draws):
            words = philox4x32_10(rnd * draws + q, sample, 1, 0, spec.key0, spec.key1)
            for j, word in enumerate(words):
                cell = 4 * q + j
                if cell < cells and (word >> 8) < spec.threshold24:
                    rows[cell // g] |= 1 << (cell % g)
                    count += 1
        if 0 < count < cells:
            return rows
    if spec.threshold24 < 2**23:
        return [1] + [0] * (g - 1)
    full = (1 << g) - 1
    return [full & ~1] + [full] * (g - 1)


def _rows_to_tensor(rows: List[int], grid: int) -> torch.Tensor:
    bits = np.array(rows, dtype=np.uint64)[:, None] >> np.arange(grid, dtype=np.uint64)[None, :]
    return torch.from_numpy((bits & np.uint64(1)).astype(np.bool_))


def check_make_masks_args(n, grid, ratio, kind, seed, step) -> None:
    """Argument checks of :func:`make_masks`, shared by every backend."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"make_masks: n must be an int >= 1, got n={n!r}")
    if not _is_int(grid) or not (_MIN_GRID <= grid <= _MAX_GRID):
        raise ValueError(f"make_masks: grid must be an int in [{_MIN_GRID}, {_MAX_GRID}], got grid={grid!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) < 1.0):
        raise ValueError(f"make_masks: ratio must be a number with 0 < ratio < 1, got ratio={ratio!r}")
    if kind not in _MASK_KINDS:
        raise ValueError(f"make_masks: kind must be one of {_MASK_KINDS}, got kind={kind!r}")
    if not _is_int(seed):
        raise TypeError(f"make_masks: seed must be an int, got seed={seed!r}")
    if not _is_int(step):
        raise TypeError(f"make_masks: step must be an int, got step={step!r}")


def make_masks(n: int, grid: int, ratio: float, kind: str = "block", *, seed: int, step: int) -> torch.Tensor:
    """Draw ``n`` MixMask grid masks, a deterministic pure function of its arguments.

    Returns a CPU ``torch.bool`` tensor ``[n, grid, grid]``; 1 = cell kept from the original
    image ``x_i``, 0 = cell taken from the filler.

    Randomness: Philox4x32-10 keyed by :func:`mask_key` ``(seed, step)``, counters from
    ``(draw index, sample i)`` (see :func:`block_mask_rows`, :func:`discrete_mask_rows`).
    Mask ``i`` therefore does not depend on ``n``, the global RNGs (Python, NumPy, torch)
    are never touched, and every backend (CPU C++, CUDA, Triton) draws the same bits.

    ``kind="block"``: the BEiT block-masking generator, ``int(ratio*grid^2)`` ones (clamped
    to ``[1, grid^2-1]``), never more, occasionally fewer.
    ``kind="discrete"``: each cell 1 independently with probability ``ratio``.
    No mask is ever all-0 or all-1 (such draws are redrawn).

    Raises ``ValueError`` unless ``n >= 1``, ``2 <= grid <= 64``, ``0 < ratio < 1`` and
    ``kind in {"block", "discrete"}``; ``TypeError`` if ``seed``/``step`` are not ints.
    """
    check_make_masks_args(n, grid, ratio, kind, seed, step)
    spec = mask_spec(grid, float(ratio), kind, seed, step)
    draw = block_mask_rows if kind == "block" else discrete_mask_rows
    return torch.stack([_rows_to_tensor(draw(spec, i), grid) for i in range(n)], 0)


def _nearest_indices(in_size: int, out_size: int, device) -> torch.Tensor:
    """Source index of every output position, exactly as ``F.interpolate(mode="nearest")``.

    ``src(y) = min(floor(float32(y) * float32(in/out)), in - 1)`` with the product in
    float32, which is what PyTorch's CPU and CUDA kernels compute. Note this is *not*
    always the exact rational ``floor(y*in/out)``: when ``y*in/out`` is an integer and
    ``float32(in/out)`` rounds down, PyTorch's index is one smaller (e.g. in=2, out=82).
    We follow PyTorch so that any backend can be checked against ``F.interpolate``.
    """
    if out_size == in_size:
        return torch.arange(out_size, device=device)
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    pos = torch.arange(out_size, dtype=torch.float32) * scale
    return torch.clamp(torch.floor(pos).long(), max=in_size - 1).to(device)


def upsample_masks(masks: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of grid masks ``[n, g, g]`` (bool) to ``[n, H, W]`` (bool).

    ``out[k, y, x] = masks[k, iy(y), ix(x)]`` with ``iy``/``ix`` the nearest-neighbour source
    indices of ``F.interpolate(mode="nearest")`` (``~ floor(y*g/H)``, see
    :func:`_nearest_indices`). ``H`` and ``W`` need not be multiples of ``g``. The result is
    on ``masks``' device.
    """
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
        raise ValueError(
            "upsample_masks: masks must be a bool tensor [n, g, g], got "
            + (f"{masks.dtype} of shape {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else repr(type(masks)))
        )
    if not _is_int(H) or not _is_int(W) or H < 1 or W < 1:
        raise ValueError(f"upsample_masks: H and W must be ints >= 1, got H={H!r}, W={W!r}")
    gh, gw = masks.shape[1], masks.shape[2]
    iy = _nearest_indices(gh, H, masks.device)
    ix = _nearest_indices(gw, W, masks.device)
    return masks[:, iy][:, :, ix]


# ---------------------------------------------------------------------------------------
# MixMask mixing
# ---------------------------------------------------------------------------------------


# --- argument checks, shared by the reference and the fused ops (mixfast/ops/mix.py) -----------


def _describe(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else repr(type(t))


def check_image_batch(op: str, x) -> None:
    """x is a 4-D floating tensor [B, C, H, W]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: x must be a tensor, got {type(x)!r}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point, got dtype {x.dtype}")


def check_masks(op: str, masks, B: int) -> None:
    """masks is a bool tensor [1 or B, g, g'] (one mask per batch, or per sample)."""
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise ValueError(f"{op}: masks must be a torch.bool tensor, got "
                         + (str(masks.dtype) if isinstance(masks, torch.Tensor) else repr(type(masks))))
    if masks.dim() != 3 or masks.shape[0] not in (1, B):
        raise ValueError(f"{op}: masks must have shape [1, g, g] or [B={B}, g, g], got {tuple(masks.shape)}")


def check_perm(op: str, perm, B: int, device: torch.device, validate: bool = True) -> None:
    """perm is a 1-D int64 tensor of length B on x's device and, when `validate`, a permutation of range(B).

    The value check reads perm on the host: free for a CPU tensor, a device sync for a GPU one, and never a
    device-side assert (which would leave the CUDA context unusable). Callers that drew the permutation themselves
    (with torch.randperm) skip it with validate=False."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.long or perm.dim() != 1 or perm.numel() != B:
        raise ValueError(f"{op}: perm must be a 1-D int64 tensor of length B={B}, got {_describe(perm)}")
    if perm.device != device:
        raise ValueError(f"{op}: perm must be on x's device {device}, got {perm.device}")
    if validate and not torch.compiler.is_compiling():
        host = perm.detach().cpu()
        if not torch.equal(torch.sort(host).values, torch.arange(B)):
            shown = host.tolist() if B <= 16 else host[:16].tolist() + ["..."]
            raise ValueError(f"{op}: perm must be a permutation of range({B}), got {shown}")


def check_filler(op: str, filler, x: torch.Tensor, want_switch: bool) -> None:
    """An erase baseline's filler: shaped, typed and placed like x; no switch image with it."""
    if want_switch:
        raise ValueError(f"{op}: want_switch=True is not allowed with a filler (erase baselines have no switch)")
    if not isinstance(filler, torch.Tensor) or filler.shape != x.shape or filler.dtype != x.dtype:
        raise ValueError(f"{op}: filler must be a tensor shaped like x {tuple(x.shape)} with dtype {x.dtype}, "
                         f"got {_describe(filler)}")
    if filler.device != x.device:
        raise ValueError(f"{op}: filler must be on x's device {x.device}, got {filler.device}")


def check_mix_args(op: str, x, masks, perm, filler, want_switch: bool, validate: bool = True) -> None:
    """Every check of :func:`mix`'s arguments (perm is required unless a filler is given)."""
    check_image_batch(op, x)
    B = x.shape[0]
    check_masks(op, masks, B)
    if filler is not None:
        check_filler(op, filler, x, want_switch)
    elif perm is None:
        raise ValueError(f"{op}: perm is required unless a filler is given")
    if perm is not None:
        check_perm(op, perm, B, x.device, validate)


def check_lam(op: str, lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= float(lam) <= 1.0):
        raise ValueError(f"{op}: lam must be a number in [0, 1], got lam={lam!r}")
    return float(lam)


def check_unmix_box(op: str, box, use_mixup: bool, lam: float, H: int, W: int):
    """(box, lam_effective) of Un-Mix: no box for mixup (lam_effective = lam); for CutMix the given box, checked,
    or one drawn by :func:`rand_bbox`, and lam_effective = 1 - box area / (H W)."""
    if use_mixup:
        if box is not None:
            raise ValueError(f"{op}: box is only meaningful for CutMix (use_mixup=False)")
        return None, lam
    if box is None:
        box = rand_bbox(H, W, lam)
    if not isinstance(box, (tuple, list)) or len(box) != 4 or not all(_is_int(v) for v in box):
        raise ValueError(f"{op}: box must be a tuple of 4 ints (y1, y2, x1, x2), got {box!r}")
    y1, y2, x1, x2 = (int(v) for v in box)
    if not (0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W):
        raise ValueError(f"{op}: box must satisfy 0<=y1<=y2<=H={H} and 0<=x1<=x2<=W={W}, got {tuple(box)!r}")
    return (y1, y2, x1, x2), 1.0 - ((y2 - y1) * (x2 - x1)) / float(H * W)


def mix(
    x: torch.Tensor,
    masks: torch.Tensor,
    perm: Optional[torch.Tensor],
    want_switch: bool = False,
    *,
    filler: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """MixMask mixing (filling, the paper's Eq. 1-2): returns ``(mixed, switch or None, lam)``.

    With ``m`` the mask upsampled to ``H x W`` (:func:`upsample_masks`), broadcast over
    channels (and over the batch when ``masks`` is ``[1, g, g]``; per sample when it is
    ``[B, g, g]``), and ``f_i = x[perm[i]]`` (or ``filler[i]`` when ``filler`` is given)::

        mixed_i  = m_i * x_i + (1 - m_i) * f_i
        switch_i = m_i * f_i + (1 - m_i) * x_i        (only if want_switch)
        lam_i    = popcount(m_i) / (H * W)            (float32, exact fraction of ones)

    Both images are computed by *selection* (``torch.where``), so every output pixel is
    bit-identical to a pixel of ``x`` / ``f``. Outputs keep ``x``'s dtype and memory format
    (NCHW or channels_last); ``lam`` is float32 on ``x``'s device with shape ``[1]`` or ``[B]``.

    Pairing identities (per-batch mask, ``perm = pi``): on the region ``m = 1``,
    ``switch_i = x_pi(i) = mixed_pi(i)``; on ``m = 0``, ``switch_i = x_i = mixed_pi^-1(i)``.
    Hence ``switch = where(m, mixed[pi], mixed[argsort(pi)])`` and, for an involution such as
    ``flip``, ``switch = mixed[pi]`` exactly (no second forward pass needed).

    ``filler`` (same shape, dtype and device as ``x``) replaces ``x[perm]`` -- used for the
    zero / noise erase baselines, which have no switch term: ``want_switch=True`` together
    with ``filler`` raises. ``perm`` may then be ``None`` (it is ignored if given).

    Validation (``ValueError``): ``x`` 4-D floating; ``masks`` bool 3-D with first dim 1 or
    B; ``perm`` a 1-D int64 permutation of ``range(B)`` on ``x``'s device. ``masks`` may
    live on the CPU; they are moved to ``x``'s device.
    """
    check_mix_args("mix", x, masks, perm, filler, want_switch)
    B, C, H, W = x.shape
    if filler is not None:
        perm = None  # ignored with a filler

    fmt = _memory_format(x)
    f = filler if filler is not None else x[perm]
    m = upsample_masks(masks.to(x.device), H, W)[:, None]  # [1 or B, 1, H, W] bool

    mixed = torch.where(m, x, f).contiguous(memory_format=fmt)
    switch = torch.where(m, f, x).contiguous(memory_format=fmt) if want_switch else None
    count = m.sum(dim=(1, 2, 3))  # int64 popcount per mask
    lam = (count.to(torch.float64) / float(H * W)).to(torch.float32)
    return mixed, switch, lam


# ---------------------------------------------------------------------------------------
# Un-Mix
# ---------------------------------------------------------------------------------------


def rand_bbox(H: int, W: int, lam: float, generator: Optional[torch.Generator] = None) -> Tuple[int, int, int, int]:
    """CutMix box (as the Un-Mix and CutMix reference code draw it). Returns ``(y1, y2, x1, x2)``.

    ``cut = sqrt(1 - lam)``, ``cw = int(W*cut)``, ``ch = int(H*cut)``; centre
    ``cx ~ randint(0, W-1)`` then ``cy ~ randint(0, H-1)`` (uniform, ``torch.randint`` with
    ``generator``; drawn in that order); ``x1 = clip(cx - cw//2, 0, W)``,
    ``x2 = clip(cx + cw//2, 0, W)``, ``y1 = clip(cy - ch//2, 0, H)``,
    ``y2 = clip(cy + ch//2, 0, H)``. The box covers rows ``y1:y2`` and columns ``x1:x2``
    (half-open), so it may be empty and is smaller than ``ch x cw`` near the borders.
    """
    if not _is_int(H) or not _is_int(W) or H < 1 or W < 1:
        raise ValueError(f"rand_bbox: H and W must be ints >= 1, got H={H!r}, W={W!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= float(lam) <= 1.0):
        raise ValueError(f"rand_bbox: lam must be a number in [0, 1], got lam={lam!r}")
    cut = math.sqrt(1.0 - float(lam))
    cw = int(W * cut)
    ch = int(H * cut)
    cx = int(torch.randint(0, W, (1,), generator=generator).item())
    cy = int(torch.randint(0, H, (1,), generator=generator).item())
    x1 = min(max(cx - cw // 2, 0), W)
    x2 = min(max(cx + cw // 2, 0), W)
    y1 = min(max(cy - ch // 2, 0), H)
    y2 = min(max(cy + ch // 2, 0), H)
    return y1, y2, x1, x2


def unmix(
    x: torch.Tensor,
    lam: float,
    use_mixup: bool,
    box: Optional[Tuple[int, int, int, int]] = None,
) -> Tuple[torch.Tensor, float]:
    """Un-Mix image mixture with the flip partner (Shen et al.). Returns ``(x_um, lam_effective)``.

    Partner: ``flip(x)_i = x_{B-1-i}`` (for odd B the middle image pairs with itself).

    * Mixup (``use_mixup=True``): ``x_um = lam * x + (1 - lam) * flip(x)``, evaluated in
      float32 (float64 for float64 input) and rounded once to ``x``'s dtype;
      ``lam_effective = lam``.
    * CutMix: ``box = (y1, y2, x1, x2)`` as given, else drawn by :func:`rand_bbox` with the
      default torch generator; ``x_um = x`` except ``x_um[:, :, y1:y2, x1:x2] =
      flip(x)[:, :, y1:y2, x1:x2]``; ``lam_effective = 1 - (y2-y1)(x2-x1)/(H*W)``.

    ``x_um`` keeps ``x``'s dtype and memory format. ``lam_effective`` is a Python float.
    """
    check_image_batch("unmix", x)
    lam = check_lam("unmix", lam)
    B, C, H, W = x.shape
    fmt = _memory_format(x)
    partner = x.flip(0)
    box, lam_eff = check_unmix_box("unmix", box, use_mixup, lam, H, W)
    if use_mixup:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = lam * x.to(acc) + (1.0 - lam) * partner.to(acc)
        return out.to(x.dtype).contiguous(memory_format=fmt), lam
    y1, y2, x1, x2 = box
    out = x.clone().contiguous(memory_format=fmt)
    out[:, :, y1:y2, x1:x2] = partner[:, :, y1:y2, x1:x2]
    return out, lam_eff


# ---------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------


def _desc(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(type(t))


def check_soft_infonce_args(q, keys, queue, pos, tau, exclude, check_values: bool = True) -> float:
    """Raise ValueError on bad shapes, dtypes, devices, index ranges or tau; return tau as float.

    Shared by the reference and the fused op. `check_values=False` skips the checks that
    read tensor values (index ranges), which torch.compile cannot trace without a graph
    break; the fused op passes it while compiling.
    """

    for name, t in (("q", q), ("keys", keys)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"soft_infonce: {name} must be a 2-D floating tensor, got {_desc(t)}")
    M, D = q.shape
    N = keys.shape[0]
    if keys.shape[1] != D:
        raise ValueError(f"soft_infonce: keys must be [N, D={D}], got {tuple(keys.shape)}")
    if keys.device != q.device:
        raise ValueError(f"soft_infonce: keys must be on q's device {q.device}, got {keys.device}")
    if queue is not None:
        if not isinstance(queue, torch.Tensor) or queue.dim() != 2 or not queue.is_floating_point():
            raise ValueError(f"soft_infonce: queue must be a 2-D floating tensor or None, got {_desc(queue)}")
        if queue.shape[1] != D:
            raise ValueError(f"soft_infonce: queue must be [K, D={D}], got {tuple(queue.shape)}")
        if queue.device != q.device:
            raise ValueError(f"soft_infonce: queue must be on q's device {q.device}, got {queue.device}")
        if exclude is not None:
            raise ValueError("soft_infonce: exclude is only supported in in-batch mode (queue=None)")
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.long or pos.dim() != 2 or pos.shape[0] != M:
        raise ValueError(f"soft_infonce: pos must be an int64 tensor [M={M}, P], got {_desc(pos)}")
    if pos.device != q.device:
        raise ValueError(f"soft_infonce: pos must be on q's device {q.device}, got {pos.device}")
    if check_values and pos.numel() > 0 and (int(pos.min()) < 0 or int(pos.max()) >= N):
        raise ValueError(f"soft_infonce: pos entries must lie in [0, N={N}), got range [{int(pos.min())}, {int(pos.max())}]")
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.long or exclude.shape != (M,):
            raise ValueError(f"soft_infonce: exclude must be an int64 tensor [M={M}], got {_desc(exclude)}")
        if exclude.device != q.device:
            raise ValueError(f"soft_infonce: exclude must be on q's device {q.device}, got {exclude.device}")
        if check_values and M > 0 and (int(exclude.min()) < -1 or int(exclude.max()) >= N):
            raise ValueError(
                f"soft_infonce: exclude entries must lie in [-1, N={N}), got range [{int(exclude.min())}, {int(exclude.max())}]"
            )
        if check_values and bool((pos == exclude[:, None]).any()):
            raise ValueError("soft_infonce: a positive index equals the excluded index of its row")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (float(tau) > 0.0) or not math.isfinite(tau):
        raise ValueError(f"soft_infonce: tau must be a finite number > 0, got tau={tau!r}")
    return float(tau)


def soft_infonce(
    q: torch.Tensor,
    keys: torch.Tensor,
    queue: Optional[torch.Tensor],
    pos: torch.Tensor,
    tau: float,
    exclude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-term InfoNCE cross-entropies with one or several positives per query row.

    Shapes: ``q [M, D]``, ``keys [N, D]``, ``queue [K, D]`` or ``None``, ``pos [M, P]``
    (int64 indices into ``keys``), ``exclude [M]`` (int64, only without a queue). Vectors
    are used as given (the caller L2-normalizes). Returns ``out [M, P]``.

    MoCo mode (``queue`` given) -- each term has its own positive in the denominator and
    the other keys are *not* negatives::

        s_rp      = q_r . keys[pos[r, p]] / tau
        out[r, p] = logsumexp(s_rp, q_r . queue_1 / tau, ..., q_r . queue_K / tau) - s_rp
                  = CE([s_rp, q_r queue^T / tau], label 0)

    In-batch mode (``queue is None``; SimCLR-style, the positive is among the keys)::

        out[r, p] = logsumexp_{j != exclude[r]} (q_r . keys_j / tau) - q_r . keys[pos[r, p]] / tau

    where ``exclude[r] = -1`` excludes nothing for that row; ``pos[r, p] == exclude[r]`` is
    rejected (the positive would be missing from its own denominator).

    Precision: computed in float32 (bf16 / fp16 inputs are upcast; the result is float32),
    or in float64 if any of ``q``, ``keys``, ``queue`` is float64. Differentiable in ``q``
    and ``keys``; the queue is detached (never receives a gradient).

    Raises ``ValueError`` on bad shapes, dtypes, devices, index ranges or ``tau <= 0``.
    """
    tau = check_soft_infonce_args(q, keys, queue, pos, tau, exclude)

    tensors = (q, keys) if queue is None else (q, keys, queue)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    qf = q.to(acc)
    kf = keys.to(acc)

    if queue is not None:
        # s[r, p] = q_r . keys[pos[r, p]] / tau
        s = torch.einsum("md,mpd->mp", qf, kf[pos]) / tau
        neg = qf @ queue.detach().to(acc).t() / tau  # [M, K]
        lse_neg = torch.logsumexp(neg, dim=1, keepdim=True)  # [M, 1]; -inf when K == 0
        return torch.logaddexp(s, lse_neg) - s

    logits = qf @ kf.t() / tau  # [M, N]
    s = torch.gather(logits, 1, pos)  # [M, P]
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        drop = torch.zeros_like(logits, dtype=torch.bool)
        drop[rows, exclude[rows]] = True
        logits = logits.masked_fill(drop, float("-inf"))
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # [M, 1]
    return lse - s


def check_occlude_args(x, masks, fill=None) -> None:
    check_image_batch("occlude", x)
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or not masks.is_floating_point():
        raise ValueError(f"occlude: masks must be a float tensor [B, N, H, W], got {_describe(masks)}")
    if masks.size(0) != x.size(0) or masks.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"occlude: masks {tuple(masks.shape)} must be [B, N, H, W] for images {tuple(x.shape)}")
    if masks.device != x.device:
        raise ValueError(f"occlude: masks are on {masks.device}, images on {x.device}")
    if fill is not None:
        if not isinstance(fill, torch.Tensor) or fill.shape != (x.size(1),) or not fill.is_floating_point():
            raise ValueError(f"occlude: fill must be a float tensor [C] = [{x.size(1)}] (one value per channel), "
                             f"got {_describe(fill)}")
        if fill.device != x.device:
            raise ValueError(f"occlude: fill is on {fill.device}, images on {x.device}")


def occlude(x: torch.Tensor, masks: torch.Tensor, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The N occluded copies of a batch: out[k, b] = x[b] * (1 - masks[b, k]) + fill * masks[b, k]
    (1 = removed; fill [C] per channel, None = 0).

    x [B, C, H, W], masks [B, N, H, W] in [0, 1] -> [N, B, C, H, W] in x's dtype; one copy per mask."""
    check_occlude_args(x, masks, fill)
    copies = []
    for k in range(masks.size(1)):
        copy = x * (1 - masks[:, k:k + 1]).to(x.dtype)
        if fill is not None:
            copy = copy + fill.to(x.dtype).view(1, -1, 1, 1) * masks[:, k:k + 1].to(x.dtype)
        copies.append(copy)
    return torch.stack(copies)


# ---------------------------------------------------------------------------------------
# MixedAE: group mixing ("compose") and homologous TopK attention
# ---------------------------------------------------------------------------------------
#
# Fast ops: mixfast/ops/group_mix.py (group_cell_map, group_mix), mixfast/ops/topk_attention.py.

__all__ += [
    "group_cell_map",
    "group_mix",
    "topk_mask",
    "topk_attention",
    "topk_accuracy",
    "check_group_cell_map_args",
    "check_group_mix_args",
    "check_topk_attention_args",
    "check_segment_ids",
]

# Third Philox counter word of the MixedAE group cell maps (MixMask masks use 0 = block, 1 = discrete), so that a
# cell map and a MixMask mask of the same (seed, step) never share a random word.
GROUP_MAP_STREAM = 2


def check_group_cell_map_args(num_groups, group_size, cells_side, seed, step) -> None:
    """Argument checks of :func:`group_cell_map` (shared with the fast op)."""
    if not _is_int(num_groups) or num_groups < 1:
        raise ValueError(f"group_cell_map: num_groups must be an int >= 1, got num_groups={num_groups!r}")
    if not _is_int(cells_side) or cells_side < 1:
        raise ValueError(f"group_cell_map: cells_side must be an int >= 1, got cells_side={cells_side!r}")
    if not _is_int(group_size) or not (1 <= group_size <= cells_side * cells_side):
        raise ValueError(f"group_cell_map: group_size must be an int in [1, cells_side^2 = {cells_side * cells_side}] "
                         f"(every image of a group gets at least one cell), got group_size={group_size!r}")
    if not _is_int(seed):
        raise TypeError(f"group_cell_map: seed must be an int, got seed={seed!r}")
    if not _is_int(step):
        raise TypeError(f"group_cell_map: step must be an int, got step={step!r}")


def _group_words(key: Tuple[int, int], group: int, count: int) -> List[int]:
    """The first ``count`` random words of group ``group``: word ``t`` is word ``t % 4`` of the Philox draw
    ``(t // 4, group, GROUP_MAP_STREAM, 0)``."""
    words: List[int] = []
    for draw in range((count + 3) // 4):
        words.extend(philox4x32_10(draw, group, GROUP_MAP_STREAM, 0, key[0], key[1]))
    return words[:count]


def group_cell_map(num_groups: int, group_size: int, cells_side: int, *, seed: int, step: int) -> torch.Tensor:
    """MixedAE's balanced assignment of mask cells to the images of each group ("compose" mixing).

    Returns a CPU int64 tensor ``[num_groups, cells_side, cells_side]``: entry ``(g, r, c)`` is the index
    ``i in [0, group_size)`` of the image of group ``g`` whose pixels fill cell ``(r, c)`` of the mixed sample.
    With ``n = cells_side^2`` cells, every image gets ``n // group_size`` cells and ``n % group_size`` randomly chosen
    images one more (49 cells over 4 images: 12/12/12/13), so per-group counts differ by at most one.

    Randomness: Philox4x32-10 keyed by :func:`mask_key` ``(seed, step)``; group ``g`` reads its words
    ``w_0, w_1, ...`` in order from the draws ``(t, g, 2, 0)``, ``t = 0, 1, ...`` (four words per draw). A 64-bit key
    is two consecutive words ``(w_2j << 32) | w_2j+1``:

    * image order: images sorted by the keys ``j = 0 .. group_size-1`` (ties by index) -- a random permutation
      ``order``; the images ``order[0 .. n % group_size - 1]`` are the ones with an extra cell;
    * labels: ``label_c = order[c mod group_size]`` for ``c = 0 .. n-1``;
    * cells: the cells (row-major index ``c``) sorted by the keys ``j = group_size + c`` (ties by index); the
      ``c``-th cell in that order gets ``label_c``.

    A deterministic pure function of its arguments: every rank and every backend computes the same map without
    communication, group ``g`` does not depend on ``num_groups``, and no global RNG is touched.
    """
    check_group_cell_map_args(num_groups, group_size, cells_side, seed, step)
    key = mask_key(seed, step)
    n = cells_side * cells_side
    out = torch.empty((num_groups, n), dtype=torch.int64)
    for g in range(num_groups):
        w = _group_words(key, g, 2 * (group_size + n))
        keys = [(w[2 * j] << 32) | w[2 * j + 1] for j in range(group_size + n)]
        order = sorted(range(group_size), key=lambda i: (keys[i], i))
        cells = sorted(range(n), key=lambda c: (keys[group_size + c], c))
        row = [0] * n
        for rank, cell in enumerate(cells):
            row[cell] = order[rank % group_size]
        out[g] = torch.tensor(row, dtype=torch.int64)
    return out.view(num_groups, cells_side, cells_side)


def check_group_mix_args(x, cell_map, token_patch, group_size=None, check_values: bool = True) -> Tuple[int, int]:
    """Argument checks of :func:`group_mix` (shared with the fast op); returns ``(num_groups, group_size)``.
    ``check_values=False`` skips the range check of the cell map's entries (it reads the map on the host)."""
    op = "group_mix"
    check_image_batch(op, x)
    B, C, H, W = x.shape
    if not isinstance(cell_map, torch.Tensor) or cell_map.dtype != torch.long or cell_map.dim() != 3 \
            or cell_map.shape[1] != cell_map.shape[2] or cell_map.shape[0] < 1 or cell_map.shape[1] < 1:
        raise ValueError(f"{op}: cell_map must be an int64 tensor [G, cells_side, cells_side], got {_describe(cell_map)}")
    if cell_map.device.type != "cpu" and cell_map.device != x.device:
        raise ValueError(f"{op}: cell_map must be on the CPU or on x's device {x.device}, got {cell_map.device}")
    G, cs = cell_map.shape[0], cell_map.shape[1]
    if group_size is None:
        if B % G:
            raise ValueError(f"{op}: the batch of x ({B}) must be a multiple of the number of groups in cell_map ({G})")
        group_size = B // G
    elif not _is_int(group_size) or group_size < 1:
        raise ValueError(f"{op}: group_size must be an int >= 1, got group_size={group_size!r}")
    if B != G * group_size:
        raise ValueError(f"{op}: the batch of x ({B}) must be num_groups * group_size = {G} * {group_size} "
                         f"(cell_map has {G} groups)")
    if H % cs or W % cs:
        raise ValueError(f"{op}: x's height and width ({H}, {W}) must be multiples of the cell_map's side {cs}")
    if not _is_int(token_patch) or token_patch < 1 or (H // cs) % token_patch or (W // cs) % token_patch:
        raise ValueError(f"{op}: token_patch must be an int >= 1 that divides the cell size "
                         f"({H // cs} x {W // cs} pixels), got token_patch={token_patch!r}")
    if check_values and cell_map.numel() and not torch.compiler.is_compiling():
        lo, hi = int(cell_map.min()), int(cell_map.max())
        if lo < 0 or hi >= group_size:
            raise ValueError(f"{op}: cell_map entries must lie in [0, group_size={group_size}), got range [{lo}, {hi}]")
    return G, group_size


def group_mix(x: torch.Tensor, cell_map: torch.Tensor, token_patch: int,
              group_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MixedAE "compose" mixing (the appendix's Eq. A1, ``sum_i 1(M = i) X_i``): one mixed image per group.

    ``x [G * group_size, C, H, W]`` holds the groups one after the other (group ``g`` = images ``g * group_size ..
    g * group_size + group_size - 1``); ``cell_map [G, s, s]`` (int64, see :func:`group_cell_map`) names for every
    cell of an ``s x s`` grid the image of the group it is taken from. ``group_size`` defaults to ``B // G``.

    Returns ``(mixed, segment_ids)``:

    * ``mixed [G, C, H, W]`` in x's dtype and memory format: every pixel of cell ``(r, c)`` (rows
      ``r*H/s .. (r+1)*H/s - 1``, columns likewise) is the same pixel of ``x[g * group_size + cell_map[g, r, c]]``;
      differentiable in ``x`` (the gradient of a source pixel is the output gradient where it was chosen, else 0);
    * ``segment_ids [G, L]`` (int64, on x's device), ``L = (H / p) (W / p)`` tokens of ``p = token_patch`` pixels per
      side in row-major order: the source image of each token, i.e. the cell map upsampled to token resolution (each
      cell covers ``(H/s)/p x (W/s)/p`` tokens). No CLS entry: a caller with a CLS token prepends its own id.
    """
    G, gs = check_group_mix_args(x, cell_map, token_patch, group_size)
    B, C, H, W = x.shape
    cs = cell_map.shape[1]
    ch, cw = H // cs, W // cs
    cmap = cell_map.cpu()
    out = torch.empty((G, C, H, W), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    for g in range(G):
        for r in range(cs):
            for c in range(cs):
                src = g * gs + int(cmap[g, r, c])
                out[g, :, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = x[src, :, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw]
    ht, wt = H // token_patch, W // token_patch
    ty = torch.arange(ht) * token_patch // ch  # cell row of each token row
    tx = torch.arange(wt) * token_patch // cw
    seg = cmap[:, ty[:, None], tx[None, :]].reshape(G, ht * wt)
    return out, seg.to(x.device)


def check_topk_attention_args(q, k, v, topk, global_rows, op: str = "topk_attention") -> None:
    """Argument checks of :func:`topk_attention` (shared with the fast op): q ``[B, H, Lq, d]``, k and v
    ``[B, H, Lk, d]``, one floating dtype and device; ``1 <= topk <= Lk``; ``0 <= global_rows <= Lq``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a 4-D floating tensor [B, H, L, d], got {_describe(t)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, H, Lq, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d:
        raise ValueError(f"{op}: k must be [B={B}, H={H}, Lk, d={d}] for q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Lk = k.shape[2]
    if Lk < 1 or Lq < 1:
        raise ValueError(f"{op}: q and k need at least one token, got Lq={Lq}, Lk={Lk}")
    if not _is_int(topk) or not (1 <= topk <= Lk):
        raise ValueError(f"{op}: topk must be an int in [1, Lk={Lk}], got topk={topk!r}")
    if not _is_int(global_rows) or not (0 <= global_rows <= Lq):
        raise ValueError(f"{op}: global_rows must be an int in [0, Lq={Lq}], got global_rows={global_rows!r}")


def _attention_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _topk_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q k^T / sqrt(d)`` in float32 (float64 for float64 inputs): [B, H, Lq, Lk]."""
    acc = _attention_acc_dtype(q.dtype)
    return torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * (q.shape[-1] ** -0.5)


def topk_mask(q: torch.Tensor, k: torch.Tensor, topk: int, global_rows: int = 1) -> torch.Tensor:
    """The keys each query row of homologous attention keeps: bool ``[B, H, Lq, Lk]``.

    Rows ``0 .. global_rows-1`` (the CLS row) keep every key; every other row keeps exactly ``topk`` keys, those with
    the largest scores ``q k^T / sqrt(d)`` (float32; float64 for float64 inputs) as ``torch.topk`` picks them (among
    keys tied with the ``topk``-th score, topk's choice)."""
    check_topk_attention_args(q, k, k, topk, global_rows, op="topk_mask")
    s = _topk_scores(q, k)
    idx = torch.topk(s, topk, dim=-1).indices
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, idx, True)
    mask[:, :, :global_rows] = True
    return mask


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, global_rows: int = 1) -> torch.Tensor:
    """MixedAE's homologous attention: each query row attends only to its ``topk`` highest-scoring keys.

    ``q [B, H, Lq, d]``, ``k, v [B, H, Lk, d]``; with ``s = q k^T / sqrt(d)`` and ``keep = topk_mask(...)``::

        out[b, h, i] = sum_j softmax_j( s[b, h, i, j] if keep[b, h, i, j] else -inf ) v[b, h, j]

    i.e. softmax over the kept keys only, then @V; rows ``< global_rows`` (the CLS row) attend to every key, and with
    ``topk = Lk`` this is plain scaled dot-product attention. Computed in float32 (float64 for float64 inputs), the
    result in q's dtype; differentiable in q, k and v (the selection itself carries no gradient). Materializes the
    ``[B, H, Lq, Lk]`` scores: the specification, not the fast path.
    """
    check_topk_attention_args(q, k, v, topk, global_rows)
    s = _topk_scores(q, k)
    keep = topk_mask(q.detach(), k.detach(), topk, global_rows)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.matmul(p, v.to(p.dtype)).to(q.dtype)


def check_segment_ids(segment_ids, q, op: str = "topk_accuracy") -> None:
    B, Lq = q.shape[0], q.shape[2]
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype != torch.long or segment_ids.shape != (B, Lq):
        raise ValueError(f"{op}: segment_ids must be an int64 tensor [B={B}, L={Lq}], got {_describe(segment_ids)}")
    if segment_ids.device != q.device:
        raise ValueError(f"{op}: segment_ids must be on q's device {q.device}, got {segment_ids.device}")


def topk_accuracy(q: torch.Tensor, k: torch.Tensor, segment_ids: torch.Tensor, topk: int,
                  global_rows: int = 1) -> torch.Tensor:
    """MixedAE's "TopK accuracy": among the keys kept by the rows ``>= global_rows`` (all heads, all samples), the
    share whose segment id equals the query row's. Self-attention: ``segment_ids [B, L]`` (int64) labels both the
    query rows and the keys, so ``Lq = Lk``; a CLS token carries an id of its own (e.g. -1) and so never matches a
    patch. Returns a float32 scalar tensor (no gradient); NaN when no row is counted (``global_rows = L``)."""
    check_topk_attention_args(q, k, k, topk, global_rows, op="topk_accuracy")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"topk_accuracy: needs self-attention (Lq == Lk), got Lq={q.shape[2]}, Lk={k.shape[2]}")
    check_segment_ids(segment_ids, q)
    with torch.no_grad():
        keep = topk_mask(q, k, topk, global_rows)[:, :, global_rows:]  # [B, H, Lq - g, Lk]
        same = segment_ids[:, global_rows:, None] == segment_ids[:, None, :]  # [B, Lq - g, Lk]
        hits = (keep & same[:, None]).sum(dtype=torch.float64)
        return (hits / keep.sum(dtype=torch.float64)).to(torch.float32)

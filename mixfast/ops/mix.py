"""Mask generation + permuted mixing + switch + λ, and Un-Mix: public entry points.

Every op validates its arguments here (shape, dtype, device, layout, grid and ratio
ranges: errors say what was wrong), then calls a ``torch.library`` custom op
(``mixfast::mix``, ``mixfast::make_masks_and_mix``, ``mixfast::unmix``,
``mixfast::mix_and_unmix``) with a fake implementation, so ``torch.compile`` traces
through a model that calls them. Inside the op a backend of ``mix_backends.BACKENDS`` is
chosen per call (``MIXFAST_BACKEND=auto|cuda|triton|cpu|torch``) and runs it:

* ``cpu``    -- the C++/OpenMP kernels of ``mixfast._C`` (CPU tensors),
* ``cuda``   -- the CUDA kernels of ``mixfast._C`` (CUDA tensors; fused mask generation),
* ``triton`` -- ``kernels/mix.py`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``),
* ``torch``  -- ``reference.py``, the specification.

``auto`` prefers cuda > triton > torch on a GPU and cpu > torch on the CPU, and falls back
quietly (float64 inputs, tensors that need gradients, or a missing build run the
reference); a backend named explicitly fails loudly when it cannot run the call.

Masks are the same bits on every backend (Philox4x32-10, see ``reference.make_masks``),
so outputs are pixel-identical to the reference for masking and CutMix, and identical up
to the documented float32 rounding for mixup.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels.layout import out_format as _out_format
from mixfast.ops import _backend
from mixfast.ops import reference as ref
from mixfast.ops.mix_backends import BACKENDS, MaskRequest, flip, to_device
from mixfast.ops.reference import rand_bbox, upsample_masks

__all__ = [
    "make_masks",
    "make_masks_and_mix",
    "mix",
    "mix_and_unmix",
    "rand_bbox",
    "to_device",
    "unmix",
    "upsample_masks",
    "backend_for",
]

Tensor = torch.Tensor
_U64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------


def backend_for(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The name of the backend that runs ``op`` for a tensor of ``dtype`` on ``device`` right now."""
    return _pick(op, torch.device(device), dtype).name


def _pick(op: str, device: torch.device, dtype: torch.dtype):
    """The backend object (``mix_backends``) for ``op`` on this device and dtype."""
    return BACKENDS.choose(op, device.type, dtype, device.type)


# ---------------------------------------------------------------------------------------
# validation: the reference's checks (one set for the spec and every backend) plus the
# kernels' own limits
# ---------------------------------------------------------------------------------------


def _check_x(op: str, x) -> None:
    ref.check_image_batch(op, x)
    if x.numel() == 0:
        raise ValueError(f"{op}: x must not be empty, got shape {tuple(x.shape)}")


def _check_kernel_masks(op: str, masks) -> None:
    """The kernels take square grids of 2..64 cells (a mask row is one 64-bit word)."""
    if masks.shape[1] != masks.shape[2]:
        raise ValueError(f"{op}: masks must have shape [1, g, g] or [B, g, g], got {tuple(masks.shape)}")
    g = masks.shape[1]
    if not (2 <= g <= 64):
        raise ValueError(f"{op}: masks grid g must be in [2, 64], got g={g}")


def _i64(v: int) -> int:
    """``v`` mod 2^64 as a signed int64 (op schemas carry int64; mask_key reduces mod 2^64)."""
    v &= _U64
    return v - (1 << 64) if v >= 1 << 63 else v


def _empty_out(x: Tensor, fmt: torch.memory_format) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


# ---------------------------------------------------------------------------------------
# custom ops
#
# Each op is a plain function (``*_impl``) registered as a torch.library custom op
# (``*_op``) with a fake implementation. Eager calls go straight to the function: the
# dispatcher round trip costs ~0.1 ms per call, a sixth of the whole op at B=32, 224^2 on
# two CPU cores. Under torch.compile the custom op is what gets traced (see _call).
# ---------------------------------------------------------------------------------------


def _call(op, impl, *args):
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def _fake_mix_outputs(x: Tensor, n: int, want_switch: bool) -> Tuple[Tensor, Tensor, Tensor]:
    fmt = _out_format(x)
    switch = _empty_out(x, fmt) if want_switch else x.new_empty((0,))
    return _empty_out(x, fmt), switch, x.new_empty((n,), dtype=torch.float32)


def _mix_impl(x: Tensor, masks: Tensor, perm: Optional[Tensor], filler: Optional[Tensor],
              want_switch: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _pick("mix", x.device, x.dtype).mix(x, masks, perm, filler, want_switch)


_mix_op = torch.library.custom_op("mixfast::mix", mutates_args=())(_mix_impl)


@_mix_op.register_fake
def _(x, masks, perm, filler, want_switch):
    return _fake_mix_outputs(x, masks.shape[0], want_switch)


def _make_masks_and_mix_impl(x: Tensor, perm: Optional[Tensor], grid: int, ratio: float, kind: str,
                             per_sample: bool, seed: int, step: int,
                             want_switch: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    req = MaskRequest(x.shape[0] if per_sample else 1, grid, ratio, kind, seed, step)
    return _pick("make_masks_and_mix", x.device, x.dtype).make_masks_and_mix(x, perm, req, want_switch)


_make_masks_and_mix_op = torch.library.custom_op("mixfast::make_masks_and_mix",
                                                 mutates_args=())(_make_masks_and_mix_impl)


@_make_masks_and_mix_op.register_fake
def _(x, perm, grid, ratio, kind, per_sample, seed, step, want_switch):
    n = x.shape[0] if per_sample else 1
    mixed, switch, lam = _fake_mix_outputs(x, n, want_switch)
    return mixed, switch, lam, x.new_empty((n, grid, grid), dtype=torch.bool)


def _unmix_impl(x: Tensor, lam: float, use_mixup: bool, y1: int, y2: int, x1: int, x2: int) -> Tensor:
    return _pick("unmix", x.device, x.dtype).unmix(x, lam, use_mixup, (y1, y2, x1, x2))


_unmix_op = torch.library.custom_op("mixfast::unmix", mutates_args=())(_unmix_impl)


@_unmix_op.register_fake
def _(x, lam, use_mixup, y1, y2, x1, x2):
    return _empty_out(x, _out_format(x))


def _mix_and_unmix_impl(x: Tensor, masks: Tensor, perm: Tensor, want_switch: bool, lam: float, use_mixup: bool,
                        y1: int, y2: int, x1: int, x2: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _pick("mix_and_unmix", x.device, x.dtype).mix_and_unmix(x, masks, perm, want_switch, lam, use_mixup,
                                                                   (y1, y2, x1, x2))


_mix_and_unmix_op = torch.library.custom_op("mixfast::mix_and_unmix", mutates_args=())(_mix_and_unmix_impl)


@_mix_and_unmix_op.register_fake
def _(x, masks, perm, want_switch, lam, use_mixup, y1, y2, x1, x2):
    mixed, switch, lam_m = _fake_mix_outputs(x, masks.shape[0], want_switch)
    return mixed, switch, lam_m, _empty_out(x, _out_format(x))


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def make_masks(n: int, grid: int, ratio: float, kind: str = "block", *, seed: int, step: int,
               device: Optional[torch.device] = None) -> Tensor:
    """Draw ``n`` MixMask grid masks: ``torch.bool [n, grid, grid]``, 1 = keep ``x_i``, on
    ``device`` (default: the CPU).

    Same contract and bits as :func:`mixfast.ops.reference.make_masks` (Philox4x32-10
    keyed by ``(seed, step)``, counters from ``(draw, sample)``). With a ``device`` the
    masks are drawn there (CUDA or Triton kernels on a GPU, the C++ kernels on the CPU, else
    the reference and an asynchronous copy): a training step asks for them where its images
    are, with no host sync. Without one they are drawn by the C++ kernels when built, by
    Triton or CUDA when asked for by name (then copied to the CPU), else by the reference.
    """
    ref.check_make_masks_args(n, grid, ratio, kind, seed, step)
    if device is None:
        requested = _backend.requested_backend()
        gpu = requested in ("cuda", "triton") and torch.cuda.is_available()
        draw_on, target = torch.device("cuda" if gpu else "cpu"), torch.device("cpu")
    else:
        draw_on = target = torch.device(device)
    req = MaskRequest(n, grid, float(ratio), kind, seed, step)
    return to_device(_pick("make_masks", draw_on, torch.float32).make_masks(req, draw_on), target)


def mix(
    x: Tensor,
    masks: Tensor,
    perm: Optional[Tensor],
    want_switch: bool = False,
    *,
    filler: Optional[Tensor] = None,
    validate: bool = True,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """MixMask mixing: ``(mixed, switch or None, lam)``; contract of
    :func:`mixfast.ops.reference.mix` (selection, so every pixel is bit-exact; outputs keep
    x's dtype and memory format; ``lam`` float32 ``[1]`` or ``[B]``).

    ``validate=False`` skips reading ``perm``'s values on the host (a device sync for a GPU
    tensor) for a permutation the caller drew itself; a ``perm`` that is not a permutation of
    ``range(B)`` is then undefined behaviour."""
    _check_x("mix", x)
    ref.check_mix_args("mix", x, masks, perm, filler, want_switch, validate)
    _check_kernel_masks("mix", masks)
    if filler is not None:
        perm = None  # checked but ignored with a filler (as in the reference)
    if _needs_grad(x, filler):
        return ref.mix(x, masks, perm, want_switch, filler=filler)
    mixed, switch, lam = _call(_mix_op, _mix_impl, x, masks, perm, filler, bool(want_switch))
    return mixed, (switch if want_switch else None), lam


def make_masks_and_mix(
    x: Tensor,
    perm: Optional[Tensor] = None,
    *,
    grid: int,
    ratio: float,
    kind: str = "block",
    per_sample: bool = False,
    seed: int,
    step: int,
    want_switch: bool = False,
    validate: bool = True,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Draw the masks and mix in one call (one launch on CUDA / Triton):
    ``(mixed, switch or None, lam, masks)``.

    Equals ``masks = make_masks(B if per_sample else 1, grid, ratio, kind, seed=seed,
    step=step)`` followed by ``mix(x, masks, perm, want_switch)``, bit for bit, except that
    ``masks`` is returned on x's device. ``perm=None`` means the flip ``i -> B-1-i`` (the
    papers' pairing), which lets the kernels read each pair of images once. ``validate``:
    as in :func:`mix`.
    """
    _check_x("make_masks_and_mix", x)
    B = x.shape[0]
    ref.check_make_masks_args(B if per_sample else 1, grid, ratio, kind, seed, step)
    if perm is not None:
        ref.check_perm("make_masks_and_mix", perm, B, x.device, validate)
    if _needs_grad(x):
        masks = to_device(ref.make_masks(B if per_sample else 1, grid, ratio, kind, seed=seed, step=step), x.device)
        perm_t = perm if perm is not None else flip(B, x.device)
        mixed, switch, lam = ref.mix(x, masks, perm_t, want_switch)
        return mixed, switch, lam, masks
    mixed, switch, lam, masks = _call(_make_masks_and_mix_op, _make_masks_and_mix_impl, x, perm, int(grid),
                                      float(ratio), str(kind), bool(per_sample), _i64(seed), _i64(step),
                                      bool(want_switch))
    return mixed, (switch if want_switch else None), lam, masks


def unmix(
    x: Tensor,
    lam: float,
    use_mixup: bool,
    box: Optional[Tuple[int, int, int, int]] = None,
) -> Tuple[Tensor, float]:
    """Un-Mix with the flip partner: ``(x_um, lam_effective)``; contract of
    :func:`mixfast.ops.reference.unmix` (mixup in float32 rounded once to x's dtype;
    CutMix pastes ``flip(x)`` inside ``box``, drawn by :func:`rand_bbox` when ``None``)."""
    _check_x("unmix", x)
    lam = ref.check_lam("unmix", lam)
    box, lam_eff = ref.check_unmix_box("unmix", box, use_mixup, lam, x.shape[2], x.shape[3])
    box_t = box or (0, 0, 0, 0)  # the custom op's schema has no optional box
    if _needs_grad(x):
        return ref.unmix(x, lam, use_mixup, box=None if use_mixup else box_t)
    return _call(_unmix_op, _unmix_impl, x, lam, bool(use_mixup), *box_t), lam_eff


def mix_and_unmix(
    x: Tensor,
    masks: Tensor,
    perm: Tensor,
    lam_unmix: float,
    use_mixup: bool,
    box: Optional[Tuple[int, int, int, int]] = None,
    want_switch: bool = False,
    *,
    validate: bool = True,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, float]:
    """MixMask (permutation ``perm``) and Un-Mix (flip) of the same batch from one pass over
    ``x``: ``(mixed, switch or None, lam_mixmask, x_unmix, lam_unmix_effective)``.

    Identical to ``mix(x, masks, perm, want_switch)`` and ``unmix(x, lam_unmix, use_mixup,
    box)`` (with both on, MixMask takes a fresh permutation and Un-Mix keeps flip: MixMask
    paper, Table 2).
    ``validate``: as in :func:`mix`.
    """
    _check_x("mix_and_unmix", x)
    if perm is None:
        raise ValueError("mix_and_unmix: perm is required")
    ref.check_mix_args("mix_and_unmix", x, masks, perm, None, want_switch, validate)
    _check_kernel_masks("mix_and_unmix", masks)
    lam_unmix = ref.check_lam("mix_and_unmix", lam_unmix)
    box, lam_eff = ref.check_unmix_box("mix_and_unmix", box, use_mixup, lam_unmix, x.shape[2], x.shape[3])
    box_t = box or (0, 0, 0, 0)
    if _needs_grad(x):
        mixed, switch, lam_m = ref.mix(x, masks, perm, want_switch)
        return mixed, switch, lam_m, ref.unmix(x, lam_unmix, use_mixup, box=None if use_mixup else box_t)[0], lam_eff
    mixed, switch, lam_m, x_um = _call(_mix_and_unmix_op, _mix_and_unmix_impl, x, masks, perm, bool(want_switch),
                                       lam_unmix, bool(use_mixup), *box_t)
    return mixed, (switch if want_switch else None), lam_m, x_um, lam_eff

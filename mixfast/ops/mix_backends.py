"""The backends of the mix ops, one class each, behind one interface, and the table they are chosen from.

Every backend takes arguments already checked by ``mixfast/ops/mix.py`` and only runs them:

    make_masks(masks, device)                                   -> uint8/bool [n, g, g] on device
    mix(x, masks, perm, filler, want_switch)                    -> (mixed, switch or empty, lam)
    make_masks_and_mix(x, perm or None (flip), masks, want_switch) -> (mixed, switch or empty, lam, bool masks)
    unmix(x, lam, use_mixup, box)                               -> x_um
    mix_and_unmix(x, masks, perm, want_switch, lam, use_mixup, box) -> (mixed, switch or empty, lam_m, x_um)

``masks`` in ``make_masks`` / ``make_masks_and_mix`` is a :class:`MaskRequest` (what to draw); elsewhere a bool
tensor of masks. Outputs keep x's dtype and memory format (``kernels.layout.out_format``).

``BACKENDS`` lists them with the devices, dtypes and builds they need; ``mixfast/ops/_backend.py`` chooses one per
call (``MIXFAST_BACKEND=auto|cuda|triton|cpu|torch``). Adding a backend is a class here and a row in ``BACKENDS``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from kernels.layout import out_format, per_image_dense
from mixfast.ops import _backend, _native
from mixfast.ops import reference as ref

Tensor = torch.Tensor


@dataclass(frozen=True)
class MaskRequest:
    """``n`` masks of ``grid`` x ``grid`` cells to draw (``reference.make_masks``'s arguments)."""

    n: int
    grid: int
    ratio: float
    kind: str
    seed: int
    step: int

    def spec(self) -> ref.MaskSpec:
        return ref.mask_spec(self.grid, self.ratio, self.kind, self.seed, self.step)


def flip(n: int, device: torch.device) -> Tensor:
    """i -> n-1-i as a tensor (for the backends that take the flip as a permutation)."""
    return torch.arange(n - 1, -1, -1, device=device)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without a host sync: a CPU tensor reaches a GPU through pinned
    memory and an asynchronous copy (a pageable copy would block until the GPU is idle)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty((0,))  # custom ops cannot return None


# ---------------------------------------------------------------------------------------------------------------
# torch: the reference, the specification
# ---------------------------------------------------------------------------------------------------------------


class TorchMix:
    name = "torch"

    @staticmethod
    def make_masks(req: MaskRequest, device: torch.device) -> Tensor:
        return to_device(ref.make_masks(req.n, req.grid, req.ratio, req.kind, seed=req.seed, step=req.step), device)

    def mix(self, x, masks, perm, filler, want_switch):
        mixed, switch, lam = ref.mix(x, masks, perm, want_switch, filler=filler)
        return mixed, _or_empty(switch, x), lam

    def make_masks_and_mix(self, x, perm, req: MaskRequest, want_switch):
        masks = self.make_masks(req, x.device)
        mixed, switch, lam = self.mix(x, masks, perm if perm is not None else flip(x.shape[0], x.device), None,
                                      want_switch)
        return mixed, switch, lam, masks

    @staticmethod
    def unmix(x, lam, use_mixup, box):
        return ref.unmix(x, lam, use_mixup, box=None if use_mixup else box)[0]

    def mix_and_unmix(self, x, masks, perm, want_switch, lam, use_mixup, box):
        return (*self.mix(x, masks, perm, None, want_switch), self.unmix(x, lam, use_mixup, box))


# ---------------------------------------------------------------------------------------------------------------
# cpu / cuda: the C++ and CUDA kernels of mixfast._C (raw pointers; the structs are built positionally, in their
# _fields order: see _native.mask_spec)
# ---------------------------------------------------------------------------------------------------------------


class NativeMix:
    """``mixfast._C``: OpenMP kernels on CPU tensors (``cpu``) or CUDA kernels on the current stream (``cuda``).
    The args structs hold raw addresses: the tensors they point to are kept referenced until the call returns."""

    def __init__(self, name: str):
        self.name = name

    def _lib(self, op: str, x: Tensor):
        lib = _native.require_native(op)
        if self.name == "cuda":
            _native.require_cuda_tensor(op, x)
        return lib

    def _run(self, lib, fn: str, device: torch.device, args) -> None:
        if self.name == "cpu":
            getattr(lib, f"{fn}_cpu")(args)
            return
        with torch.cuda.device(device):
            getattr(lib, f"{fn}_cuda")(args, _native.stream_handle(device))

    @staticmethod
    def _out(x: Tensor, fmt: torch.memory_format) -> Tensor:
        """On the CPU from the output cache (fresh pages cost more than the kernel), else a new tensor."""
        if x.device.type == "cpu":
            return _native.output_cache.empty(x.shape, x.dtype, fmt)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)

    @staticmethod
    def _mask_source(lib, masks, device) -> Tuple[object, list, Optional[Tensor]]:
        """(``_C.MaskSource``, tensors it points to, the drawn masks or None): given bool masks, or a request."""
        if isinstance(masks, MaskRequest):
            out = torch.empty((masks.n, masks.grid, masks.grid), dtype=torch.uint8, device=device)
            return lib.MaskSource(0, out.data_ptr(), masks.n, masks.grid, _native.mask_spec(masks.spec())), [out], out
        given = to_device(masks, device).contiguous().view(torch.uint8)
        return lib.MaskSource(given.data_ptr(), 0, masks.shape[0], masks.shape[1]), [given], None

    def _mix_args(self, lib, op, x, perm, filler, want_switch, src, n, perm_is_flip):
        """(``_C.MixArgs``, (mixed, switch, lam), tensors it points to)."""
        fmt = out_format(x)
        xx, xbs = per_image_dense(x, fmt)
        alive = [xx]
        pp = perm.contiguous() if perm is not None else None
        ff, fbs = per_image_dense(filler, fmt) if filler is not None else (None, 0)
        alive += [t for t in (pp, ff) if t is not None]
        mixed = self._out(x, fmt)
        switch = self._out(x, fmt) if want_switch else x.new_empty((0,))
        lam = torch.empty((n,), dtype=torch.float32, device=x.device)
        args = lib.MixArgs(_native.geometry(op, xx, fmt == torch.channels_last), xx.data_ptr(), xbs,
                           pp.data_ptr() if pp is not None else 0, ff.data_ptr() if ff is not None else 0, fbs,
                           perm_is_flip, src, mixed.data_ptr(), switch.data_ptr() if want_switch else 0,
                           lam.data_ptr(), _native.num_threads())
        return args, (mixed, switch, lam), alive

    def _unmix_args(self, lib, op, x, lam, use_mixup, box):
        """(``_C.UnmixArgs``, output, tensors it points to); lam and mu become float32(lam) and float32(1 - lam),
        the reference's scalars."""
        fmt = out_format(x)
        xx, xbs = per_image_dense(x, fmt)
        out = self._out(x, fmt)
        args = lib.UnmixArgs(_native.geometry(op, xx, fmt == torch.channels_last), xx.data_ptr(), xbs, use_mixup,
                             lam, 1.0 - lam, *box, out.data_ptr(), _native.num_threads())
        return args, out, [xx]

    def make_masks(self, req: MaskRequest, device: torch.device) -> Tensor:
        lib = _native.require_native("make_masks")
        out = torch.empty((req.n, req.grid, req.grid), dtype=torch.uint8, device=device)
        if self.name == "cuda":
            with torch.cuda.device(device):
                lib.make_masks_cuda(_native.mask_spec(req.spec()), req.n, out.data_ptr(), _native.stream_handle(device))
        else:
            lib.make_masks_cpu(_native.mask_spec(req.spec()), req.n, out.data_ptr(), _native.num_threads())
        return out.view(torch.bool)

    def mix(self, x, masks, perm, filler, want_switch):
        lib = self._lib("mix", x)
        src, alive, _ = self._mask_source(lib, masks, x.device)
        args, outs, alive_too = self._mix_args(lib, "mix", x, perm, filler, want_switch, src, masks.shape[0], False)
        self._run(lib, "mix", x.device, args)
        return outs

    def make_masks_and_mix(self, x, perm, req: MaskRequest, want_switch):
        lib = self._lib("make_masks_and_mix", x)
        src, alive, drawn = self._mask_source(lib, req, x.device)
        # The native API takes the flip as a permutation too (the CPU kernels read it; CUDA pairs the images when
        # perm_is_flip): an arange on the device, no host work.
        perm_t = perm if perm is not None else flip(x.shape[0], x.device)
        args, outs, alive_too = self._mix_args(lib, "make_masks_and_mix", x, perm_t, None, want_switch, src, req.n,
                                               perm is None)
        self._run(lib, "mix", x.device, args)
        return (*outs, drawn.view(torch.bool))

    def unmix(self, x, lam, use_mixup, box):
        lib = self._lib("unmix", x)
        args, out, alive = self._unmix_args(lib, "unmix", x, lam, use_mixup, box)
        self._run(lib, "unmix", x.device, args)
        return out

    def mix_and_unmix(self, x, masks, perm, want_switch, lam, use_mixup, box):
        lib = self._lib("mix_and_unmix", x)
        src, alive, _ = self._mask_source(lib, masks, x.device)
        margs, (mixed, switch, lam_m), alive_m = self._mix_args(lib, "mix_and_unmix", x, perm, None, want_switch,
                                                                src, masks.shape[0], False)
        uargs, x_um, alive_u = self._unmix_args(lib, "mix_and_unmix", x, lam, use_mixup, box)
        args = lib.MixUnmixArgs()
        args.mix, args.unmix = margs, uargs
        self._run(lib, "mix_and_unmix", x.device, args)
        return mixed, switch, lam_m, x_um


# ---------------------------------------------------------------------------------------------------------------
# triton: kernels/mix.py (CUDA tensors, or CPU tensors in Triton's interpreter)
# ---------------------------------------------------------------------------------------------------------------


class TritonMix:
    name = "triton"

    @staticmethod
    def _kernels():
        from kernels import mix as triton_mix  # noqa: PLC0415 - imported on first use (TRITON_INTERPRET)

        return triton_mix

    def make_masks(self, req: MaskRequest, device: torch.device) -> Tensor:
        return self._kernels().make_masks(req.spec(), req.n, device).view(torch.bool)

    def mix(self, x, masks, perm, filler, want_switch):
        return self._kernels().mix(x, masks=masks, spec=None, n_masks=masks.shape[0], grid=masks.shape[1], perm=perm,
                                   filler=filler, want_switch=want_switch, perm_is_flip=False)[:3]

    def make_masks_and_mix(self, x, perm, req: MaskRequest, want_switch):
        # With flip the kernel reads each pair of images once and never reads a permutation.
        mixed, switch, lam, masks = self._kernels().mix(x, masks=None, spec=req.spec(), n_masks=req.n, grid=req.grid,
                                                        perm=perm, filler=None, want_switch=want_switch,
                                                        perm_is_flip=perm is None)
        return mixed, switch, lam, masks.view(torch.bool)

    def unmix(self, x, lam, use_mixup, box):
        return self._kernels().unmix(x, lam=lam, use_mixup=use_mixup, box=box)

    def mix_and_unmix(self, x, masks, perm, want_switch, lam, use_mixup, box):
        return self._kernels().mix_and_unmix(x, masks=masks, perm=perm, want_switch=want_switch, lam=lam,
                                             use_mixup=use_mixup, box=box)


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _triton_runs_on(device_type: str) -> bool:
    """Triton runs on a GPU, or on the CPU only in its interpreter (TRITON_INTERPRET=1)."""
    if device_type == "cuda":
        return _triton_importable()
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable()


_KERNEL_DTYPES = _native.NATIVE_DTYPES  # float32, bfloat16, float16: what every kernel backend takes

BACKENDS = _backend.Table(
    "mix ops",
    rows=[
        _backend.Row(NativeMix("cuda"), lambda device_type: device_type == "cuda" and _native.cuda_ready(),
                     _KERNEL_DTYPES),
        _backend.Row(TritonMix(), _triton_runs_on, _KERNEL_DTYPES),
        _backend.Row(NativeMix("cpu"), lambda device_type: device_type == "cpu" and _native.available(),
                     _KERNEL_DTYPES),
        _backend.Row(TorchMix(), lambda device_type: True, None),
    ],
    preference={"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")},
)

"""Loading of the native module ``mixfast._C`` and the glue between tensors and its
raw-pointer API: kernels take raw pointers, sizes, strides, dtype codes and a stream handle,
and Python validates the tensors (so the module needs no torch C++ ABI: one build works with
the CPU torch wheel and across torch versions).

Nothing here imports ``mixfast._C`` at import time: ``native()`` loads it on first use and
remembers why it failed, so a checkout without a build still runs every torch path.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NATIVE_DTYPES = tuple(DTYPE_CODES)

_load_error: Optional[BaseException] = None


@functools.lru_cache(maxsize=None)
def _load():
    global _load_error
    try:
        from mixfast import _C  # noqa: PLC0415 - optional native extension
    except ImportError as e:  # not built (e.g. a source checkout without `pip install -e .`)
        _load_error = e
        return None
    return _C


def native():
    """The ``mixfast._C`` module, or ``None`` if it is not built."""
    return _load()


def available() -> bool:
    return _load() is not None


def require_native(op: str):
    """``mixfast._C`` or a RuntimeError naming the op and how to build the module."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"{op}: the native module mixfast._C is not built ({_load_error}); "
                           "run `pip install -e .` (it builds with CMake)")
    return mod


def build_info() -> dict:
    """What ``mixfast._C`` was built with: ``cuda`` (bool), ``cuda_archs``, ``nvcc_version``,
    ``cuda_sources``, ``openmp``, ``compiler``, ... (see csrc/bindings.cpp)."""
    return dict(require_native("build_info").build_info())


@functools.lru_cache(maxsize=None)
def cuda_built() -> bool:
    """Asked on every op call: build_info() builds a dict, so the answer is kept (it cannot change)."""
    mod = _load()
    return bool(mod is not None and mod.build_info()["cuda"])


@functools.lru_cache(maxsize=None)
def _gpu_present() -> bool:
    return torch.cuda.is_available()


def cuda_ready(device: Optional[torch.device] = None) -> bool:
    """The CUDA kernels can run: built with CUDA, and torch sees a GPU (``device`` if given)."""
    if not cuda_built() or not _gpu_present():
        return False
    return device is None or device.type == "cuda"


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a GPU (for grid sizes): read once per device, not per call."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def require_cuda_tensor(op: str, t: torch.Tensor) -> None:
    """A clear error before any CUDA entry point is called with an unsuitable tensor."""
    if not cuda_built():
        raise RuntimeError(f"{op}: mixfast._C was built without CUDA kernels (no nvcc at build time, or MIXFAST_CUDA=0)")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{op}: no CUDA device is available (torch.cuda.is_available() is False)")
    if t.device.type != "cuda":
        raise ValueError(f"{op}: the CUDA kernels need CUDA tensors, got a tensor on {t.device}")


def num_threads() -> int:
    """Threads for the OpenMP kernels: torch's intra-op setting, so both agree."""
    return max(1, torch.get_num_threads())


def stream_handle(device: torch.device) -> int:
    """``cudaStream_t`` of torch's current stream on ``device``, as an integer."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def dtype_code(op: str, dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"{op}: the native kernels support float32, bfloat16 and float16, got {dtype}") from None


def geometry(op: str, x: torch.Tensor, channels_last: bool):
    """``_C.ImageGeometry`` of a 4-D batch laid out NCHW or NHWC (per ``channels_last``).

    One object per (shape, dtype, layout), shared by every call: the argument structs copy it,
    and nobody may modify it."""
    dtype = x.dtype
    dtype_code(op, dtype)  # an unsupported dtype raises here, naming the op
    return _geometry(x.shape, dtype, bool(channels_last))


@functools.lru_cache(maxsize=256)
def _geometry(shape: torch.Size, dtype: torch.dtype, channels_last: bool):
    # A training loop asks for the same few shapes on every step, and building the object
    # costs several times the cache lookup.
    N, C, H, W = shape
    return require_native("geometry").ImageGeometry(N=N, C=C, H=H, W=W, dtype=DTYPE_CODES[dtype],
                                                    channels_last=channels_last)


def mask_spec(spec) -> object:
    """``_C.MaskSpec`` from a :class:`mixfast.ops.reference.MaskSpec`.

    The argument structs built on every op call are built positionally, in their ``_fields``
    order: pybind11 looks each parameter name up per call, so keywords cost several times as
    much (tests/test_native_build.py pins the orders)."""
    return require_native("mask_spec").MaskSpec(spec.grid, spec.kind, spec.num, spec.min_patches, spec.threshold24,
                                                spec.key0, spec.key1)


class CpuOutputCache:
    """Reuses the memory of earlier CPU outputs of the native ops once nothing references
    them any more (a tiny caching allocator, as torch has for CUDA).

    Why: glibc hands large freed blocks back to the OS, so a fresh 19 MB output (B=32,
    3x224x224 float32) takes ~4.7k page faults -- 1 to 4 ms on a 2-core machine, several
    times the kernel that fills it. A training loop asks for the same shapes every step and
    has dropped the previous step's outputs by then, so their pages can be reused.

    A buffer is handed out again only when this cache holds the sole reference to its
    storage (no tensor, view or storage object of the caller's survives); callers get a new
    tensor object over the storage each time. Bounded: ``per_key`` buffers per (shape,
    strides, dtype) and ``max_bytes`` in all (least recently used dropped first). Outputs
    below ``min_bytes`` are allocated normally. ``MIXFAST_CPU_OUTPUT_CACHE=0`` turns it off.
    """

    def __init__(self, per_key: int = 4, max_bytes: int = 1 << 30, min_bytes: int = 1 << 20):
        import collections

        self.per_key, self.max_bytes, self.min_bytes = per_key, max_bytes, min_bytes
        self._bufs: "collections.OrderedDict[tuple, list[torch.Tensor]]" = collections.OrderedDict()
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)
        self._baseline = None

    def enabled(self) -> bool:
        import os

        return self._use_count is not None and os.environ.get("MIXFAST_CPU_OUTPUT_CACHE", "1") != "0"

    @staticmethod
    def _refs(t: torch.Tensor) -> tuple:
        """(references to t's storage, Python references to its storage object)."""
        import sys

        storage = t.untyped_storage()
        return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)

    def _unused(self, buf: torch.Tensor) -> bool:
        # Compared with a tensor nobody else sees: counts differ across torch versions (the
        # storage's Python object is preserved and shared), so measure rather than assume.
        if self._baseline is None:
            self._baseline = self._refs(torch.empty(1))
        count, pyrefs = self._refs(buf)
        return count <= self._baseline[0] and pyrefs <= self._baseline[1]

    def empty(self, shape, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= int(s)
        if nbytes < self.min_bytes or not self.enabled():
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)
        key = (tuple(int(s) for s in shape), _dense_strides(shape, memory_format), dtype)
        bufs = self._bufs.get(key, [])
        for buf in bufs:
            if self._unused(buf):
                self._bufs.move_to_end(key)
                return torch.empty(0, dtype=dtype).set_(buf.untyped_storage(), 0, buf.shape, buf.stride())
        out = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        if len(bufs) < self.per_key:
            self._bufs[key] = bufs + [out]
            self._bufs.move_to_end(key)
            self._trim()
            return torch.empty(0, dtype=dtype).set_(out.untyped_storage(), 0, out.shape, out.stride())
        return out

    def _trim(self) -> None:
        def total():
            return sum(b.untyped_storage().nbytes() for bufs in self._bufs.values() for b in bufs)

        while self._bufs and total() > self.max_bytes:
            self._bufs.popitem(last=False)

    def clear(self) -> None:
        self._bufs.clear()


def _dense_strides(shape, memory_format: torch.memory_format) -> tuple:
    if memory_format == torch.channels_last and len(shape) == 4:
        N, C, H, W = (int(s) for s in shape)
        return (H * W * C, 1, W * C, C)
    strides, acc = [], 1
    for s in reversed([int(v) for v in shape]):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


output_cache = CpuOutputCache()

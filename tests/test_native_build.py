"""The native module mixfast._C: built by `pip install -e .` (setup.py -> CMake), CPU
kernels with OpenMP, and -- whenever nvcc is on this machine -- every CUDA source compiled
for sm_80 and sm_90 (checked in the module's embedded fatbinaries, not only in its own
report). Calling a CUDA entry point without a GPU raises a Python error, never crashes."""

import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from mixfast.ops import _backend, _native
from mixfast.ops import reference as ref

REPO = Path(__file__).resolve().parents[1]
FATBIN_MAGIC = 0xBA55ED50
FATBIN_KIND_CUBIN = 2


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _cuda_expected() -> bool:
    """setup.py builds CUDA when nvcc is found, unless MIXFAST_CUDA=0 forces it off."""
    forced = os.environ.get("MIXFAST_CUDA", "").strip().lower()
    if forced in ("0", "off", "false", "no"):
        return False
    return forced in ("1", "on", "true", "yes") or _nvcc() is not None


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """Bytes of ELF64 (little-endian) section `wanted`, or None."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a little-endian ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strtab_off = header(shstrndx)[4]
    for i in range(shnum):
        name_off, _, _, _, off, size = header(i)[:6]
        end = data.index(b"\0", strtab_off + name_off)
        if data[strtab_off + name_off:end].decode() == wanted:
            return data[off:off + size]
    return None


def _fatbin_cubin_archs(section: bytes) -> list[set[int]]:
    """For each fatbinary (one per compiled .cu file) the SM architectures of its cubins."""
    out, pos = [], 0
    while pos + 16 <= len(section):
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbinaries are 8-byte aligned in the section
            continue
        archs, e = set(), pos + hsize
        while e < pos + hsize + fsize:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", section, e)
            arch, = struct.unpack_from("<I", section, e + 28)
            if kind == FATBIN_KIND_CUBIN:
                archs.add(arch)
            e += ehsize + psize
        out.append(archs)
        pos += hsize + fsize
    return out


def test_module_builds_with_openmp_cpu_kernels():
    assert _native.available(), "mixfast._C is not importable: `pip install -e .` must build it with CMake"
    info = _native.build_info()
    assert info["openmp"] is True and info["openmp_version"] >= 201511
    assert info["compiler"]
    C = _native.native()
    for name in ("make_masks_cpu", "mix_cpu", "unmix_cpu", "mix_and_unmix_cpu"):
        assert callable(getattr(C, name))
    # the CPU kernels run and agree with the reference
    got = torch.empty((2, 8, 8), dtype=torch.uint8)
    C.make_masks_cpu(_native.mask_spec(ref.mask_spec(8, 0.5, "block", 1, 2)), 2, got.data_ptr(), 2)
    assert torch.equal(got.bool(), ref.make_masks(2, 8, 0.5, "block", seed=1, step=2))


@pytest.mark.skipif(not _cuda_expected(), reason="no nvcc on this machine (or MIXFAST_CUDA=0): CUDA not built")
def test_cuda_objects_built_when_nvcc_present():
    info = _native.build_info()
    assert info["cuda"] is True, f"nvcc is at {_nvcc()} but mixfast._C was built without CUDA: {info}"
    assert {80, 90} <= set(info["cuda_archs"])
    assert info["nvcc_version"]
    sources = sorted(p.name for p in (REPO / "csrc" / "cuda").glob("*.cu"))
    assert "mix_cuda.cu" in sources and sorted(info["cuda_sources"]) == sources, "every CUDA source is compiled"

    so = Path(_native.native().__file__).read_bytes()
    section = _elf_section(so, ".nv_fatbin")
    assert section is not None, "the module embeds no CUDA fatbinary"
    per_file = _fatbin_cubin_archs(section)
    assert len(per_file) == len(sources), per_file
    for archs in per_file:
        assert {80, 90} <= archs, f"cubins for sm_80 and sm_90 expected, found {sorted(archs)}"
    for kernel in (b"mix_kernel", b"unmix_kernel", b"mix_unmix_kernel", b"make_masks_kernel"):
        assert kernel in section, f"{kernel.decode()} missing from the device code"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_entry_points_raise_without_gpu():
    C = _native.require_native("test")
    assert C.cuda_device_count() == 0
    cuda_error = "no CUDA device" if _native.cuda_built() else "without CUDA|no CUDA kernels"
    spec = _native.mask_spec(ref.mask_spec(8, 0.5, "block", 0, 0))
    calls = [
        lambda: C.make_masks_cuda(spec, 1, 0, 0),
        lambda: C.mix_cuda(C.MixArgs(), 0),
        lambda: C.unmix_cuda(C.UnmixArgs(), 0),
        lambda: C.mix_and_unmix_cuda(C.MixUnmixArgs(), 0),
    ]
    for call in calls:  # garbage arguments and null pointers: the guard runs first
        with pytest.raises(RuntimeError, match=cuda_error):
            call()
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="CUDA"):
        _native.require_cuda_tensor("mix", x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_backend_requested_without_gpu_fails_loudly(monkeypatch):
    from mixfast import ops

    monkeypatch.setenv("MIXFAST_BACKEND", "cuda")
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        ops.mix(x, ref.make_masks(1, 2, 0.5, seed=0, step=0), torch.tensor([1, 0]))
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        ops.make_masks(1, 4, 0.5, seed=0, step=0)
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        ops.unmix(x, 0.5, True)

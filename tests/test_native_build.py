"""The native module mixfast._C: built by `pip install -e .` (setup.py -> CMake), CPU
kernels with OpenMP, and -- whenever nvcc is on this machine -- every CUDA source compiled
for sm_80 and sm_90 (checked in the module's embedded fatbinaries, not only in its own
report). Calling a CUDA entry point without a GPU raises a Python error, never crashes."""

import os
import shutil
import struct
import subprocess
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


# Arguments that pass every check of the API layer. The addresses are fake: only entry points
# that raise before any kernel runs may see them.
FAKE = 1 << 12
GEO = dict(N=2, C=1, H=4, W=4)
SPEC = dict(grid=2, kind=0, num=1, min_patches=1, threshold24=1)


def _spec(C, **change):
    return C.MaskSpec(**{**SPEC, **change})


def _masks(C, **change):
    return C.MaskSource(**{**dict(n=1, grid=2, given=FAKE), **change})


def _generated(C, **spec_change):
    return _masks(C, given=0, out=FAKE, spec=_spec(C, **spec_change))


def _mix_args(C, geo=None, masks=None, **change):
    geo = C.ImageGeometry(**{**GEO, **(geo or {})})
    return C.MixArgs(**{**dict(geo=geo, x=FAKE, x_batch_stride=16, perm=FAKE, masks=masks or _masks(C), mixed=FAKE,
                               lam=FAKE), **change})


def _unmix_args(C, geo=None, **change):
    geo = C.ImageGeometry(**{**GEO, **(geo or {})})
    return C.UnmixArgs(**{**dict(geo=geo, x=FAKE, x_batch_stride=16, out=FAKE), **change})


def _mix_unmix_args(C, mix=None, unmix=None):
    return C.MixUnmixArgs(mix=_mix_args(C, **(mix or {})), unmix=_unmix_args(C, **(unmix or {})))


def test_argument_structs_take_every_field_as_a_keyword():
    C = _native.require_native("test")
    a, u = C.MixArgs(), C.UnmixArgs()  # every default is the C++ struct's
    assert (a.masks.n, a.num_threads, a.x, a.perm_is_flip, a.geo.N) == (1, 1, 0, False, 0)
    assert (u.mixup, u.lam, u.mu, u.out) == (True, 0.5, 0.5, 0)
    a = C.MixArgs(geo=C.ImageGeometry(N=3, channels_last=True), x=(1 << 64) - 16, x_batch_stride=7, num_threads=4,
                  masks=C.MaskSource(n=3, spec=C.MaskSpec(key1=(1 << 32) - 1)))
    assert (a.geo.N, a.geo.channels_last, a.x, a.x_batch_stride, a.num_threads) == (3, True, (1 << 64) - 16, 7, 4)
    assert (a.masks.n, a.masks.spec.key1) == (3, (1 << 32) - 1)
    a.geo.N = 5  # attributes of nested structs edit the struct itself
    a.masks.spec.grid = 9
    assert (a.geo.N, a.masks.spec.grid) == (5, 9)
    a.perm = FAKE  # pointers are integer addresses both ways
    assert a.perm == FAKE
    u = C.UnmixArgs(lam=0.3, mu=1 - 0.3)
    assert (u.lam, u.mu) == (torch.tensor(0.3).item(), torch.tensor(1 - 0.3).item())  # float32, as the kernels
    with pytest.raises(TypeError):
        C.MixArgs(bogus=1)
    with pytest.raises(TypeError):
        C.MixArgs(x=-1)  # an address is never negative


# The order of each struct's constructor arguments. The ops build these structs positionally on every call (a
# keyword call costs several times as much), so a change here means changing their call sites too.
FIELD_ORDERS = {
    "MaskSpec": ("grid", "kind", "num", "min_patches", "threshold24", "key0", "key1"),
    "ImageGeometry": ("N", "C", "H", "W", "dtype", "channels_last"),
    "MaskSource": ("given", "out", "n", "grid", "spec"),
    "MixArgs": ("geo", "x", "x_batch_stride", "perm", "filler", "filler_batch_stride", "perm_is_flip", "masks",
                "mixed", "switch_out", "lam", "num_threads"),
    "UnmixArgs": ("geo", "x", "x_batch_stride", "mixup", "lam", "mu", "y1", "y2", "x1", "x2", "out", "num_threads"),
    "MixUnmixArgs": ("mix", "unmix"),
    "InfoNCEProblem": ("q", "q_stride", "cols", "cols_stride", "exclude", "m", "n", "d", "scale", "dtype", "stream"),
    "InfoNCEGradTerms": ("lse", "gl", "pos", "gs", "p", "in_denom"),
}


def test_struct_constructors_take_the_fields_in_the_order_the_ops_pass_them():
    C = _native.require_native("test")

    def distinct(default, i):  # a value unlike the default and unlike every other field's
        if isinstance(default, bool):
            return not default
        if isinstance(default, int):
            return 100 + i
        if isinstance(default, float):
            return 0.25 + i
        return type(default)()  # a nested struct

    for name, fields in FIELD_ORDERS.items():
        cls = getattr(C, name)
        assert cls._fields == fields, f"{name}: the ops build it positionally, update their call sites too"
        defaults = cls()
        values = [distinct(getattr(defaults, f), i) for i, f in enumerate(fields)]
        built = cls(*values)
        for f, v in zip(fields, values):
            if isinstance(v, (bool, int, float)):
                assert getattr(built, f) == v, f"{name}.{f}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fake addresses: only safe where no CUDA kernel can launch")
def test_cuda_entry_points_check_every_argument_then_require_a_gpu():
    """Every CUDA entry point runs the API layer's checks first (ValueError naming the entry point and the
    argument), so each check is tested here without a GPU; with valid arguments it raises RuntimeError for the
    missing device (or CUDA build) before anything is launched."""
    C = _native.require_native("test")
    assert C.cuda_device_count() == 0
    mix = lambda **kw: C.mix_cuda(_mix_args(C, **kw), 0)  # noqa: E731
    unmix = lambda **kw: C.unmix_cuda(_unmix_args(C, **kw), 0)  # noqa: E731
    both = lambda **kw: C.mix_and_unmix_cuda(_mix_unmix_args(C, **kw), 0)  # noqa: E731
    draw = lambda n=1, out=FAKE, **kw: C.make_masks_cuda(_spec(C, **kw), n, out, 0)  # noqa: E731
    cases = [
        (lambda: mix(geo=dict(N=0)), "mix_cuda: image batch must have N, C, H, W >= 1"),
        (lambda: mix(geo=dict(W=0)), "N, C, H, W >= 1"),
        (lambda: mix(geo=dict(dtype=3)), "mix_cuda: dtype code must be 0"),
        (lambda: mix(geo=dict(H=(1 << 24) + 1)), "H and W must be below 2\\^24"),
        (lambda: mix(masks=_masks(C, n=3)), "n_masks must be 1 or N=2, got 3"),
        (lambda: mix(masks=_masks(C, grid=65)), "grid must be in \\[2, 64\\], got 65"),
        (lambda: mix(masks=_generated(C, grid=1)), "grid must be in \\[2, 64\\], got 1"),
        (lambda: mix(masks=_generated(C, kind=2)), "mask kind must be 0"),
        (lambda: mix(masks=_generated(C, num=4)), "num must be in \\[1, 3\\], got 4"),
        (lambda: mix(masks=_generated(C, min_patches=5)), "min_patches must be in \\[1, 4\\]"),
        (lambda: mix(masks=_generated(C, kind=1, threshold24=0)), "threshold24 must be in"),
        (lambda: mix(masks=_generated(C, kind=1, threshold24=(1 << 24) + 1)), "threshold24 must be in"),
        (lambda: mix(masks=_masks(C, given=0, spec=_spec(C))), "output buffer"),
        (lambda: mix(masks=_masks(C, given=0, out=FAKE, grid=4, spec=_spec(C))), "mask grid and spec grid differ"),
        (lambda: mix(x=0), "mix_cuda: x must be non-null"),
        (lambda: mix(mixed=0), "mixed must be non-null"),
        (lambda: mix(lam=0), "lam must be non-null"),
        (lambda: mix(perm=0), "exactly one of perm and filler"),
        (lambda: mix(filler=FAKE), "exactly one of perm and filler"),
        (lambda: mix(perm=0, filler=FAKE, switch_out=FAKE), "a filler has no switch image"),
        (lambda: mix(perm=0, filler=FAKE, perm_is_flip=True), "perm_is_flip needs perm"),
        (lambda: mix(num_threads=0), "num_threads must be >= 1"),
        (lambda: unmix(geo=dict(C=0)), "unmix_cuda: image batch must have N, C, H, W >= 1"),
        (lambda: unmix(x=0), "unmix_cuda: x must be non-null"),
        (lambda: unmix(out=0), "out must be non-null"),
        (lambda: unmix(mixup=False, y1=0, y2=5, x1=0, x2=4), "box must satisfy"),
        (lambda: unmix(mixup=False, y1=0, y2=4, x1=3, x2=2), "box must satisfy"),
        (lambda: unmix(num_threads=0), "num_threads must be >= 1"),
        (lambda: both(mix=dict(x=0)), "mix_and_unmix_cuda: x must be non-null"),
        (lambda: both(mix=dict(perm=0, filler=FAKE)), "no filler in mix_and_unmix"),
        (lambda: both(unmix=dict(out=0)), "out must be non-null"),
        (lambda: both(unmix=dict(mixup=False, y1=0, y2=5)), "box must satisfy"),
        (lambda: draw(grid=65), "make_masks_cuda: grid must be in"),
        (lambda: draw(n=0), "n must be >= 1"),
        (lambda: draw(out=0), "out must be non-null"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # The Un-Mix half reads the MixMask input: its own geometry and input are not even looked at.
    valid = [lambda: mix(), lambda: mix(perm=0, filler=FAKE), lambda: mix(masks=_generated(C)), lambda: unmix(),
             lambda: both(unmix=dict(geo=dict(N=0), x=0)), lambda: draw()]
    cuda_error = "no CUDA device" if _native.cuda_built() else "no CUDA kernels"
    for call in valid:
        with pytest.raises(RuntimeError, match=cuda_error):
            call()
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="CUDA"):
        _native.require_cuda_tensor("mix", x)


def test_cpu_entry_points_run_the_same_checks():
    """Arguments that fail a check never reach a kernel (which would read the fake addresses)."""
    C = _native.require_native("test")
    with pytest.raises(ValueError, match="mixfast._C.mix_cpu: lam must be non-null"):
        C.mix_cpu(_mix_args(C, lam=0))
    with pytest.raises(ValueError, match="mixfast._C.unmix_cpu: box must satisfy"):
        C.unmix_cpu(_unmix_args(C, mixup=False, y2=5))
    with pytest.raises(ValueError, match="mixfast._C.mix_and_unmix_cpu: no filler"):
        C.mix_and_unmix_cpu(_mix_unmix_args(C, mix=dict(perm=0, filler=FAKE)))
    with pytest.raises(ValueError, match="mixfast._C.make_masks_cpu: n must be >= 1"):
        C.make_masks_cpu(_spec(C), 0, FAKE, 1)
    with pytest.raises(ValueError, match="mixfast._C.block_candidate: grid must be in"):
        C.block_candidate(_spec(C, grid=1), 0, 0, 1)


def test_mix_and_unmix_reads_the_mix_input_for_both_halves():
    """The API layer takes Un-Mix's geometry, input, batch stride and threads from the MixMask half, whatever the
    caller left in the Un-Mix struct."""
    C = _native.require_native("test")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    masks = ref.make_masks(1, 4, 0.5, seed=0, step=0)
    perm = torch.tensor([2, 3, 0, 1])
    mixed, lam, x_um = torch.empty_like(x), torch.empty(1), torch.empty_like(x)
    a = C.MixUnmixArgs(
        mix=C.MixArgs(geo=_native.geometry("test", x, False), x=x.data_ptr(), x_batch_stride=3 * 8 * 8,
                      perm=perm.data_ptr(), masks=C.MaskSource(n=1, grid=4, given=masks.view(torch.uint8).data_ptr()),
                      mixed=mixed.data_ptr(), lam=lam.data_ptr()),
        unmix=C.UnmixArgs(mixup=True, lam=0.25, mu=0.75, out=x_um.data_ptr(), num_threads=0))
    C.mix_and_unmix_cpu(a)
    assert torch.equal(mixed, ref.mix(x, masks, perm)[0])
    assert torch.equal(x_um, ref.unmix(x, 0.25, True)[0])


NVCC = _nvcc()
CUDA_SOURCES = sorted(p.name for p in (REPO / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_compiles_for_sm80_and_sm90_without_warnings(source, tmp_path):
    """The CUDA sources cannot run here, but each must compile for A100 (sm_80) and H100 (sm_90), with the build's
    flags and the host compiler's -Wall, without a warning."""
    cmd = [NVCC, "-std=c++17", "-O3", "-Xcompiler=-ffp-contract=off", "-Xcompiler=-Wall", "-c",
           str(REPO / "csrc" / "cuda" / source), "-I", str(REPO / "csrc" / "include"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


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

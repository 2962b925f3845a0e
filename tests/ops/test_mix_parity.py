"""Parity of the mix ops' backends with the reference (mixfast/ops/reference.py).

Backends: ``cpu`` (C++/OpenMP of mixfast._C), ``triton`` (kernels/mix.py; on a CPU-only
machine in Triton's interpreter, small sizes) and ``cuda`` (mixfast._C; marked ``gpu``,
skipped without a GPU -- on a GPU machine Triton runs compiled on CUDA tensors).

* ``make_masks`` is bit-identical across backends (shared Philox + float32 generator).
* masking (MixMask, CutMix) is pixel-exact and λ exact; mixup within a per-dtype tolerance.
* ragged H, W (g does not divide them), odd batches, channels_last, non-contiguous inputs.
* bad inputs raise errors that name the problem; explicit backends fail loudly.

Without a GPU the Triton cases need ``TRITON_INTERPRET=1`` set before ``triton`` is first
imported, so this file re-runs its own ``triton`` cases in a subprocess with the variable
set (``test_triton_cases_in_interpreter``); the variable never leaks into other tests.
"""

import importlib
import os

import pytest
import torch

from mixfast import ops
from mixfast.ops import _backend, _native
from mixfast.ops import reference as ref

mix_mod = importlib.import_module("mixfast.ops.mix")  # the module (mixfast.ops.mix is also the function)

GPU = torch.cuda.is_available()
INTERPRETED_TRITON = not GPU
# Triton cases run in this process on a GPU, or when this process was started with the
# interpreter on (the subprocess of test_triton_cases_in_interpreter).
TRITON_HERE = GPU or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_present() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _backend_param(name):
    if name == "cuda":
        return pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
    return pytest.param(name, id=name)


BACKENDS = [_backend_param(b) for b in ("cpu", "triton", "cuda") if b != "triton" or TRITON_HERE]


def _device(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and GPU):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def use_backend(monkeypatch):
    """Force MIXFAST_BACKEND for the test; skip backends this machine cannot run."""

    def _use(backend: str) -> torch.device:
        if backend in ("cpu", "cuda") and not _native.available():
            pytest.fail("mixfast._C is not built (pip install -e . builds it); see tests/test_native_build.py")
        if backend == "triton" and not _triton_present():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("MIXFAST_BACKEND", backend)
        return _device(backend)

    return _use


def _small(backend: str) -> bool:
    return backend == "triton" and INTERPRETED_TRITON


def _randn(shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other image of a larger batch: per-image dense, batch-strided
        big = torch.stack([x, torch.full_like(x, 7.0)], 1).flatten(0, 1)
        return big[::2]
    if layout == "transposed":  # H and W swapped in memory: neither NCHW nor NHWC dense
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def _assert_same_layout(out, expect):
    assert out.shape == expect.shape and out.dtype == expect.dtype
    assert out.is_contiguous() == expect.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last) == expect.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------
# the shared random core
# ---------------------------------------------------------------------------------------

KAT = [  # Random123's known answers for Philox4x32-10: (counter, key) -> words
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers_cpp_python():
    C = _native.require_native("test")
    for ctr, key, words in KAT:
        assert ref.philox4x32_10(*ctr, *key) == words
        assert tuple(C.philox4x32_10(*ctr, *key)) == words
    g = torch.Generator().manual_seed(0)  # and on random counters/keys, C++ == Python
    for _ in range(200):
        v = torch.randint(0, 2**32, (6,), generator=g, dtype=torch.int64).tolist()
        assert tuple(C.philox4x32_10(*v)) == ref.philox4x32_10(*v)


@pytest.mark.skipif(not TRITON_HERE, reason="runs in test_triton_cases_in_interpreter's subprocess")
def test_philox_known_answers_triton(use_backend):
    device = use_backend("triton")
    from kernels import mix as kmix

    ctr = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64, device=device)
    for row, (_, key, words) in enumerate(KAT):
        assert tuple(kmix.philox(ctr[row:row + 1], *key)[0].tolist()) == words
    g = torch.Generator().manual_seed(1)
    ctrs = torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64)
    got = kmix.philox(ctrs.to(device), 0x12345678, 0x9ABCDEF0).cpu()
    for c, w in zip(ctrs.tolist(), got.tolist()):
        assert tuple(w) == ref.philox4x32_10(*c, 0x12345678, 0x9ABCDEF0)


def test_block_candidates_bit_identical_cpp_python():
    """The float32 chain uniform -> area/aspect -> sqrt -> round -> randint, on 20k draws."""
    C = _native.require_native("test")
    for grid in (2, 3, 4, 7, 8, 16, 32, 64):
        for ratio in (0.1, 0.5, 0.9):
            spec = ref.mask_spec(grid, ratio, "block", seed=grid, step=int(ratio * 10))
            cspec = _native.mask_spec(spec)
            for draw in range(0, 800, 1):
                rem = 1 + (draw * 7919) % spec.num
                py = ref._block_candidate(spec, draw % 5, draw, rem)
                assert tuple(C.block_candidate(cspec, draw % 5, draw, rem)) == py, (grid, ratio, draw, rem)


# ---------------------------------------------------------------------------------------
# make_masks: bit-identical on every backend
# ---------------------------------------------------------------------------------------

GRIDS = (2, 4, 8, 16, 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["block", "discrete"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_batch", "per_sample"])
def test_make_masks_bit_identical(use_backend, backend, kind, per_sample):
    use_backend(backend)
    small = _small(backend)
    seeds = (0, 12345) if small else (0, 1, 2**40 + 3, -7)
    ratios = (0.5, 0.3) if small else (0.5, 0.1, 0.37, 0.9)
    grids = GRIDS if small else GRIDS + (3, 48, 64)
    n = (3 if small else 9) if per_sample else 1
    for grid in grids:
        for k, seed in enumerate(seeds):
            ratio = ratios[k % len(ratios)]
            step = 100 * k + grid
            got = ops.make_masks(n, grid, ratio, kind, seed=seed, step=step)
            want = ref.make_masks(n, grid, ratio, kind, seed=seed, step=step)
            assert got.dtype == torch.bool and got.device.type == "cpu" and got.shape == (n, grid, grid)
            assert torch.equal(got, want), (backend, kind, grid, seed, ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["block", "discrete"])
def test_mask_keys_on_both_sides_of_2_31(use_backend, backend, kind):
    """Philox keys are uint32; the Triton kernels take them as the int32 of the same bits (one compiled kernel for
    every seed), so keys >= 2^31 must draw and mix the reference's masks exactly like small ones."""
    device = use_backend(backend)
    pairs = [(seed, step) for seed in range(64) for step in (0, 1)]
    high = next(p for p in pairs if min(ref.mask_key(*p)) >= 2**31)
    low = next(p for p in pairs if max(ref.mask_key(*p)) < 2**31)
    B, g = 4, 4
    x = _randn((B, 2, 10, 10), seed=3, device=device)
    flip = torch.arange(B - 1, -1, -1, device=device)
    for seed, step in (high, low):
        want_masks = ref.make_masks(B, g, 0.5, kind, seed=seed, step=step)
        assert torch.equal(ops.make_masks(B, g, 0.5, kind, seed=seed, step=step), want_masks), (seed, step)
        mixed, _, lam, masks = ops.make_masks_and_mix(x, grid=g, ratio=0.5, kind=kind, per_sample=True, seed=seed,
                                                      step=step)
        want = ref.mix(x, want_masks, flip)
        assert torch.equal(masks.cpu(), want_masks) and torch.equal(mixed, want[0]) and torch.equal(lam, want[2])


def test_make_masks_native_statistics():
    """The C++ generator on many masks: same spec statistics as the reference (SPEC §1)."""
    _native.require_native("test")
    m = mix_mod.make_masks(4000, 8, 0.5, "block", seed=11, step=3)
    c = m.flatten(1).sum(1)
    assert int(c.max()) <= 32 and int(c.min()) >= 28
    assert (c == 32).float().mean().item() > 0.9
    assert torch.equal(m[:50], ref.make_masks(50, 8, 0.5, "block", seed=11, step=3))


# ---------------------------------------------------------------------------------------
# mix: pixel-exact, λ exact
# ---------------------------------------------------------------------------------------

SHAPES_FULL = [  # B, C, H, W, g
    (5, 3, 32, 32, 4),    # odd batch
    (7, 3, 30, 17, 4),    # ragged: g divides neither H nor W
    (4, 2, 24, 40, 8),
    (1, 1, 5, 3, 2),      # a single image, tiny
    (6, 3, 16, 16, 32),   # grid finer than the image (nearest downsampling)
    (3, 4, 82, 7, 2),     # PyTorch's float32 index rounding (in=2, out=82)
]
SHAPES_SMALL = [(5, 3, 12, 12, 4), (3, 2, 10, 7, 4), (2, 1, 6, 6, 8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _perms(B, device):
    g = torch.Generator().manual_seed(B)
    return {"flip": torch.arange(B - 1, -1, -1, device=device),
            "random": torch.randperm(B, generator=g).to(device),
            "cycle": torch.roll(torch.arange(B), 1).to(device)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_mix_pixel_exact(use_backend, backend, dtype, layout):
    device = use_backend(backend)
    small = _small(backend)
    for B, C, H, W, g in (SHAPES_SMALL if small else SHAPES_FULL):
        x = _layout(_randn((B, C, H, W), seed=B * 100 + H, dtype=dtype, device=device), layout)
        for per_sample in (False, True):
            masks = ref.make_masks(B if per_sample else 1, g, 0.5, seed=H, step=W)
            for name, perm in _perms(B, device).items():
                if small and name == "cycle":
                    continue
                want = ref.mix(x, masks, perm, want_switch=True)
                got = ops.mix(x, masks, perm, want_switch=True)
                for o, e in zip(got[:2], want[:2]):
                    _assert_same_layout(o, e)
                    assert torch.equal(o, e), (backend, B, C, H, W, g, per_sample, name)
                assert got[2].dtype == torch.float32 and torch.equal(got[2], want[2])
                mixed, switch, lam = ops.mix(x, masks, perm)
                assert switch is None and torch.equal(mixed, want[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_mix_non_contiguous_inputs(use_backend, backend, layout):
    device = use_backend(backend)
    B, C, H, W, g = (4, 2, 10, 12, 4) if _small(backend) else (6, 3, 20, 26, 8)
    x = _layout(_randn((B, C, H, W), seed=5, device=device), layout)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    masks = ref.make_masks(B, g, 0.4, seed=1, step=2)
    perm = _perms(B, device)["random"]
    want = ref.mix(x, masks, perm, want_switch=True)
    got = ops.mix(x, masks, perm, want_switch=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    filler = _layout(_randn((B, C, H, W), seed=6, device=device), layout)
    assert torch.equal(ops.mix(x, masks, None, filler=filler)[0], ref.mix(x, masks, None, filler=filler)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_mix_filler(use_backend, backend, dtype):
    device = use_backend(backend)
    B, C, H, W = (3, 2, 9, 11) if _small(backend) else (5, 3, 30, 17)
    x = _randn((B, C, H, W), seed=1, dtype=dtype, device=device)
    masks = ref.make_masks(B, 4, 0.5, seed=3, step=1)
    noise = _randn((B, C, H, W), seed=2, dtype=dtype, device=device)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        # the filler may be laid out differently from x
        for filler in (torch.zeros_like(x), noise, noise.contiguous(memory_format=torch.channels_last)):
            got = ops.mix(xx, masks, None, filler=filler)
            want = ref.mix(xx, masks, None, filler=filler)
            assert got[1] is None and torch.equal(got[2], want[2])
            _assert_same_layout(got[0], want[0])
            assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_make_masks_and_mix_fused(use_backend, backend, dtype, layout):
    """One call (one launch on CUDA/Triton) == make_masks + mix, masks included."""
    device = use_backend(backend)
    small = _small(backend)
    cases = [(5, 3, 12, 12, 4, "block"), (4, 2, 10, 7, 8, "discrete")] if small else [
        (7, 3, 30, 17, 4, "block"), (6, 3, 32, 32, 8, "block"), (5, 2, 24, 40, 16, "discrete"), (1, 3, 8, 8, 2, "block")]
    for B, C, H, W, g, kind in cases:
        x = _layout(_randn((B, C, H, W), seed=B + H, dtype=dtype, device=device), layout)
        for per_sample in (False, True):
            for perm in (None, _perms(B, device)["random"]):
                kw = dict(grid=g, ratio=0.5, kind=kind, per_sample=per_sample, seed=B, step=H)
                mixed, switch, lam, masks = ops.make_masks_and_mix(x, perm, want_switch=True, **kw)
                want_masks = ref.make_masks(B if per_sample else 1, g, 0.5, kind, seed=B, step=H)
                assert masks.device == x.device and torch.equal(masks.cpu(), want_masks)
                p = perm if perm is not None else torch.arange(B - 1, -1, -1, device=device)
                want = ref.mix(x, want_masks, p, want_switch=True)
                _assert_same_layout(mixed, want[0])
                assert torch.equal(mixed, want[0]) and torch.equal(switch, want[1]) and torch.equal(lam, want[2])
                if perm is None and not per_sample:  # SPEC §1: with flip, switch = flip(mixed)
                    assert torch.equal(switch, mixed.flip(0))
                    assert torch.equal(mixed[B // 2], x[B // 2]) if B % 2 else True


def test_lambda_counts_pixels_when_grid_does_not_divide():
    _native.require_native("test")
    g, H, W = 4, 30, 17
    masks = torch.zeros(1, g, g, dtype=torch.bool)
    masks[0, 0, :] = True
    masks[0, 2, 1] = True
    x = _randn((2, 1, H, W), seed=0)
    lam = mix_mod.mix(x, masks, torch.tensor([1, 0]))[2]
    up = ref.upsample_masks(masks, H, W)
    assert lam.item() == torch.tensor(up.sum().item() / (H * W), dtype=torch.float32).item()
    assert lam.item() != masks.float().mean().item()


# ---------------------------------------------------------------------------------------
# Un-Mix and MixMask + Un-Mix
# ---------------------------------------------------------------------------------------

MIXUP_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
             torch.float16: dict(atol=1e-3, rtol=1e-3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_unmix(use_backend, backend, dtype, layout):
    device = use_backend(backend)
    shapes = [(5, 3, 9, 11), (2, 1, 6, 5)] if _small(backend) else [(5, 3, 30, 17), (4, 3, 32, 32), (1, 2, 7, 9)]
    for B, C, H, W in shapes:
        x = _layout(_randn((B, C, H, W), seed=H * W, dtype=dtype, device=device), layout)
        for lam in (0.0, 0.3, 0.77, 1.0):
            got, lam_eff = ops.unmix(x, lam, True)
            want, want_lam = ref.unmix(x, lam, True)
            _assert_same_layout(got, want)
            assert lam_eff == want_lam
            torch.testing.assert_close(got, want, **MIXUP_TOL[dtype])
        for box in ((1, H - 2, 2, W - 1), (0, H, 0, W), (3, 3, 0, W), (0, 1, W - 1, W)):
            got, lam_eff = ops.unmix(x, 0.5, False, box=box)
            want, want_lam = ref.unmix(x, 0.5, False, box=box)
            _assert_same_layout(got, want)
            assert torch.equal(got, want) and lam_eff == pytest.approx(want_lam, abs=1e-15)
            assert torch.equal(got[B // 2], x[B // 2]) if B % 2 else True  # middle pairs with itself


def test_unmix_mixup_bitexact_cpu():
    """The C++ mixup rounds like the reference (two float32 products, a float32 sum, one
    rounding to the dtype): equal bits, not just close."""
    _native.require_native("test")
    for dtype in DTYPES:
        x = _randn((7, 3, 19, 23), seed=3, dtype=dtype)
        for lam in (0.1234567, 0.5, 0.9):
            assert torch.equal(mix_mod.unmix(x, lam, True)[0], ref.unmix(x, lam, True)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_mix_and_unmix_equals_separate_ops(use_backend, backend, dtype, layout):
    device = use_backend(backend)
    shapes = [(5, 3, 9, 11, 4)] if _small(backend) else [(5, 3, 30, 17, 4), (6, 3, 32, 32, 8), (1, 1, 8, 8, 2)]
    for B, C, H, W, g in shapes:
        x = _layout(_randn((B, C, H, W), seed=B * H, dtype=dtype, device=device), layout)
        perm = _perms(B, device)["random"]
        for per_sample in (False, True):
            masks = ref.make_masks(B if per_sample else 1, g, 0.5, seed=B, step=W)
            for use_mixup, box in ((True, None), (False, (1, H - 1, 2, W - 3))):
                mixed, switch, lam, x_um, lam_um = ops.mix_and_unmix(x, masks, perm, 0.3, use_mixup, box,
                                                                     want_switch=True)
                wm = ref.mix(x, masks, perm, want_switch=True)
                wu = ref.unmix(x, 0.3, use_mixup, box=box)
                assert torch.equal(mixed, wm[0]) and torch.equal(switch, wm[1]) and torch.equal(lam, wm[2])
                _assert_same_layout(x_um, wu[0])
                torch.testing.assert_close(x_um, wu[0], **MIXUP_TOL[dtype])
                if not use_mixup:
                    assert torch.equal(x_um, wu[0])
                assert lam_um == pytest.approx(wu[1], abs=1e-15)


# ---------------------------------------------------------------------------------------
# bad inputs, backend choice, autograd, torch.compile
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(use_backend, backend):
    device = use_backend(backend)
    x = _randn((4, 3, 8, 8), seed=0, device=device)
    masks = ref.make_masks(1, 4, 0.5, seed=0, step=0)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0)).to(device)
    cases = [
        (lambda: ops.mix(x, masks, torch.tensor([0, 0, 1, 2], device=device)), "permutation"),
        (lambda: ops.mix(x, masks, perm[:3]), "perm"),
        (lambda: ops.mix(x, masks, perm.int()), "perm"),
        (lambda: ops.mix(x, torch.zeros(1, 4, 5, dtype=torch.bool), perm), "masks"),
        (lambda: ops.mix(x, torch.zeros(1, 65, 65, dtype=torch.bool), perm), "grid"),
        (lambda: ops.mix(x, masks.float(), perm), "masks"),
        (lambda: ops.mix(x[0], masks, perm), "4-D"),
        (lambda: ops.mix((x * 10).long(), masks, perm), "floating"),
        (lambda: ops.mix(x[:0], masks, perm[:0]), "empty"),
        (lambda: ops.mix(x, masks, perm, want_switch=True, filler=torch.zeros_like(x)), "want_switch"),
        (lambda: ops.make_masks_and_mix(x, grid=1, ratio=0.5, seed=0, step=0), "grid="),
        (lambda: ops.make_masks_and_mix(x, grid=8, ratio=1.0, seed=0, step=0), "ratio="),
        (lambda: ops.make_masks_and_mix(x, grid=8, ratio=0.5, kind="cross", seed=0, step=0), "kind="),
        (lambda: ops.make_masks(2, 65, 0.5, seed=0, step=0), "grid="),
        (lambda: ops.make_masks(2, 8, -0.1, seed=0, step=0), "ratio="),
        (lambda: ops.unmix(x, 1.5, True), "lam"),
        (lambda: ops.unmix(x, 0.5, False, box=(0, 9, 0, 4)), "box"),
        (lambda: ops.mix_and_unmix(x, masks, perm, 0.5, False, box=(5, 4, 0, 1)), "box"),
        (lambda: ops.mix_and_unmix(x, masks, perm[:2], 0.5, True), "perm"),
        # values out of range or repeated: a ValueError on every backend (read on the host),
        # never an out-of-bounds read or a device-side assert that would end the CUDA context
        (lambda: ops.mix(x, masks, torch.tensor([0, 1, 2, 7], device=device)), "permutation"),
        (lambda: ops.make_masks_and_mix(x, torch.tensor([3, 2, 1, -1], device=device), grid=4, ratio=0.5, seed=0,
                                        step=0), "permutation"),
        (lambda: ops.mix_and_unmix(x, masks, torch.tensor([1, 1, 2, 3], device=device), 0.5, True), "permutation"),
    ]
    for fn, word in cases:
        with pytest.raises(ValueError, match=word):
            fn()
    # the device is still usable after every bad call
    assert torch.equal(ops.mix(x, masks, perm)[0], ref.mix(x, masks, perm)[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    if device.type == "cuda":
        with pytest.raises(ValueError, match="device"):
            ops.mix(x, masks, perm.cpu())


def test_explicit_backend_fails_loudly(monkeypatch):
    x = _randn((2, 1, 4, 4), seed=0)
    masks = ref.make_masks(1, 2, 0.5, seed=0, step=0)
    perm = torch.tensor([1, 0])
    monkeypatch.setenv("MIXFAST_BACKEND", "cuda")
    if not GPU:
        with pytest.raises(_backend.BackendUnavailable, match="cuda"):
            ops.mix(x, masks, perm)
    monkeypatch.setenv("MIXFAST_BACKEND", "cpu")
    with pytest.raises(_backend.BackendUnavailable, match="float64"):
        ops.mix(x.double(), masks, perm)
    monkeypatch.setenv("MIXFAST_BACKEND", "auto")  # auto: float64 falls back to the reference quietly
    assert torch.equal(ops.mix(x.double(), masks, perm)[0], ref.mix(x.double(), masks, perm)[0])
    monkeypatch.setenv("MIXFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MIXFAST_BACKEND"):
        ops.mix(x, masks, perm)


def test_auto_picks_native_on_cpu(monkeypatch):
    monkeypatch.setenv("MIXFAST_BACKEND", "auto")
    assert mix_mod.backend_for("mix", torch.device("cpu")) == ("cpu" if _native.available() else "torch")
    assert mix_mod.backend_for("mix", torch.device("cpu"), torch.float64) == "torch"


def test_native_api_layer_checks_arguments():
    """The C++ API layer rejects bad structs before any kernel runs (ValueError)."""
    C = _native.require_native("test")
    a = C.MixArgs()
    with pytest.raises(ValueError, match="N, C, H, W"):
        C.mix_cpu(a)
    a.geo.N = a.geo.C = a.geo.H = a.geo.W = 2
    a.masks.n, a.masks.grid = 3, 2
    with pytest.raises(ValueError, match="n_masks"):
        C.mix_cpu(a)
    spec = _native.mask_spec(ref.mask_spec(8, 0.5, "block", 0, 0))
    spec.grid = 65
    with pytest.raises(ValueError, match="grid"):
        C.make_masks_cpu(spec, 1, 1)


def test_gradients_flow_through_reference_path():
    x = _randn((4, 2, 8, 8), seed=1).requires_grad_()
    masks = ref.make_masks(1, 4, 0.5, seed=0, step=0)
    mixed, switch, _ = ops.mix(x, masks, torch.tensor([3, 2, 1, 0]), want_switch=True)
    (mixed.sum() + 2 * switch.sum()).backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))  # every pixel lands once in mixed, once in switch


def test_torch_compile_traces_without_graph_breaks():
    _native.require_native("test")
    torch._dynamo.reset()
    x = _randn((4, 3, 16, 16), seed=2)
    masks = ref.make_masks(1, 4, 0.5, seed=0, step=0)
    perm = torch.tensor([2, 3, 0, 1])

    def model(x, masks, perm):
        mixed, switch, lam = ops.mix(x, masks, perm, want_switch=True)
        fused, _, lam2, m2 = ops.make_masks_and_mix(x, grid=8, ratio=0.5, seed=3, step=4)
        um, lam_um = ops.unmix(x, 0.25, False, box=(2, 10, 3, 12))
        return mixed * lam + switch + fused * lam2 + um * lam_um + m2.float().mean()

    want = model(x, masks, perm)
    for backend in ("eager", "aot_eager"):
        compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
        assert torch.equal(compiled(x, masks, perm), want)
    torch._dynamo.reset()


def test_fake_tensors_match_real_outputs():
    """The fake (meta) implementations agree with the real ops on shape, dtype, strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _randn((3, 2, 9, 7), seed=0).contiguous(memory_format=torch.channels_last)
    masks = ref.make_masks(3, 4, 0.5, seed=0, step=0)
    perm = torch.tensor([2, 0, 1])
    real = torch.ops.mixfast.mix(x, masks, perm, None, True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.mixfast.mix(mode.from_tensor(x), mode.from_tensor(masks), mode.from_tensor(perm), None, True)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()
    torch.library.opcheck(torch.ops.mixfast.mix.default, (x, masks, perm, None, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.mixfast.unmix.default, (x, 0.3, True, 0, 0, 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("random_partner", [False, True])
def test_mixers_keep_their_results(monkeypatch, per_sample, random_partner):
    """MixMaskMixer now calls ops.make_masks_and_mix (one launch on a GPU) and UnMixer
    ops.unmix: on every backend they give what make_masks + mix of the reference gave."""
    from mixfast.config import MixMaskConfig, UnMixConfig
    from mixfast.mixing import MixMaskMixer, UnMixer
    from mixfast.mixing.rng import STREAM_MIXMASK, step_generator

    x = _randn((6, 3, 32, 32), seed=9)
    seed, rank, step = 1, 0, 5
    cfg = MixMaskConfig(per_sample=per_sample, ratio=0.5, grid=8)
    mixer = MixMaskMixer(cfg, seed=seed, rank=rank)
    args = mixer.mask_args(step)
    assert (args["grid"], args["ratio"], args["kind"], args["step"]) == (8, 0.5, "block", step)
    masks = ref.make_masks(6 if per_sample else 1, **args)
    perm = (torch.randperm(6, generator=step_generator(seed, rank, STREAM_MIXMASK, step)) if random_partner
            else torch.arange(5, -1, -1))
    want_mixed, _, want_lam = ref.mix(x, masks, perm)
    for backend in ("torch", "auto", "cpu"):
        monkeypatch.setenv("MIXFAST_BACKEND", backend)
        mm = MixMaskMixer(cfg, seed=seed, rank=rank)(x, step=step, random_partner=random_partner)
        assert torch.equal(mm.masks, masks) and torch.equal(mm.perm, perm)
        assert torch.equal(mm.mixed, want_mixed) and torch.equal(mm.pixel_lam, want_lam)
        um = UnMixer(UnMixConfig(), seed=seed, rank=rank)(x, step=step)
        if backend == "torch":
            want_um = (um.mixed, um.lam)
        assert torch.equal(um.mixed, want_um[0]) and um.lam == want_um[1]


@pytest.mark.skipif(TRITON_HERE, reason="the triton cases run in this process")
def test_triton_cases_in_interpreter(triton_cases_in_interpreter):
    """This file's triton cases in a subprocess with TRITON_INTERPRET=1 (CPU tensors, small sizes)."""
    print(triton_cases_in_interpreter(__file__, min_passed=30,
                                      ignore_warnings=("DeprecationWarning", "RuntimeWarning")))


def test_cpu_output_cache_reuses_only_dead_outputs(monkeypatch):
    """Native CPU outputs come from _native.CpuOutputCache: their memory is handed out again
    only once no tensor, view, storage or numpy array of the caller's refers to it."""
    _native.require_native("test")
    monkeypatch.setenv("MIXFAST_BACKEND", "cpu")
    cache = _native.CpuOutputCache(min_bytes=1 << 18)  # outputs below are 393 kB
    monkeypatch.setattr(_native, "output_cache", cache)
    x = _randn((8, 3, 64, 64), seed=0)
    flip = torch.arange(7, -1, -1)
    want = {s: ref.mix(x, ref.make_masks(1, 8, 0.5, seed=0, step=s), flip)[0] for s in (1, 2)}

    def run(step):
        return ops.make_masks_and_mix(x, grid=8, ratio=0.5, seed=0, step=step)[0]

    out = run(1)
    ptr = out.data_ptr()
    holders = [
        (lambda t: t[1:3], lambda h: torch.equal(h, want[1][1:3])),
        (lambda t: t.untyped_storage(), lambda h: torch.equal(torch.empty(0).set_(h, 0, x.shape, x.stride()), want[1])),
        (lambda t: t.numpy(), lambda h: torch.equal(torch.from_numpy(h), want[1])),
    ]
    for hold, intact in holders:
        held = hold(out)
        del out
        other = run(2)
        assert other.data_ptr() != ptr, "memory still referenced by the caller was handed out again"
        assert torch.equal(other, want[2]) and intact(held)
        del held, other
        out = run(1)  # both buffers free now: the first one comes back
        assert out.data_ptr() == ptr and torch.equal(out, want[1])
    monkeypatch.setenv("MIXFAST_CPU_OUTPUT_CACHE", "0")
    cached = sum(len(v) for v in cache._bufs.values())
    del out
    assert torch.equal(run(1), want[1]) and sum(len(v) for v in cache._bufs.values()) == cached

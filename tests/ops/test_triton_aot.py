"""The Triton kernels' GPU code path, checked on a machine without a GPU.

The interpreter runs the kernels' logic (test_mix_parity, test_infonce) but never compiles them: it accepts code a
GPU compile refuses, and it says nothing about registers. Here the kernel variants the ops launch (a covering
sample, below) are compiled ahead of time for sm_80 (A100) and sm_90 (H100/H200) through the host wrappers' own
launch descriptions (`kernels.aot.compile_launch` hands their arguments to Triton's binder), so what is compiled is
what is launched.

Variants: a full cross product of flags x dtypes x grids x archs is ~670 compiles for the mix kernels alone (about
nine minutes on two cores at ~0.8 s each), so the sets below are sampled, and the tests assert what the samples
cover:
* every value of every constexpr flag, every data type a kernel sees, every mask grid size GP (2..64) of the
  mixing kernel and the smallest and largest of the others, on both archs;
* in full, the variants training runs: float32 and bfloat16 images, NCHW and channels_last, per-batch masks at
  the configs' grid, every op the mixers call (those must also not spill);
* soft_infonce: each dtype at D=128 (training's width) with every backward-flag combination the autograd function
  produces, and D=256 (the widest, smaller tiles) per dtype.

Needs Triton; skipped in a process that runs Triton in its interpreter (the kernels are then not compilable).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels defined in interpreter mode cannot be compiled for a GPU")

from kernels import aot  # noqa: E402
from kernels import infonce as kinf  # noqa: E402
from kernels import mix as kmix  # noqa: E402

ARCHS = (80, 90)
SMEM_A100 = 163 * 1024  # the largest dynamic shared memory per block on sm_80 (H100: 227 KB)
TRAIN_GRID = 8  # the largest grid in configs/*.json (they use 2, 4 and 8)
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _key(variant: dict) -> tuple:
    return tuple(sorted(variant.items(), key=lambda kv: kv[0]))


@functools.lru_cache(maxsize=None)
def _compiled_mix(op: str, arch: int, variant: tuple):
    return kmix.compile_for_gpu(op, arch, **dict(variant))


@functools.lru_cache(maxsize=None)
def _compiled_infonce(dtype, d: int, arch: int, variant: tuple) -> dict:
    return kinf.compile_for_gpu(dtype, d, arch, **dict(variant))


# ---------------------------------------------------------------------------------------------------------------
# mix kernels
# ---------------------------------------------------------------------------------------------------------------


def _trainer_mix_variants():
    """What mixfast.mixing calls: make_masks_and_mix (flip or a random partner), mix with a filler (erase
    baselines), mix_and_unmix and unmix (mixup or CutMix); per-batch masks, no switch output."""
    out = []
    for dtype in (F32, BF16):
        for cl in (False, True):
            base = dict(dtype=dtype, channels_last=cl)
            mask = dict(base, grid=TRAIN_GRID)
            out += [("make_masks_and_mix", dict(mask, flip=True)), ("make_masks_and_mix", dict(mask, flip=False)),
                    ("mix", dict(mask, filler=True)),
                    ("mix_and_unmix", dict(mask, use_mixup=True)), ("mix_and_unmix", dict(mask, use_mixup=False)),
                    ("unmix", dict(base, use_mixup=True)), ("unmix", dict(base, use_mixup=False))]
    return out


TRAINER_MIX = _trainer_mix_variants()
# The rest of the flag values, each at least once, spread over grids, dtypes and layouts (both archs compile all).
OTHER_MIX = [
    ("make_masks", dict(grid=2)),
    ("make_masks", dict(grid=64)),
    ("make_masks_and_mix", dict(dtype=BF16, grid=64, per_sample=True, want_switch=True, flip=True)),
    ("make_masks_and_mix", dict(dtype=F32, channels_last=True, grid=4, per_sample=True, want_switch=True)),
    ("make_masks_and_mix", dict(dtype=F16, grid=32, want_switch=False, flip=False, per_sample=True)),
    ("mix", dict(dtype=F32, grid=16, per_sample=True, want_switch=True)),
    ("mix", dict(dtype=F16, channels_last=True, grid=64, per_sample=False, want_switch=False)),
    ("mix", dict(dtype=BF16, grid=2, per_sample=True, filler=True)),
    ("mix_and_unmix", dict(dtype=F16, channels_last=True, grid=64, per_sample=True, want_switch=True,
                           use_mixup=True)),
    ("mix_and_unmix", dict(dtype=F16, grid=2, use_mixup=False)),
    ("unmix", dict(dtype=F16, use_mixup=True, channels_last=True)),
    ("unmix", dict(dtype=F16, use_mixup=False)),
    # images whose size is not a multiple of 16 elements (3 x 7 x 7): the kernels' unaligned variants
    ("make_masks_and_mix", dict(dtype=BF16, channels_last=True, flip=True, image=7)),
    ("mix", dict(dtype=F32, filler=True, image=7)),
    ("mix_and_unmix", dict(dtype=BF16, use_mixup=True, image=7)),
    ("unmix", dict(dtype=F32, use_mixup=False, image=7)),
]


def _covered(pairs):
    """{(kernel name, constexpr or "data"): set of values} over the launches of (op, variant) pairs."""
    seen = {}
    for op, variant in pairs:
        launch = kmix.example_launch(op, **variant)
        name = launch.kernel.fn.__name__
        for k, v in launch.kwargs.items():
            seen.setdefault((name, k), set()).add(v)
        data = launch.kwargs.get("x", launch.kwargs.get("out"))  # the images (the masks for make_masks)
        seen.setdefault((name, "data"), set()).add(data.dtype)
    return seen


def test_mix_samples_cover_every_flag_dtype_and_grid():
    """The sample is what makes the compile test below complete: every constexpr value the host wrappers can
    produce (HAS_FILLER only without PAIR / WANT_SWITCH / GENERATE), every element type, GP = 2..64."""
    seen = _covered(TRAINER_MIX + OTHER_MIX)
    both = {False, True}
    for flag in ("PAIR", "HAS_FILLER", "WANT_SWITCH", "GENERATE", "PER_SAMPLE", "CHANNELS_LAST"):
        assert seen[("_mix_kernel", flag)] == both, flag
    for flag in ("WANT_SWITCH", "PER_SAMPLE", "MIXUP", "CHANNELS_LAST"):
        assert seen[("_mix_unmix_kernel", flag)] == both, flag
    for flag in ("MIXUP", "CHANNELS_LAST"):
        assert seen[("_unmix_kernel", flag)] == both, flag
    for kernel in ("_mix_kernel", "_mix_unmix_kernel", "_unmix_kernel"):
        assert seen[(kernel, "ALIGNED")] == both, kernel
    assert seen[("_mix_kernel", "GP")] == {2, 4, 8, 16, 32, 64}
    assert seen[("_mix_unmix_kernel", "GP")] == {2, 8, 64} and seen[("_make_masks_kernel", "GP")] == {2, 64}
    assert seen[("_mix_kernel", "data")] == {torch.int32, torch.int16}  # fp32 / 16-bit images are moved as bits
    for kernel in ("_unmix_kernel", "_mix_unmix_kernel"):
        assert seen[(kernel, "DT")] == {kmix.DT_F32, kmix.DT_BF16, kmix.DT_F16}


@pytest.mark.parametrize("arch", ARCHS)
def test_mix_kernels_compile_for_gpu(arch):
    for op, variant in TRAINER_MIX + OTHER_MIX:
        kernel = _compiled_mix(op, arch, _key(variant))
        assert kernel.metadata.target.arch == arch
        assert kernel.metadata.shared <= SMEM_A100, (op, variant, kernel.metadata.shared)
        assert not kernel.metadata.enable_fp_fusion  # the mask generator's float32 chain must not contract


def _spills(kernel) -> dict:
    """The kernel's resource usage if it uses local memory (stack frame or spills), else {}."""
    usage = aot.resource_usage(kernel)
    return usage if usage["stack"] or usage["spill_stores"] or usage["spill_loads"] else {}


@pytest.mark.parametrize("arch", ARCHS)
def test_mix_kernels_do_not_spill(arch):
    """No stack frame and no spills (read from ptxas -v) in any compiled mix variant, those training runs first
    among them: a spill puts a round trip to local memory into a kernel that should be bound by image traffic."""
    spilling = {(op, str(variant)): usage for op, variant in TRAINER_MIX + OTHER_MIX
                if (usage := _spills(_compiled_mix(op, arch, _key(variant))))}
    assert not spilling, spilling


@pytest.mark.parametrize("arch", ARCHS)
def test_mix_kernels_move_aligned_images_in_vectors(arch):
    """With images a multiple of 16 elements (every training size), the kernels the mixers launch load and store
    image data in vector instructions (the ops are bound by memory traffic); at an odd size, in scalars."""
    import re

    for op, variant in TRAINER_MIX:
        ptx = _compiled_mix(op, arch, _key(variant)).asm["ptx"]
        assert re.search(r"ld\.global(\.\w+)*\.v[24]\.", ptx) and re.search(r"st\.global(\.\w+)*\.v[24]\.", ptx), (op, variant)
    odd = dict(dtype=BF16, channels_last=True, flip=True, image=7)
    ptx = _compiled_mix("make_masks_and_mix", arch, _key(odd)).asm["ptx"]
    assert not re.search(r"(ld|st)\.global(\.\w+)*\.v[24]\.", ptx)


def test_ptxas_resource_lines_are_read():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_80'\n"
           "ptxas info    : Function properties for _k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 72 registers, used 1 barriers, 592 bytes cmem[0]\n")
    assert aot.parse_ptxas_log(log) == {"registers": 72, "stack": 8, "spill_stores": 4, "spill_loads": 12}
    with pytest.raises(RuntimeError, match="resource lines"):
        aot.parse_ptxas_log(log + log)  # two kernels: ambiguous


# ---------------------------------------------------------------------------------------------------------------
# soft_infonce kernels
# ---------------------------------------------------------------------------------------------------------------

# The flags of the autograd function's calls (mixfast/ops/infonce.py): MoCo's queue (in the denominator, no
# positives, dq only), MoCo's keys (positives only, dq and dkeys), in-batch keys with and without excluded columns.
INFONCE_CALLS = {
    "moco_queue": dict(in_denom=True, p=0, need_dcols=False),
    "moco_keys": dict(in_denom=False, p=2, need_dcols=True),
    "inbatch": dict(in_denom=True, p=2, need_dcols=True),
    "inbatch_exclude": dict(in_denom=True, p=1, exclude=True, need_dcols=True),
}
INFONCE_SAMPLE = ([(dtype, 128, call) for dtype in (F32, BF16, F16) for call in INFONCE_CALLS]
                  + [(dtype, 256, "inbatch_exclude") for dtype in (F32, BF16, F16)])


@pytest.mark.parametrize("arch", ARCHS)
def test_infonce_kernels_compile_for_gpu(arch):
    seen = set()
    for dtype, d, call in INFONCE_SAMPLE:
        compiled = _compiled_infonce(dtype, d, arch, _key(INFONCE_CALLS[call]))
        assert set(compiled) == {"lse", "grad_q"} | ({"grad_cols"} if INFONCE_CALLS[call]["need_dcols"] else set())
        for name, kernel in compiled.items():
            assert 0 < kernel.metadata.shared <= SMEM_A100, (dtype, d, call, name, kernel.metadata.shared)
        launches = kinf.example_launches(dtype, d, **INFONCE_CALLS[call])
        seen |= {(name, k, v) for name, launch in launches.items() for k, v in launch.kwargs.items()
                 if k in ("HAS_EXCL", "IN_DENOM", "HAS_POS") and (name != "lse" or k == "HAS_EXCL")}
    # every value of the backward flags (dcols are only ever asked for through positives), and the lse with and
    # without excluded columns
    both = {False, True}
    expect = {("lse", "HAS_EXCL"): both, ("grad_q", "HAS_EXCL"): both, ("grad_q", "IN_DENOM"): both,
              ("grad_q", "HAS_POS"): both, ("grad_cols", "HAS_EXCL"): both, ("grad_cols", "IN_DENOM"): both,
              ("grad_cols", "HAS_POS"): {True}}
    assert seen == {(name, flag, v) for (name, flag), values in expect.items() for v in values}


@pytest.mark.parametrize("arch", ARCHS)
def test_infonce_kernels_do_not_spill(arch):
    """No stack frame and no spills in any sampled soft_infonce kernel, training's D=128 in fp32 and bf16 among them
    (fp32 used to spill kilobytes a thread: its FMA-unit dots held all of D in registers)."""
    spilling = {(str(dtype), d, call, name): usage for dtype, d, call in INFONCE_SAMPLE
                for name, kernel in _compiled_infonce(dtype, d, arch, _key(INFONCE_CALLS[call])).items()
                if (usage := _spills(kernel))}
    assert not spilling, spilling


# ---------------------------------------------------------------------------------------------------------------
# one compiled kernel per op across seeds and steps
# ---------------------------------------------------------------------------------------------------------------


def test_every_seed_and_step_launches_one_compiled_kernel_per_op():
    """Triton compiles a kernel per specialization key: integer arguments are typed by value (i32 below 2^31,
    else i64) and, unless listed in do_not_specialize, also specialized on == 1 and divisibility by 16. The mask
    keys are uint32 (half of them >= 2^31), and the ratio schedule, the Un-Mix λ and box change every step: none of
    these may change the key, or training recompiles in its first steps. The key is Triton's own, computed from the
    wrappers' launch arguments."""
    from mixfast.ops import reference as ref

    B = 6
    x = torch.zeros((B, 3, 20, 20), dtype=BF16).contiguous(memory_format=torch.channels_last)
    perm = torch.arange(B - 1, -1, -1)
    masks = torch.zeros((1, TRAIN_GRID, TRAIN_GRID), dtype=torch.bool)
    keys, key_words = {}, set()
    for seed in (0, 1, 12345, -7, 2**40 + 3):
        for step in range(0, 400, 37):
            ratio = 0.3 + 0.4 * step / 400  # a schedule: num and threshold24 change with the step
            lam = (step % 97) / 97
            for kind in ("block", "discrete"):
                spec = ref.mask_spec(TRAIN_GRID, ratio, kind, seed, step)
                key_words |= {spec.key0 >= 2**31, spec.key1 >= 2**31}
                out = torch.empty((B, TRAIN_GRID, TRAIN_GRID), dtype=torch.uint8)
                launches = {
                    "make_masks": kmix.make_masks_launch(spec, out),
                    "make_masks_and_mix": kmix.mix_launch(x, masks=None, spec=spec, n_masks=1, grid=TRAIN_GRID,
                                                          perm=perm, filler=None, want_switch=False,
                                                          perm_is_flip=True)[1],
                    "unmix": kmix.unmix_launch(x, lam=lam, use_mixup=False, box=ref.rand_bbox(20, 20, lam))[1],
                    "mix_and_unmix": kmix.mix_and_unmix_launch(x, masks=masks, perm=perm, want_switch=False,
                                                               lam=lam, use_mixup=True, box=(0, 0, 0, 0))[1],
                }
                for op, launch in launches.items():
                    keys.setdefault(op, set()).add(aot.specialization_key(launch))
    assert key_words == {False, True}  # keys on both sides of 2^31 were launched
    assert {op: len(k) for op, k in keys.items()} == {op: 1 for op in keys}, keys

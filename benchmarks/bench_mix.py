"""Benchmark of MixMask's mask generation + mixing + λ: mixfast's op against the paper code, the
torch reference and a torch copy of the same bytes.

Rows (whichever exist on the machine):

  (a) paper   the public MixMask code's path: BEiT mask generated on the host in Python,
              copied to the device, F.interpolate(nearest), mask*x + (1-mask)*flip(x)
              (and the switch image), mask.sum()/(H*W) read back
  (b) ref     mixfast's torch reference: reference.make_masks + reference.mix
  (c) compile torch.compile of the reference mix (masks from reference.make_masks)
  (d) cpu     mixfast C++/OpenMP kernels: ops.make_masks_and_mix (mask + mix + λ, one call)
  (e) triton  mixfast Triton kernel (GPU only; the CPU interpreter is not a timing)
  (f) cuda    mixfast CUDA kernel (GPU only)

Rows (d)-(f) are the same public op, each under its MIXFAST_BACKEND (the row's name), which the
timer sets around each sample, outside the timed calls.

Modes (--mode):

  sweep (default)        B in {32, 256}, 224^2 and 32^2, grid in {4, 8, 16}, float32 / bfloat16,
                         NCHW / channels_last; one block mask per batch and flip pairing (the
                         papers' default), with and without switch images; every row in --rows.
  cpu-vs-paper-and-copy  one configuration on the CPU (default B=32, 3x224^2, grid 8; float32,
                         NCHW): the op (d) against the paper code (a) and against a torch copy of
                         its bytes, with and without switch images, and whether it is >= 3x faster
                         than (a) and at >= 60% of the copy's speed.

Each row reports microseconds (median, p20, p80), GB/s from the bytes that must move (x read
once, each output written once), that as % of a torch copy moving the same number of bytes
(``dst.copy_(src)`` into a preallocated buffer; also ``src.clone()``, which allocates its output
like the ops do), and the speed-up over (a) and (b). Each configuration times all its rows and
both copies round-robin (one sample of each per round, shuffled, caches flushed before each
sample), so load from other jobs on a shared machine hits them alike and no row inherits warm
inputs from the one before. A sample is one call on the CPU; on a GPU it is several
back-to-back calls between two CUDA events, queued behind a spin kernel so that the events see
device time, not the host's launch cost (common.time_fn), and the host's issue time per call is
a column of its own.

    python benchmarks/bench_mix.py                      # full sweep on this machine
    python benchmarks/bench_mix.py --batch 32 --size 224 --grid 8 --dtype float32 --layout nchw
    python benchmarks/bench_mix.py --rows paper,ref,cpu --results-file /tmp/mix.json
    python benchmarks/bench_mix.py --mode cpu-vs-paper-and-copy --threads 2 --update-readme

Prints the results; writes files only when asked: --results-file PATH (JSON and a CSV twin),
--results-dir DIR (<benchmark>-<tag>.{json,csv}), --update-readme (the mode's section of
benchmarks/README.md, between its ``<!-- bench:NAME:* -->`` markers).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    BENCH_DIR,
    add_output_args,
    clear_copy_buffers,
    copy_fn,
    env_line,
    environment,
    gbps,
    mixfast_backend,
    render_table,
    retain_freed_memory,
    runnable_rows,
    save_requested_results,
    time_round_robin,
    update_readme,
)
from mixfast import ops  # noqa: E402
from mixfast.ops import reference as ref  # noqa: E402
from mixfast.ops.mix import backend_for  # noqa: E402

ROWS = {
    "paper": "(a) paper code",
    "ref": "(b) torch reference",
    "compile": "(c) torch.compile(reference)",
    "cpu": "(d) mixfast C++ (CPU)",
    "triton": "(e) mixfast Triton",
    "cuda": "(f) mixfast CUDA",
}
# MIXFAST_BACKEND of the rows that call mixfast's op; the timer sets it outside the timed calls
ROW_BACKEND = {"cpu": "cpu", "triton": "triton", "cuda": "cuda"}
RATIO = 0.5
MODES = ("sweep", "cpu-vs-paper-and-copy")
SWEEP_SIZES = dict(batch=[32, 256], size=[224, 32], grid=[4, 8, 16])
CPU_MODE_SIZES = dict(batch=[32], size=[224], grid=[8])
# The bar the CPU kernels were built to clear in cpu-vs-paper-and-copy: at least this many times
# faster than the paper code, and at least this % of a torch copy_ of the same bytes (with and
# without switch images).
TARGET_SPEEDUP_VS_PAPER = 3.0
TARGET_PCT_OF_COPY = 60.0


# ---------------------------------------------------------------------------------------
# (a) the paper code's path
# ---------------------------------------------------------------------------------------


class BeitMaskingGenerator:
    """BEiT's MaskingGenerator as used by the public MixMask code (numpy mask, Python RNG)."""

    def __init__(self, grid: int, num_masking_patches: int, min_num_patches: int = 4, min_aspect: float = 0.3):
        self.height = self.width = grid
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=(self.height, self.width), dtype=np.int64)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def paper_path(x: torch.Tensor, grid: int, want_switch: bool):
    """Host mask -> device -> nearest upsampling -> arithmetic blend -> λ read back."""
    H, W = x.shape[2], x.shape[3]
    gen = BeitMaskingGenerator(grid, int(RATIO * grid * grid), min_num_patches=min(4, (grid - 1) ** 2))
    mask = torch.from_numpy(gen()).to(x.device)
    mask = F.interpolate(mask[None, None].float(), size=(H, W), mode="nearest").to(x.dtype)
    partner = x.flip(0)
    mixed = mask * x + (1 - mask) * partner
    switch = mask * partner + (1 - mask) * x if want_switch else None
    lam = float(mask.sum() / (H * W))
    return mixed, switch, lam


# ---------------------------------------------------------------------------------------
# the other rows
# ---------------------------------------------------------------------------------------


def reference_path(x, grid, want_switch, step, mix_fn=ref.mix):
    masks = ref.make_masks(1, grid, RATIO, "block", seed=0, step=step)
    flip = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
    return mix_fn(x, masks, flip, want_switch)


def mixfast_path(x, grid, want_switch, step):
    return ops.make_masks_and_mix(x, None, grid=grid, ratio=RATIO, seed=0, step=step, want_switch=want_switch)


def row_unavailable(row: str, device: torch.device) -> Optional[str]:
    """Why ``row`` cannot run on ``device`` on this machine, or None when it can."""
    backend = ROW_BACKEND.get(row)
    if backend is None:
        return None
    if backend == "cpu" and device.type != "cpu":
        return "the C++ kernels take CPU tensors"
    if backend in ("triton", "cuda") and device.type != "cuda":
        # On the CPU Triton runs only in its interpreter: a correctness tool, not a timing.
        return "needs a GPU"
    with mixfast_backend(backend):
        try:
            backend_for("make_masks_and_mix", device)
        except RuntimeError as err:  # a backend asked for by name says why it is missing
            return str(err)
    return None


def make_fn(row: str, x: torch.Tensor, grid: int, want_switch: bool, compiled: dict):
    counter = [0]

    def step():
        counter[0] += 1
        return counter[0]

    if row == "paper":
        return lambda: paper_path(x, grid, want_switch)
    if row == "ref":
        return lambda: reference_path(x, grid, want_switch, step())
    if row == "compile":
        # one compiled function for the whole sweep; dynamo recompiles on new shapes (and then
        # marks the changing sizes dynamic), compile time is excluded by the warm-up calls
        fn = compiled.setdefault("mix", torch.compile(ref.mix))
        return lambda: reference_path(x, grid, want_switch, step(), mix_fn=fn)
    # the backend is not set here but by the timer, around each sample (ROW_BACKEND)
    return lambda: mixfast_path(x, grid, want_switch, step())


def check_same(row: str, x, grid, want_switch):
    """The mixfast rows must produce the reference's bits (a benchmark of a wrong kernel is
    worthless): compare one call at step 1 with the reference."""
    if row in ("paper", "ref"):
        return
    with mixfast_backend(ROW_BACKEND.get(row)):
        got = make_fn(row, x, grid, want_switch, {})()
    want = reference_path(x, grid, want_switch, 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), f"{row} differs from the reference"
    if want_switch:
        assert torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="sweep",
                   help="sweep: every row over the configuration sweep; cpu-vs-paper-and-copy: the C++ op against "
                        "the paper code and a torch copy of its bytes at one configuration on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the sweep (default: cuda where there is one); cpu-vs-paper-and-copy runs on the CPU")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes B (default: 32 256; cpu-vs-paper-and-copy: one value, default 32)")
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="image sizes H = W (default: 224 32; cpu-vs-paper-and-copy: one value, default 224)")
    p.add_argument("--grid", type=int, nargs="+", default=None,
                   help="mask grid sizes (default: 4 8 16; cpu-vs-paper-and-copy: one value, default 8)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"],
                   help="sweep: image dtypes (cpu-vs-paper-and-copy: float32)")
    p.add_argument("--layout", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"],
                   help="sweep: memory layouts (cpu-vs-paper-and-copy: nchw)")
    p.add_argument("--switch", nargs="+", default=["no", "yes"], choices=["no", "yes"],
                   help="sweep: time without and/or with switch images (cpu-vs-paper-and-copy: both)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"sweep: comma-separated subset of {','.join(ROWS)}; cpu, triton and cuda are the public op "
                        "under that MIXFAST_BACKEND; a row that cannot run here is skipped with the reason")
    p.add_argument("--reps", type=int, default=25, help="timed rounds (the sweep stops a configuration early past --max-row-seconds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each row first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every row (the C++ kernels follow torch's setting); "
                        "default: torch's")
    p.add_argument("--max-row-seconds", type=float, default=8.0,
                   help="sweep: time budget per row and configuration (rounds stop early past it)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check of each mixfast row")
    p.add_argument("--malloc", choices=["default", "retain"], default="default",
                   help="retain: glibc keeps freed memory (no trimming / mmap per allocation), see "
                        "common.retain_freed_memory; applies to every row alike")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="measure nothing: print the sweep's README section rebuilt from a results JSON of an earlier "
                        "run (written to benchmarks/README.md with --update-readme)")
    add_output_args(p, "the mode's section (the sweep: grid 8 rows)")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown rows {unknown}; choose from {','.join(ROWS)}")
    for key, default in (SWEEP_SIZES if args.mode == "sweep" else CPU_MODE_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        elif args.mode != "sweep" and len(getattr(args, key)) != 1:
            p.error(f"--{key}: {args.mode} measures one configuration, give one value")
    return args


# ---------------------------------------------------------------------------------------
# cpu-vs-paper-and-copy: one configuration on the CPU
# ---------------------------------------------------------------------------------------


def cpu_vs_paper_and_copy(args) -> dict:
    """The C++ op (d) at one configuration on the CPU, against the paper code (a) and a torch
    copy of its bytes, with and without switch images, measured in one run: every round times
    each candidate once, in a shuffled order and from flushed caches (common.time_round_robin),
    so load that drifts during the run hits all of them alike. The op is the public
    ``make_masks_and_mix`` (fresh outputs included) under MIXFAST_BACKEND=cpu."""
    device = torch.device("cpu")
    reason = row_unavailable("cpu", device)
    if reason:
        raise SystemExit(f"cpu-vs-paper-and-copy: the C++ kernels cannot run here: {reason}")
    B, S, grid = args.batch[0], args.size[0], args.grid[0]
    env = environment(device)
    env["malloc"] = args.malloc
    print(env_line(env), f"malloc={args.malloc}", flush=True)
    x = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(0))
    n = x.numel() * x.element_size()
    if not args.no_check:
        for sw in (False, True):
            check_same("cpu", x, grid, sw)
    # The op moves 2N bytes without switch images (x read, mixed written) and 3N with them.
    # No row times the kernel alone into preallocated outputs: the public op has no out=
    # argument, and the kernel's private argument builders are not for benchmarks to call.
    cands = {
        "paper": make_fn("paper", x, grid, False, {}),
        "paper_switch": make_fn("paper", x, grid, True, {}),
        "cpu": make_fn("cpu", x, grid, False, {}),
        "cpu_switch": make_fn("cpu", x, grid, True, {}),
        "copy_2N": copy_fn(2 * n, device),
        "copy_3N": copy_fn(3 * n, device),
        "clone_2N": copy_fn(2 * n, device, allocate=True),
        "clone_3N": copy_fn(3 * n, device, allocate=True),
    }
    # every round runs (no time budget): the ratios come from all --reps rounds
    timings = time_round_robin(cands, device=device, warmup=args.warmup, reps=args.reps, max_time_s=float("inf"),
                               backends={"cpu": ROW_BACKEND["cpu"], "cpu_switch": ROW_BACKEND["cpu"]})
    clear_copy_buffers()
    med = {k: t.median_us for k, t in timings.items()}
    p20 = {k: t.p20_us for k, t in timings.items()}
    p80 = {k: t.p80_us for k, t in timings.items()}
    res = {
        "config": f"B={B}, 3x{S}x{S}, float32, NCHW, grid {grid}, ratio {RATIO}, one block mask per batch, "
                  "flip pairing",
        "reps": args.reps, "median_us": med, "p20_us": p20, "p80_us": p80,
        "speedup_vs_paper": med["paper"] / med["cpu"],
        "speedup_vs_paper_switch": med["paper_switch"] / med["cpu_switch"],
        "pct_of_copy": 100 * med["copy_2N"] / med["cpu"],
        "pct_of_copy_switch": 100 * med["copy_3N"] / med["cpu_switch"],
        "pct_of_clone": 100 * med["clone_2N"] / med["cpu"],
        "pct_of_clone_switch": 100 * med["clone_3N"] / med["cpu_switch"],
        "gbps": gbps(2 * n, med["cpu"]), "gbps_switch": gbps(3 * n, med["cpu_switch"]),
        "copy_gbps": gbps(2 * n, med["copy_2N"]), "copy_gbps_3N": gbps(3 * n, med["copy_3N"]),
    }
    res["holds"] = bool(res["speedup_vs_paper"] >= TARGET_SPEEDUP_VS_PAPER and res["pct_of_copy"] >= TARGET_PCT_OF_COPY
                        and res["pct_of_copy_switch"] >= TARGET_PCT_OF_COPY)
    for k in cands:
        print(f"{k:<13} median {med[k]:9.0f} us  p20 {p20[k]:9.0f}  p80 {p80[k]:9.0f}")
    print({k: v for k, v in res.items() if not isinstance(v, dict)})
    save_requested_results(args, "mix-cpu-vs-paper-and-copy", [res], env)
    md = cpu_vs_paper_and_copy_markdown(res, env, args, n)
    print(md, flush=True)
    if args.update_readme:
        threads = torch.get_num_threads()
        update_readme(f"mix-cpu-vs-paper-and-copy-{threads}t-{args.malloc}", md,
                      title=f"mix on the CPU: the op vs the paper code and a torch copy ({threads} thread(s), "
                            f"malloc {args.malloc})")
    return res


def cpu_vs_paper_and_copy_markdown(res: dict, env: dict, args, nbytes_x: int) -> str:
    med, p20, p80 = res["median_us"], res["p20_us"], res["p80_us"]
    mb = nbytes_x / 1e6

    def row(what, key, **extra):
        return dict(what=what, us=med[key], p20=p20[key], p80=p80[key], **extra)

    rows = [
        row("(a) paper code: mask + mix + λ", "paper"),
        row("(d) mixfast C++: mask + mix + λ", "cpu", gbps=res["gbps"], pct=res["pct_of_copy"],
            speedup=res["speedup_vs_paper"]),
        row(f"torch copy_ of the same bytes (2 × {mb:.3g} MB)", "copy_2N", gbps=res["copy_gbps"]),
        row("torch clone (allocating copy) of the same bytes", "clone_2N", gbps=gbps(2 * nbytes_x, med["clone_2N"])),
        row("(a) paper code, with switch images", "paper_switch"),
        row("(d) mixfast C++, with switch images", "cpu_switch", gbps=res["gbps_switch"],
            pct=res["pct_of_copy_switch"], speedup=res["speedup_vs_paper_switch"]),
        row(f"torch copy_ of the same bytes (3 × {mb:.3g} MB)", "copy_3N", gbps=res["copy_gbps_3N"]),
        row("torch clone (allocating copy) of the same bytes", "clone_3N", gbps=gbps(3 * nbytes_x, med["clone_3N"])),
    ]
    verdict = "**holds**" if res["holds"] else "**does not hold**"
    load = env.get("load_avg_1m")
    return "\n".join([
        f"{torch.get_num_threads()} thread(s), {res['reps']} rounds in one run, each timing every row once in a "
        f"shuffled order from flushed caches ({res['config']}). "
        f"(d), the public op `make_masks_and_mix` (fresh output tensors), is {res['speedup_vs_paper']:.1f}× faster "
        f"than (a) and at {res['pct_of_copy']:.0f}% of a torch `copy_` of its bytes into a preallocated buffer; with "
        f"switch images {res['pct_of_copy_switch']:.0f}% (targets: ≥ {TARGET_SPEEDUP_VS_PAPER:.0f}×, "
        f"≥ {TARGET_PCT_OF_COPY:.0f}%, ≥ {TARGET_PCT_OF_COPY:.0f}%): {verdict}. Against an allocating "
        f"copy (`clone`): {res['pct_of_clone']:.0f}% / {res['pct_of_clone_switch']:.0f}%. glibc malloc: "
        f"{args.malloc} (`--malloc retain` keeps freed memory, so fresh outputs do not page-fault). Load average at "
        f"the start: {load if load is None else f'{load:.2f}'} (a shared machine).",
        "",
        env_line(env),
        "",
        render_table(rows, [("what", "row"), ("us", "µs median"), ("p20", "p20"), ("p80", "p80"), ("gbps", "GB/s"),
                            ("pct", "% of copy_"), ("speedup", "× vs (a)")]),
    ])


# ---------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------


def sweep(args) -> list[dict]:
    device = torch.device(args.device)
    env = environment(device)
    env["malloc"] = args.malloc
    print(env_line(env), flush=True)
    rows = runnable_rows(args.rows, lambda row: row_unavailable(row, device), ROWS)
    compiled: dict = {}
    results = []
    for B in args.batch:
        for S in args.size:
            for dtype_name in args.dtype:
                dtype = getattr(torch, dtype_name)
                for layout in args.layout:
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(B, 3, S, S, generator=g).to(dtype).to(device)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    nbytes_x = x.numel() * x.element_size()
                    for grid in args.grid:
                        for sw in args.switch:
                            want_switch = sw == "yes"
                            moved = nbytes_x * (3 if want_switch else 2)  # read x, write mixed (+ switch)
                            config = dict(B=B, C=3, H=S, W=S, grid=grid, dtype=dtype_name, layout=layout,
                                          switch=want_switch, bytes_moved=moved)
                            if not args.no_check:
                                for row in rows:
                                    check_same(row, x, grid, want_switch)
                            # every row and the two copies of the same bytes, round-robin
                            fns = {row: make_fn(row, x, grid, want_switch, compiled) for row in rows}
                            fns["copy"] = copy_fn(moved, device)
                            fns["clone"] = copy_fn(moved, device, allocate=True)
                            timings = time_round_robin(fns, device=device, warmup=args.warmup, reps=args.reps,
                                                       max_time_s=args.max_row_seconds * len(fns),
                                                       backends={row: ROW_BACKEND.get(row) for row in rows})
                            clear_copy_buffers()
                            copy_t, clone_t = timings.pop("copy"), timings.pop("clone")
                            copy_gbps = gbps(moved, copy_t.median_us)
                            for row, t in timings.items():
                                r = dict(config, impl=ROWS[row], row=row, us_median=t.median_us, us_p20=t.p20_us,
                                         us_p80=t.p80_us, reps=t.reps, host_us=t.host_us, calls=t.calls,
                                         gbps=gbps(moved, t.median_us),
                                         copy_us=copy_t.median_us, copy_gbps=copy_gbps,
                                         pct_of_copy=100.0 * copy_t.median_us / t.median_us,
                                         clone_us=clone_t.median_us,
                                         pct_of_clone=100.0 * clone_t.median_us / t.median_us,
                                         speedup_vs_paper=(timings["paper"].median_us / t.median_us
                                                           if "paper" in timings else float("nan")),
                                         speedup_vs_ref=(timings["ref"].median_us / t.median_us
                                                         if "ref" in timings else float("nan")))
                                results.append(r)
                                print(f"B={B:<4} {S}x{S} g={grid:<2} {dtype_name:<8} {layout:<13} switch={sw:<3} "
                                      f"{ROWS[row]:<30} {t.median_us:>10.0f} us  [{t.p20_us:.0f}, {t.p80_us:.0f}]  "
                                      + (f"host {t.host_us:.0f} us/call  " if t.host_us is not None else "") +
                                      f"{r['gbps']:6.2f} GB/s  {r['pct_of_copy']:5.1f}% of copy  "
                                      f"x{r['speedup_vs_paper']:.1f} vs (a)  x{r['speedup_vs_ref']:.1f} vs (b)",
                                      flush=True)
    written = save_requested_results(args, "mix", results, env)
    if args.update_readme:
        update_readme("mix", readme_section(results, env, written[0][1] if written else None), title=SWEEP_TITLE)
    return results


SWEEP_TITLE = "mix: mask + mix + λ, every implementation against a torch copy (bench_mix.py)"
TABLE_COLUMNS = [
    ("B", "B"), ("H", "H×W"), ("grid", "g"), ("dtype", "dtype"), ("layout", "layout"), ("switch", "switch"),
    ("impl", "implementation"), ("us_median", "µs median"), ("us_p20", "p20"), ("us_p80", "p80"),
    ("gbps", "GB/s"), ("pct_of_copy", "% of copy"), ("pct_of_clone", "% of alloc. copy"),
    ("speedup_vs_paper", "× vs (a)"), ("speedup_vs_ref", "× vs (b)"),
]
# GPU runs only: the host's wall time to issue one call (the µs columns are device time there)
HOST_COLUMN = ("host_us", "host µs/call")


def _shown_path(path: Path) -> str:
    """``path`` as the README shows it: relative to benchmarks/ when it lies inside."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(BENCH_DIR))
    except ValueError:
        return str(path)


def readme_section(results: list[dict], env: dict, csv_path: Optional[Path]) -> str:
    """Headline rows (grid 8, the papers' ImageNet setting) in full; every other config is in
    the CSV where one was written. % of copy compares with ``dst.copy_(src)`` of the same
    byte count."""
    head = [r for r in results if r["grid"] == 8]
    grids = "/".join(str(g) for g in sorted({r["grid"] for r in results}))
    where = (f"the full sweep (grids {grids}) is in `{_shown_path(csv_path)}` and its JSON twin" if csv_path else
             f"the run's other grids ({grids}) were printed, not saved (`--results-file` keeps them)")
    gpu_note = ("" if any(r["row"] in ("triton", "cuda") for r in results) else
                "Rows (e) Triton and (f) CUDA need a GPU and are absent here, so the GPU targets (≥ 85% of copy "
                "bandwidth and ≥ 10× row (a) at B=256, 3×224², bf16, channels_last) are not measured in this table. ")
    return "\n".join([
        env_line(env) + f" glibc malloc: {env.get('malloc', 'default')}.",
        "",
        f"Grid 8 rows below; {where}. Bytes that must move: x read "
        "once, mixed (and switch) written once. '% of copy' = time of a torch `copy_` moving the same bytes into a "
        "preallocated buffer ÷ time of the row; '% of alloc. copy' uses `clone()` (a fresh output, like the ops). "
        "(a) is the paper code's path (host BEiT mask, copy, `F.interpolate`, arithmetic blend, λ read back). Each "
        "configuration times its rows round-robin, shuffled, from flushed caches. " + gpu_note,
        "",
        render_table(head, TABLE_COLUMNS + ([HOST_COLUMN] if any(r.get("host_us") is not None for r in head)
                                           else [])),
    ])


def render(args) -> list[dict]:
    """The sweep's README section from the results JSON of an earlier run (its CSV twin named in it)."""
    import json

    data = json.loads(Path(args.render).read_text(encoding="utf-8"))
    md = readme_section(data["rows"], data["environment"], Path(args.render).with_suffix(".csv"))
    print(md)
    if args.update_readme:
        update_readme("mix", md, title=SWEEP_TITLE)
    return data["rows"]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.render:
        return render(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "retain" and not retain_freed_memory():
        raise SystemExit("--malloc retain needs glibc's mallopt")
    if args.mode == "cpu-vs-paper-and-copy":
        return [cpu_vs_paper_and_copy(args)]
    return sweep(args)


if __name__ == "__main__":
    main()

"""Benchmark of the fused soft-InfoNCE loss (mixfast.ops.soft_infonce) against the paper code's per-term loss and
eager / compiled PyTorch: time, throughput against the device's limits, and peak extra memory.

    python benchmarks/bench_infonce.py                      # the default sweep for this machine
    python benchmarks/bench_infonce.py --m 768 --k 65536 --dtype bf16 --rows paper,eager,triton,cuda
    python benchmarks/bench_infonce.py --mode cpu-vs-eager-memory   # chunked vs eager on the CPU at 768 x 65536

The problem is one MoCo step of MixMask + Un-Mix: B query rows of each of the original, Un-Mix and MixMask views
(M = 3B rows), B keys, a queue of K keys, D = 128 (--d), tau = 0.2, the loss

    CE(q, k) + lu CE(q_um, k) + (1-lu) CE(flip(q_um), k) + lm CE(q_mm, k) + (1-lm) CE(q_mm[argsort(perm)], k).

Rows:
  paper    (a) the paper code: per term an einsum against the queue, cat, cross_entropy -- five B x K logit matrices
  eager    (b) one matmul for all M rows (the reference's formula, matmul in the input dtype): one M x K matrix
  compile  (c) torch.compile of (b)
  chunked  (d) mixfast.ops.soft_infonce, MIXFAST_BACKEND=cpu: chunked torch, nothing M x K
  triton   (e) MIXFAST_BACKEND=triton (GPU)
  cuda     (f) MIXFAST_BACKEND=cuda (GPU, mixfast._C built with CUDA)
Rows (d)-(f) are the same public op; the backend of a row is set around its measurements, outside the timed calls.

Modes (--mode):
  sweep (default)      every row in --rows over M x K x dtype (default on a GPU: M in 64, 512, 768, 4096, K in 4096,
                       65536, 262144, fp32 and bf16; on the CPU: M in 64, 512, 768, K in 4096, 65536, fp32)
  cpu-vs-eager-memory  on the CPU, fp32, one problem (default M = 768, K = 65536): forward+backward of (d) chunked
                       against (b) eager, interleaved repetitions; the ratio of their peak extra memory and of their
                       times, and whether chunked needs at most 1/8 of eager's memory in at most 1.5x its time (the exit
                       status is 1 when it does not)

Columns: forward, backward (of a fresh forward) and forward+backward times (median, p20, p80 in ms); TFLOP/s from
2*M*D*(K+B) flops forward and twice that backward; the time floor max(flops / measured matmul rate, bytes / measured
copy bandwidth) and the fraction of it reached; the op's peak extra memory for forward+backward.

Times on a GPU are device time per call: several calls back to back between two CUDA events, queued behind a spin
kernel so the host's launch cost does not show (common.time_fn); the host's issue time per call is its own column.

Peak extra memory: on a GPU, torch.cuda.max_memory_allocated() above what the inputs hold. On the CPU torch has no
allocator statistics, so each row runs once more in a fresh subprocess: after a warm-up call the kernel's peak-RSS
mark is reset (/proc/self/clear_refs), and the peak RSS of one forward+backward above the RSS before it is reported.
glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed large buffers are returned to the kernel and a
later allocation cannot hide in memory the warm-up left resident.

Prints the results; writes files only when asked: --results-file PATH (JSON and a CSV twin), --results-dir DIR
(<benchmark>-<tag>.{json,csv}), --update-readme (the mode's section of benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import (Timing, add_output_args, add_repo_to_path, copy_timing, env_line, environment,
                        mixfast_backend, render_table, runnable_rows, save_requested_results, time_fn,
                        update_readme)
    add_repo_to_path()
else:
    from benchmarks.common import (Timing, add_output_args, copy_timing, env_line, environment, mixfast_backend,
                                   render_table, runnable_rows, save_requested_results, time_fn, update_readme)

from mixfast.ops import reference  # noqa: E402
from mixfast.ops.infonce import backend_for, soft_infonce  # noqa: E402

TAU = 0.2
ROWS = ("paper", "eager", "compile", "chunked", "triton", "cuda")
ROW_LABELS = {"paper": "(a) paper code", "eager": "(b) eager, one matmul", "compile": "(c) torch.compile (b)",
              "chunked": "(d) chunked CPU", "triton": "(e) Triton", "cuda": "(f) CUDA"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# MIXFAST_BACKEND of the op rows: set around a row's measurements (the op reads it at every call), outside the
# timed calls
ROW_BACKEND = {"chunked": "cpu", "triton": "triton", "cuda": "cuda"}
MODES = ("sweep", "cpu-vs-eager-memory")
# The bar the chunked CPU path was built to clear in cpu-vs-eager-memory: at most this fraction of eager's peak
# extra memory, in at most this multiple of eager's time.
TARGET_MEMORY_RATIO = 1 / 8
TARGET_TIME_RATIO = 1.5


# ---------------------------------------------------------------------------------------------------------------
# the problem and the six implementations of its loss
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    q: torch.Tensor        # [3B, D] query rows: original, Un-Mix, MixMask (requires grad)
    keys: torch.Tensor     # [B, D]
    queue: torch.Tensor    # [K, D]
    pos: torch.Tensor      # [3B, 2] positives of the stacked rows
    weight: torch.Tensor   # [3B, 2]
    perm: torch.Tensor     # MixMask's random partner permutation
    lam_u: float
    lam_m: float

    @property
    def b(self) -> int:
        return self.keys.shape[0]


def make_problem(m: int, k: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """M = 3B rows with B = round(m / 3); unit vectors, as the MoCo heads produce."""
    gen = torch.Generator().manual_seed(seed)
    b = max(1, round(m / 3))

    def unit(n):
        return F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device=device, dtype=dtype)

    q, keys, queue = unit(3 * b).requires_grad_(), unit(b), unit(k)
    rows = torch.arange(b)
    perm = torch.randperm(b, generator=gen)
    lam_u, lam_m = 0.3, 0.6
    pos = torch.cat([torch.stack([rows, rows], 1),                   # original (second slot: weight 0)
                     torch.stack([rows, rows.flip(0)], 1),           # Un-Mix: own key, flip partner
                     torch.stack([rows, perm], 1)])                  # MixMask: own key, filler's key
    weight = torch.tensor([[1.0, 0.0]] * b + [[lam_u, 1 - lam_u]] * b + [[lam_m, 1 - lam_m]] * b)
    return Problem(q, keys, queue, pos.to(device), weight.to(device), perm.to(device), lam_u, lam_m)


def loss_paper(p: Problem, q: torch.Tensor) -> torch.Tensor:
    """(a) The paper code: five cross-entropies, each with its own einsum against the queue."""
    b = p.b
    zeros = torch.zeros(b, dtype=torch.long, device=q.device)

    def ce(qx):
        l_pos = torch.einsum("nc,nc->n", qx, p.keys)[:, None]
        l_neg = torch.einsum("nc,ck->nk", qx, p.queue.t().clone().detach())
        return F.cross_entropy(torch.cat([l_pos, l_neg], 1) / TAU, zeros)

    q0, q_um, q_mm = q[:b], q[b:2 * b], q[2 * b:]
    return (ce(q0) + p.lam_u * ce(q_um) + (1 - p.lam_u) * ce(q_um.flip(0))
            + p.lam_m * ce(q_mm) + (1 - p.lam_m) * ce(q_mm[torch.argsort(p.perm)]))


def eager_terms(q, keys, queue, pos) -> torch.Tensor:
    """The reference's formula with every query row against the queue in one matmul, as eager PyTorch would be
    written for speed: the matmul in the inputs' dtype, the logsumexp in fp32. (The reference itself also checks
    index ranges on the data, which would split a torch.compile graph.)"""
    s = torch.einsum("md,mpd->mp", q, keys[pos]).float() / TAU
    lse = torch.logsumexp((q @ queue.t()).float() / TAU, dim=1, keepdim=True)  # one M x K logits matrix
    return torch.logaddexp(s, lse) - s


def loss_eager(p: Problem, q: torch.Tensor) -> torch.Tensor:
    """(b) All rows against the queue in one matmul, weighted as the trainer does."""
    return (p.weight * eager_terms(q, p.keys, p.queue, p.pos)).sum() / p.b


def loss_reference(p: Problem, q: torch.Tensor) -> torch.Tensor:
    """The reference op, for the float64 value every row's loss is compared with."""
    return (p.weight * reference.soft_infonce(q, p.keys, p.queue, p.pos, TAU)).sum() / p.b


def loss_op(p: Problem, q: torch.Tensor) -> torch.Tensor:
    """(d)-(f) mixfast.ops.soft_infonce; MIXFAST_BACKEND picks the backend."""
    return (p.weight * soft_infonce(q, p.keys, p.queue, p.pos, TAU)).sum() / p.b


def row_off_device(row: str, device: torch.device) -> Optional[str]:
    """Why ``row`` is not measured on ``device``, or None when it is."""
    if row == "chunked" and device.type == "cuda":
        return "on a GPU the chunked path is only the fallback, not a row of interest"
    if row in ("triton", "cuda") and device.type != "cuda":
        return "needs a GPU"
    return None


def backend_refuses(row: str, p: Problem) -> Optional[str]:
    """Why the backend of op row ``row`` cannot run problem ``p`` here, or None when it can."""
    backend = ROW_BACKEND.get(row)
    if backend is None:
        return None
    try:
        backend_for(p.q, p.queue, requested=backend)
    except RuntimeError as err:  # a backend asked for by name says why it cannot run these inputs
        return str(err)
    return None


def loss_fn(row: str) -> Callable[[Problem, torch.Tensor], torch.Tensor]:
    """The row's loss; the op rows run it under their ROW_BACKEND (mixfast_backend)."""
    if row == "paper":
        return loss_paper
    if row == "eager":
        return loss_eager
    if row == "compile":
        return torch.compile(loss_eager, dynamic=False)
    return loss_op


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backward(make_loss: Callable[[], torch.Tensor], device: torch.device, reps: int, warmup: int,
                  max_time_s: float) -> Timing:
    """Backward alone: each repetition runs a fresh forward untimed, then times loss.backward().

    On a GPU a repetition is several backward calls back to back (common.time_fn: device time per call, and the
    host's issue time), of as many forwards run untimed just before; at most 8 of them, since every pending
    forward holds its saved tensors."""
    if device.type == "cuda":
        pending: list[torch.Tensor] = []

        def fresh_forwards(n: int) -> None:
            pending[:] = [make_loss() for _ in range(n)]
            _sync(device)

        return time_fn(lambda: pending.pop().backward(), device=device, warmup=warmup, reps=reps,
                       max_time_s=max_time_s, setup=fresh_forwards, max_calls=8)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(warmup + reps):
        loss = make_loss()
        _sync(device)
        t0 = time.perf_counter()
        loss.backward()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e6)
        if time.perf_counter() - start > max_time_s and len(times) >= 3:
            break
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7], len(times))


def matmul_tflops(dtype: torch.dtype, device: torch.device) -> float:
    """The matmul rate this device reaches in `dtype` (TF32 off): a large square GEMM, best of a few."""
    n = 4096 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda: torch.mm(a, b), device=device, warmup=2, reps=5)
    return 2 * n ** 3 / (t.p20_us * 1e-6) / 1e12


def problem_bytes(p: Problem) -> tuple[int, int]:
    """Bytes an ideal fused kernel moves: forward reads q, keys, queue and writes the [M, P] terms; backward reads
    them again and writes dq."""
    e = p.q.element_size()
    inputs = (p.q.numel() + p.keys.numel() + p.queue.numel()) * e + p.pos.numel() * 8
    fwd = inputs + p.pos.numel() * 4
    return fwd, inputs + p.pos.numel() * 4 + p.q.numel() * e


def flops(p: Problem) -> tuple[float, float]:
    m, d = p.q.shape
    fwd = 2.0 * m * d * (p.queue.shape[0] + p.b)
    return fwd, 2 * fwd


def gpu_peak_extra(make_loss: Callable[[], torch.Tensor], device: torch.device) -> int:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    make_loss().backward()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def cpu_peak_extra_here(row: str, m: int, k: int, d: int, dtype: str) -> int:
    """Run in a fresh process (see the module docstring): peak RSS of one forward+backward above the RSS before."""
    p = make_problem(m, k, d, DTYPES[dtype], torch.device("cpu"))
    fn = loss_fn(row)
    with mixfast_backend(ROW_BACKEND.get(row)):
        fn(p, p.q).backward()  # warm-up: lazy initializations, compilation
        p.q.grad = None
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
        base = _status_bytes("VmRSS")
        fn(p, p.q).backward()
    return _status_bytes("VmHWM") - base


def cpu_peak_extra(row: str, m: int, k: int, d: int, dtype: str) -> Optional[int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory", row, "--m", str(m), "--k", str(k),
           "--d", str(d), "--dtype", dtype, "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"  memory measurement of {row} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def bench_row(row: str, p: Problem, m_requested: int, dtype: str, device: torch.device, args, rates: dict,
              reference_loss: float) -> dict:
    with mixfast_backend(ROW_BACKEND.get(row)):
        return _bench_row(row, p, m_requested, dtype, device, args, rates, reference_loss)


def _bench_row(row: str, p: Problem, m_requested: int, dtype: str, device: torch.device, args, rates: dict,
               reference_loss: float) -> dict:
    fn = loss_fn(row)
    q = p.q

    def fwd():
        return fn(p, q)

    def fwdbwd():
        q.grad = None
        fn(p, q).backward()

    value = float(fwd().detach())  # also the first warm-up (compilation for `compile`)
    kw = dict(device=device, warmup=args.warmup, reps=args.reps, max_time_s=args.max_time)
    with torch.enable_grad():
        t_f = time_fn(fwd, **kw)
        t_b = time_backward(fwd, device, args.reps, args.warmup, args.max_time)
        t_fb = time_fn(fwdbwd, **kw)
    m, d = q.shape
    f_fwd, f_bwd = flops(p)
    b_fwd, b_bwd = problem_bytes(p)
    floor_f = max(f_fwd / (rates["tflops"] * 1e12), b_fwd / (rates["gbps"] * 1e9)) * 1e6
    floor_b = max(f_bwd / (rates["tflops"] * 1e12), b_bwd / (rates["gbps"] * 1e9)) * 1e6
    if device.type == "cuda":
        peak = gpu_peak_extra(fwd, device)
    else:
        peak = cpu_peak_extra(row, m_requested, p.queue.shape[0], d, dtype) if args.memory else None
    return {
        "row": ROW_LABELS[row], "backend": row, "M": m, "B": p.b, "K": p.queue.shape[0], "D": d, "dtype": dtype,
        "fwd_ms": t_f.median_us / 1e3, "fwd_p20_ms": t_f.p20_us / 1e3, "fwd_p80_ms": t_f.p80_us / 1e3,
        "bwd_ms": t_b.median_us / 1e3, "bwd_p20_ms": t_b.p20_us / 1e3, "bwd_p80_ms": t_b.p80_us / 1e3,
        "fwdbwd_ms": t_fb.median_us / 1e3, "fwdbwd_p20_ms": t_fb.p20_us / 1e3, "fwdbwd_p80_ms": t_fb.p80_us / 1e3,
        # GPU only: the host's wall time to issue one call (the ms columns are device time there)
        "fwd_host_us": t_f.host_us, "bwd_host_us": t_b.host_us, "fwdbwd_host_us": t_fb.host_us,
        "fwd_tflops": f_fwd / (t_f.median_us * 1e-6) / 1e12, "bwd_tflops": f_bwd / (t_b.median_us * 1e-6) / 1e12,
        "fwd_gflops": f_fwd / (t_f.median_us * 1e-6) / 1e9, "bwd_gflops": f_bwd / (t_b.median_us * 1e-6) / 1e9,
        "floor_fwdbwd_ms": (floor_f + floor_b) / 1e3, "floor_frac": (floor_f + floor_b) / t_fb.median_us,
        "peak_extra_mb": peak / 2**20 if peak is not None else None,
        "mxk_mb": m * p.queue.shape[0] * 4 / 2**20,
        "loss_rel_err": abs(value - reference_loss) / abs(reference_loss),
        "reps": t_fb.reps,
    }


# ---------------------------------------------------------------------------------------------------------------
# cpu-vs-eager-memory: on the CPU, chunked vs eager forward+backward, memory and time, measured in one run
# ---------------------------------------------------------------------------------------------------------------


def cpu_vs_eager_memory(args) -> dict:
    device = torch.device("cpu")
    m, k, d = args.m[0], args.k[0], args.d
    p = make_problem(m, k, d, torch.float32, device)
    fns = {"eager": loss_fn("eager"), "chunked": loss_fn("chunked")}
    for name, fn in fns.items():  # warm up both
        with mixfast_backend(ROW_BACKEND.get(name)):
            for _ in range(max(1, args.warmup)):
                fn(p, p.q).backward()
    # Interleaved repetitions: on a shared machine both rows see the same background load.
    times = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            p.q.grad = None
            with mixfast_backend(ROW_BACKEND.get(name)):  # entered before the clock starts
                t0 = time.perf_counter()
                fn(p, p.q).backward()
                times[name].append(time.perf_counter() - t0)
    mem = {name: cpu_peak_extra(name, m, k, d, "fp32") for name in fns}
    if None in mem.values():
        raise SystemExit("cpu-vs-eager-memory: a memory measurement failed (its error is above)")
    t = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "M": m, "K": k, "D": d, "dtype": "fp32", "reps": args.reps,
        "eager_fwdbwd_ms": t["eager"] * 1e3, "chunked_fwdbwd_ms": t["chunked"] * 1e3,
        "time_ratio": t["chunked"] / t["eager"],
        "eager_peak_extra_mb": mem["eager"] / 2**20, "chunked_peak_extra_mb": mem["chunked"] / 2**20,
        # at toy sizes eager's extra memory can stay within pages already resident: no ratio then
        "memory_ratio": mem["chunked"] / mem["eager"] if mem["eager"] > 0 else float("nan"),
        "eager_times_ms": [round(x * 1e3, 1) for x in times["eager"]],
        "chunked_times_ms": [round(x * 1e3, 1) for x in times["chunked"]],
    }
    result["pass"] = result["memory_ratio"] <= TARGET_MEMORY_RATIO and result["time_ratio"] <= TARGET_TIME_RATIO
    return result


def cpu_vs_eager_memory_markdown(r: dict) -> str:
    verdict = "**holds**" if r["pass"] else "**does not hold**"
    return (f"CPU, M = {r['M']}, K = {r['K']}, D = {r['D']}, fp32, forward+backward, {r['reps']} interleaved "
            f"repetitions: chunked peak extra memory {r['chunked_peak_extra_mb']:.1f} MiB vs eager "
            f"{r['eager_peak_extra_mb']:.1f} MiB (ratio {r['memory_ratio']:.3f}, target ≤ {TARGET_MEMORY_RATIO:.3f}); "
            f"time {r['chunked_fwdbwd_ms']:.0f} ms vs {r['eager_fwdbwd_ms']:.0f} ms (ratio {r['time_ratio']:.2f}, "
            f"target ≤ {TARGET_TIME_RATIO}): {verdict}.")


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------

def columns(gpu: bool) -> list[tuple[str, str]]:
    """Table columns; throughput in TFLOP/s on a GPU, GFLOP/s on the CPU (where TFLOP/s would print as 0.00)."""
    unit = ("tflops", "TFLOP/s") if gpu else ("gflops", "GFLOP/s")
    return [("row", "row"), ("M", "M"), ("K", "K"), ("dtype", "dtype"),
            ("fwd_ms", "fwd ms"), ("bwd_ms", "bwd ms"), ("fwdbwd_ms", "fwd+bwd ms"),
            ("fwdbwd_p20_ms", "p20"), ("fwdbwd_p80_ms", "p80"),
            (f"fwd_{unit[0]}", f"fwd {unit[1]}"), (f"bwd_{unit[0]}", f"bwd {unit[1]}"),
            ("floor_fwdbwd_ms", "floor ms"), ("floor_frac", "floor / time"),
            ("peak_extra_mb", "peak extra MiB"), ("mxk_mb", "M×K fp32 MiB")] + (
        [("fwdbwd_host_us", "host µs/call (fwd+bwd)")] if gpu else [])


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="sweep",
                    help="sweep: every row over M x K x dtype; cpu-vs-eager-memory: (d) chunked against (b) eager on "
                         "the CPU, peak extra memory and forward+backward time")
    ap.add_argument("--m", type=_ints, default=None,
                    help="query rows M, comma list (M = 3B, rounded); cpu-vs-eager-memory: one value, default 768")
    ap.add_argument("--k", type=_ints, default=None,
                    help="queue sizes K, comma list; cpu-vs-eager-memory: one value, default 65536")
    ap.add_argument("--d", type=int, default=128, help="embedding dimension D")
    ap.add_argument("--dtype", default=None,
                    help="sweep: fp32,bf16 (comma list; default both on a GPU, fp32 on the CPU); "
                         "cpu-vs-eager-memory: fp32")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"sweep: comma-separated subset of {','.join(ROWS)}; chunked, triton and cuda are the public "
                         "op under MIXFAST_BACKEND=cpu, triton, cuda; a row that cannot run here is skipped with the "
                         "reason")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of the sweep (default: cuda where there is one); cpu-vs-eager-memory runs on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 25 on a GPU, 5 on the CPU)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls of each row first (default: 5 on a GPU, 1 on the CPU)")
    ap.add_argument("--max-time", type=float, default=60.0, help="sweep: seconds per measurement at most")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="sweep: skip the CPU memory subprocesses (cpu-vs-eager-memory always measures memory)")
    add_output_args(ap, "the mode's section")
    # internal: the fresh process in which cpu_peak_extra measures one row's memory
    ap.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown rows {unknown}; choose from {','.join(ROWS)}")
    if args.mode == "cpu-vs-eager-memory":
        for key, default in (("m", 768), ("k", 65536)):
            value = getattr(args, key)
            if value is None:
                setattr(args, key, [default])
            elif len(value) != 1:
                ap.error(f"--{key}: cpu-vs-eager-memory measures one problem, give one value")
    return args


def run_cpu_vs_eager_memory(args, env: dict) -> int:
    r = cpu_vs_eager_memory(args)
    print(json.dumps(r, indent=1))
    save_requested_results(args, "infonce-cpu-vs-eager-memory", [r], env)
    md = cpu_vs_eager_memory_markdown(r) + "\n\n" + env_line(env)
    print(md, flush=True)
    if args.update_readme:
        update_readme("infonce-cpu-vs-eager-memory", md,
                      title="soft-InfoNCE on the CPU: chunked vs eager, peak memory and time")
    return 0 if r["pass"] else 1


def sweep(args, device: torch.device, env: dict) -> list[dict]:
    gpu = device.type == "cuda"
    ms = args.m or ([64, 512, 768, 4096] if gpu else [64, 512, 768])
    ks = args.k or ([4096, 65536, 262144] if gpu else [4096, 65536])
    dtypes = (args.dtype or ("fp32,bf16" if gpu else "fp32")).split(",")
    rows = runnable_rows(args.rows, lambda row: row_off_device(row, device), ROW_LABELS)
    results = []
    for dtype in dtypes:
        copy = copy_timing(256 * 2**20, device)  # reads and writes 128 MiB each
        rates = {"tflops": matmul_tflops(DTYPES[dtype], device), "gbps": 256 * 2**20 / (copy.median_us * 1e-6) / 1e9}
        print(f"[{dtype}] matmul {rates['tflops']:.2f} TFLOP/s, copy {rates['gbps']:.1f} GB/s", flush=True)
        for m in ms:
            for k in ks:
                p = make_problem(m, k, args.d, DTYPES[dtype], device)
                ref = float(loss_reference(p, p.q.detach().double()))  # float64 value of the loss
                for row in rows:
                    reason = backend_refuses(row, p)
                    if reason:
                        print(f"  {row:8s} M={p.q.shape[0]:5d} K={k:6d} {dtype}: skipped ({reason})", flush=True)
                        continue
                    res = bench_row(row, p, m, dtype, device, args, rates, ref)
                    res.update(matmul_tflops=rates["tflops"], copy_gbps=rates["gbps"])
                    results.append(res)
                    print(f"  {row:8s} M={res['M']:5d} K={k:6d} {dtype}: fwd {res['fwd_ms']:.2f} ms, bwd "
                          f"{res['bwd_ms']:.2f} ms, fwd+bwd {res['fwdbwd_ms']:.2f} ms, "
                          f"{res['floor_frac']:.0%} of floor, peak extra {res['peak_extra_mb']} MiB", flush=True)
                del p
    save_requested_results(args, "infonce", results, env)
    if args.update_readme:
        note = ("Forward / backward / forward+backward medians (p20, p80 of forward+backward); throughput from "
                "2·M·D·(K+B) FLOPs forward and twice that backward; floor = max(FLOPs / matmul rate, bytes / copy "
                "bandwidth), both measured on this device, and floor / time the fraction of it reached (above 1 "
                "where a row does less work than that count: the eager rows do not recompute the logits in the "
                "backward); peak extra memory of one forward+backward (method: benchmarks/bench_infonce.py "
                "docstring). M×K fp32 MiB is the size of one logits matrix, for scale.")
        if not gpu:
            note += (" Rows (e) Triton and (f) CUDA need a GPU and were not measured on this machine, so the GPU "
                     "targets (bf16 forward+backward at M = 768, K = 65536 at least 5× faster than row (a) and at 50% "
                     "of the floor, with no M×K buffer) are not measured in this table.")
        update_readme("infonce", env_line(env) + "\n\n" + note + "\n\n" + render_table(results, columns(gpu)),
                      title="soft-InfoNCE (bench_infonce.py)")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        peak = cpu_peak_extra_here(args.measure_memory, args.m[0], args.k[0], args.d, args.dtype)
        print(json.dumps({"peak_extra_bytes": peak}))
        return 0
    device = torch.device("cpu" if args.mode == "cpu-vs-eager-memory" else args.device)
    gpu = device.type == "cuda"
    args.reps = args.reps or (25 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    env = environment(device)
    if args.mode == "cpu-vs-eager-memory":
        return run_cpu_vs_eager_memory(args, env)
    sweep(args, device, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())

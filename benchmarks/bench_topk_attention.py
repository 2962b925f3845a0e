"""MixedAE homologous TopK attention: the reference (dense scores, mask, softmax) against each fused backend of
`mixfast.ops.topk_attention`, forward and forward+backward, with plain dense attention (SDPA over all keys, a
different op) as the yardstick of what attention itself costs.

    python benchmarks/bench_topk_attention.py                       # CPU, small batches (< 2 minutes)
    python benchmarks/bench_topk_attention.py --device cuda         # B = 64, fp32 and bf16
    python benchmarks/bench_topk_attention.py --tag cpu-2cpus       # also write results/topk-attention-<tag>.{json,csv,md}

Shapes (B, heads, L, d, topk): `demo` (64, 4, 65, 32, 16): the demo ViT (64 tokens + CLS); `vitb` (64, 12, 197, 64,
49): ViT-B/16 at 224 px with K = r * 196 = 49 as the paper. On the CPU the batch defaults to 8 (demo) and 2 (vitb) so
that the run stays short (--batch overrides both).

Candidates: reference (`reference.topk_attention`), chunked, flex (FlexAttention, compiled unless
MIXFAST_FLEX_COMPILE=0; on the CPU its backward is the chunked one), triton (GPU, or CPU under TRITON_INTERPRET=1,
which is far too slow to time), and sdpa (`F.scaled_dot_product_attention`, all keys). Each is timed round-robin with
the others (common.time_round_robin: order shuffled per round, caches flushed before each sample); a sample is
`--calls` back-to-back calls on the CPU, on a GPU as many as fill ~2 ms behind a spin kernel. fwd+bwd is one forward
and `torch.autograd.grad` of q, k, v.

Peak extra memory: on a GPU, torch.cuda.max_memory_allocated() above what was allocated before the call. On the CPU
(no allocator statistics) one subprocess per shape measures every candidate in turn: after a warm-up call the kernel's
peak-RSS mark is reset (/proc/self/clear_refs) and the peak RSS of one call above the RSS before it is reported, with
glibc's mmap threshold pinned low so that freed buffers leave the process (as bench_infonce.py does); the kernel's
RSS counters lag by some pages, so values below ~1 MiB are noise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_output_args, env_line, environment, render_table,  # noqa: E402
                    save_requested_results, time_round_robin)

from mixfast.ops import reference as ref  # noqa: E402

tka = importlib.import_module("mixfast.ops.topk_attention")  # the module (mixfast.ops exports the function by its name)

SHAPES = {"demo": (64, 4, 65, 32, 16), "vitb": (64, 12, 197, 64, 49)}
CPU_BATCH = {"demo": 8, "vitb": 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")


def candidates(q: torch.Tensor) -> list[str]:
    names = ["reference", "chunked", "flex"]
    if "triton" in tka.available_backends(q) and q.is_cuda:
        names.append("triton")
    return names + ["sdpa"]


def make_inputs(shape, batch, dtype, device, seed=0):
    B, H, L, d, topk = shape
    B = batch or B
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    gout = torch.randn(B, H, L, d, generator=g).to(device, dtype)
    return q, k, v, gout, topk


def call_fn(name: str, q, k, v, gout, topk: int, mode: str):
    if name == "sdpa":
        def attn():
            return F.scaled_dot_product_attention(q, k, v)
    elif name == "reference":
        def attn():
            return ref.topk_attention(q, k, v, topk, 1)
    else:
        def attn():
            return tka.topk_attention(q, k, v, topk, 1, backend=name, validate=False)
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return attn()
        return fwd

    def fwd_bwd():
        return torch.autograd.grad(attn(), (q, k, v), gout)
    return fwd_bwd


# ---------------------------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------------------------


def gpu_peak_extra(fn, device) -> int:
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def cpu_peaks_here(shape_name: str, batch, dtype_name: str) -> dict:
    """In a fresh process: {candidate/mode: peak RSS of one call above the RSS before it}."""
    out = {}
    q, k, v, gout, topk = make_inputs(SHAPES[shape_name], batch, DTYPES[dtype_name], torch.device("cpu"))
    for mode in PASSES:
        for name in candidates(q):
            fn = call_fn(name, q, k, v, gout, topk, mode)
            fn()  # warm-up: lazy initializations, compilation
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset the peak-RSS mark to the current RSS
            base = _status_bytes("VmRSS")
            fn()
            out[f"{name}/{mode}"] = max(0, _status_bytes("VmHWM") - base)  # RSS counters lag by ~100 KiB
    return out


def cpu_peaks(shape_name: str, batch, dtype_name: str, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory", shape_name, "--dtype", dtype_name,
           "--threads", str(threads)] + (["--batch", str(batch)] if batch else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"  memory measurement of {shape_name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="demo,vitb", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16 (default: fp32 on the CPU, both on a GPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch of every shape (default: 64; on the CPU 8 / 2)")
    ap.add_argument("--reps", type=int, default=None, help="rounds (default: 25 on a GPU, 8 on the CPU)")
    ap.add_argument("--calls", type=int, default=3, help="back-to-back calls per CPU sample")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on the CPU (default 1: on a shared 2-core machine, 2 threads make every OpenMP "
                         "region wait on a descheduled thread)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--measure-memory", metavar="SHAPE", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    add_output_args(ap, "nothing (this benchmark has no README table)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(cpu_peaks_here(args.measure_memory, args.batch, args.dtype)))
        return
    dtypes = (args.dtypes or ("fp32" if dev.type == "cpu" else "fp32,bf16")).split(",")
    reps = args.reps or (8 if dev.type == "cpu" else 25)
    env = environment(dev)
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        batch = args.batch or (CPU_BATCH[shape_name] if dev.type == "cpu" else None)
        for dtype_name in dtypes:
            q, k, v, gout, topk = make_inputs(shape, batch, DTYPES[dtype_name], dev)
            names = candidates(q)
            if dev.type == "cuda":
                peaks = {f"{n}/{m}": gpu_peak_extra(call_fn(n, q, k, v, gout, topk, m), dev)
                         for m in PASSES for n in names}
            else:
                peaks = {} if args.no_memory else cpu_peaks(shape_name, batch, dtype_name, args.threads)
            for mode in PASSES:
                fns = {n: call_fn(n, q, k, v, gout, topk, mode) for n in names}
                t = time_round_robin(fns, device=dev, reps=reps, calls=args.calls if dev.type == "cpu" else None)
                ref_us, ref_mem = t["reference"].median_us, peaks.get(f"reference/{mode}")
                B, H, L, d, _ = shape
                for n in names:
                    mem = peaks.get(f"{n}/{mode}")
                    rows.append({
                        "shape": f"{shape_name} B{batch or B} H{H} L{L} d{d} K{topk}", "dtype": dtype_name,
                        "pass": mode, "backend": n, "us": t[n].median_us, "p20_us": t[n].p20_us,
                        "p80_us": t[n].p80_us, "speedup_vs_reference": ref_us / t[n].median_us,
                        "peak_extra_mb": mem / 2**20 if mem is not None else None,
                        "memory_vs_reference": (mem / ref_mem) if mem is not None and ref_mem else None,
                        "calls_per_sample": t[n].calls, "samples": t[n].reps})
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    columns = [("shape", "shape"), ("dtype", "dtype"), ("pass", "pass"), ("backend", "backend"), ("us", "µs"),
               ("p20_us", "p20"), ("p80_us", "p80"), ("speedup_vs_reference", "× reference"),
               ("peak_extra_mb", "peak extra MiB"), ("memory_vs_reference", "memory ÷ reference")]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    md = (f"# TopK (homologous) attention: reference vs fused backends ({env['device']})\n\n"
          f"`python benchmarks/bench_topk_attention.py {' '.join(sys.argv[1:])}`\n\n"
          f"{env_line(env)} Load average (1 min): {env.get('load_avg_1m') or float('nan'):.1f} at the start, "
          f"{load_end:.1f} at the end. sdpa = dense attention over all keys (a yardstick, not the same op); "
          f"× reference = reference time / row time (> 1: faster).\n\n{render_table(rows, columns)}\n")
    print(md)
    for jpath, _ in save_requested_results(args, "topk-attention", rows, env):
        jpath.with_suffix(".md").write_text(md, encoding="utf-8")
        print(f"wrote {jpath.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""Shared helpers for mixfast's benchmarks: environment metadata, timing, copy bandwidth,
result files (JSON + CSV) and the markdown tables in benchmarks/README.md.

Every benchmark script (bench_mix.py, bench_infonce.py, ...) follows the same recipe:

    env = environment(device)                       # device name, versions, commit
    t = time_fn(fn, device=device)                  # median / p20 / p80 in microseconds
    ref = copy_timing(nbytes, device)               # a torch copy moving the same bytes
    rows.append({... "us": t.median_us, "gbps": gbps(nbytes, t.median_us), ...})
    paths = write_results("mix", rows, env)         # benchmarks/results/mix-<device>.{json,csv}
    update_readme("mix", render_table(rows, COLUMNS), env)

Importable both as ``benchmarks.common`` (from the repository root) and as ``common``
(when a script in this folder is run directly).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"


# ---------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model as the kernel reports it (``/proc/cpuinfo``), else ``platform``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    """HEAD's hash, with ``+dirty`` when the work tree has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - an optional dependency that fails to import is simply absent
        return None
    return getattr(mod, "__version__", "unknown")


def environment(device: torch.device | str) -> dict:
    """Metadata stored with every result file: what ran, where, on which code."""
    device = torch.device(device)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "cuda_runtime": torch.version.cuda,
        "commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        from mixfast.ops import _native

        env["mixfast_C"] = _native.build_info()
    except Exception as e:  # noqa: BLE001 - the benchmark still runs the torch rows without it
        env["mixfast_C"] = f"unavailable: {e}"
    return env


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    reps: int

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted sequence."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one_call(fn: Callable[[], object], device: torch.device) -> float:
    """Microseconds of one call: CUDA events around it on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 3, reps: int = 25,
            min_time_s: float = 0.0, max_time_s: float = 20.0) -> Timing:
    """Time ``fn()`` once per repetition and return median / p20 / p80 in microseconds.

    Each repetition is timed on its own (CUDA: events around the call; CPU: perf_counter),
    so the quantiles show the spread. Runs at least ``reps`` repetitions and keeps going
    until ``min_time_s`` has passed, but never past ``max_time_s`` (slow reference rows).
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(_time_one_call(fn, device))
        spent = time.perf_counter() - start
        if (len(times) >= reps and spent >= min_time_s) or spent >= max_time_s:
            break
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


_FLUSH: dict = {}


def flush_caches(device: torch.device | str = "cpu", nbytes: int = 96 << 20) -> None:
    """Stream ``nbytes`` (3x a 32 MB last-level cache) through memory so that the next
    candidate starts without its inputs in the caches, as in a training step."""
    device = torch.device(device)
    key = (str(device), nbytes)
    if key not in _FLUSH:
        _FLUSH[key] = (torch.ones(nbytes // 8, device=device), torch.empty(nbytes // 8, device=device))
    src, dst = _FLUSH[key]
    dst.copy_(src)
    _sync(device)


def time_round_robin(fns: dict, *, device: torch.device | str = "cpu", warmup: int = 2, reps: int = 25,
                     max_time_s: float = 60.0, flush: bool = True, seed: int = 0) -> dict:
    """Time several candidates in turn, one call of each per round, and return a
    :class:`Timing` per name. Load that comes and goes during the run (other jobs on a shared
    machine) then hits every candidate alike, which keeps ratios between them honest. The
    order is shuffled every round and, with ``flush``, caches are flushed before each call,
    so no candidate inherits warm inputs from the one before it.
    Stops after ``reps`` rounds or once ``max_time_s`` has passed (at least 3 rounds)."""
    import random as _random

    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict = {name: [] for name in fns}
    order = list(fns)
    rng = _random.Random(seed)
    start = time.perf_counter()
    for rnd in range(reps):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            if flush:
                flush_caches(device)
            samples[name].append(_time_one_call(fn, device))
        if rnd >= 2 and time.perf_counter() - start > max_time_s:
            break
    out = {}
    for name, vals in samples.items():
        vals.sort()
        out[name] = Timing(_quantile(vals, 0.5), _quantile(vals, 0.2), _quantile(vals, 0.8), len(vals))
    return out


def gbps(nbytes: int, us: float) -> float:
    """Bandwidth in GB/s (10^9 bytes per second) of moving ``nbytes`` in ``us`` microseconds."""
    return nbytes / (us * 1e-6) / 1e9 if us > 0 else float("nan")


_COPY_CACHE: dict = {}


def copy_timing(nbytes: int, device: torch.device | str = "cpu", *, allocate: bool = False, **kw) -> Timing:
    """Time a plain torch copy that moves ``nbytes`` in total (half read, half written).

    This is the yard-stick for memory-bound kernels: a kernel that reads R bytes and
    writes W bytes is compared with ``dst.copy_(src)`` of (R+W)/2 bytes each way.
    ``allocate=True`` times ``src.clone()`` instead (a fresh output each call, like an op
    that returns new tensors); the default copies into a preallocated buffer.
    """
    return time_fn(copy_fn(nbytes, device, allocate=allocate), device=device, **kw)


def copy_fn(nbytes: int, device: torch.device | str = "cpu", *, allocate: bool = False):
    """The torch copy of :func:`copy_timing` as a callable (for :func:`time_round_robin`)."""
    device = torch.device(device)
    n = max(1, nbytes // 2 // 4)
    key = (n, str(device), allocate)
    if key not in _COPY_CACHE:
        _COPY_CACHE[key] = (torch.randn(n, device=device), torch.empty(n, device=device))
    src, dst = _COPY_CACHE[key]
    return (lambda: src.clone()) if allocate else (lambda: dst.copy_(src))


def clear_copy_buffers() -> None:
    _COPY_CACHE.clear()


# ---------------------------------------------------------------------------------------
# result files
# ---------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def write_results(name: str, rows: list[dict], env: dict, out_dir: Path | str = RESULTS_DIR,
                  tag: Optional[str] = None) -> tuple[Path, Path]:
    """Write ``<name>-<tag>.json`` (environment + rows) and ``.csv`` (rows + env columns).

    ``tag`` defaults to the device type and a slug of the device name, so results of
    different machines sit side by side.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = tag or f"{env.get('device_type', 'dev')}-{slug(str(env.get('device', '')))}"
    jpath = out_dir / f"{name}-{tag}.json"
    cpath = out_dir / f"{name}-{tag}.csv"
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump({"benchmark": name, "environment": env, "rows": rows}, f, indent=1, default=str)
        f.write("\n")
    env_cols = {k: env.get(k) for k in ("device", "torch", "triton", "commit", "date_utc")}
    fields: list[str] = []
    for row in rows:
        for k in row:
            if k not in fields:
                fields.append(k)
    fields += [f"env_{k}" for k in env_cols]
    with open(cpath, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({**row, **{f"env_{k}": v for k, v in env_cols.items()}})
    return jpath, cpath


# ---------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def render_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table; ``columns`` is a list of ``(row key, header)``."""
    rows = list(rows)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def env_line(env: dict) -> str:
    """One line naming the device, versions and commit, shown above a table."""
    return (f"Device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton') or 'absent'}, "
            f"commit `{env.get('commit')}`, {env.get('date_utc')}.")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def update_readme(name: str, markdown: str, readme: Path | str = README, title: Optional[str] = None) -> Path:
    """Replace the text between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``
    in ``readme`` with ``markdown`` (appending a new section with both markers if absent).
    Other benchmarks' sections are left untouched."""
    readme = Path(readme)
    start, end = markers(name)
    text = readme.read_text(encoding="utf-8") if readme.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        i, j = text.index(start), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    else:
        text = text.rstrip() + "\n\n" + (f"## {title}\n\n" if title else "") + block + "\n"
    readme.write_text(text, encoding="utf-8")
    return readme


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS (no heap trimming,
    no per-allocation mmap up to 1 GiB), as PyTorch's CPU tuning advice does with jemalloc or
    tcmalloc. Without it, an op that returns a fresh 19 MB tensor after other large tensors
    were freed pays ~4.7k page faults (1-4 ms here) -- more than the kernel itself.
    Returns whether both settings were accepted (False off glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 1 << 30))


def add_repo_to_path() -> None:
    """Let a script in benchmarks/ import mixfast and kernels from the checkout."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)

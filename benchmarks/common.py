"""Shared helpers for mixfast's benchmarks: environment metadata, timing, copy bandwidth,
result files (JSON + CSV) and the markdown tables in benchmarks/README.md.

Every benchmark script (bench_mix.py, bench_infonce.py, ...) follows the same recipe:

    add_output_args(ap, "the mix section")          # --results-file/--results-dir/--tag/--update-readme
    env = environment(device)                       # device name, versions, commit
    t = time_fn(fn, device=device, backend="cuda")  # median / p20 / p80 µs per call (+ host µs/call on a GPU)
    ref = copy_timing(nbytes, device)               # a torch copy moving the same bytes
    rows.append({... "us": t.median_us, "gbps": gbps(nbytes, t.median_us), ...})
    save_requested_results(args, "mix", rows, env)  # JSON + CSV, only where the flags ask
    if args.update_readme:
        update_readme("mix", render_table(rows, COLUMNS), title="...")

A run prints its results and writes no file unless asked, so that trying a benchmark never
rewrites the result files and README tables committed with the repository.

On a GPU the timers measure device time: many back-to-back calls between two CUDA events,
queued behind a spin kernel so that the host's launch cost cannot hide in the measurement,
plus the host's own issue time per call, from a separate pass (see ``_time_calls``).
Timing one call between events right after a sync measured the host whenever the kernel
was shorter than its launch.

Importable both as ``benchmarks.common`` (from the repository root) and as ``common``
(when a script in this folder is run directly).
"""

from __future__ import annotations

import contextlib
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
    """HEAD's hash, with ``+dirty`` when the work tree has uncommitted changes; where the
    checkout has no git metadata (a copy sent to another machine), ``MIXFAST_COMMIT`` if set."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MIXFAST_COMMIT") or "unknown"


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - an optional dependency that fails to import is simply absent
        return None
    return getattr(mod, "__version__", "unknown")


def _dist_version(distribution: str) -> Optional[str]:
    """An installed distribution's version from its metadata, without importing it (importing
    DeepSpeed picks an accelerator and takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict:
    """Metadata stored with every result file: what ran, where, on which code."""
    device = torch.device(device)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "deepspeed": _dist_version("deepspeed"),
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
    """Per-call times in microseconds: median / p20 / p80 over ``reps`` samples.

    On the CPU a sample is one call (wall time). On a GPU a sample is ``calls`` back-to-back
    calls timed between two CUDA events and divided by ``calls`` (see :func:`time_fn`), so the
    quantiles are of the device time per call; ``host_us`` is the median wall time the host
    spent issuing one call (no sync inside), which is what binds when it exceeds the device
    time."""

    median_us: float
    p20_us: float
    p80_us: float
    reps: int
    host_us: Optional[float] = None
    calls: int = 1

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}

    @property
    def host_bound(self) -> bool:
        """Issuing a call takes the host longer than the device needs to run it."""
        return self.host_us is not None and self.host_us > self.median_us


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted sequence."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summary(device_us: list[float], host_us: list[float], calls: int) -> Timing:
    d, h = sorted(device_us), sorted(host_us)
    return Timing(_quantile(d, 0.5), _quantile(d, 0.2), _quantile(d, 0.8), len(d),
                  _quantile(h, 0.5) if h else None, calls)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def mixfast_backend(name: Optional[str]):
    """``MIXFAST_BACKEND=name`` for the duration of the block (``None``: leave it as it is).

    The ops read the variable at every call. A benchmark passes the backend of each candidate
    to the timer (``backend=`` of :func:`time_fn`, ``backends=`` of :func:`time_round_robin`), which enters
    this around a whole sample of calls, outside the timed region: setting it inside the timed
    callable would add its cost to every call's host time."""
    if name is None:
        yield
        return
    old = os.environ.get("MIXFAST_BACKEND")
    os.environ["MIXFAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MIXFAST_BACKEND", None)
        else:
            os.environ["MIXFAST_BACKEND"] = old


_SLEEP_CYCLES_PER_US: dict = {}


def _gpu_cycles_per_us(device: torch.device) -> Optional[float]:
    """Clock cycles per microsecond of ``torch.cuda._sleep`` on this GPU, measured once (the
    spin kernel counts cycles; the clock is not queryable without NVML)."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    key = str(device)
    if key not in _SLEEP_CYCLES_PER_US:
        cycles = 10_000_000
        torch.cuda._sleep(1000)  # load the kernel
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        _SLEEP_CYCLES_PER_US[key] = cycles / max(a.elapsed_time(b) * 1e3, 1.0)
    return _SLEEP_CYCLES_PER_US[key]


def _time_calls(fn: Callable[[], object], device: torch.device, calls: int,
                setup: Optional[Callable[[int], object]] = None,
                between: Optional[Callable[[], object]] = None) -> tuple[float, float]:
    """(device µs per call, host µs per call) of ``calls`` back-to-back calls of ``fn``.

    CPU: wall time of the calls (both numbers are the same). CUDA: two passes of ``calls``
    calls each. The host pass times the issuing loop (wall time, no sync inside the loop), then
    syncs: the host's cost per call, including any wait a call makes itself (``.item()``). The
    device pass times the calls between two CUDA events. Issued onto an idle stream, the
    kernels would wait for the host between launches, and the events would measure host issue
    time wherever it exceeds the kernels' time (the flaw of timing one call between events). So a
    spin kernel first keeps the stream busy for longer than the host pass took: the calls queue
    up behind it and then run back to back, and the events see device time only. A call that
    synchronizes inside still serializes host and device in both passes, as in a training step.
    ``setup(calls)`` runs untimed before each pass (e.g. fresh forwards for a backward);
    ``between()`` runs between the passes (e.g. a cache flush)."""
    if setup is not None:
        setup(calls)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e6 / calls
    if device.type != "cuda":
        return host, host
    torch.cuda.synchronize(device)
    if between is not None:
        between()
    if setup is not None:
        setup(calls)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rate = _gpu_cycles_per_us(device)
    if rate:
        # 25% margin over the host pass (plus 50 µs); at most 0.2 s of spinning
        torch.cuda._sleep(int(min(1.25 * host * calls + 50.0, 2e5) * rate))
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / calls, host


def _calls_per_sample(fn: Callable[[], object], device: torch.device, calls: Optional[int], max_calls: int,
                      setup: Optional[Callable[[int], object]]) -> int:
    """How many back-to-back calls make one sample: 1 on the CPU; on a GPU ``calls`` or enough
    for ~2 ms of device time, at least 3, at most ``max_calls``, and no more than ~0.1 s of host
    issue time per pass."""
    if device.type != "cuda":
        return calls or 1
    if calls is not None:
        return calls
    dev_us, host_us = _time_calls(fn, device, 3, setup)
    n = math.ceil(2000.0 / max(dev_us, 1e-3))
    n = min(n, int(1e5 / max(host_us, 1e-3)))
    return max(3, min(n, max_calls))


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 3, reps: int = 25,
            min_time_s: float = 0.0, max_time_s: float = 20.0, calls: Optional[int] = None, max_calls: int = 200,
            backend: Optional[str] = None, setup: Optional[Callable[[int], object]] = None) -> Timing:
    """Time ``fn()`` and return per-call median / p20 / p80 in microseconds (and host µs/call).

    CPU: each repetition is one call (perf_counter), so the quantiles show the spread.
    CUDA: each repetition is ``calls`` back-to-back calls, issued once for the host's time and
    once between two events behind a spin kernel for the device's (see :func:`_time_calls`);
    ``calls=None`` picks the number. Runs at least ``reps`` repetitions and keeps going until ``min_time_s``
    has passed, but never past ``max_time_s`` (slow reference rows). ``backend`` is the
    ``MIXFAST_BACKEND`` of the calls (set outside the timed region); ``setup(n)`` runs untimed
    before each batch of ``n`` calls.
    """
    device = torch.device(device)
    with mixfast_backend(backend):
        if setup is not None and warmup:
            setup(warmup)
        for _ in range(warmup):
            fn()
        _sync(device)
        n = _calls_per_sample(fn, device, calls, max_calls, setup)
        dev_times: list[float] = []
        host_times: list[float] = []
        start = time.perf_counter()
        while True:
            d, h = _time_calls(fn, device, n, setup)
            dev_times.append(d)
            host_times.append(h)
            spent = time.perf_counter() - start
            if (len(dev_times) >= reps and spent >= min_time_s) or spent >= max_time_s:
                break
    return _summary(dev_times, host_times if device.type == "cuda" else [], n)


_FLUSH: dict = {}


def flush_caches(device: torch.device | str = "cpu", nbytes: int = 96 << 20) -> None:
    """Stream ``nbytes`` (3x a 32 MB last-level cache; H200's L2 is 60 MB) through memory so
    that the next candidate starts without its inputs in the caches, as in a training step."""
    device = torch.device(device)
    key = (str(device), nbytes)
    if key not in _FLUSH:
        _FLUSH[key] = (torch.ones(nbytes // 8, device=device), torch.empty(nbytes // 8, device=device))
    src, dst = _FLUSH[key]
    dst.copy_(src)
    _sync(device)


def time_round_robin(fns: dict, *, device: torch.device | str = "cpu", warmup: int = 2, reps: int = 25,
                     max_time_s: float = 60.0, flush: bool = True, seed: int = 0,
                     backends: Optional[dict] = None, calls: Optional[int] = None, max_calls: int = 200) -> dict:
    """Time several candidates in turn, one sample of each per round, and return a
    :class:`Timing` per name. Load that comes and goes during the run (other jobs on a shared
    machine) then hits every candidate alike, which keeps ratios between them honest. The
    order is shuffled every round and, with ``flush``, caches are flushed before each sample,
    so no candidate inherits warm inputs from the one before it.
    A sample is one call on the CPU and ``calls`` back-to-back calls on a GPU (see
    :func:`time_fn`; chosen per candidate when None). ``backends`` maps a candidate's name to
    the ``MIXFAST_BACKEND`` it runs under (set around its samples, outside the timed region).
    Stops after ``reps`` rounds or once ``max_time_s`` has passed (at least 3 rounds)."""
    import random as _random

    device = torch.device(device)
    backends = backends or {}
    n_calls: dict = {}
    for name, fn in fns.items():
        with mixfast_backend(backends.get(name)):
            for _ in range(warmup):
                fn()
            _sync(device)
            n_calls[name] = _calls_per_sample(fn, device, calls, max_calls, None)
    dev_samples: dict = {name: [] for name in fns}
    host_samples: dict = {name: [] for name in fns}
    order = list(fns)
    rng = _random.Random(seed)
    start = time.perf_counter()
    for rnd in range(reps):
        rng.shuffle(order)
        for name in order:
            with mixfast_backend(backends.get(name)):
                if flush:
                    flush_caches(device)
                d, h = _time_calls(fns[name], device, n_calls[name],
                                   between=(lambda: flush_caches(device)) if flush else None)
            dev_samples[name].append(d)
            host_samples[name].append(h)
        if rnd >= 2 and time.perf_counter() - start > max_time_s:
            break
    return {name: _summary(dev_samples[name], host_samples[name] if device.type == "cuda" else [], n_calls[name])
            for name in fns}


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


def runnable_rows(requested, why_not: Callable[[str], Optional[str]], labels: dict) -> list:
    """The requested rows that can run here; each other one is printed with the reason ``why_not(row)`` gives."""
    rows = []
    for row in requested:
        reason = why_not(row)
        if reason:
            print(f"{labels[row]}: skipped ({reason})", flush=True)
        else:
            rows.append(row)
    return rows


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def write_results(name: str, rows: list[dict], env: dict, out_dir: Path | str = RESULTS_DIR,
                  tag: Optional[str] = None) -> tuple[Path, Path]:
    """Write ``<name>-<tag>.json`` (environment + rows) and ``.csv`` (rows + env columns).

    ``tag`` defaults to the device type and a slug of the device name, so results of
    different machines sit side by side.
    """
    out_dir = Path(out_dir)
    tag = tag or f"{env.get('device_type', 'dev')}-{slug(str(env.get('device', '')))}"
    return write_results_file(out_dir / f"{name}-{tag}.json", name, rows, env)


def add_output_args(ap, readme_part: str) -> None:
    """The flags that ask a benchmark to write files (it writes none without them).
    ``readme_part`` names what ``--update-readme`` replaces, for its help."""
    g = ap.add_argument_group("output (by default the results are printed and no file is written)")
    g.add_argument("--results-file", metavar="PATH", default=None,
                   help="write the results as JSON to PATH, with a CSV twin next to it")
    g.add_argument("--results-dir", metavar="DIR", default=None,
                   help="write the results as <benchmark>-<tag>.json and .csv into DIR")
    g.add_argument("--tag", default=None,
                   help="the <tag> of --results-dir file names (default: device type and name); given without "
                        "--results-dir, the files go to benchmarks/results/")
    g.add_argument("--update-readme", action="store_true", help=f"replace {readme_part} in benchmarks/README.md")
    # Older command lines (scripts, notes) pass --no-readme; it is what every run does now.
    g.add_argument("--no-readme", action="store_true",
                   help="no effect: benchmarks/README.md is written only with --update-readme")


def save_requested_results(args, name: str, rows: list[dict], env: dict) -> list[tuple[Path, Path]]:
    """Write ``rows`` where the flags of :func:`add_output_args` ask, and nothing otherwise;
    returns the (JSON, CSV) pairs written."""
    written = []
    if args.results_file:
        written.append(write_results_file(args.results_file, name, rows, env))
    out_dir = args.results_dir or (RESULTS_DIR if args.tag else None)
    if out_dir is not None:
        written.append(write_results(name, rows, env, out_dir, tag=args.tag))
    for jpath, cpath in written:
        print(f"wrote {jpath} and {cpath}")
    return written


def write_results_file(path: Path | str, name: str, rows: list[dict], env: dict,
                       extra: Optional[dict] = None) -> tuple[Path, Path]:
    """Write ``path`` (JSON: benchmark name, environment, ``extra`` keys, rows) and a CSV twin
    next to it (same name, ``.csv``: rows + env columns)."""
    jpath = Path(path)
    cpath = jpath.with_suffix(".csv")
    jpath.parent.mkdir(parents=True, exist_ok=True)
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump({"benchmark": name, "environment": env, **(extra or {}), "rows": rows}, f, indent=1, default=str)
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
    ds = f", DeepSpeed {env['deepspeed']}" if env.get("deepspeed") else ""
    return (f"Device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton') or 'absent'}{ds}, "
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

"""Cost of the start-up file check (``mixfast.data.check.check_files``): cold and cached.

    python benchmarks/bench_file_check.py --files 10000 --threads 1 2 \\
        --results benchmarks/results/file-check-cpu-2cpus.md

Writes ``--files`` JPEGs of about 500x375 (``bench_data.make_tree``: the size of an average
ImageNet image, quality 90, smooth content plus noise so the decode cost is realistic) under
``--tree`` (default: a temporary folder), then times, per ``--threads`` value:

- ``cold``: no cache (a fresh cache directory): every file is opened and decoded by Pillow
  (JPEGs with DCT scaling, as the check does), and the verdicts are written to the cache file;
- ``cached``: the same call again: ``stat`` of every file (the cache key is path, size and
  modification time) and the cache file read; nothing is decoded.

"Cold" means not checked before, not a cold disk: the files sit in the page cache, so the rows time the decoding, not the storage (a network file system adds its
latency per file, which the threads overlap). Each row is the median of ``--repeats`` runs.
The ImageNet line of the table is arithmetic on the measured rate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_repo_to_path, env_line, environment, render_table  # noqa: E402

add_repo_to_path()

import mixfast  # noqa: E402,F401  (torchvision shim)


IMAGENET_TRAIN_FILES = 1_281_167


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", default=None, help="existing tree from an earlier run (train/ split), else written")
    parser.add_argument("--results", default=None, help="write the table (markdown) and a .json beside it here")
    args = parser.parse_args(argv)

    from bench_data import make_tree

    from mixfast.data.check import check_files
    from mixfast.data.files import images_in

    load_start = os.getloadavg()[0]  # other jobs on a shared machine slow the rows
    tmp = Path(tempfile.mkdtemp(prefix="bench-file-check-"))
    try:
        root = Path(args.tree) if args.tree else tmp / "tree"
        if not args.tree or not (root / "train").is_dir():
            t0 = time.perf_counter()
            make_tree(root, args.files)
            print(f"wrote {args.files} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        paths = [p for folder in sorted((root / "train").iterdir()) for p in images_in(str(folder))[0]]
        listing_s = time.perf_counter() - t0
        sizes = [os.path.getsize(p) for p in paths]
        rows = []
        for threads in args.threads:
            cold, cached = [], []
            for r in range(args.repeats):
                cache = tmp / f"cache-{threads}-{r}"
                t0 = time.perf_counter()
                verdicts = check_files(paths, str(root), str(cache), threads=threads)
                cold.append(time.perf_counter() - t0)
                assert all(v.problem is None for v in verdicts)
                t0 = time.perf_counter()
                check_files(paths, str(root), str(cache), threads=threads)
                cached.append(time.perf_counter() - t0)
            cache_bytes = sum(f.stat().st_size for f in cache.glob("file-check-*.json"))
            for kind, times in (("cold", cold), ("cached", cached)):
                s = statistics.median(times)
                rows.append({"check": kind, "threads": threads, "files": len(paths), "seconds": round(s, 3),
                             "files_per_s": round(len(paths) / s), "us_per_file": round(1e6 * s / len(paths), 1),
                             "imagenet_train_min": round(IMAGENET_TRAIN_FILES / (len(paths) / s) / 60, 1),
                             "runs_s": [round(t, 3) for t in times], "cache_file_bytes": cache_bytes})
                print(rows[-1], flush=True)
        env = environment("cpu")
        env.update(pillow=__import__("PIL").__version__, cpus=os.cpu_count(), listing_s=round(listing_s, 3),
                   mean_file_bytes=round(sum(sizes) / len(sizes)), load_avg_1m_start=load_start,
                   load_avg_1m_end=os.getloadavg()[0])
        table = render_table(rows, [("check", "check"), ("threads", "threads"), ("files", "files"),
                                    ("seconds", "s (median)"), ("files_per_s", "files/s"),
                                    ("us_per_file", "µs/file"), ("imagenet_train_min", "ImageNet train, min*"),
                                    ("cache_file_bytes", "cache file, bytes")])
        text = (f"# Start-up file check: cold and cached\n\n{env_line(env)} Pillow {env['pillow']}, "
                f"{env['cpus']} CPUs (shared), load average {env['load_avg_1m_start']:.2f} at the start and "
                f"{env['load_avg_1m_end']:.2f} at the end.\n\n"
                f"{len(paths)} JPEGs of 500x375, quality 90, {env['mean_file_bytes'] / 1024:.0f} KiB on average, in "
                f"the page cache; median of {args.repeats} runs per row. Listing the tree "
                f"(`mixfast.data.files.images_in`) took {listing_s:.2f} s.\n\n{table}\n\n"
                f"\\* {IMAGENET_TRAIN_FILES:,} files at the measured rate (arithmetic, not measured; ImageNet's "
                f"files average about 110 KiB, larger than these, so expect its rate per file to be lower).\n\nMethod: `benchmarks/bench_file_check.py` "
                f"(docstring). Command: `python benchmarks/bench_file_check.py "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}`.\n")
        print(text)
        if args.results:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results).write_text(text)
            Path(args.results).with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

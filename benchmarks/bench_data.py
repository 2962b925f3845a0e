"""Pre-training loader throughput: images/s (two augmented views per image) of each loader.

    python benchmarks/bench_data.py --make-tree 512 --loader dali torch --workers 2 --batch 32

Loaders, both over the same JPEG tree (an ImageFolder ``train/`` split) with the same recipe:

- ``torch``: ``SafeImageFolder`` + ``two_view_transform`` (PIL/torchvision) in a DataLoader
  with ``--workers`` worker processes (the trainer's ``build_train_loader``);
- ``dali``: ``DaliTwoViewLoader`` with ``--workers`` DALI threads, on the CPU
  (``device_id=None``) unless ``--dali-device gpu``.

Method: the loaders are timed in turn in one process, one segment of ``--steps`` batches
each per round, the order shuffled every round, for ``--rounds`` rounds; the load of other
jobs on a shared machine then hits both alike, so their ratio is what to read. The first
``--skip`` batches of each segment are not timed: they may come from the prefetch queue
filled while the other loader ran, and meanwhile the other loader finishes the batches it
had in flight (the torch DataLoader keeps 2 per worker), so little of its work lands in
the timed part. images/s = timed images / timed seconds, summed over
rounds; p20/p80 spread over the per-round rates.

``--make-tree N`` writes N JPEGs of about 500x375 (the size of an average ImageNet
image, quality 90, smooth content plus noise so the decode cost is realistic) in 10 classes
under ``--tree`` (default: a temporary folder); ``--tree PATH`` alone uses an existing tree.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_repo_to_path, env_line, environment, render_table, update_readme, write_results  # noqa: E402

add_repo_to_path()

import mixfast  # noqa: E402,F401  (torchvision shim)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_tree(root: Path, n: int, classes: int = 10, size=(500, 375), seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        folder = root / "train" / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        base = (np.sin(xx * fx + phase)[..., None] * rng.uniform(40, 90, 3) +
                np.cos(yy * fy)[..., None] * rng.uniform(40, 90, 3) + rng.uniform(60, 190, 3))
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def build(kind: str, tree: Path, args):
    from mixfast.data import SafeImageFolder, TwoViewDataset, build_train_loader, two_view_transform
    from mixfast.data.dali import DaliTwoViewLoader

    folder = SafeImageFolder(str(tree / "train"))
    if kind == "torch":
        data = TwoViewDataset(folder, two_view_transform(args.recipe, args.image_size))
        return build_train_loader(data, args.batch, 0, 1, seed=0, num_workers=args.workers)
    return DaliTwoViewLoader(folder.samples, batch_size=args.batch, rank=0, world_size=1, seed=0, recipe=args.recipe,
                             image_size=args.image_size, num_threads=args.workers, device=args.dali_device,
                             device_id=0 if args.dali_device == "gpu" else None, prefetch=args.prefetch)


class Stream:
    """Endless batches from a loader, epoch after epoch."""

    def __init__(self, loader):
        self.loader, self.epoch, self.it = loader, 0, None

    def next(self):
        while True:
            if self.it is None:
                self.loader.sampler.set_epoch(self.epoch)
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=None, help="JPEG tree with a train/ split (default: temporary)")
    ap.add_argument("--make-tree", type=int, default=0, metavar="N", help="write N ~500x375 JPEGs into --tree first")
    ap.add_argument("--loader", nargs="+", default=["dali", "torch"], choices=["dali", "torch"])
    ap.add_argument("--workers", type=int, nargs="+", default=[2],
                    help="DataLoader worker processes = DALI threads (one row per value)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--recipe", default="mocov2", choices=["mocov2", "mocov1", "cifar"])
    ap.add_argument("--steps", type=int, default=20, help="batches per segment (the first --skip untimed)")
    ap.add_argument("--skip", type=int, default=8,
                    help="untimed batches at the start of each segment: long enough for the other loader to finish "
                         "the batches it had queued (the torch DataLoader keeps 2 x workers batches in flight)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=2, help="DALI prefetch queue depth")
    ap.add_argument("--dali-device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--tag", default=None, help="results file tag (default: cpu-<workers>workers)")
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    args = ap.parse_args(argv)

    tmp = None
    if args.tree is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        args.tree = Path(tmp.name)
        args.make_tree = args.make_tree or 512
    if args.make_tree:
        t0 = time.perf_counter()
        make_tree(args.tree, args.make_tree)
        print(f"wrote {args.make_tree} JPEGs to {args.tree} in {time.perf_counter() - t0:.1f} s", flush=True)
    n_files = sum(len(f) for _, _, f in os.walk(args.tree / "train"))
    mean_kb = np.mean([os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.tree / "train") for f in fs]) / 1024

    env = environment("cpu" if args.dali_device == "cpu" else "cuda")
    rows = []
    for workers in args.workers:
        args.workers = workers
        streams = {kind: Stream(build(kind, args.tree, args)) for kind in args.loader}
        for s in streams.values():  # warm-up: workers started, pipelines built, first batches
            for _ in range(args.skip):
                s.next()
        images = {k: 0 for k in streams}
        seconds = {k: 0.0 for k in streams}
        rates = {k: [] for k in streams}
        order = list(streams)
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for kind in order:
                s = streams[kind]
                for _ in range(args.skip):
                    s.next()
                t0 = time.perf_counter()
                for _ in range(args.steps - args.skip):
                    batch = s.next()
                dt = time.perf_counter() - t0
                assert batch["x1"].shape == (args.batch, 3, args.image_size, args.image_size)
                n = (args.steps - args.skip) * args.batch
                images[kind] += n
                seconds[kind] += dt
                rates[kind].append(n / dt)
        del streams
        torch_rate = images["torch"] / seconds["torch"] if "torch" in images else float("nan")
        for kind in images:
            r = sorted(rates[kind])
            rate = images[kind] / seconds[kind]
            rows.append({"loader": kind if kind == "torch" else f"dali-{args.dali_device}", "workers": workers,
                         "batch": args.batch, "image_size": args.image_size, "recipe": args.recipe,
                         "images_per_s": rate, "p20": float(np.quantile(r, 0.2)), "p80": float(np.quantile(r, 0.8)),
                         "ms_per_batch": 1e3 * args.batch / rate, "vs_torch": rate / torch_rate,
                         "timed_images": images[kind], "files": n_files, "mean_kib": float(mean_kb)})
            print(rows[-1], flush=True)

    columns = [("loader", "loader"), ("workers", "workers / threads"), ("batch", "batch"), ("image_size", "size"),
               ("recipe", "recipe"), ("images_per_s", "images/s"), ("p20", "p20"), ("p80", "p80"),
               ("ms_per_batch", "ms/batch"), ("vs_torch", "× torch"), ("timed_images", "timed images")]
    table = render_table(rows, columns)
    tag = args.tag or f"{env['device_type']}-{'-'.join(str(w) for w in sorted({r['workers'] for r in rows}))}workers"
    jpath, _ = write_results("data", rows, env, tag=tag)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    md = (f"{env_line(env)} Load average (1 min): {env.get('load_avg_1m') or float('nan'):.1f} at the start, "
          f"{load_end:.1f} at the end (other jobs share this machine: read the ratios).\n\n"
          f"{n_files} JPEGs of about 500x375 (mean {mean_kb:.0f} KiB), two {args.recipe} views of "
          f"{args.image_size} px per image, batch {args.batch}; {args.rounds} rounds of {args.steps - args.skip} "
          f"timed batches per loader, interleaved in one process (method: benchmarks/bench_data.py docstring).\n\n"
          f"{table}\n")
    (jpath.with_suffix(".md")).write_text(md, encoding="utf-8")
    if args.readme:
        update_readme("data", md, title="Data loaders (bench_data.py)")
    print(md)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""Per-step training losses of every shipped config on a few synthetic steps, to compare two versions.

    python benchmarks/config_losses.py --out losses.json            # run every configs/*.json
    python benchmarks/config_losses.py --compare before.json after.json

Each config runs as shipped except for sizes (the same shrinking as the shipped-config test:
synthetic data, width-4 backbones, small heads, batch 16, 32 px), `--steps` steps on the CPU, in
this process. A refactoring that changes no arithmetic must reproduce every loss bit for bit;
`--compare` prints the configs whose losses differ and by how much.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHRINK = [
    "data.name=synthetic", "data.synthetic_size=32", "data.image_size=32", "data.num_workers=0",
    "model.width=4", "model.head_hidden_dim=32", "model.feature_dim=16", "model.predictor_hidden_dim=8",
    "method.queue_size=64", "train.batch_size=16", "log.every_steps=1", "log.progress=false",
    "log.tensorboard=false", "log.image_grid=false", "eval.knn_at_start=false", "eval.knn_every=0",
]


def losses_of(config: Path, steps: int, tmp: Path, extra: list[str]) -> list[float]:
    """The logged train/loss of steps 1..steps of `config` (shrunk, synthetic)."""
    sys.path.insert(0, str(REPO))
    from mixfast import train

    out = tmp / config.stem
    argv = ["--config", str(config)]
    for item in [*SHRINK, *extra, f"train.max_steps={steps}", f"train.output_dir={out}"]:
        argv += ["--set", item]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def run(args) -> None:
    saved = dict(os.environ)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in sorted((REPO / "configs").glob("*.json")):
            results[config.stem] = losses_of(config, args.steps, Path(tmp), args.overrides)
            os.environ.clear()
            os.environ.update(saved)  # the single-process set-up writes rank variables
            print(f"{config.stem}: {results[config.stem]}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def compare(before_path: str, after_path: str) -> int:
    before, after = json.loads(Path(before_path).read_text()), json.loads(Path(after_path).read_text())
    same, differ = [], []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a == b:
            same.append(name)
            continue
        rel = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a or [], b or [])), default=float("nan"))
        differ.append(name)
        print(f"differs: {name}: max relative difference {rel:.3g}\n  before {a}\n  after  {b}")
    print(f"{len(same)} configs identical, {len(differ)} differ")
    return 1 if differ else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write {config: [losses]} here")
    parser.add_argument("--steps", type=int, default=3, help="training steps per config (default 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every config, e.g. train.precision=fp32 (repeatable)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two --out files")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give --out FILE (or --compare BEFORE AFTER)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

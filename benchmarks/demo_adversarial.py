"""Train the adversarial-masking demos and check that their maskers are adversaries.

For `configs/demo_adios.json` and `configs/demo_sequential.json` (SimCLR + ADIOS, SimCLR +
sequential masking, on the built-in digits) this trains each run as a user would type it, then
loads the finished run and, on the held-out test images (two augmented views each, fixed seed,
encoder in eval mode), measures:

* the encoder loss with each image's own masks and with masks borrowed from another image of the
  batch (the batch rolled by one), paired per batch over 10 augmentation draws: an adversarial
  masker hides what matters in *its* image, so the first should be larger (mean difference and
  its standard error; encoder in eval and in train mode);
* each mask's coverage (the fraction of an image it removes): mean, min and max over the images.

    python benchmarks/demo_adversarial.py [--out runs/demo_adversarial] [--only demo_adios] [--seeds 0 1 2]
                                          [--skip-train]

With several `--seeds` each config is trained and checked once per `train.seed` (runs
`<name>_seed<s>`) and each cell gives the mean over the seeds with the min-max range.

Writes `results.json` and `results.md` under --out (the README's table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_frameworks import _KNN_LINE, reuse_training, save_training, spread  # noqa: E402

DEMOS = ["demo_adios", "demo_sequential"]


def _seed_sets(seed: int | None) -> list[str]:
    return [] if seed is None else [f"train.seed={seed}"]


def train(name: str, run_dir: Path, log: Path, seed: int | None = None) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "mixfast.train", "--config", f"configs/{name}.json",
           "--set", f"train.output_dir={run_dir}", "--set", "log.progress=false",
           *[a for kv in _seed_sets(seed) for a in ("--set", kv)]]
    print("$", " ".join(cmd), flush=True)
    # a fresh single-process run: not the rendezvous variables this process set for its own checks
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}); last lines of {log}:\n"
                 + "\n".join(proc.stdout.splitlines()[-20:]))
    return proc.stdout, wall


def adversary_check(config: Path, run_dir: Path, batch: int = 64, draws: int = 10, seed: int | None = None) -> dict:
    """Own-mask vs borrowed-mask encoder loss and mask coverage on the demo's test images.

    `draws` augmentation draws of the 360 test images (seeds 0..draws-1), in batches of `batch`: each
    batch gives a paired difference loss(own masks) - loss(borrowed masks). Reported for the encoder
    in eval mode (BatchNorm running statistics) and in train mode (batch statistics, as the loss is
    computed during training; the running statistics it updates are not saved)."""
    import torch

    from mixfast.config import load_config
    from mixfast.data.datasets import DigitsDemo, TwoViewDataset
    from mixfast.data.transforms import two_view_transform
    from mixfast.engine import distributed as dist_utils
    from mixfast.methods.masker import coverage
    from mixfast.train import Trainer

    cfg = load_config(config, [
        f"train.output_dir={run_dir}", "train.resume=auto", "log.tensorboard=false", "log.progress=false",
        "log.image_grid=false", "eval.knn_at_start=false", *_seed_sets(seed)])
    trainer = Trainer(cfg, dist_utils.init_distributed())
    if trainer.state.step == 0:
        sys.exit(f"{run_dir}: no finished run to check (train it first)")
    module, method = trainer.engine.module, trainer.method
    d = cfg.data
    test = TwoViewDataset(DigitsDemo(train=False), two_view_transform(d.augmentation, d.image_size,
                                                                        d.crop_min_scale, d.hflip))
    out: dict = {"steps": trainer.state.step, "draws": draws}
    cover = []
    for mode in ("eval", "train"):
        module.train(mode == "train")
        method.train(mode == "train")
        diffs, own = [], []
        for draw in range(draws):
            torch.manual_seed(draw)  # the augmentations draw from torch's global generator
            loader = torch.utils.data.DataLoader(test, batch_size=batch, shuffle=False, drop_last=True)
            for x1, x2, _, _ in loader:
                a, b = method.adversary_check(module, x1, x2)
                own.append(a)
                diffs.append(a - b)
                if mode == "eval":
                    with torch.no_grad():
                        cover.append(coverage(method.masker(x2 if 2 in method.masked_views else x1)))
        diff = torch.tensor(diffs, dtype=torch.float64)
        out[mode] = {"batches": len(diffs), "loss_own_masks": sum(own) / len(own),
                     "own_minus_borrowed_mean": float(diff.mean()),
                     "own_minus_borrowed_stderr": float(diff.std() / len(diffs) ** 0.5),
                     "own_above_borrowed_batches": int((diff > 0).sum())}
    s = torch.cat(cover)  # [images x draws, N]
    out.update(coverage_mean=s.mean(0).tolist(), coverage_min=s.min(0).values.tolist(),
               coverage_max=s.max(0).values.tolist())
    return out


def markdown(records: list[dict]) -> str:
    """One row per config. One seed: the measured values (difference ± its standard error). Several
    seeds: each cell is the mean over the seeds with the min-max range; coverage per mask is the
    mean coverage over the seeds with the smallest and largest single-image coverage of any seed."""
    head = ["config", "masks", "kNN random-init", "kNN trained", "own - borrowed, BN eval", "own > borrowed",
            "own - borrowed, BN train", "own > borrowed", "coverage per mask: mean [min, max]", "train wall"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in dict.fromkeys(r["config"] for r in records):
        runs = [r for r in records if r["config"] == config]
        r = runs[0]
        per_mask = zip(*[zip(x["coverage_mean"], x["coverage_min"], x["coverage_max"]) for x in runs])
        cov = "; ".join(f"{sum(m for m, _, _ in v) / len(v):.2f} [{min(lo for _, lo, _ in v):.2f}, "
                        f"{max(hi for _, _, hi in v):.2f}]" for v in per_mask)
        walls = [x["train_wall_s"] for x in runs if x.get("train_wall_s") is not None]  # unknown: reused run
        cells = []
        for mode in ("eval", "train"):
            if len(runs) == 1:
                cells += [f"{r[mode]['own_minus_borrowed_mean']:+.4f} ± {r[mode]['own_minus_borrowed_stderr']:.4f}",
                          f"{r[mode]['own_above_borrowed_batches']}/{r[mode]['batches']}"]
            else:
                cells += [spread([x[mode]["own_minus_borrowed_mean"] for x in runs], "{:+.4f}", ""),
                          spread([x[mode]["own_above_borrowed_batches"] for x in runs], "{:.1f}",
                                 f"/{r[mode]['batches']}")]
        rows.append("| " + " | ".join([
            f"`{config}`", r["masks"], spread([x["knn_random_init"] for x in runs]),
            spread([x["knn_trained"] for x in runs]), *cells, cov,
            spread(walls, "{:.0f}", " s") if walls else "-"]) + " |")
    seeds = sorted({r.get("seed") for r in records}, key=str)
    if len(seeds) > 1:
        rows.append(f"\nSeeds {', '.join(map(str, seeds))}: mean [min, max] over the seeds.")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_adversarial"))
    ap.add_argument("--only", nargs="+", choices=DEMOS, default=DEMOS)
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="train.seed values, one run each (default: the config's seed, one run)")
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs under --out")
    args = ap.parse_args()
    out = args.out if args.out.is_absolute() else ROOT / args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    records = []
    for name, seed in [(n, s) for n in args.only for s in (args.seeds or [None])]:
        tag = name if seed is None else f"{name}_seed{seed}"
        run_dir, log = out / tag, out / "logs" / f"{tag}.train.log"
        config = f"configs/{name}.json"
        cfg = json.loads((ROOT / config).read_text())
        run_seed = cfg["train"]["seed"] if seed is None else seed
        reused = reuse_training(run_dir, log, out / "results.json", config, run_seed) if args.skip_train else None
        if reused:
            text, wall = reused
        else:
            text, wall = train(name, run_dir, log, seed)
            save_training(log, text, wall)
        m = _KNN_LINE.findall(text)
        if not m:
            sys.exit(f"{tag}: no 'kNN top-1: random-init ... -> trained ...' line in {log}")
        rec = {"config": config, "seed": run_seed,
               "masks": f"{cfg['masker']['kind']}, N={cfg['masker']['num_masks']}",
               "knn_random_init": float(m[-1][0]), "knn_trained": float(m[-1][1]), "train_wall_s": wall,
               **adversary_check(ROOT / config, run_dir, seed=seed)}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Train every demo recipe and evaluate it: the per-framework table of the README.

For each `configs/demo*.json` (MoCo v2, SimCLR, BYOL, SimSiam with MixMask; MixSiam) this runs
the trainer on the built-in demo data, then the kNN, linear-probe and fine-tune commands on the
result, each as its own process exactly as a user would type it, and writes one JSON record
per framework plus a Markdown table. Runs are sequential: on a 2-core machine two trainings
side by side only make both slow.

    python benchmarks/demo_frameworks.py [--out runs/demo_frameworks] [--only demo_byol ...]
                                          [--labels 1 10] [--seeds 0 1 2] [--skip-train]

With several `--seeds` (`train.seed`: initial weights, data order, augmentations, mixing draws)
each recipe is trained and evaluated once per seed (runs `<name>_seed<s>`; the evaluation
commands keep their own default seeds) and each table cell is the mean with the min-max range.

The random-init kNN is the trainer's own (`eval.knn_at_start` in the demo configs). A run that
was interrupted resumes from its checkpoint because the trainer does; a finished run is not
trained again with --skip-train.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ["demo", "demo_simclr", "demo_byol", "demo_simsiam", "demo_mixsiam"]
_FRAMEWORK = {"moco": "MoCo v2", "simclr": "SimCLR", "byol": "BYOL", "simsiam": "SimSiam", "mixsiam": "MixSiam"}
_KNN_LINE = re.compile(r"kNN top-1: random-init ([\d.]+)% -> trained ([\d.]+)%")


def _run(cmd: list[str], log: Path) -> tuple[str, float]:
    """Run one command, tee its output to `log`, fail loudly with the log's tail."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                 f"last lines of {log}:\n" + "\n".join(proc.stdout.splitlines()[-20:]))
    return proc.stdout, wall


def _wall_file(log: Path) -> Path:
    return log.with_name(log.name + ".wall_s")


def save_training(log: Path, text: str, wall: float) -> None:
    """Keep a finished training's output and wall time, so that --skip-train can reuse both."""
    log.write_text(text)
    _wall_file(log).write_text(f"{wall:.3f}\n")


def reuse_training(run_dir: Path, log: Path, results: Path, config: str, seed: int) -> tuple[str, float | None] | None:
    """Output and wall time of a training finished under `run_dir` by an earlier pass, else None.

    The exported backbone is the trainer's last act and the log is written after its process
    exits, so a pass killed between the two (or before) trains again instead of failing on a
    missing log. The wall time is the one `save_training` kept, else the `(config, seed)` record's
    in an earlier pass's `results` file (runs from before the wall files), else unknown."""
    if not ((run_dir / "backbone_torchvision.pth").exists() and log.exists()):
        return None
    if _wall_file(log).exists():
        return log.read_text(), float(_wall_file(log).read_text())
    records = json.loads(results.read_text()) if results.exists() else []
    walls = {(r["config"], r.get("seed")): r.get("train_wall_s") for r in records}
    return log.read_text(), walls.get((config, seed))


def _top1(metrics_file: Path) -> float:
    return float(json.loads(metrics_file.read_text())["top1"])


def evaluate(name: str, out: Path, labels: list[int], skip_train: bool, seed: int | None = None) -> dict:
    """Train `name` (at `train.seed=seed` when given) and run the evaluation commands on it."""
    py = sys.executable
    tag = name if seed is None else f"{name}_seed{seed}"
    run_dir = out / tag
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    rec: dict = {"config": f"configs/{name}.json", "method": cfg["method"]["name"],
                 "mixmask": cfg["mixing"]["mixmask"]["enabled"], "unmix": cfg["mixing"]["unmix"]["enabled"],
                 "epochs": cfg["train"]["epochs"], "run_dir": str(run_dir),
                 "seed": cfg["train"]["seed"] if seed is None else seed}
    seed_set = [] if seed is None else ["--set", f"train.seed={seed}"]

    log = logs / f"{tag}.train.log"
    reused = reuse_training(run_dir, log, out / "results.json", rec["config"], rec["seed"]) if skip_train else None
    if reused:
        text, rec["train_wall_s"] = reused
    else:
        text, rec["train_wall_s"] = _run(
            [py, "-m", "mixfast.train", "--config", f"configs/{name}.json",
             "--set", f"train.output_dir={run_dir}", "--set", "log.progress=false", *seed_set], log)
        save_training(log, text, rec["train_wall_s"])
    m = _KNN_LINE.findall(text)
    if not m:
        sys.exit(f"{tag}: no 'kNN top-1: random-init ... -> trained ...' line in {log}")
    rec["knn_random_init"], rec["knn_trained"] = (float(v) for v in m[-1])

    _, rec["linear_wall_s"] = _run(
        [py, "-m", "mixfast.eval.linear", str(run_dir), "--protocol", "cifar", "--augment", "none",
         "--no-progress"], logs / f"{tag}.linear.log")
    rec["linear_top1"] = _top1(run_dir / "eval" / "linear-cifar" / "linear_metrics.json")

    for p in labels:
        _, rec[f"finetune_{p}pct_wall_s"] = _run(
            [py, "-m", "mixfast.eval.finetune", str(run_dir), "--labels", str(p), "--no-progress"],
            logs / f"{tag}.finetune{p}.log")
        rec[f"finetune_{p}pct_top1"] = _top1(run_dir / "eval" / f"finetune-{p}pct" / "finetune_metrics.json")
    print(json.dumps(rec), flush=True)
    return rec


def spread(values: list[float], fmt: str = "{:.2f}", unit: str = "%") -> str:
    """One value as is; several as 'mean [min-max]' (the README's seed tables)."""
    if len(values) == 1:
        return fmt.format(values[0]) + unit
    mean = sum(values) / len(values)
    return f"{fmt.format(mean)}{unit} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def markdown(records: list[dict], labels: list[int]) -> str:
    """One row per config; with records of several seeds, each cell is 'mean [min-max]'."""
    head = ["config", "framework (mixing)", "kNN random-init", "kNN trained", "linear (`--protocol cifar --augment none`)",
            *[f"fine-tune {p}%" for p in labels], "training wall"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    configs = list(dict.fromkeys(r["config"] for r in records))
    for config in configs:
        runs = [r for r in records if r["config"] == config]
        r = runs[0]
        mixing = (" + ".join(k for k, on in (("MixMask", r["mixmask"]), ("Un-Mix", r["unmix"])) if on)
                  or ("its own mixture" if r["method"] == "mixsiam" else "-"))
        walls = [x["train_wall_s"] for x in runs if x.get("train_wall_s")]
        wall = spread(walls, "{:.0f}", " s") if walls else "-"
        rows.append("| " + " | ".join([
            f"`{config}`", f"{_FRAMEWORK.get(r['method'], r['method'])} ({mixing})", spread([x["knn_random_init"] for x in runs]),
            spread([x["knn_trained"] for x in runs]), spread([x["linear_top1"] for x in runs]),
            *[spread([x[f"finetune_{p}pct_top1"] for x in runs]) for p in labels], wall]) + " |")
    seeds = sorted({r["seed"] for r in records})
    if len(seeds) > 1:
        rows.append(f"\nSeeds {', '.join(map(str, seeds))}: mean [min, max] over the seeds.")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_frameworks"))
    ap.add_argument("--only", nargs="+", choices=DEMOS, default=DEMOS)
    ap.add_argument("--labels", nargs="+", type=int, default=[1, 10], choices=[1, 10, 100])
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="train.seed values, one run each (default: the config's seed, one run)")
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs under --out")
    args = ap.parse_args()
    out = args.out if args.out.is_absolute() else ROOT / args.out
    seeds = args.seeds or [None]
    records = [evaluate(name, out, args.labels, args.skip_train, seed) for name in args.only for seed in seeds]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records, args.labels)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Train the ViT autoencoder demos (MAE, MixedAE on the built-in digits) and evaluate them.

For `configs/demo_mae.json` and `configs/demo_mixedae.json` this trains each run as a user would
type it, then runs the kNN and fine-tune commands on the result (each its own process), and reads
from the run's metrics.jsonl how the reconstruction loss and (MixedAE) the TopK accuracy moved:
the mean over the first and over the last epoch's logged steps, and (MixedAE) the TopK accuracy's
course, its mean over each sixth of the epochs (a second table).

`--skip-train` reuses a run folder under --out whatever config trained it: give a new --out after
changing a demo config (its epochs, say).

    python benchmarks/demo_autoencoders.py [--out runs/demo_autoencoders] [--only demo_mae] [--seeds 0 1 2]
                                           [--skip-train]

With several `--seeds` each config is trained and evaluated once per `train.seed` (runs
`<name>_seed<s>`) and each cell is the mean with the min-max range.

Writes `results.json` and `results.md` under --out (the README's table).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_frameworks import _KNN_LINE, _run, _top1, reuse_training, save_training, spread  # noqa: E402

DEMOS = ["demo_mae", "demo_mixedae"]
# The ViT fine-tune recipe's defaults are ImageNet's (batch 1024, 100 epochs); the demo's: 10% of the labels,
# batch 64, 30 epochs with 3 of warm-up, no mixup/cutmix/RandAugment.
CURVE_SPANS = 6  # the TopK accuracy's course: means over 6 equal runs of epochs (20 each at 120 epochs)
FINETUNE = ["--labels", "10", "--recipe", "vit", "--batch-size", "64", "--epochs", "30", "--warmup-epochs", "3"]


def logged(metrics: Path, key: str) -> dict[int, float]:
    """step -> value of `key` in a run's metrics.jsonl (a step logged again after a resume: the last line)."""
    values = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    return values


def first_last(metrics: Path, key: str, steps_per_epoch: int) -> tuple[float, float]:
    values = logged(metrics, key)
    steps = sorted(values)
    first = [values[s] for s in steps if s <= steps_per_epoch]
    last = [values[s] for s in steps if s > steps[-1] - steps_per_epoch]
    return sum(first) / len(first), sum(last) / len(last)


def span_epochs(epochs: int, spans: int) -> list[range]:
    """`epochs` cut into at most `spans` runs of ceil(epochs / spans) epochs (the last may be shorter)."""
    per = -(-epochs // spans)
    return [range(start, min(start + per, epochs)) for start in range(0, epochs, per)]


def span_means(metrics: Path, key: str, steps_per_epoch: int, epochs: int, spans: int) -> list[float | None]:
    """The mean of `key` over the logged steps of each of `span_epochs(epochs, spans)` (the TopK accuracy's
    course over training); None for a run of epochs with no logged value (a run cut short)."""
    runs = span_epochs(epochs, spans)
    sums: list[list[float]] = [[] for _ in runs]
    for step, value in logged(metrics, key).items():
        epoch = (step - 1) // steps_per_epoch  # steps count from 1
        sums[min(epoch // len(runs[0]), len(runs) - 1)].append(value)
    return [sum(v) / len(v) if v else None for v in sums]


def evaluate(name: str, out: Path, skip_train: bool, seed: int | None = None) -> dict:
    py = sys.executable
    tag = name if seed is None else f"{name}_seed{seed}"
    run_dir, logs = out / tag, out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    rec: dict = {"config": f"configs/{name}.json", "method": cfg["method"]["name"], "arch": cfg["model"]["arch"],
                 "epochs": cfg["train"]["epochs"], "seed": cfg["train"]["seed"] if seed is None else seed}
    seed_set = [] if seed is None else ["--set", f"train.seed={seed}"]
    log = logs / f"{tag}.train.log"
    reused = reuse_training(run_dir, log, out / "results.json", rec["config"], rec["seed"]) if skip_train else None
    if reused:
        text, rec["train_wall_s"] = reused
    else:
        text, rec["train_wall_s"] = _run([py, "-m", "mixfast.train", "--config", f"configs/{name}.json",
                                          "--set", f"train.output_dir={run_dir}", "--set", "log.progress=false",
                                          *seed_set], log)
        save_training(log, text, rec["train_wall_s"])
    m = _KNN_LINE.findall(text)
    if not m:
        sys.exit(f"{tag}: no 'kNN top-1: random-init ... -> trained ...' line in {log}")
    rec["knn_random_init"], rec["knn_trained"] = (float(v) for v in m[-1])
    steps_per_epoch = int(next(line for line in text.splitlines() if "steps/epoch" in line)
                          .split(" steps/epoch")[0].rsplit(" ", 1)[-1])
    metrics = run_dir / "metrics.jsonl"
    rec["loss_recon_first_epoch"], rec["loss_recon_last_epoch"] = first_last(metrics, "train/loss_recon",
                                                                             steps_per_epoch)
    if rec["method"] == "mixedae":
        rec["topk_accuracy_first_epoch"], rec["topk_accuracy_last_epoch"] = first_last(
            metrics, "train/topk_accuracy", steps_per_epoch)
        rec["loss_homocon_first_epoch"], rec["loss_homocon_last_epoch"] = first_last(
            metrics, "train/loss_homocon", steps_per_epoch)
        rec["topk_accuracy_spans"] = span_means(metrics, "train/topk_accuracy", steps_per_epoch, rec["epochs"],
                                                CURVE_SPANS)
    _, rec["knn_command_wall_s"] = _run([py, "-m", "mixfast.eval.knn", str(run_dir)], logs / f"{tag}.knn.log")
    rec["knn_command_top1"] = _top1(run_dir / "eval" / "knn" / "knn_metrics.json")
    _, rec["finetune_wall_s"] = _run([py, "-m", "mixfast.eval.finetune", str(run_dir), *FINETUNE, "--no-progress"],
                                     logs / f"{tag}.finetune.log")
    rec["finetune_10pct_top1"] = _top1(run_dir / "eval" / "finetune-10pct" / "finetune_metrics.json")
    print(json.dumps(rec), flush=True)
    return rec


def markdown(records: list[dict]) -> str:
    """One row per config; with records of several seeds, each value is 'mean [min-max]'."""
    head = ["config", "kNN random-init → trained", "reconstruction loss, first → last epoch",
            "TopK accuracy, first → last epoch (chance ≈ 25%)", "HomoCon, first → last epoch", "kNN command",
            "fine-tune 10% (ViT recipe, 30 ep)", "train wall"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in dict.fromkeys(r["config"] for r in records):
        runs = [r for r in records if r["config"] == config]

        def cell(key, scale=1.0, fmt="{:.2f}", unit="%"):
            return spread([scale * r[key] for r in runs], fmt, unit)

        def arrow(first, last, scale=1.0, fmt="{:.2f}", unit="%"):
            if first not in runs[0]:
                return "-"
            return f"{cell(first, scale, fmt, unit)} → {cell(last, scale, fmt, unit)}"

        walls = [r["train_wall_s"] for r in runs if r.get("train_wall_s")]
        rows.append("| " + " | ".join([
            f"`{config}`", arrow("knn_random_init", "knn_trained"),
            arrow("loss_recon_first_epoch", "loss_recon_last_epoch", fmt="{:.3f}", unit=""),
            arrow("topk_accuracy_first_epoch", "topk_accuracy_last_epoch", 100.0, "{:.1f}"),
            arrow("loss_homocon_first_epoch", "loss_homocon_last_epoch", fmt="{:.3f}", unit=""),
            cell("knn_command_top1"), cell("finetune_10pct_top1"),
            spread(walls, "{:.0f}", " s") if walls else "-"]) + " |")
    seeds = sorted({r.get("seed") for r in records})
    if len(seeds) > 1:
        rows.append(f"\nSeeds {', '.join(map(str, seeds))}: mean [min, max] over the seeds.")
    curves = [r for r in records if r.get("topk_accuracy_spans")]
    if curves:
        spans = span_epochs(curves[0]["epochs"], CURVE_SPANS)  # the recipes give every seed the same epochs
        labels = [f"epochs {r[0]}-{r[-1]}" if len(r) > 1 else f"epoch {r[0]}" for r in spans]
        rows += ["", "TopK accuracy over training (mean over the logged steps of each run of epochs; chance ≈ 25%):",
                 "", "| run | " + " | ".join(labels) + " |", "|" + "---|" * (len(spans) + 1)]
        for r in curves:
            rows.append(f"| `{r['config']}` seed {r.get('seed')} | " + " | ".join(
                "-" if v is None else f"{100 * v:.1f}%" for v in r["topk_accuracy_spans"]) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_autoencoders"))
    ap.add_argument("--only", nargs="+", choices=DEMOS, default=DEMOS)
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="train.seed values, one run each (default: the config's seed, one run)")
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs under --out")
    args = ap.parse_args()
    out = args.out if args.out.is_absolute() else ROOT / args.out
    records = [evaluate(name, out, args.skip_train, seed) for name in args.only for seed in (args.seeds or [None])]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

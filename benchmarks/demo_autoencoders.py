"""Train the ViT autoencoder demos (MAE, MixedAE on the built-in digits) and evaluate them.

For `configs/demo_mae.json` and `configs/demo_mixedae.json` this trains each run as a user would
type it, then runs the kNN and fine-tune commands on the result (each its own process), and reads
from the run's metrics.jsonl how the reconstruction loss and (MixedAE) the TopK accuracy moved:
the mean over the first and over the last epoch's logged steps.

    python benchmarks/demo_autoencoders.py [--out runs/demo_autoencoders] [--only demo_mae] [--skip-train]

Writes `results.json` and `results.md` under --out (the README's table).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_frameworks import _KNN_LINE, _run, _top1  # noqa: E402

DEMOS = ["demo_mae", "demo_mixedae"]
# The ViT fine-tune recipe's defaults are ImageNet's (batch 1024, 100 epochs); the demo's: 10% of the labels,
# batch 64, 30 epochs with 3 of warm-up, no mixup/cutmix/RandAugment.
FINETUNE = ["--labels", "10", "--recipe", "vit", "--batch-size", "64", "--epochs", "30", "--warmup-epochs", "3"]


def first_last(metrics: Path, key: str, steps_per_epoch: int) -> tuple[float, float]:
    values = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    steps = sorted(values)
    first = [values[s] for s in steps if s <= steps_per_epoch]
    last = [values[s] for s in steps if s > steps[-1] - steps_per_epoch]
    return sum(first) / len(first), sum(last) / len(last)


def evaluate(name: str, out: Path, skip_train: bool) -> dict:
    py = sys.executable
    run_dir, logs = out / name, out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    rec: dict = {"config": f"configs/{name}.json", "method": cfg["method"]["name"], "arch": cfg["model"]["arch"],
                 "epochs": cfg["train"]["epochs"]}
    log = logs / f"{name}.train.log"
    if skip_train and (run_dir / "backbone_torchvision.pth").exists():
        earlier = out / "results.json"
        walls = {r["config"]: r.get("train_wall_s") for r in json.loads(earlier.read_text())} if earlier.exists() else {}
        text, rec["train_wall_s"] = log.read_text(), walls.get(rec["config"])
    else:
        text, rec["train_wall_s"] = _run([py, "-m", "mixfast.train", "--config", f"configs/{name}.json",
                                          "--set", f"train.output_dir={run_dir}", "--set", "log.progress=false"], log)
    m = _KNN_LINE.findall(text)
    if not m:
        sys.exit(f"{name}: no 'kNN top-1: random-init ... -> trained ...' line in {log}")
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
    _, rec["knn_command_wall_s"] = _run([py, "-m", "mixfast.eval.knn", str(run_dir)], logs / f"{name}.knn.log")
    rec["knn_command_top1"] = _top1(run_dir / "eval" / "knn" / "knn_metrics.json")
    _, rec["finetune_wall_s"] = _run([py, "-m", "mixfast.eval.finetune", str(run_dir), *FINETUNE, "--no-progress"],
                                     logs / f"{name}.finetune.log")
    rec["finetune_10pct_top1"] = _top1(run_dir / "eval" / "finetune-10pct" / "finetune_metrics.json")
    print(json.dumps(rec), flush=True)
    return rec


def markdown(records: list[dict]) -> str:
    head = ["config", "kNN random-init → trained", "reconstruction loss, first → last epoch",
            "TopK accuracy, first → last epoch (chance ≈ 25%)", "HomoCon, first → last epoch", "kNN command",
            "fine-tune 10% (ViT recipe, 30 ep)", "train wall"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        topk = (f"{100 * r['topk_accuracy_first_epoch']:.1f}% → {100 * r['topk_accuracy_last_epoch']:.1f}%"
                if "topk_accuracy_first_epoch" in r else "-")
        homocon = (f"{r['loss_homocon_first_epoch']:.3f} → {r['loss_homocon_last_epoch']:.3f}"
                   if "loss_homocon_first_epoch" in r else "-")
        wall = f"{r['train_wall_s']:.0f} s" if r.get("train_wall_s") else "-"
        rows.append("| " + " | ".join([
            f"`{r['config']}`", f"{r['knn_random_init']:.2f}% → {r['knn_trained']:.2f}%",
            f"{r['loss_recon_first_epoch']:.3f} → {r['loss_recon_last_epoch']:.3f}", topk, homocon,
            f"{r['knn_command_top1']:.2f}%", f"{r['finetune_10pct_top1']:.2f}%", wall]) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_autoencoders"))
    ap.add_argument("--only", nargs="+", choices=DEMOS, default=DEMOS)
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs under --out")
    args = ap.parse_args()
    out = args.out if args.out.is_absolute() else ROOT / args.out
    records = [evaluate(name, out, args.skip_train) for name in args.only]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

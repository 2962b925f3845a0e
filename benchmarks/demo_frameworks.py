"""Train every demo recipe and evaluate it: the per-framework table of the README.

For each `configs/demo*.json` (MoCo v2, SimCLR, BYOL, SimSiam with MixMask; MixSiam) this runs
the trainer on the built-in demo data, then the kNN, linear-probe and fine-tune commands on the
result, each as its own process exactly as a user would type it, and writes one JSON record
per framework plus a Markdown table. Runs are sequential: on a 2-core machine two trainings
side by side only make both slow.

    python benchmarks/demo_frameworks.py [--out runs/demo_frameworks] [--only demo_byol ...]
                                          [--labels 1 10] [--skip-train]

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


def _top1(metrics_file: Path) -> float:
    return float(json.loads(metrics_file.read_text())["top1"])


def evaluate(name: str, out: Path, labels: list[int], skip_train: bool) -> dict:
    py = sys.executable
    run_dir = out / name
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    rec: dict = {"config": f"configs/{name}.json", "method": cfg["method"]["name"],
                 "mixmask": cfg["mixing"]["mixmask"]["enabled"], "unmix": cfg["mixing"]["unmix"]["enabled"],
                 "epochs": cfg["train"]["epochs"], "run_dir": str(run_dir)}

    if skip_train and (run_dir / "backbone_torchvision.pth").exists():
        text = (logs / f"{name}.train.log").read_text()
        earlier = out / "results.json"  # keep the wall time the training pass measured
        walls = {r["config"]: r.get("train_wall_s") for r in json.loads(earlier.read_text())} if earlier.exists() else {}
        rec["train_wall_s"] = walls.get(rec["config"])
    else:
        text, rec["train_wall_s"] = _run(
            [py, "-m", "mixfast.train", "--config", f"configs/{name}.json",
             "--set", f"train.output_dir={run_dir}", "--set", "log.progress=false"],
            logs / f"{name}.train.log")
    m = _KNN_LINE.findall(text)
    if not m:
        sys.exit(f"{name}: no 'kNN top-1: random-init ... -> trained ...' line in {logs / f'{name}.train.log'}")
    rec["knn_random_init"], rec["knn_trained"] = (float(v) for v in m[-1])

    _, rec["linear_wall_s"] = _run(
        [py, "-m", "mixfast.eval.linear", str(run_dir), "--protocol", "cifar", "--augment", "none",
         "--no-progress"], logs / f"{name}.linear.log")
    rec["linear_top1"] = _top1(run_dir / "eval" / "linear-cifar" / "linear_metrics.json")

    for p in labels:
        _, rec[f"finetune_{p}pct_wall_s"] = _run(
            [py, "-m", "mixfast.eval.finetune", str(run_dir), "--labels", str(p), "--no-progress"],
            logs / f"{name}.finetune{p}.log")
        rec[f"finetune_{p}pct_top1"] = _top1(run_dir / "eval" / f"finetune-{p}pct" / "finetune_metrics.json")
    print(json.dumps(rec), flush=True)
    return rec


def markdown(records: list[dict], labels: list[int]) -> str:
    head = ["config", "method", "kNN random-init", "kNN trained", "linear (cifar, --augment none)",
            *[f"fine-tune {p}%" for p in labels], "train wall"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        mixing = " + ".join(k for k, on in (("MixMask", r["mixmask"]), ("Un-Mix", r["unmix"])) if on) or "-"
        wall = f"{r['train_wall_s']:.0f} s" if r.get("train_wall_s") else "-"
        rows.append("| " + " | ".join([
            f"`{r['config']}`", f"{r['method']} ({mixing})", f"{r['knn_random_init']:.2f}%",
            f"{r['knn_trained']:.2f}%", f"{r['linear_top1']:.2f}%",
            *[f"{r[f'finetune_{p}pct_top1']:.2f}%" for p in labels], wall]) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_frameworks"))
    ap.add_argument("--only", nargs="+", choices=DEMOS, default=DEMOS)
    ap.add_argument("--labels", nargs="+", type=int, default=[1, 10], choices=[1, 10, 100])
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs under --out")
    args = ap.parse_args()
    out = args.out if args.out.is_absolute() else ROOT / args.out
    records = [evaluate(name, out, args.labels, args.skip_train) for name in args.only]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records, args.labels)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

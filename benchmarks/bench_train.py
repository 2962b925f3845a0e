"""Trainer throughput built up one change at a time: images/s of whole training steps.

    python benchmarks/bench_train.py                                  # the config's sizes (B=256, 224², ResNet-50)
    python benchmarks/bench_train.py --rows papers,bf16,fused,supervised --results-file /tmp/train.json
    python benchmarks/bench_train.py --device cpu --arch resnet18 --width 8 --batch 16 --image-size 32 \\
        --steps 3 --set method.queue_size=256                         # a CPU smoke run

Rows, each a `Trainer` (mixfast/train.py) of `--config` with one change more than the row above it:

  papers         (a) the papers' code style: fp32, NCHW, torch ops (MIXFAST_BACKEND=torch)
  bf16           (b) + bf16 autocast (train.precision=bf16)
  channels_last  (c) + channels_last (model.channels_last=true)
  fused          (d) + mixfast's fused ops (MIXFAST_BACKEND=auto: CUDA / Triton / C++ kernels where built)
  dali           (e) + the DALI GPU loader: each step first takes its batch from a DALI pipeline decoding a JPEG
                     tree written at start (needs DALI and a GPU; otherwise the row says why it did not run)
  compile        (f) (d) + torch.compile of the encoders (train.compile=true), on the fixed batch
  supervised     (g) the ceiling: plain supervised training of the same backbone (+ a linear classifier, 1000
                     classes, SGD as the config's optim), bf16, channels_last, cross-entropy, on view 1 of the
                     same batch; one forward+backward per step

Every row but (e) trains on one fixed synthetic batch already on the device (two views, `--batch` images each), so
the table measures the step, not a loader. MIXFAST_BACKEND is set per row around its steps (common.mixfast_backend),
never inside the trainer's calls.

Method: all rows are built and warmed up first (`--warmup` steps each; (f) compiles then), then `--steps` rounds
each time one step of every row, in an order shuffled every round, so load that comes and goes (other jobs on a
shared machine, GPU clocks) hits all rows alike and the ratios between rows are measured in one run. A step is timed
from its start to the end of the device's work (the trainer reads the loss back; a sync follows). A row that fails
to build or to step is reported with the first line of its error; the other rows still run.

Columns: images/s = batch / median step time; ms/step median, p20, p80; peak memory: on a GPU the CUDA max
allocated of a step plus what the row keeps allocated between steps (weights, optimizer state, queue) and the
input batch, i.e. what the row would show alone in the process; on the CPU the peak RSS above the RSS before the step
(the maximum over steps; allocator reuse makes it a lower bound). Passes: forward+backward and forward-only
passes of the backbone per step, counted with forward hooks during the first warm-up step (MoCo + MixMask + Un-Mix:
3 + 1, the key encoder's forward being the forward-only one). Ceiling of a method row = supervised images/s ÷
(forward+backward passes + 0.33 × forward-only passes), a forward costing about a third of a forward+backward; "of
ceiling" = images/s ÷ that.

Prints the table; `--results-file PATH` writes it as JSON (environment, settings, rows, the markdown) with a CSV
twin; `--update-readme` replaces the `train` section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import (add_repo_to_path, env_line, environment, mixfast_backend, render_table, update_readme,
                        write_results_file)

    add_repo_to_path()
else:
    from benchmarks.common import (env_line, environment, mixfast_backend, render_table, update_readme,
                                   write_results_file)

import mixfast  # noqa: E402,F401  (torchvision compatibility shim first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_CONFIG = "configs/in1k_mixmask_unmix.json"
FORWARD_COST = 0.33  # a forward-only pass, as a fraction of a forward+backward pass
SUPERVISED_CLASSES = 1000


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    precision: str
    channels_last: bool
    backend: str  # MIXFAST_BACKEND of the row's steps
    kind: str = "method"  # method | dali | supervised
    compile: bool = False

    @property
    def setup(self) -> str:
        ops = {"torch": "torch ops", "auto": "fused ops"}.get(self.backend, f"{self.backend} ops")
        parts = [self.precision, "channels_last" if self.channels_last else "NCHW", ops]
        if self.kind == "dali":
            parts.append("DALI loader")
        if self.compile:
            parts.append("torch.compile")
        if self.kind == "supervised":
            parts = ["supervised CE", self.precision, "channels_last" if self.channels_last else "NCHW"]
        return ", ".join(parts)


ROWS = {r.key: r for r in [
    RowSpec("papers", "(a) papers' code style", "fp32", False, "torch"),
    RowSpec("bf16", "(b) + bf16", "bf16", False, "torch"),
    RowSpec("channels_last", "(c) + channels_last", "bf16", True, "torch"),
    RowSpec("fused", "(d) + fused ops", "bf16", True, "auto"),
    RowSpec("dali", "(e) + DALI loader", "bf16", True, "auto", kind="dali"),
    RowSpec("compile", "(f) (d) + torch.compile", "bf16", True, "auto", compile=True),
    RowSpec("supervised", "(g) supervised ResNet (ceiling)", "bf16", True, "torch", kind="supervised"),
]}
# Keys each row sets itself: a --set of one of them would silently change what the row measures.
ROW_KEYS = ("train.precision", "model.channels_last", "train.compile", "data.name", "data.loader", "data.root",
            "train.batch_size", "data.image_size")


# ---------------------------------------------------------------------------------------------------------------
# one row: a trainer (or the supervised model) and its measurements
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    spec: RowSpec
    status: str = "ok"
    step: Optional[Callable[[], dict]] = None
    times_s: list = field(default_factory=list)
    peak_bytes: Optional[int] = None
    resident_bytes: int = 0
    passes: Optional[tuple] = None  # (forward+backward, forward-only) backbone passes per step
    owner: object = None  # keeps the trainer alive

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, err: BaseException) -> None:
        self.status = "failed: " + first_line(err)
        self.step = self.owner = None


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # the process-group wrapper prefixes DeepSpeed's messages with "[rank0]: "
    line = re.sub(r"^\[rank\d+\]:\s*", "", text[0]) if text else ""
    return f"{type(err).__name__}: {line}"[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PassCounter:
    """Forward hooks on every backbone: images through it with autograd on (forward+backward passes) and off
    (forward-only passes: the key / target encoder), divided by the batch."""

    def __init__(self, roots, batch: int):
        from mixfast.models.resnet import ScaledResNet
        from mixfast.models.vit import PatchEmbed

        self.batch, self.images = batch, {True: 0, False: 0}
        # a ViT counts the images entering its patch embedding, whatever share of their tokens it keeps
        # (MAE: 1 pass at 25% of the tokens; MixedAE: 1/4 pass of mixed images at every token)
        backbones = {id(m): m for root in roots for m in root.modules() if isinstance(m, (ScaledResNet, PatchEmbed))}
        self.handles = [m.register_forward_hook(self._hook) for m in backbones.values()]

    def _hook(self, module, inputs, output):
        self.images[torch.is_grad_enabled()] += inputs[0].shape[0]

    def close(self) -> tuple:
        for h in self.handles:
            h.remove()
        return self.images[True] / self.batch, self.images[False] / self.batch


class Supervised:
    """Plain supervised training of the same backbone: the throughput ceiling of one forward+backward per step."""

    def __init__(self, cfg, device: torch.device, labels_seed: int = 0):
        from mixfast.models import build_backbone

        torch.manual_seed(cfg.train.seed)
        mc = cfg.model
        backbone = build_backbone(mc.arch, mc.width, mc.cifar_stem, image_size=cfg.data.image_size)
        self.model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, SUPERVISED_CLASSES)).to(device)
        self.channels_last = mc.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        oc = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=oc.lr, momentum=oc.momentum,
                                         weight_decay=oc.weight_decay)
        gen = torch.Generator().manual_seed(labels_seed)
        self.labels = torch.randint(0, SUPERVISED_CLASSES, (cfg.train.batch_size,), generator=gen).to(device)
        self.device, self.bf16 = device, cfg.train.precision == "bf16"
        self.model.train()

    def train_step(self, batch: dict) -> dict:
        x = batch["x1"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(x), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}  # read back, as the trainer does


# ---------------------------------------------------------------------------------------------------------------
# building the rows
# ---------------------------------------------------------------------------------------------------------------


def model_overrides(args) -> list[str]:
    """--arch, --width and --set, which every row takes."""
    ov = []
    if args.arch:
        ov.append(f"model.arch={args.arch}")
    if args.width:
        ov.append(f"model.width={args.width}")
    return ov + list(args.overrides)


def base_overrides(args, out_dir: Path) -> list[str]:
    """Overrides every row shares: sizes, synthetic data, no loader workers, nothing written but the run folder."""
    return [f"train.batch_size={args.batch}", f"data.image_size={args.image_size}", "data.name=synthetic",
            f"data.synthetic_size={args.batch}", "data.num_workers=0", "data.loader=torch", "train.resume=none",
            f"train.output_dir={out_dir}", "log.tensorboard=false", "log.image_grid=false", "log.progress=false",
            "eval.knn_at_start=false"] + model_overrides(args)


def row_overrides(spec: RowSpec) -> list[str]:
    return [f"train.precision={spec.precision}", f"model.channels_last={str(spec.channels_last).lower()}",
            f"train.compile={str(spec.compile).lower()}"]


def dali_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "needs a CUDA device (the DALI pipeline decodes on the GPU)"
    from mixfast.data.dali import dali_available

    if not dali_available():
        return "NVIDIA DALI (nvidia.dali) is not installed"
    return None


def build_row(spec: RowSpec, args, device: torch.device, batch: dict, tmp: Path) -> Row:
    from mixfast.config import load_config
    from mixfast.train import Trainer

    row = Row(spec)
    overrides = base_overrides(args, tmp / spec.key) + row_overrides(spec)
    if spec.kind == "dali":
        why = dali_unavailable(device)
        if why:
            row.status = "not available: " + why
            return row
        tree = jpeg_tree(tmp, 4 * args.batch)
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        overrides += ["data.name=imagefolder", f"data.root={tree}", "data.loader=dali", "data.dali_device=gpu",
                      f"data.dali_threads={threads}"]
    cfg = load_config(args.config, overrides)
    with mixfast_backend(spec.backend):
        if spec.kind == "supervised":
            owner = Supervised(cfg, device)
            row.step, row.passes = (lambda: owner.train_step(batch)), (1.0, 0.0)
        else:
            owner = Trainer(cfg, device)
            owner.engine.train()
            owner.method.train()
            row.step = dali_steps(owner) if spec.kind == "dali" else (lambda: owner.train_step(batch))
    row.owner = owner
    return row


_TREE: dict = {}


def jpeg_tree(tmp: Path, n: int) -> Path:
    """An ImageFolder tree of n JPEGs of about 500x375 (bench_data.make_tree), written once per run."""
    if n not in _TREE:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_data import make_tree

        _TREE[n] = make_tree(tmp / "jpegs", n)
    return _TREE[n]


def dali_steps(trainer) -> Callable[[], dict]:
    """A step that first takes the next batch from the trainer's DALI loader (a new epoch when one ends)."""
    state = {"epoch": 0, "it": None}

    def step():
        while True:
            if state["it"] is None:
                trainer.train_loader.sampler.set_epoch(state["epoch"])
                state["it"] = iter(trainer.train_loader)
            try:
                batch = next(state["it"])
                break
            except StopIteration:
                state["epoch"] += 1
                state["it"] = None
        return trainer.train_step(batch)

    return step


def warm_up(row: Row, steps: int, device: torch.device, batch_size: int) -> None:
    """The row's first steps (compilation, lazy initialisation, cuDNN's algorithm choice); the first one also
    counts the backbone passes of a method row (not under torch.compile, whose graphs would not run the hooks)."""
    with mixfast_backend(row.spec.backend):
        for i in range(steps):
            counter = None
            if i == 0 and row.passes is None and not row.spec.compile:
                counter = PassCounter([row.owner.engine.module, row.owner.method], batch_size)
            try:
                row.step()
            finally:
                if counter is not None:
                    row.passes = counter.close()
        _sync(device)


def timed_step(row: Row, device: torch.device) -> None:
    """One step of the row, timed; its peak memory (see the module docstring)."""
    with mixfast_backend(row.spec.backend):
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            rss_ok = _reset_peak_rss()
            before = _proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        row.step()
        _sync(device)
        row.times_s.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = row.resident_bytes + torch.cuda.max_memory_allocated(device) - before
    else:
        hwm = _proc_status_bytes("VmHWM")
        peak = hwm - before if rss_ok and hwm is not None and before is not None else None
    if peak is not None:
        row.peak_bytes = max(row.peak_bytes or 0, peak)


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------


def quantile(vals: list, q: float) -> float:
    vals = sorted(vals)
    if not vals:
        return float("nan")
    pos = q * (len(vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def summarize(rows: list[Row], args, device: torch.device) -> list[dict]:
    nan = float("nan")
    sup = next((r for r in rows if r.spec.kind == "supervised" and r.ok and r.times_s), None)
    sup_ips = args.batch / quantile(sup.times_s, 0.5) if sup else nan
    # passes are the same for every method row (one method config); (f) takes them from another row
    method_passes = next((r.passes for r in rows if r.passes and r.spec.kind != "supervised"), None)
    out = []
    for r in rows:
        ok = r.ok and bool(r.times_s)
        med = quantile(r.times_s, 0.5) if ok else nan
        passes = (r.passes or (method_passes if r.spec.kind != "supervised" else None)) if ok else None
        ceiling = sup_ips / (passes[0] + FORWARD_COST * passes[1]) if passes and ok else nan
        ips = args.batch / med if ok else nan
        out.append({
            "row": r.spec.label, "key": r.spec.key, "setup": r.spec.setup, "status": r.status,
            "images_per_s": ips, "ms_median": med * 1e3, "ms_p20": quantile(r.times_s, 0.2) * 1e3 if ok else nan,
            "ms_p80": quantile(r.times_s, 0.8) * 1e3 if ok else nan,
            "peak_mib": r.peak_bytes / 2**20 if ok and r.peak_bytes is not None else nan,
            "passes_fwd_bwd": passes[0] if passes else None, "passes_fwd": passes[1] if passes else None,
            "passes": f"{passes[0]:g} + {passes[1]:g}" if passes else "",
            "ceiling_ips": ceiling, "frac_ceiling": ips / ceiling if ok else nan,
            "steps": len(r.times_s), "backend": r.spec.backend, "precision": r.spec.precision,
            "channels_last": r.spec.channels_last, "compile": r.spec.compile,
        })
    return out


def columns(device: torch.device) -> list[tuple[str, str]]:
    peak = "peak MiB (CUDA max allocated)" if device.type == "cuda" else "peak RSS Δ MiB"
    return [("row", "row"), ("setup", "setup"), ("images_per_s", "images/s"), ("ms_median", "ms/step"),
            ("ms_p20", "p20"), ("ms_p80", "p80"), ("peak_mib", peak), ("passes", "passes fwd+bwd + fwd"),
            ("ceiling_ips", "ceiling images/s"), ("frac_ceiling", "of ceiling"), ("status", "status")]


def markdown(results: list[dict], env: dict, settings: dict, device: torch.device) -> str:
    s = settings
    head = (f"{s['config']}: {s['arch']} (width {s['width']}), batch {s['batch']} of two {s['image_size']}² views "
            f"already on the device, {s['steps']} interleaved rounds after {s['warmup']} warm-up step(s) per row "
            f"(method: benchmarks/bench_train.py docstring). Ceiling = supervised images/s ÷ (forward+backward "
            f"passes + {FORWARD_COST} × forward-only passes).")
    return "\n".join([env_line(env), "", head, "", render_table(results, columns(device))])


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"trainer config (default {DEFAULT_CONFIG})")
    ap.add_argument("--batch", type=_positive, default=None, help="images per view (default: the config's)")
    ap.add_argument("--image-size", type=_positive, default=None, help="crop size (default: the config's)")
    ap.add_argument("--arch", default=None, help="model.arch override (resnet18, resnet50, a ViT of mixfast.models.VIT_ARCHS)")
    ap.add_argument("--width", type=_positive, default=None, help="model.width override")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config override, e.g. --set model.bn_splits=1 (repeatable)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--steps", type=_positive, default=None, help="timed steps per row (default: 20 GPU, 5 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default: 3 GPU, 2 CPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=_positive, default=None,
                    help="torch CPU threads (default: torch's; 1 keeps a CPU run on a busy machine from "
                         "thrashing in OpenMP's spin-waits)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed batch and of the round order")
    ap.add_argument("--results-file", default=None, metavar="PATH",
                    help="write the results as JSON to PATH (and CSV next to it)")
    ap.add_argument("--update-readme", action="store_true", help="replace the train section of benchmarks/README.md")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        ap.error(f"--rows: unknown row(s) {unknown}; choose from {','.join(ROWS)}")
    args.rows = rows
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if key in ROW_KEYS:
            ap.error(f"--set {item}: {key} is set by the benchmark itself (per row, or by --batch / --image-size)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and torch.cuda.is_available():
        ap.error("--device cpu on a machine with a GPU: the trainer takes the GPU; hide it (CUDA_VISIBLE_DEVICES=)")
    gpu = args.device == "cuda"
    args.steps = args.steps or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    if args.warmup < 1:
        ap.error("--warmup: at least 1 (the first step counts the passes and pays one-time costs)")
    return args


def resolve_sizes(args) -> dict:
    """The config's sizes where no flag overrides them (and a config error names the key)."""
    from mixfast.config import ConfigError, load_config

    try:
        # synthetic data: the config's data.root need not exist here
        cfg = load_config(args.config, ["data.name=synthetic", *model_overrides(args)])
    except ConfigError as err:
        raise SystemExit(f"bench_train: config error in {args.config}:\n{err}") from None
    args.batch = args.batch or cfg.train.batch_size
    args.image_size = args.image_size or cfg.data.image_size
    return {"config": args.config, "arch": cfg.model.arch, "width": cfg.model.width, "batch": args.batch,
            "image_size": args.image_size, "steps": args.steps, "warmup": args.warmup,
            "method": cfg.method.name, "mixmask": cfg.mixing.mixmask.enabled, "unmix": cfg.mixing.unmix.enabled,
            "bn_splits": cfg.model.bn_splits, "overrides": list(args.overrides), "threads": torch.get_num_threads(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = resolve_sizes(args)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from mixfast.engine import distributed as dist_utils

    device = dist_utils.init_distributed()
    env = environment(device)
    print(env_line(env), flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    x1, x2 = torch.randn(2, args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    batch = {"x1": x1, "x2": x2, "skipped": 0}
    input_bytes = 2 * x1.numel() * x1.element_size()

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        for key in args.rows:
            spec = ROWS[key]
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            try:
                row = build_row(spec, args, device, batch, tmp)
                if row.ok:
                    warm_up(row, args.warmup, device, args.batch)
            except Exception as err:  # noqa: BLE001 - a row that cannot run is reported, the others go on
                row = Row(spec)
                row.fail(err)
            if device.type == "cuda":
                if not row.ok:
                    gc.collect()
                    torch.cuda.empty_cache()
                row.resident_bytes = torch.cuda.memory_allocated(device) - before + input_bytes
            print(f"  {spec.label:<34} {row.status}  (built and warmed up in {time.perf_counter() - t0:.1f} s)",
                  flush=True)
            rows.append(row)

        rng = random.Random(args.seed)
        order = [r for r in rows if r.ok]
        for _ in range(args.steps):
            rng.shuffle(order)
            for row in list(order):
                try:
                    timed_step(row, device)
                except Exception as err:  # noqa: BLE001
                    row.fail(err)
                    order.remove(row)
                    print(f"  {row.spec.label}: {row.status}", flush=True)
        results = summarize(rows, args, device)
        for r in rows:  # free the trainers before the temporary folder goes
            r.step = r.owner = None

    md = markdown(results, env, settings, device)
    print(md, flush=True)
    if args.results_file:
        jpath, cpath = write_results_file(args.results_file, "train", results, env, extra={"settings": settings,
                                                                                          "markdown": md})
        print(f"wrote {jpath} and {cpath}")
    if args.update_readme:
        update_readme("train", md, title="Trainer steps (bench_train.py)")
    return results


if __name__ == "__main__":
    main()

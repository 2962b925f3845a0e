"""mixfast against a peer library on the same work: MoCo v2 on the demo digits, mixfast vs lightly.

A user who knows lightly runs the same MoCo v2 both ways before switching. This script does that
with every setting matched, in one interleaved run on one machine:

* mixfast: `configs/demo.json` with MixMask and Un-Mix off, trained by mixfast's own Trainer
  (DeepSpeed engine, its loader, logging, progress bar and checkpoints as shipped);
* the peer: a plain PyTorch loop built from lightly's components, as in lightly's MoCo example
  and CIFAR-10 benchmark: `SplitBatchNorm`, `batch_shuffle` / `batch_unshuffle`,
  `update_momentum`, `MoCoProjectionHead`, `NTXentLoss` with a memory bank, `MoCoV2Transform`,
  `knn_predict`. The same data arrays, the same ResNet-18 (width 32) with bit-identical initial
  weights, head, queue (256), temperature (0.5), momentum (0.99), SGD (0.06, m 0.9, wd 5e-4),
  per-step warm-up + cosine, batch 64, augmentation recipe (crop 0.6-1, jitter 0.4/0.4/0.4/0.1
  p 0.8, grayscale p 0.2, no blur, no flip) and kNN protocol (k 50, t 0.1, backbone features).

First a one-step equality check (same batch, same shuffle permutation, same queue): the losses
and every gradient must agree to fp32 round-off. Then, for each seed, one process per library
(alternating which goes first), each measuring: the training loop of `--steps` steps (its wall
time / steps = the full step including data), the kNN accuracy after it, the compute of one step
without data (the same batch `--compute-steps` times), the loader (one epoch of batches, no
model) and the process's peak RSS. The peer's process takes its arrays and initial weights from
mixfast's data set class and model builder, so it also imports those modules: 11.9 MiB of its peak
RSS (measured: lightly's imports on top of torch + torchvision peak at 452 MiB, 464 with them).

lightly is a dependency of this benchmark only, not of mixfast:

    pip install --no-deps lightly==1.6.0 lightning_utilities
    python benchmarks/bench_peers.py [--seeds 0 1 2] [--steps 660] [--out benchmarks/results/peers-cpu]

(lightly's own requirements pull in pytorch-lightning and others that the components used here
do not need; `--no-deps` keeps the torch pin untouched.) Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mixfast  # noqa: E402,F401  (torchvision compatibility shim before lightly imports torchvision)
import torch  # noqa: E402

DEMO = ROOT / "configs" / "demo.json"
MOCO_V2 = ["mixing.mixmask.enabled=false", "mixing.unmix.enabled=false"]
LIGHTLY_INSTALL = "pip install --no-deps lightly==1.6.0 lightning_utilities"


def _lightly():
    try:
        import lightly  # noqa: F401
    except ImportError:
        sys.exit(f"bench_peers.py needs lightly (a benchmark-only dependency): {LIGHTLY_INSTALL}")
    return lightly


def demo_config(seed: int, out: str, steps: int | None = None):
    from mixfast.config import load_config

    sets = MOCO_V2 + [f"train.seed={seed}", f"train.output_dir={out}", "train.resume=none",
                      "eval.knn_at_start=false", "eval.knn_every=0"]
    if steps is not None:
        sets.append(f"train.max_steps={steps}")
    return load_config(str(DEMO), sets)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --- the peer: a plain loop from lightly's components --------------------------------------------

class LightlyMoCo(torch.nn.Module):
    """Query and key encoders as lightly's MoCo example builds them, from mixfast's initial weights:
    the same ResNet with lightly's SplitBatchNorm in place of mixfast's, lightly's MoCoProjectionHead
    holding mixfast's head weights."""

    def __init__(self, mixfast_query: torch.nn.Module, num_splits: int):
        super().__init__()
        from lightly.models.batchnorm import SplitBatchNorm
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = copy.deepcopy(mixfast_query.backbone)
        self._swap_bn(self.backbone, SplitBatchNorm, num_splits)
        first, last = mixfast_query.head[0], mixfast_query.head[-1]
        self.projection_head = MoCoProjectionHead(first.in_features, first.out_features, last.out_features)
        linears = [m for m in self.projection_head.modules() if isinstance(m, torch.nn.Linear)]
        if len(linears) != 2:
            raise RuntimeError(f"lightly's MoCoProjectionHead changed: {self.projection_head}")
        for mine, theirs in zip(linears, (first, last)):
            mine.load_state_dict(theirs.state_dict())
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    @staticmethod
    def _swap_bn(module, split_cls, num_splits):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                new = split_cls(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
                new.weight.data.copy_(child.weight.data)
                new.bias.data.copy_(child.bias.data)
                new.running_mean.copy_(child.running_mean.repeat(num_splits))
                new.running_var.copy_(child.running_var.repeat(num_splits))
                setattr(module, name, new)
            else:
                LightlyMoCo._swap_bn(child, split_cls, num_splits)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def query_parameters(self):
        return list(self.backbone.parameters()) + list(self.projection_head.parameters())


class PeerRun:
    """lightly MoCo v2 with the demo's settings: model, loss with memory bank, SGD + warm-up/cosine,
    the MoCoV2Transform loader over the same base images."""

    def __init__(self, cfg, mixfast_query, queue: torch.Tensor, datasets):
        from lightly.loss import NTXentLoss
        from lightly.transforms import MoCoV2Transform

        self.cfg = cfg
        self.model = LightlyMoCo(mixfast_query, cfg.model.bn_splits)
        self.criterion = NTXentLoss(temperature=cfg.method.temperature, memory_bank_size=tuple(queue.shape))
        self.criterion.memory_bank.bank = queue.clone()  # the same initial queue as mixfast's
        from mixfast.data import mean_std

        d = cfg.data
        mean, std = mean_std(d.augmentation)  # the demo recipe's normalization
        self.transform = MoCoV2Transform(
            input_size=d.image_size, cj_prob=0.8, cj_strength=1.0, cj_bright=0.4, cj_contrast=0.4, cj_sat=0.4,
            cj_hue=0.1, min_scale=d.crop_min_scale, random_gray_scale=0.2, gaussian_blur=0.0, hf_prob=0.0,
            normalize={"mean": list(mean), "std": list(std)})
        base = datasets.train.base
        transform = self.transform

        class Views(torch.utils.data.Dataset):
            def __len__(self):
                return len(base)

            def __getitem__(self, i):
                image, label = base[i]
                x0, x1 = transform(image)
                return x0, x1, label

        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.loader = torch.utils.data.DataLoader(Views(), batch_size=cfg.train.batch_size, shuffle=True,
                                                  drop_last=True, num_workers=d.num_workers, generator=gen)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.query_parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.steps_per_epoch = len(self.loader)
        total, warmup = cfg.train.epochs * self.steps_per_epoch, round(o.warmup_epochs * self.steps_per_epoch)

        def multiplier(step):  # linear warm-up per step, then half cosine to 0 (the demo's schedule)
            import math
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)
        self.datasets = datasets

    def loss(self, x0, x1, perm=None):
        from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum

        update_momentum(self.model.backbone, self.model.backbone_momentum, m=self.cfg.method.momentum)
        update_momentum(self.model.projection_head, self.model.projection_head_momentum, m=self.cfg.method.momentum)
        query = self.model(x0)
        if perm is None:
            shuffled, shuffle = batch_shuffle(x1)
        else:  # the equality check: mixfast's permutation
            shuffled, shuffle = x1[perm], perm
        key = batch_unshuffle(self.model.forward_momentum(shuffled), shuffle)
        return self.criterion(query, key)

    def step(self, x0, x1):
        loss = self.loss(x0, x1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        return loss.detach()

    def fit(self, steps: int):
        done = 0
        self.model.train()
        while done < steps:
            total = torch.zeros(())
            for x0, x1, _ in self.loader:
                total += self.step(x0, x1)
                done += 1
                if done >= steps:
                    break
            print(f"peer: step {done}, mean loss {float(total) / self.steps_per_epoch:.4f}", flush=True)

    def knn(self) -> float:
        from lightly.utils.benchmarking import knn_predict

        def features(ds):
            loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)
            fs, ys = [], []
            with torch.no_grad():
                for x, y in loader:
                    fs.append(torch.nn.functional.normalize(self.model.backbone(x).flatten(1), dim=1))
                    ys.append(y)
            return torch.cat(fs), torch.cat(ys)

        self.model.eval()
        bank, bank_y = features(self.datasets.knn_train)
        test, test_y = features(self.datasets.knn_test)
        self.model.train()
        e = self.cfg.eval
        pred = knn_predict(test, bank.t().contiguous(), bank_y, self.datasets.num_classes, e.knn_k, e.knn_t)
        return 100.0 * (pred[:, 0] == test_y).float().mean().item()


# --- the one-step equality check -----------------------------------------------------------------

class _Engine:
    """What MoCo.training_step needs of a DeepSpeed engine, for one step in plain PyTorch."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *views):
        return self.module(*views)


def equality_check() -> dict:
    from mixfast.data import build_datasets, build_pretrain_loader
    from mixfast.methods import build_method
    from mixfast.mixing.rng import STREAM_SHUFFLE_BN, step_generator

    with tempfile.TemporaryDirectory() as out:
        cfg = demo_config(0, out)
        torch.manual_seed(cfg.train.seed)
        datasets = build_datasets(cfg.data)
        query, moco = build_method(cfg, 0, 1)
        peer = PeerRun(cfg, query, moco.queue, datasets)
        loader = build_pretrain_loader(cfg, datasets, cfg.train.batch_size, 0, 1, torch.device("cpu"))
        loader.sampler.set_epoch(0)
        batch = next(iter(loader))
        x1, x2 = batch["x1"], batch["x2"]
        result = moco.training_step(_Engine(query), x1, x2, 0, lambda loss, last: loss.backward())
        perm = torch.randperm(x1.size(0), generator=step_generator(cfg.train.seed, 0, STREAM_SHUFFLE_BN, 0))
        peer_loss = peer.loss(x1, x2, perm)
        peer_loss.backward()
    ours = [p.grad for p in query.parameters()]
    theirs = [p.grad for p in peer.model.query_parameters()]
    grad_diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    grad_scale = max(a.abs().max().item() for a in ours)
    loss_diff = abs(result.loss.item() - peer_loss.item())
    return {"loss_mixfast": result.loss.item(), "loss_lightly": peer_loss.item(), "loss_abs_diff": loss_diff,
            "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale, "num_grads": len(ours),
            "passed": bool(len(ours) == len(theirs) and loss_diff <= 1e-5 and grad_diff <= 1e-5 * max(1.0, grad_scale))}


# --- one measured run per process ----------------------------------------------------------------

def _time_batches(iterable, n: int) -> float:
    it = iter(iterable)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return (time.perf_counter() - t0) / n


def run_mixfast(seed: int, steps: int, compute_steps: int) -> dict:
    from mixfast.engine import distributed as dist_utils
    from mixfast.train import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = demo_config(seed, out, steps)
        device = dist_utils.init_distributed()
        trainer = Trainer(cfg, device)
        t0 = time.perf_counter()
        trainer.fit()
        loop = time.perf_counter() - t0
        knn = trainer.knn()
        trainer.train_loader.sampler.set_epoch(0)
        batch = next(iter(trainer.train_loader))
        trainer.train_step(batch)  # warm
        t0 = time.perf_counter()
        for _ in range(compute_steps):
            trainer.train_step(batch)
        trainer.read_metrics(trainer._last_result)  # CPU: the steps ran synchronously; this only reads
        compute = (time.perf_counter() - t0) / compute_steps
        trainer.train_loader.sampler.set_epoch(1)
        loader = _time_batches(trainer.train_loader, trainer.steps_per_epoch)
        trainer.logger.close()
    return {"loop_s": loop, "steps": steps, "knn": knn, "compute_ms": 1e3 * compute, "loader_ms": 1e3 * loader}


def run_lightly(seed: int, steps: int, compute_steps: int) -> dict:
    _lightly()
    from mixfast.data import build_datasets
    from mixfast.methods import build_method

    with tempfile.TemporaryDirectory() as out:
        cfg = demo_config(seed, out, steps)
    torch.manual_seed(cfg.train.seed)  # as mixfast's Trainer: the same initial weights and queue
    datasets = build_datasets(cfg.data)
    query, moco = build_method(cfg, 0, 1)
    peer = PeerRun(cfg, query, moco.queue, datasets)
    del query, moco
    t0 = time.perf_counter()
    peer.fit(steps)
    loop = time.perf_counter() - t0
    knn = peer.knn()
    x0, x1, _ = next(iter(peer.loader))
    peer.step(x0, x1)  # warm
    t0 = time.perf_counter()
    for _ in range(compute_steps):
        peer.step(x0, x1)
    compute = (time.perf_counter() - t0) / compute_steps
    loader = _time_batches(peer.loader, peer.steps_per_epoch)
    return {"loop_s": loop, "steps": steps, "knn": knn, "compute_ms": 1e3 * compute, "loader_ms": 1e3 * loader}


def child(args) -> None:
    run = {"mixfast": run_mixfast, "lightly": run_lightly}[args.role]
    rec = run(args.seed, args.steps, args.compute_steps)
    rec.update(role=args.role, seed=args.seed, peak_rss_mib=peak_rss_mib(), step_ms=1e3 * rec["loop_s"] / rec["steps"])
    Path(args.json).write_text(json.dumps(rec))


# --- the interleaved run and the table -----------------------------------------------------------

ROWS = [("full step incl. data (ms)", "step_ms", "{:.1f}"), ("compute per step, no data (ms)", "compute_ms", "{:.1f}"),
        ("loader, per batch of 64 two-view images (ms)", "loader_ms", "{:.1f}"), ("training loop (s)", "loop_s", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}")]


def table(records: list[dict], check: dict) -> str:
    by = {r: [x for x in records if x["role"] == r] for r in ("mixfast", "lightly")}
    lines = ["| | mixfast | lightly loop | mixfast / lightly |", "|---|---|---|---|"]
    for label, key, fmt in ROWS:
        a, b = (statistics.median(x[key] for x in by[r]) for r in ("mixfast", "lightly"))
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}× |")
    knn = {r: " / ".join(f"{x['knn']:.2f}" for x in sorted(by[r], key=lambda x: x["seed"])) for r in by}
    seeds = "/".join(str(x["seed"]) for x in sorted(by["mixfast"], key=lambda x: x["seed"]))
    lines.append(f"| kNN top-1 after the loop, seeds {seeds} (%) | {knn['mixfast']} | {knn['lightly']} | |")
    lines.append("")
    lines.append(f"Medians over {len(by['mixfast'])} runs each. One-step equality check: losses "
                 f"{check['loss_mixfast']:.7f} vs {check['loss_lightly']:.7f} (|Δ| {check['loss_abs_diff']:.1e}), "
                 f"largest gradient difference {check['grad_max_abs_diff']:.1e} over {check['num_grads']} tensors "
                 f"(largest gradient {check['grad_max_abs']:.2e}): {'passed' if check['passed'] else 'FAILED'}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=660, help="training steps per run (660 = the demo's 30 epochs)")
    parser.add_argument("--compute-steps", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers-moco-v2-cpu"))
    parser.add_argument("--role", choices=["mixfast", "lightly"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return child(args)
    lightly = _lightly()
    check = equality_check()
    print(f"one-step equality: {json.dumps(check)}", flush=True)
    if not check["passed"]:
        sys.exit("the one-step equality check failed: the two loops do not compute the same thing")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(args.seeds):
            order = ("mixfast", "lightly") if i % 2 == 0 else ("lightly", "mixfast")
            for role in order:
                path = os.path.join(tmp, f"{role}-{seed}.json")
                cmd = [sys.executable, __file__, "--role", role, "--seed", str(seed), "--steps", str(args.steps),
                       "--compute-steps", str(args.compute_steps), "--json", path]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{role} seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                rec = json.loads(Path(path).read_text())
                records.append(rec)
                print(f"{role} seed {seed}: step {rec['step_ms']:.1f} ms, compute {rec['compute_ms']:.1f} ms, "
                      f"loader {rec['loader_ms']:.1f} ms, loop {rec['loop_s']:.1f} s, RSS {rec['peak_rss_mib']:.0f} MiB, "
                      f"kNN {rec['knn']:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    md = table(records, check)
    print(md)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "lightly": lightly.__version__, "torch_threads": torch.get_num_threads(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(), "steps": args.steps, "seeds": args.seeds}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "equality": check, "runs": records}, indent=2))
    Path(args.out + ".md").write_text(f"MoCo v2 on the demo digits, mixfast vs lightly {lightly.__version__} "
                                      f"(`python benchmarks/bench_peers.py`; {meta})\n\n{md}\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()

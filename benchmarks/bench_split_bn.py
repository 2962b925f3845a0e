"""Training-step time of a ResNet with SplitBatchNorm, channels_last against NCHW.

One step = forward + backward of the backbone (loss: mean square of the features) on a
fixed batch, gradients cleared before each step. Configurations, timed round-robin in one
run (one step of each per round, order shuffled every round, caches flushed before each
step), so load from other jobs hits all of them alike:

* channels_last + SplitBatchNorm      (mixfast.models.SplitBatchNorm; weights NCHW as DeepSpeed
  holds them, activations channels_last from the input)
* NCHW + SplitBatchNorm
* channels_last weights too + SplitBatchNorm (what converting the module would add)
* channels_last + previous SplitBatchNorm (--previous): groups folded into channels with
  `reshape`, a transposing copy in and an NCHW result out, and channels_last weights as
  the trainer used to convert them, so every convolution returns channels_last again
* channels_last + BatchNorm2d, NCHW + BatchNorm2d (plain BN, reference)

Reported: median, p20 and p80 of the step time, each configuration's median over NCHW +
SplitBatchNorm's, and the aten ops per step that compute something (views and allocations
left out; on a GPU each is a kernel launch), counted once outside the timing.

    python benchmarks/bench_split_bn.py                       # ResNet-18 width 32, 64 px, batch 32, 8 groups
    python benchmarks/bench_split_bn.py --results-file benchmarks/results/split-bn-cpu-2cpus.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()
from mixfast.models import build_backbone, convert_to_split_bn  # noqa: E402
from mixfast.models.norm import SplitBatchNorm  # noqa: E402


class PreviousSplitBatchNorm(nn.BatchNorm2d):
    """SplitBatchNorm as it was before it kept channels_last: groups folded into channels
    with `reshape` (a copy for channels_last input), parameters and running stats repeated
    per call. Kept here as the baseline the new module is measured against."""

    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s == 1 or n % s:
            return super().forward(x)
        mean_split, var_split = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean_split, var_split, self.weight.repeat(s),
                           self.bias.repeat(s), True, self.momentum, self.eps).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(s, c).mean(0))
            self.running_var.copy_(var_split.view(s, c).mean(0))
            self.num_batches_tracked += 1
        return out


def _use_previous(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, SplitBatchNorm):
            prev = PreviousSplitBatchNorm(child.num_features, child.num_splits)
            prev.load_state_dict(child.state_dict())
            setattr(module, name, prev)
        else:
            _use_previous(child)
    return module


# Ops that only make views or allocate: no kernel on a GPU, left out of the count.
_NO_KERNEL = {"view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "as_strided", "slice", "select", "permute",
              "t", "transpose", "detach", "alias", "reshape", "_reshape_alias", "empty", "empty_like", "empty_strided",
              "new_empty_strided", "lift_fresh", "_local_scalar_dense"}


class _CountOps(TorchDispatchMode):
    """Counts the aten ops of one step that run a computation (kernels on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="torchvision backbone")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage (64 = standard ResNet)")
    p.add_argument("--image-size", type=int, default=64, help="input height = width in pixels")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 conv1 without max-pool")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--splits", type=int, default=8, help="SplitBatchNorm groups (model.bn_splits)")
    p.add_argument("--reps", type=int, default=15, help="rounds (one timed step of every configuration per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each configuration first")
    p.add_argument("--max-time", type=float, default=600.0, help="stop after this many seconds of rounds (>= 3 rounds)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--previous", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the previous SplitBatchNorm (channels_last through a folded NCHW copy)")
    p.add_argument("--retain-freed-memory", action="store_true",
                   help="glibc keeps freed memory (no page faults on re-allocation; see benchmarks/common.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: autocast around the step, fp32 weights (train.precision=bf16)")
    p.add_argument("--results-file", type=Path, default=None,
                   help="write the table with the environment to this markdown file (nothing is written without it)")
    p.add_argument("--append", action="store_true", help="add a section to --results-file instead of replacing it")
    p.add_argument("--note", default="", help="a sentence written under the section's table (e.g. why these threads)")
    return p.parse_args(argv)


def build(args, layout: str, norm: str, weights: str, seed_model: nn.Module, device) -> tuple[nn.Module, torch.Tensor]:
    model = copy.deepcopy(seed_model)
    if norm != "bn":
        convert_to_split_bn(model, args.splits)
        if norm == "previous":
            _use_previous(model)
    model = model.to(device).train()
    if weights == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def step_fn(model: nn.Module, x: torch.Tensor, dtype: str):
    device_type = x.device.type

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(x).float().square().mean()
        loss.backward()

    return step


CONFIGS = [  # (name, activations, norm, weights)
    ("channels_last + SplitBatchNorm", "channels_last", "split", "nchw"),
    ("NCHW + SplitBatchNorm", "nchw", "split", "nchw"),
    ("channels_last, weights too + SplitBatchNorm", "channels_last", "split", "channels_last"),
    ("channels_last + previous SplitBatchNorm (weights channels_last)", "channels_last", "previous", "channels_last"),
    ("channels_last + BatchNorm2d", "channels_last", "bn", "nchw"),
    ("NCHW + BatchNorm2d", "nchw", "bn", "nchw"),
]
COLUMNS = [("config", "configuration"), ("median_ms", "median ms"), ("p20_ms", "p20 ms"), ("p80_ms", "p80 ms"),
           ("vs_nchw_split", "÷ NCHW + split median"), ("ops", "compute ops / step"), ("reps", "rounds")]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory:
        common.retain_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)
    seed_model = build_backbone(args.arch, args.width, args.cifar_stem)
    configs = [c for c in CONFIGS if args.previous or c[2] != "previous"]
    fns, ops = {}, {}
    for name, layout, norm, weights in configs:
        model, x = build(args, layout, norm, weights, seed_model, device)
        fns[name] = step_fn(model, x, args.dtype)
        with _CountOps() as counter:
            fns[name]()
        ops[name] = counter.count
    timings = common.time_round_robin(fns, device=device, warmup=args.warmup, reps=args.reps,
                                      max_time_s=args.max_time)
    base = timings["NCHW + SplitBatchNorm"].median_us
    rows = [{"config": name, "median_ms": t.median_us / 1e3, "p20_ms": t.p20_us / 1e3, "p80_ms": t.p80_us / 1e3,
             "vs_nchw_split": t.median_us / base, "ops": ops[name], "reps": t.reps}
            for name, t in timings.items()]
    env = common.environment(device)
    setup = (f"{args.arch} width {args.width}{', CIFAR stem' if args.cifar_stem else ''}, {args.image_size} px, "
             f"batch {args.batch}, SplitBatchNorm groups {args.splits}, {args.dtype}, forward + backward; "
             f"torch threads: {torch.get_num_threads()}")
    table = common.render_table(rows, COLUMNS)
    print(setup)
    print(common.env_line(env))
    print(table)
    if args.results_file:
        write_markdown(args.results_file, setup, env, table, argv, args.append, args.note)
        print(f"wrote {args.results_file}")
    return rows


def write_markdown(path: Path, setup: str, env: dict, table: str, argv, append: bool = False, note: str = "") -> None:
    args = " ".join(repr(a) if " " in a else a for a in (sys.argv[1:] if argv is None else argv))
    section = (f"## {setup}\n\n`python benchmarks/bench_split_bn.py {args}`\n\n"
               f"{common.env_line(env)} Python {env['python']}, {env['platform']}; 1-minute load average at "
               f"the start {env.get('load_avg_1m'):.2f}.\n\n{table}\n" + (f"\n{note}\n" if note else ""))
    header = (f"# SplitBatchNorm: training step, channels_last vs NCHW ({env['device']})\n\n"
              f"Forward + backward of the backbone (loss: mean square of the features). Weights NCHW, as DeepSpeed "
              f"holds them, unless the row says otherwise; activations in the input's layout. Configurations timed "
              f"round-robin in one run, order shuffled per round, caches flushed before each step; median, p20, "
              f"p80 over the rounds. 'compute ops / step': aten ops that compute something (views and allocations "
              f"left out), counted once.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    if append and path.exists():
        path.write_text(path.read_text(encoding="utf-8").rstrip() + "\n\n" + section, encoding="utf-8")
    else:
        path.write_text(header + "\n" + section, encoding="utf-8")


if __name__ == "__main__":
    main()

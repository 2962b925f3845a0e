"""The method interface the trainer drives, and the registry of frameworks.

Split of responsibilities with DeepSpeed: the engine owns only what the optimizer trains
(the *trained module*: `backbone` + `head`, plus a `predictor` for BYOL/SimSiam), built by
the framework's `build` function. The `Method` object owns everything else a framework
needs across steps and that is not trained by the optimizer: MoCo's key encoder and queue,
BYOL's target network. It is an `nn.Module` so its state (`state_dict()`: EMA weights and
buffers) travels in the checkpoint's client state (DeepSpeed saves only the engine's module).

Per step the trainer calls `training_step(engine, x1, x2, step, backward, sequential)`,
then `engine.step()`, then `after_step(result)`.

A method owns its rules, its state and what it shows:
* its config rules: `@register("name", check=fn)`; `check_config(cfg)` runs the chosen
  method's check (the trainer calls it right after loading the config);
* state carried from one step to the next (MoCo's keys waiting for the queue) lives on the
  Method object, and `after_step` consumes it;
* a second optimizer outside DeepSpeed (the ADIOS masker): its module is a submodule of the
  Method, its optimizer and schedule ride in the Method's `state_dict` through that module's
  `get_extra_state`/`set_extra_state` (so in the checkpoint), and its step runs in
  `after_step`, after the engine's optimizer step, with gradients from `torch.autograd.grad`
  over its own parameters only (no `.grad` of the engine's parameters is written);
* EMA targets: `momentum_pairs(online)` lists (target, online) modules, and the one
  `momentum_update` of this base class updates them all;
* the first-batch image grid: `StepResult.images`, labelled rows in display order (image
  batches, masks, or callables producing them), drawn by `engine.images` without knowing the
  names.

Adding a framework = one module in this package that defines a `Method` subclass and
decorates its build function with `@register("name")`, and a recipe/config file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mixfast.config import ConfigError, RunConfig

Backward = Callable[[torch.Tensor, bool], None]


@dataclass
class StepResult:
    loss: torch.Tensor  # detached total of the step
    # Scalars for the logs: floats, or 0-d tensors on the device that the trainer reads only
    # when it logs (reading a GPU value is a host sync; a step makes none).
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)
    # Rows of the first-batch image grid, in display order (see engine/images.py).
    images: dict[str, torch.Tensor | Callable[[], torch.Tensor]] = field(default_factory=dict)


class Method(nn.Module):
    """Base class: the framework's untrained state and its loss."""

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.total_steps = 1

    def set_total_steps(self, total_steps: int) -> None:
        """Length of the run in optimizer steps (for schedules such as BYOL's τ)."""
        self.total_steps = max(1, int(total_steps))

    def momentum_at(self, step: int) -> float:
        """EMA momentum of this step: constant (MoCo), or BYOL's cosine schedule from
        `method.momentum` at step 0 to 1 at the last step."""
        import math

        base = self.cfg.method.momentum
        if self.cfg.method.momentum_schedule == "constant":
            return base
        progress = min(1.0, step / self.total_steps)
        return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2

    def autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def training_step(self, engine, x1: torch.Tensor, x2: torch.Tensor, step: int, backward: Backward,
                      sequential: bool = False) -> StepResult:
        """Forward and backward of one step. `backward(loss_part, is_last)` must be called
        at least once; the trainer then runs the optimizer step and `after_step`."""
        raise NotImplementedError

    def after_step(self, result: StepResult) -> None:
        """Work that must follow the optimizer step (MoCo: enqueue the keys; ADIOS: the masker's
        step). Statistics added to `result.stats` here are logged with the step's."""

    def momentum_pairs(self, online: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA target, online module) pairs of this method; none by default."""
        return []

    @torch.no_grad()
    def momentum_update(self, online: nn.Module, step: int) -> None:
        """target ← m·target + (1-m)·online for every momentum pair, m = `momentum_at(step)`."""
        pairs = self.momentum_pairs(online)
        if pairs:
            ema_update([t for t, _ in pairs], [o for _, o in pairs], self.momentum_at(step))


@torch.no_grad()
def ema_update(target: nn.Module | list[nn.Module], online: nn.Module | list[nn.Module], momentum: float) -> None:
    """t ← m·t + (1-m)·o over parameters. BatchNorm running statistics are not averaged:
    the target network keeps its own, from its own train-mode passes (MoCo, BYOL code).

    Two multi-tensor kernels (``_foreach``) per dtype group instead of two launches per
    parameter (a ResNet-50 has 161 parameter tensors); the same arithmetic as the per-tensor
    ``mul_`` then ``add_``."""
    targets = [p for m in (target if isinstance(target, list) else [target]) for p in m.parameters()]
    online_params = [p for m in (online if isinstance(online, list) else [online]) for p in m.parameters()]
    if len(targets) != len(online_params):
        raise ValueError(f"EMA pairs differ: {len(targets)} target vs {len(online_params)} online parameters")
    onlines = [po.detach().to(pt.dtype) for pt, po in zip(targets, online_params)]
    if not targets:
        return
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, onlines, alpha=1 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    import copy

    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


# --- registry -------------------------------------------------------------------------------

BuildFn = Callable[[RunConfig, int, int], "tuple[nn.Module, Method]"]
CheckFn = Callable[[RunConfig], None]
_REGISTRY: dict[str, BuildFn] = {}
_CHECKS: dict[str, CheckFn] = {}


def register(name: str, check: CheckFn | None = None):
    """Register a framework's build function under `name`, with its config rules: `check(cfg)`
    raises ConfigError naming the keys when `cfg` breaks them."""
    def wrap(fn: BuildFn) -> BuildFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = fn
        if check is not None:
            _CHECKS[name] = check
        return fn
    return wrap


def _import_all() -> None:
    """Import every module of this package once, so each registers its framework."""
    import mixfast.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{package.__name__}.{info.name}")


def registered() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def check_config(cfg: RunConfig) -> None:
    """ConfigError unless `cfg.method.name` is a registered framework whose rules `cfg` keeps."""
    _import_all()
    if cfg.method.name not in _REGISTRY:
        raise ConfigError(f"method.name={cfg.method.name!r} is not a registered framework; "
                          f"registered: {', '.join(sorted(_REGISTRY))}")
    if cfg.method.name in _CHECKS:
        _CHECKS[cfg.method.name](cfg)


def build_method(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> tuple[nn.Module, Method]:
    """(trained module to hand to DeepSpeed, Method) for `cfg.method.name`; checks the config first."""
    check_config(cfg)
    return _REGISTRY[cfg.method.name](cfg, rank, world_size)

"""The method interface the trainer drives, and the registry of frameworks.

Split of responsibilities with DeepSpeed: the engine owns only what the optimizer trains
(the *trained module*: `backbone` + `head`, plus a `predictor` for BYOL/SimSiam), built by
the framework's `build` function. The `Method` object owns everything else a framework
needs across steps and that is not trained by the optimizer: MoCo's key encoder and queue,
BYOL's target network. It is an `nn.Module` so its state (`state_dict()`: EMA weights and
buffers) travels in the checkpoint's client state (SPEC §8).

Per step the trainer calls `training_step(engine, x1, x2, step, backward, sequential)`,
then `engine.step()`, then `after_step(result)`.

Adding a framework = one module in this package that defines a `Method` subclass and
decorates its build function with `@register("name")`, plus its name in
`config.MethodConfig.name` and a config file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mixfast.config import RunConfig

Backward = Callable[[torch.Tensor, bool], None]


@dataclass
class StepResult:
    loss: torch.Tensor  # detached total of the step
    # Scalars for the logs: floats, or 0-d tensors on the device that the trainer reads only
    # when it logs (reading a GPU value is a host sync; a step makes none).
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    keys_to_enqueue: torch.Tensor | None = None


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
        """Work that must follow the optimizer step (MoCo: enqueue the keys)."""


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """t ← m·t + (1-m)·o over parameters. BatchNorm running statistics are not averaged:
    the target network keeps its own, from its own train-mode passes (MoCo, BYOL code).

    Two multi-tensor kernels (``_foreach``) per dtype group instead of two launches per
    parameter (a ResNet-50 has 161 parameter tensors); the same arithmetic as the per-tensor
    ``mul_`` then ``add_``."""
    targets = list(target.parameters())
    onlines = [po.detach().to(pt.dtype) for pt, po in zip(targets, online.parameters())]
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
_REGISTRY: dict[str, BuildFn] = {}


def register(name: str):
    def wrap(fn: BuildFn) -> BuildFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = fn
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


def build_method(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> tuple[nn.Module, Method]:
    """(trained module to hand to DeepSpeed, Method) for `cfg.method.name`."""
    _import_all()
    try:
        build = _REGISTRY[cfg.method.name]
    except KeyError:
        raise ValueError(f"method.name={cfg.method.name!r} is not a registered framework; "
                         f"registered: {', '.join(sorted(_REGISTRY))}") from None
    return build(cfg, rank, world_size)

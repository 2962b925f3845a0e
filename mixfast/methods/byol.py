"""BYOL (Grill et al., 2020) with the MixMask / Un-Mix branches (soft pairing: see methods.losses).

The online network (backbone, projector, predictor) is trained by DeepSpeed; the target
network (backbone, projector) is its EMA with BYOL's cosine τ schedule
(`method.momentum_schedule="cosine"`, base τ = `method.momentum`), updated from
`engine.module` before each step's forward (equivalent to BYOL's after-step update) and
kept in the checkpoint's client state.

    L = D(p1, t2) + D(p2, t1) + Σ_branches mean_i [ λ_i·D(p_m,i, t2_i) + (1-λ_i)·D(p_m,i, t2_π(i)) ]

with D = 2 - 2·cos (BYOL's normalized MSE) and t the target projections; the mixture is
built from view 1 (`mixing.symmetrize` adds view 2's against t1).
"""

from __future__ import annotations

import torch
from torch import nn

from mixfast.config import RunConfig
from mixfast.methods.base import Backward, StepResult, frozen_copy, register
from mixfast.methods.encoders import (PredictorEncoder, build_predictor_encoder, finalize, to_channels_last,
                                      to_memory_format)
from mixfast.methods.losses import normalized_mse
from mixfast.methods.simsiam import SimSiam


class TargetNetwork(nn.Module):
    def __init__(self, online: PredictorEncoder):
        super().__init__()
        self.channels_last = online.channels_last
        # Not trained by DeepSpeed, so its weights may follow model.channels_last too.
        self.backbone = to_memory_format(frozen_copy(online.backbone), self.channels_last)
        self.head = frozen_copy(online.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(to_channels_last(x, self.channels_last))).float()


class BYOL(SimSiam):
    distance = staticmethod(normalized_mse)

    def __init__(self, online: PredictorEncoder, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.target = TargetNetwork(online)

    def momentum_pairs(self, online: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """The target network follows the online backbone and projector (not the predictor)."""
        return [(self.target.backbone, online.backbone), (self.target.head, online.head)]

    @torch.no_grad()
    def targets(self, engine, x1, x2, online) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target(x1), self.target(x2)

    def siamese_loss(self, online, targets) -> torch.Tensor:
        (_, p1), (_, p2) = online[:2]
        t1, t2 = targets
        return self.distance(p1, t2).mean() + self.distance(p2, t1).mean()

    def training_step(self, engine, x1, x2, step: int, backward: Backward, sequential: bool = False) -> StepResult:
        self.momentum_update(engine.module, step)
        result = super().training_step(engine, x1, x2, step, backward, sequential)
        result.stats["target_momentum"] = self.momentum_at(step)
        return result


@register("byol")
def build_byol(cfg: RunConfig, rank: int, world_size: int) -> tuple[PredictorEncoder, BYOL]:
    online = finalize(build_predictor_encoder(cfg), cfg)
    return online, BYOL(online, cfg, rank, world_size)

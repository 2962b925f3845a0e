"""SimSiam (Chen & He, 2021) with the MixMask / Un-Mix branches (soft pairing: see methods.losses).

    L = ½·D(p1, sg z2) + ½·D(p2, sg z1)
      + Σ_branches mean_i [ λ_i·D(p_m,i, sg z2_i) + (1-λ_i)·D(p_m,i, sg z2_π(i)) ]

with D the negative cosine; the mixture is built from view 1 and predicts view 2's
projections (`mixing.symmetrize` adds view 2's mixtures against z1, same masks). The
mixed term is not halved: like MoCo's mixed branch it is added at full weight.
"""

from __future__ import annotations

import torch

from mixfast.config import RunConfig
from mixfast.methods.base import Backward, Method, StepResult, register
from mixfast.methods.encoders import PredictorEncoder, build_predictor_encoder, finalize
from mixfast.methods.losses import negative_cosine, soft_pair_loss
from mixfast.mixing.branches import Mixtures


class SimSiam(Method):
    distance = staticmethod(negative_cosine)

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.mixtures = Mixtures(cfg.mixing, cfg.train.seed, rank)

    def targets(self, engine, x1, x2, online) -> tuple[torch.Tensor, torch.Tensor]:
        """What each view's prediction is compared with: the online projections (stop-gradient
        inside the distance)."""
        return online[0][0], online[1][0]

    def siamese_loss(self, online, targets) -> torch.Tensor:
        (_, p1), (_, p2) = online[:2]
        t1, t2 = targets
        return 0.5 * self.distance(p1, t2).mean() + 0.5 * self.distance(p2, t1).mean()

    def training_step(self, engine, x1: torch.Tensor, x2: torch.Tensor, step: int, backward: Backward,
                      sequential: bool = False) -> StepResult:
        pairs, stats, images = self.mixtures.pairs(x1, x2, step)
        with self.autocast(x1.device.type):
            online = engine(x1, x2, *[br.x for br, _ in pairs])
            targets = self.targets(engine, x1, x2, online)
        loss = self.siamese_loss(online, targets)
        stats["loss_orig"] = loss.detach()
        for (br, target), (_, p_m) in zip(pairs, online[2:]):
            part = soft_pair_loss(self.distance, p_m, targets[target], br)
            stats[f"loss_{br.name}" + ("_v2" if target == 0 else "")] = part.detach()
            loss = loss + part
        backward(loss, True)
        return StepResult(loss.detach(), stats, images)


@register("simsiam")
def build_simsiam(cfg: RunConfig, rank: int, world_size: int) -> tuple[PredictorEncoder, SimSiam]:
    return finalize(build_predictor_encoder(cfg), cfg), SimSiam(cfg, rank, world_size)

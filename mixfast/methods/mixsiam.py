"""MixSiam (Guo et al.): SimSiam plus a mixture of the two views of the same image.

    x_m   = l·x1 + (1-l)·x2                   l = method.mixsiam.mix_lambda (0.5)
    z_f   = max(sg z1, sg z2)  element-wise  (method.mixsiam.aggregation: max | mean)
    L_mix = D(p_m, z_f)                       ('none': ½·D(p_m, sg z1) + ½·D(p_m, sg z2))
    L     = λ·L_siam + (1-λ)·L_mix            λ = method.mixsiam.loss_lambda (0.5)

with D the negative cosine and L_siam SimSiam's symmetric loss. The MixMask / Un-Mix
branches are off for this method (checked by the config).
"""

from __future__ import annotations

import torch

from mixfast.config import ConfigError, RunConfig
from mixfast.methods.base import Backward, StepResult, register
from mixfast.methods.encoders import PredictorEncoder, build_predictor_encoder, finalize
from mixfast.methods.simsiam import SimSiam


class MixSiam(SimSiam):
    def mixed_target_loss(self, p_m: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        how = self.cfg.method.mixsiam.aggregation
        if how == "none":
            return 0.5 * self.distance(p_m, z1).mean() + 0.5 * self.distance(p_m, z2).mean()
        z1, z2 = z1.detach(), z2.detach()
        z_f = torch.maximum(z1, z2) if how == "max" else 0.5 * (z1 + z2)
        return self.distance(p_m, z_f).mean()

    def training_step(self, engine, x1: torch.Tensor, x2: torch.Tensor, step: int, backward: Backward,
                      sequential: bool = False) -> StepResult:
        ms = self.cfg.method.mixsiam
        x_m = torch.lerp(x2, x1, ms.mix_lambda)  # l·x1 + (1-l)·x2
        with self.autocast(x1.device.type):
            online = engine(x1, x2, x_m)
        (z1, _), (z2, _), (_, p_m) = online
        siam = self.siamese_loss(online, (z1, z2))
        mix = self.mixed_target_loss(p_m, z1, z2)
        loss = ms.loss_lambda * siam + (1 - ms.loss_lambda) * mix
        backward(loss, True)
        stats = {"loss_siam": siam.detach(), "loss_mix": mix.detach()}
        return StepResult(loss.detach(), stats, {"view1": x1, "view2": x2, "mixsiam": x_m})


def check_mixsiam_config(cfg: RunConfig) -> None:
    """MixSiam's mixture is its own (the two views of one image); the MixMask / Un-Mix
    branches are defined for the other frameworks."""
    if cfg.mixing.mixmask.enabled or cfg.mixing.unmix.enabled:
        raise ConfigError("method.name='mixsiam' mixes the two views of each image itself: set "
                          "mixing.mixmask.enabled=false and mixing.unmix.enabled=false")


@register("mixsiam", check=check_mixsiam_config)
def build_mixsiam(cfg: RunConfig, rank: int, world_size: int) -> tuple[PredictorEncoder, MixSiam]:
    return finalize(build_predictor_encoder(cfg), cfg), MixSiam(cfg, rank, world_size)

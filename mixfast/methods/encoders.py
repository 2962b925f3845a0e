"""The trained modules handed to DeepSpeed. Each has `backbone` and `head` (the projector),
which the kNN monitor and the backbone export read, and encodes each view in its own pass
(own BatchNorm statistics, as in the papers' code).

channels_last (`model.channels_last`) is a property of the activations, not of the trained
parameters: the encoders convert their input, and a convolution of a channels_last input
returns channels_last output whatever its weight's layout (cuDNN and oneDNN convert the
small weight themselves), so every activation of the backbone follows. The parameters stay
plain contiguous because DeepSpeed needs them so: `deepspeed.initialize` broadcasts each
one as `p.data.view(torch.uint8)` (refused for a channels_last 3x3 weight), and ZeRO 1/2
re-point every `p.data` into one flat buffer and reduce gradients as `grad.view(-1)` (a
channels_last parameter gets channels_last gradients, which refuse that view). Converting
after `initialize` replaces `p.data` behind DeepSpeed's back (ZeRO 1/2 then fail at that
view, and rely on re-pointing p.data after every step to stay attached). The frozen
copies outside DeepSpeed (MoCo's key encoder, BYOL's target) can and do take channels_last
weights: `to_memory_format`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixfast.config import RunConfig
from mixfast.models import build_backbone, build_head, build_predictor


def to_channels_last(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def to_memory_format(module: nn.Module, channels_last: bool) -> nn.Module:
    """channels_last weights for a module that DeepSpeed does not own (frozen copies)."""
    return module.to(memory_format=torch.channels_last) if channels_last else module


class QueryEncoder(nn.Module):
    """Backbone + projection head; `forward(*views)` returns one L2-normalized float32
    embedding per view (MoCo, SimCLR)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, channels_last: bool = False):
        super().__init__()
        self.backbone, self.head, self.channels_last = backbone, head, channels_last

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(to_channels_last(x, self.channels_last))).float(), dim=1)

    def forward(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encode(v) for v in views)


class PredictorEncoder(nn.Module):
    """Backbone + projector + predictor (BYOL online network, SimSiam, MixSiam).
    `forward(*views)` returns `(z, p)` per view: projection and prediction, float32, not
    normalized (each loss normalizes what it compares)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module, channels_last: bool = False):
        super().__init__()
        self.backbone, self.head, self.predictor, self.channels_last = backbone, head, predictor, channels_last

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(to_channels_last(x, self.channels_last)))

    def forward(self, *views: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        out = []
        for v in views:
            z = self.project(v)
            out.append((z.float(), self.predictor(z).float()))
        return tuple(out)


def backbone_and_head(cfg: RunConfig) -> tuple[nn.Module, nn.Module]:
    mc = cfg.model
    backbone = build_backbone(mc.arch, mc.width, mc.cifar_stem)
    return backbone, build_head(mc.head, backbone.feature_dim, mc.feature_dim, mc.head_hidden_dim, mc.head_layers)


def finalize(module: nn.Module, cfg: RunConfig) -> nn.Module:
    """SyncBatchNorm, converted before deepspeed.initialize (the engine keeps the modules it is
    given). The parameters keep the plain contiguous layout DeepSpeed needs, also with
    model.channels_last (see the module doc)."""
    if cfg.model.sync_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def build_query_encoder(cfg: RunConfig) -> QueryEncoder:
    backbone, head = backbone_and_head(cfg)
    return QueryEncoder(backbone, head, cfg.model.channels_last)


def build_predictor_encoder(cfg: RunConfig) -> PredictorEncoder:
    backbone, head = backbone_and_head(cfg)
    predictor = build_predictor(cfg.model.feature_dim, cfg.model.predictor_hidden_dim)
    return PredictorEncoder(backbone, head, predictor, cfg.model.channels_last)

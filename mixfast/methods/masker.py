"""The adversary of ADIOS and sequential adversarial masking: the U-Net masker, its optimizer,
schedule and objective.

The masker is not part of the DeepSpeed engine. It has its own SGD (momentum, the encoder's
weight decay unless `masker.weight_decay`) and a warm-up + cosine schedule stepped per
iteration; its gradients come from `torch.autograd.grad` over its own parameters only (no
encoder `.grad` is written), are averaged over ranks, and its weights, optimizer and schedule
travel in the checkpoint through the method's `state_dict` (`get_extra_state`).

Objective (maximised), per the reference code (ADIOS) and the seed paper (sequential), over
the per-mask encoder losses L_k and penalties P_k:

    O = reduce_k L_k - reduce_k P_k + alpha_e * sum_b sum_k softmax_k(s_b) * log_softmax_k(s_b)

    P_k = alpha_s * mean_b 1 / (sin(pi * s_bk) + 1e-10)          (ADIOS sparsity)
        + alpha_b * mean_b (s_bk - b)^2                           (budget)
        + alpha_o * mean_b sum_pixels m_bk * S_b,k-1              (overlap with the earlier masks)
        + alpha_c * mean_b sum_pixels (m_bk - avgpool3x3(m_bk))^2 (smoothness; count_include_pad=False)

with s_bk the mean of mask k over sample b's pixels, S_k-1 = sum_{j<k} m_j and reduce = sum
(ADIOS) or mean (seed) over the masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixfast.config import MaskerConfig, RunConfig
from mixfast.engine import distributed as dist_utils
from mixfast.engine.schedule import warmup_cosine
from mixfast.models.unet import MaskerUNet

SIN_EPS = 1e-10  # the ADIOS code's guard in 1 / (sin(pi s) + eps)


@dataclass(frozen=True)
class MaskerSettings:
    """`masker.*` with every null replaced by the default of `masker.kind`."""

    kind: str
    num_masks: int
    reduction: str
    sparsity: float
    entropy: float
    budget: float
    budget_weight: float
    overlap: float
    smoothness: float

    @classmethod
    def from_config(cls, mc: MaskerConfig) -> "MaskerSettings":
        seq = mc.kind == "sequential"

        def pick(value, adios, sequential):
            return value if value is not None else (sequential if seq else adios)

        return cls(kind=mc.kind, num_masks=pick(mc.num_masks, 4, 5), reduction=pick(mc.reduction, "sum", "mean"),
                   sparsity=pick(mc.sparsity_weight, 1.0, 0.0), entropy=pick(mc.entropy_weight, 0.0, 0.0),
                   budget=mc.budget, budget_weight=pick(mc.budget_weight, 0.0, 1.0),
                   overlap=pick(mc.overlap_weight, 0.0, 1e-4), smoothness=pick(mc.smoothness_weight, 0.0, 1e-4))


def reduce_masks(values: list[torch.Tensor] | torch.Tensor, how: str) -> torch.Tensor:
    stacked = torch.stack(list(values)) if isinstance(values, list) else values
    return stacked.sum(0) if how == "sum" else stacked.mean(0)


def _upcast(masks: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 masks from autocast); float64 stays float64."""
    return masks if masks.dtype in (torch.float32, torch.float64) else masks.float()


def coverage(masks: torch.Tensor) -> torch.Tensor:
    """s [B, N]: the fraction of each sample's pixels each mask removes."""
    return _upcast(masks).mean((-2, -1))


def sparsity_penalty(masks: torch.Tensor) -> torch.Tensor:
    """[N]: mean_b 1 / (sin(pi * s_bk) + 1e-10), large for masks near empty or full."""
    return (1 / (torch.sin(math.pi * coverage(masks)) + SIN_EPS)).mean(0)


def budget_penalty(masks: torch.Tensor, budget: float) -> torch.Tensor:
    """[N]: mean_b (s_bk - b)^2."""
    return ((coverage(masks) - budget) ** 2).mean(0)


def overlap_penalty(masks: torch.Tensor) -> torch.Tensor:
    """[N]: mean_b sum_pixels m_bk * S_b,k-1 with S_k-1 = sum_{j<k} m_j (0 for the first mask)."""
    m = _upcast(masks)
    earlier = torch.cumsum(m, 1) - m
    return (m * earlier).sum((-2, -1)).mean(0)


def smoothness_penalty(masks: torch.Tensor) -> torch.Tensor:
    """[N]: mean_b sum_pixels (m - avgpool3x3(m))^2; the pool ignores padding, so a constant mask costs 0."""
    m = _upcast(masks)
    pooled = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False)
    return ((m - pooled) ** 2).sum((-2, -1)).mean(0)


def entropy_term(masks: torch.Tensor) -> torch.Tensor:
    """sum_b sum_k softmax_k(s_b) * log_softmax_k(s_b): minus the entropy of the mask sizes, summed over
    the batch (the ADIOS code adds alpha_e times this to the objective)."""
    s = coverage(masks)
    return (torch.softmax(s, 1) * torch.log_softmax(s, 1)).sum()


def penalties(masks: torch.Tensor, st: MaskerSettings) -> dict[str, torch.Tensor]:
    """The enabled weighted penalties of one view's masks, [N] each (the entropy term is in `objective`)."""
    out = {}
    if st.sparsity:
        out["sparsity"] = st.sparsity * sparsity_penalty(masks)
    if st.budget_weight:
        out["budget"] = st.budget_weight * budget_penalty(masks, st.budget)
    if st.overlap:
        out["overlap"] = st.overlap * overlap_penalty(masks)
    if st.smoothness:
        out["smoothness"] = st.smoothness * smoothness_penalty(masks)
    return out


def objective(losses: list[torch.Tensor], masks: list[torch.Tensor], st: MaskerSettings) -> tuple[torch.Tensor, dict]:
    """The masker's objective O (to maximise) from the per-mask encoder losses and each masked view's
    masks [B, N, H, W] (SimSiam: two views); returns (O, each term for the logs). Penalties are reduced
    over each view's masks and summed over views; the entropy term spans all masks of all views."""
    total = reduce_masks(losses, st.reduction)
    logged = {"masker_encoder_loss": total.detach()}
    per_view = [penalties(m, st) for m in masks]
    for name in per_view[0]:
        value = sum(reduce_masks(terms[name], st.reduction) for terms in per_view)
        total = total - value
        logged[f"masker_{name}"] = value.detach()
    if st.entropy:
        value = st.entropy * entropy_term(torch.cat(masks, 1))
        total = total + value
        logged["masker_entropy"] = value.detach()
    logged["masker_objective"] = total.detach()
    return total, logged


def mask_stats(masks: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """Per-mask coverage (mean, min, max over the batch) and the mean pairwise overlap
    mean_pixels(m_j * m_k) over pairs j < k, as device scalars."""
    m = masks.detach().float()
    s = coverage(m)
    out = {}
    for k in range(m.size(1)):
        out[f"{prefix}mask{k}_coverage_mean"] = s[:, k].mean()
        out[f"{prefix}mask{k}_coverage_min"] = s[:, k].min()
        out[f"{prefix}mask{k}_coverage_max"] = s[:, k].max()
    n = m.size(1)
    if n > 1:
        flat = m.flatten(2)  # [B, N, P]
        gram = torch.einsum("bip,bjp->ij", flat, flat) / (flat.size(0) * flat.size(2))
        out[f"{prefix}mask_overlap"] = gram.triu(1).sum() / (n * (n - 1) / 2)
    return out


class AdversarialMasker(nn.Module):
    """The U-Net, its SGD and schedule; `step(objective)` makes one ascent step on the objective."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.mc = mc = cfg.masker
        self.settings = MaskerSettings.from_config(mc)
        self.net = MaskerUNet(cfg.data.image_size, self.settings.num_masks, mc.width, mc.norm,
                              "sequential" if mc.kind == "sequential" else "adios", mc.condition, mc.blocks)
        decay = cfg.optim.weight_decay if mc.weight_decay is None else mc.weight_decay
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=mc.lr, momentum=mc.momentum, weight_decay=decay)
        self.epochs, self.total_steps = cfg.train.epochs, 1
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_multiplier)

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))

    def _lr_multiplier(self, step: int) -> float:
        mc = self.mc
        warmup = round(mc.warmup_epochs * self.total_steps / self.epochs)
        return warmup_cosine(step, self.total_steps, warmup, mc.lr, mc.warmup_start_lr, mc.min_lr) / mc.lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def step(self, objective: torch.Tensor) -> None:
        """Ascend `objective`: gradients of -objective w.r.t. the masker only (autograd.grad writes no
        other .grad), averaged over ranks, one SGD step and one schedule step."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(-objective, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        world = dist_utils.world_size()
        if world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist_utils.all_reduce_sum(flat)
            flat /= world
            grads = list(torch.split(flat, [g.numel() for g in grads]))
        for p, g in zip(params, grads):
            p.grad = g.view_as(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # optimizer and schedule state ride in the module's state_dict (the method's, in the checkpoint)
    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

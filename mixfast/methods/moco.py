"""MoCo v1/v2 with the MixMask and Un-Mix branches (SPEC §1-§2).

Split of responsibilities with DeepSpeed: the engine owns only what the optimizer trains,
the `QueryEncoder` (backbone + head), and runs all query passes in one forward call so
one backward follows. `MoCo` owns the momentum (key) encoder and the queue as buffers;
they are not trained, are updated from `engine.module`, and travel in the checkpoint's
client state (SPEC §8).

Every loss term is a cross-entropy over `[q·k+, q·queue]/τ` with its own positive. All
query rows of a step (original, Un-Mix, MixMask) are stacked into one `soft_infonce` call
with a [rows, P] table of positive indices and weights, so the queue is read once per step:

    row of q (original)  : (k_i, 1)
    row i of q_um        : (k_i, λu), (k_flip(i), 1-λu)     == λu·CE(q_um,k) + (1-λu)·CE(flip(q_um),k)
    row i of q_mm        : (k_i, λ_i), (k_π(i), 1-λ_i)      == λ·CE(q_mm,k) + (1-λ)·CE(q_mm[argsort π],k)

(the second form sums the same (row, positive) pairs in another order). Each CE is a batch
mean, so the loss is Σ weight·term / B. The symmetric variant scores every query set
against both key views.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixfast import ops
from mixfast.config import RunConfig
from mixfast.engine import distributed as dist_utils
from mixfast.mixing import MixMaskMixer, UnMixer
from mixfast.mixing.rng import STREAM_SHUFFLE_BN, step_generator
from mixfast.models import build_backbone, build_head, convert_to_split_bn


class QueryEncoder(nn.Module):
    """Backbone + projection head; `forward(*views)` encodes each view in its own pass
    (own BatchNorm statistics, as in the papers' code) and returns L2-normalized features."""

    def __init__(self, backbone: nn.Module, head: nn.Module, channels_last: bool = False):
        super().__init__()
        self.backbone, self.head, self.channels_last = backbone, head, channels_last

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    def forward(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encode(v) for v in views)


@dataclass
class QuerySet:
    """Query rows of one branch with their positives (indices into the key table) and weights."""

    x: torch.Tensor
    pos: torch.Tensor      # long [B, P]
    weight: torch.Tensor   # float [B, P]
    name: str


@dataclass
class StepResult:
    loss: torch.Tensor  # detached total of the step
    stats: dict[str, float] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    keys_to_enqueue: torch.Tensor | None = None


class MoCo(nn.Module):
    def __init__(self, query: QueryEncoder, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        m = cfg.method
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.temperature, self.momentum, self.symmetric = m.temperature, m.momentum, m.symmetric
        self.shuffle_bn = cfg.model.shuffle_bn and world_size > 1
        self.key_encoder = copy.deepcopy(query)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, cfg.model.feature_dim, generator=gen), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        mix = cfg.mixing
        self.mixmask = MixMaskMixer(mix.mixmask, cfg.train.seed, rank) if mix.mixmask.enabled else None
        self.unmix = UnMixer(mix.unmix, cfg.train.seed, rank) if mix.unmix.enabled else None

    # --- key side -------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self, query: nn.Module) -> None:
        """k ← m·k + (1-m)·q for parameters only. As in the official MoCo, the key
        encoder's BatchNorm running statistics come from its own (train-mode) passes."""
        for pk, pq in zip(self.key_encoder.parameters(), query.parameters()):
            pk.mul_(self.momentum).add_(pq.detach().to(pk.dtype), alpha=1 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Key features with shuffled BatchNorm groups.

        Without a shuffle, query i and its key i share BatchNorm statistics (the same
        GPU's batch, or the same SplitBatchNorm group), which lets the encoders lower the
        loss through batch statistics instead of learning features, and kNN accuracy
        then falls while the loss falls. So the key batch is permuted before the key
        encoder and restored after: across ranks (shuffle-BN), or within the batch on one
        process, where SplitBatchNorm groups are `index % bn_splits` (the official MoCo
        CIFAR recipe). The permutation is a pure function of (seed, step), identical on
        every rank, so nothing is broadcast.
        """
        gen = step_generator(self.cfg.train.seed, 0, STREAM_SHUFFLE_BN, step)
        if not self.shuffle_bn:
            perm = torch.randperm(x.size(0), generator=gen).to(x.device)
            return self.key_encoder.encode(x[perm])[torch.argsort(perm)]
        x_all = dist_utils.all_gather_cat(x)
        perm = torch.randperm(x_all.size(0), generator=gen).to(x.device)
        b = x.size(0)
        mine = perm[self.rank * b:(self.rank + 1) * b]
        k_all = dist_utils.all_gather_cat(self.key_encoder.encode(x_all[mine]))
        return k_all[torch.argsort(perm)][self.rank * b:(self.rank + 1) * b]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = dist_utils.all_gather_cat(keys.float())
        k, ptr = self.queue.size(0), int(self.queue_ptr)
        idx = (ptr + torch.arange(keys.size(0), device=keys.device)) % k  # wraps; any batch size
        self.queue[idx] = keys[-k:] if keys.size(0) > k else keys
        self.queue_ptr.fill_((ptr + keys.size(0)) % k)

    # --- query side -----------------------------------------------------------------
    def _query_sets(self, x1, x2, step, n_keysets) -> tuple[list[QuerySet], dict, dict]:
        b, dev = x1.size(0), x1.device
        rows = torch.arange(b, device=dev)
        ones = torch.ones(b, device=dev)

        def against_all_keysets(partners: list[tuple[torch.Tensor, torch.Tensor]]):
            # Every (partner index, weight) pair is repeated for each key view.
            pos = torch.stack([p + s * b for s in range(n_keysets) for p, _ in partners], 1)
            w = torch.stack([wt for _ in range(n_keysets) for _, wt in partners], 1)
            return pos, w

        if self.symmetric:  # key table = [k2; k1]: q1 scores against k2, q2 against k1
            sets = [QuerySet(x1, rows[:, None], ones[:, None], "orig"),
                    QuerySet(x2, (rows + b)[:, None], ones[:, None], "orig2")]
        else:
            sets = [QuerySet(x1, rows[:, None], ones[:, None], "orig")]
        stats, images = {}, {"view1": x1, "view2": x2}
        um = mm = None
        if self.unmix is not None and self.mixmask is not None:
            # Both mixtures from one pass over x1; MixMask takes a fresh random partner.
            mm, um = self.mixmask.with_unmix(x1, step, self.unmix)
        elif self.unmix is not None:
            um = self.unmix(x1, step)
        elif self.mixmask is not None:
            mm = self.mixmask(x1, step, random_partner=False)
        if um is not None:
            lam = torch.full((b,), um.lam, device=dev)
            pos, w = against_all_keysets([(rows, lam), (um.perm, 1 - lam)])
            sets.append(QuerySet(um.mixed, pos, w, "unmix"))
            stats.update(lam_unmix=um.lam, unmix_is_mixup=float(um.use_mixup))
            images["unmix"] = um.mixed
        if mm is not None:  # with Un-Mix present its partner is random (paper Table 2), else flip
            pos, w = against_all_keysets([(rows, mm.weight_own), (mm.perm, mm.weight_filler)])
            sets.append(QuerySet(mm.mixed, pos, w, "mixmask"))
            stats["lam_mixmask"] = float(mm.pixel_lam.float().mean())
            images.update(mixmask=mm.mixed, mask=mm.masks, mixmask_perm=mm.perm)
        return sets, stats, images

    def training_step(self, engine, x1: torch.Tensor, x2: torch.Tensor, step: int,
                      backward: Callable[[torch.Tensor, bool], None], sequential: bool = False) -> StepResult:
        """Forward and backward of one step; the caller then runs engine.step and `enqueue`.

        `backward(loss_part, is_last)` is called once (fused: every query branch in one
        forward and one `soft_infonce` call, so the queue is read once) or once per branch
        (`sequential`: each branch is backpropagated right after its forward, so only one
        branch's activations are alive at a time; the loss is a sum over rows whose terms
        depend only on their own query, so the gradients are the same).
        """
        self.momentum_update(engine.module)
        autocast = torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")
        with autocast:
            k2 = self.encode_keys(x2, step)
            k1 = self.encode_keys(x1, step) if self.symmetric else None
        keys = torch.cat([k2, k1]) if self.symmetric else k2
        sets, stats, images = self._query_sets(x1, x2, step, 2 if self.symmetric else 1)
        groups = [[s] for s in sets] if sequential else [sets]
        total = torch.zeros((), device=x1.device)
        for i, group in enumerate(groups):
            loss, branch_losses = self._group_loss(engine, group, keys, x1.size(0))
            stats.update(branch_losses)
            # The queue is updated in place only after backward (see `enqueue`), so the
            # autograd graph may hold it without a copy.
            backward(loss, i == len(groups) - 1)
            total += loss.detach()
        enqueue = torch.cat([k1, k2]) if self.symmetric else k2
        return StepResult(total, stats, images, enqueue)

    def _group_loss(self, engine, group: list[QuerySet], keys: torch.Tensor, batch: int):
        """Σ weight·term / B over the rows of `group`, and each branch's share for the logs."""
        queries = engine(*[s.x for s in group])
        width = max(s.pos.size(1) for s in group)
        pos = torch.cat([F.pad(s.pos, (0, width - s.pos.size(1))) for s in group])
        weight = torch.cat([F.pad(s.weight, (0, width - s.weight.size(1))) for s in group])
        weighted = weight * ops.soft_infonce(torch.cat(queries), keys, self.queue, pos, self.temperature)
        branch_losses, start = {}, 0
        for s in group:
            n = s.x.size(0)
            branch_losses[f"loss_{s.name}"] = float(weighted[start:start + n].detach().sum() / n)
            start += n
        return weighted.sum() / batch, branch_losses


def build_moco(cfg: RunConfig, rank: int, world_size: int) -> tuple[QueryEncoder, MoCo]:
    """Query encoder (to hand to DeepSpeed) and the MoCo wrapper (key encoder, queue, loss).

    BatchNorm: shuffle-BN across ranks when world_size > 1, else SplitBatchNorm(bn_splits)
    to emulate it on one process (SPEC §1)."""
    mc = cfg.model
    backbone = build_backbone(mc.arch, mc.width, mc.cifar_stem)
    head = build_head(mc.head, backbone.feature_dim, mc.feature_dim)
    query = QueryEncoder(backbone, head, mc.channels_last)
    if world_size == 1 or not mc.shuffle_bn:
        convert_to_split_bn(query, mc.bn_splits)
    if mc.sync_bn:
        query = nn.SyncBatchNorm.convert_sync_batchnorm(query)
    if mc.channels_last:
        query = query.to(memory_format=torch.channels_last)
    return query, MoCo(query, cfg, rank, world_size)

"""MoCo v1/v2 with the MixMask (Vishniakov et al.) and Un-Mix (Shen et al.) branches.

Split of responsibilities with DeepSpeed: the engine owns only what the optimizer trains,
the `QueryEncoder` (backbone + head), and runs all query passes in one forward call so
one backward follows. `MoCo` owns the momentum (key) encoder and the queue as buffers;
they are not trained, are updated from `engine.module` (the weights DeepSpeed trains), and
travel in the checkpoint's client state (DeepSpeed saves only the engine's module).

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixfast import ops
from mixfast.config import RunConfig
from mixfast.engine import distributed as dist_utils
from mixfast.config import ConfigError
from mixfast.methods.base import Backward, Method, StepResult, frozen_copy, register
from mixfast.methods.encoders import QueryEncoder, build_query_encoder, finalize, to_memory_format
from mixfast.mixing.branches import Mixtures
from mixfast.mixing.rng import STREAM_SHUFFLE_BN, step_generator
from mixfast.ops.mix import to_device
from mixfast.models import convert_to_split_bn

__all__ = ["MoCo", "QueryEncoder", "QuerySet", "StepResult", "build_moco"]


@dataclass
class QuerySet:
    """Query rows of one branch with their positives (indices into the key table) and weights."""

    x: torch.Tensor
    pos: torch.Tensor      # long [B, P]
    weight: torch.Tensor   # float [B, P]
    name: str


class MoCo(Method):
    def __init__(self, query: QueryEncoder, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        m = cfg.method
        self.temperature, self.momentum, self.symmetric = m.temperature, m.momentum, m.symmetric
        self.shuffle_bn = cfg.model.shuffle_bn and world_size > 1
        # Not trained by DeepSpeed, so its weights may follow model.channels_last too.
        self.key_encoder = to_memory_format(frozen_copy(query), cfg.model.channels_last)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        # The loss runs in the training dtype: with bf16 the queue is kept in bf16 (half the
        # bytes the loss streams per step) and the queries and keys are cast to it, so the
        # fused loss multiplies bf16 tiles on the tensor cores with fp32 accumulation and an
        # fp32 log-sum-exp (error bound: ops.soft_infonce tests at this dtype).
        loss_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        queue = F.normalize(torch.randn(m.queue_size, cfg.model.feature_dim, generator=gen), dim=1)
        self.register_buffer("queue", queue.to(loss_dtype))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.mixtures = Mixtures(cfg.mixing, cfg.train.seed, rank)
        self.pending_keys: torch.Tensor | None = None  # this step's keys, for the queue after the step

    # --- key side -------------------------------------------------------------------
    def momentum_pairs(self, query: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """k ← m·k + (1-m)·q for parameters only. As in the official MoCo, the key
        encoder's BatchNorm running statistics come from its own (train-mode) passes."""
        return [(self.key_encoder, query)]

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
            perm = to_device(torch.randperm(x.size(0), generator=gen), x.device)
            return self.key_encoder.encode(x[perm])[torch.argsort(perm)]
        x_all = dist_utils.all_gather_cat(x)
        perm = to_device(torch.randperm(x_all.size(0), generator=gen), x.device)
        b = x.size(0)
        mine = perm[self.rank * b:(self.rank + 1) * b]
        k_all = dist_utils.all_gather_cat(self.key_encoder.encode(x_all[mine]))
        return k_all[torch.argsort(perm)][self.rank * b:(self.rank + 1) * b]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the newest keys over the oldest, wrapping (any batch size). The pointer stays
        on the device: no host read per step."""
        keys = dist_utils.all_gather_cat(keys.float()).to(self.queue.dtype)  # gathered in fp32 (gloo has no bf16)
        k, n = self.queue.size(0), min(keys.size(0), self.queue.size(0))
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % k
        self.queue.index_copy_(0, idx, keys[-n:])
        self.queue_ptr.copy_((self.queue_ptr + keys.size(0)) % k)

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
        branches, stats, mixed_rows = self.mixtures(x1, step)
        images = {"view1": x1, "view2": x2, **mixed_rows}
        for br in branches:
            # Un-Mix keeps flip; MixMask with Un-Mix present takes a random partner (paper
            # Table 2), alone flip. Row i: its own key (λ) and its filler's key (1-λ).
            pos, w = against_all_keysets([(rows, br.weight_own), (br.perm, br.weight_filler)])
            sets.append(QuerySet(br.x, pos, w, br.name))
        return sets, stats, images

    def training_step(self, engine, x1: torch.Tensor, x2: torch.Tensor, step: int,
                      backward: Backward, sequential: bool = False) -> StepResult:
        """Forward and backward of one step; the caller then runs engine.step and `enqueue`.

        `backward(loss_part, is_last)` is called once (fused: every query branch in one
        forward and one `soft_infonce` call, so the queue is read once) or once per branch
        (`sequential`: each branch is backpropagated right after its forward, so only one
        branch's activations are alive at a time; the loss is a sum over rows whose terms
        depend only on their own query, so the gradients are the same).
        """
        self.momentum_update(engine.module, step)
        with self.autocast(x1.device.type):
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
        # enqueued by after_step, once the optimizer step no longer needs the queue as it was
        self.pending_keys = torch.cat([k1, k2]) if self.symmetric else k2
        return StepResult(total, stats, images)

    def after_step(self, result: StepResult) -> None:
        keys, self.pending_keys = self.pending_keys, None
        self.enqueue(keys)

    def _group_loss(self, engine, group: list[QuerySet], keys: torch.Tensor, batch: int):
        """Σ weight·term / B over the rows of `group`, and each branch's share for the logs."""
        queries = engine(*[s.x for s in group])
        width = max(s.pos.size(1) for s in group)
        pos = torch.cat([F.pad(s.pos, (0, width - s.pos.size(1))) for s in group])
        weight = torch.cat([F.pad(s.weight, (0, width - s.weight.size(1))) for s in group])
        # pos comes from _query_sets (built from the batch size): not read back on the host.
        terms = ops.soft_infonce(torch.cat(queries).to(self.queue.dtype), keys.to(self.queue.dtype), self.queue, pos,
                                 self.temperature, validate=False)
        weighted = weight * terms
        branch_losses, start = {}, 0
        for s in group:
            n = s.x.size(0)
            branch_losses[f"loss_{s.name}"] = weighted[start:start + n].detach().sum() / n
            start += n
        return weighted.sum() / batch, branch_losses


def check_moco_config(cfg: RunConfig) -> None:
    """MoCo v1 is the linear-head variant (v2 added the MLP head)."""
    if cfg.method.version == 1 and cfg.model.head != "linear":
        raise ConfigError("method.version=1 (MoCo v1) uses a linear projection head: set model.head='linear'")


@register("moco", check=check_moco_config)
def build_moco(cfg: RunConfig, rank: int, world_size: int) -> tuple[QueryEncoder, MoCo]:
    """Query encoder (to hand to DeepSpeed) and the MoCo wrapper (key encoder, queue, loss).

    BatchNorm: shuffle-BN across ranks when world_size > 1, else SplitBatchNorm(bn_splits)
    to emulate it on one process (as MoCo's official CIFAR-10 demo does)."""
    query = build_query_encoder(cfg)
    if world_size == 1 or not cfg.model.shuffle_bn:
        convert_to_split_bn(query, cfg.model.bn_splits)
    query = finalize(query, cfg)
    return query, MoCo(query, cfg, rank, world_size)

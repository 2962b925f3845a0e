"""SimCLR (Chen et al., 2020) with the MixMask / Un-Mix branches (soft pairing: see methods.losses).

NT-Xent over the in-batch set [z_a; z_b] of 2N L2-normalized embeddings (N = global batch,
gathered over ranks with gradient), each row's own embedding excluded from its
denominator; computed by `ops.soft_infonce(queue=None)` without materializing the logits.

    L = NTXent(z1, z2) + Σ_branches [ λ·NTXent(z_t, z_m) + (1-λ)·NTXent(z_t, z_m ∘ π⁻¹) ]

The mixed embedding z_m of row i (built from view 1) pairs with the other view's z_t[i]
with weight λ_i and with z_t[π(i)] (its filler's) with weight 1-λ_i; row j of z_t pairs
with z_m[j] (λ_j) and with the mixture whose filler it is, z_m[π⁻¹(j)] (1-λ_π⁻¹(j)), so the
branch term is exactly the Un-Mix authors' `λ·NTXent(x, mixed) + (1-λ)·NTXent(x, mixed_flip)`
for π = flip and scalar λ, generalized to random π and per-sample λ. Each NTXent is a mean
over its 2N rows. `mixing.symmetrize` adds the branches of view 2 against z1 (same masks).
"""

from __future__ import annotations

import torch

from mixfast.config import RunConfig
from mixfast.engine import distributed as dist_utils
from mixfast.methods.base import Backward, Method, StepResult, register
from mixfast.methods.encoders import QueryEncoder, build_query_encoder, finalize
from mixfast.methods.losses import ntxent_rows
from mixfast.mixing.branches import Mixtures


class SimCLR(Method):
    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.temperature = cfg.method.temperature
        self.mixtures = Mixtures(cfg.mixing, cfg.train.seed, rank)

    def _ntxent(self, a, b, partner_a=None, partner_b=None, weight=None) -> torch.Tensor:
        """Mean over this rank's 2n rows of Σ_p weight·term (weight [2n, P], default 1)."""
        offset = self.rank * a.size(0)
        terms = ntxent_rows(a, b, self.temperature, offset, dist_utils.all_gather_with_grad(a),
                            dist_utils.all_gather_with_grad(b), partner_a, partner_b)
        if weight is not None:
            terms = terms * weight
        return terms.sum() / terms.size(0)

    def training_step(self, engine, x1: torch.Tensor, x2: torch.Tensor, step: int, backward: Backward,
                      sequential: bool = False) -> StepResult:
        pairs, stats, images = self.mixtures.pairs(x1, x2, step)
        with self.autocast(x1.device.type):
            feats = engine(x1, x2, *[br.x for br, _ in pairs])
        z = feats[:2]
        loss = self._ntxent(z[0], z[1])
        stats["loss_orig"] = loss.detach()
        for (br, target), z_m in zip(pairs, feats[2:]):
            z_t = z[target]
            inverse = torch.argsort(br.perm)
            rows = torch.arange(z_t.size(0), device=z_t.device)
            partner_t = torch.stack([rows, inverse], 1)         # z_t[j] ↔ z_m[j], z_m[π⁻¹(j)]
            partner_m = torch.stack([rows, br.perm], 1)         # z_m[i] ↔ z_t[i], z_t[π(i)]
            weight = torch.cat([torch.stack([br.weight_own, br.weight_filler[inverse]], 1),
                                torch.stack([br.weight_own, br.weight_filler], 1)])
            part = self._ntxent(z_t, z_m, partner_t, partner_m, weight)
            name = f"loss_{br.name}" + ("_v2" if target == 0 else "")
            stats[name] = part.detach()
            loss = loss + part
        backward(loss, True)
        return StepResult(loss.detach(), stats, images)


@register("simclr")
def build_simclr(cfg: RunConfig, rank: int, world_size: int) -> tuple[QueryEncoder, SimCLR]:
    return finalize(build_query_encoder(cfg), cfg), SimCLR(cfg, rank, world_size)

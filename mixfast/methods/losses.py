"""Per-row losses shared by the frameworks, and the soft pairing of a mixed branch.

Every function returns one value per row, so a framework can weight rows (λ, 1-λ) before
averaging. The soft pairing, MixMask's and Un-Mix's loss carried over from MoCo to the
other frameworks (MixMask paper, Sec. 3.2; Un-Mix, Shen et al.): mixed row i is compared with
the target of its own image with weight λ_i and with the target of its filler image
perm[i] with weight 1-λ_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixfast import ops
from mixfast.mixing.branches import MixedBranch


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, z) per row; z is detached (stop-gradient)."""
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(1)


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ||p/|p| - z/|z|||² = 2 - 2·cos(p, z) per row; z is detached (target network)."""
    return 2 + 2 * negative_cosine(p, z)


def soft_pair_loss(distance, p_mixed: torch.Tensor, targets: torch.Tensor, branch: MixedBranch) -> torch.Tensor:
    """mean_i [ λ_i·D(p_i, t_i) + (1-λ_i)·D(p_i, t_perm[i]) ] (a zero weight skips nothing:
    its term is multiplied by 0, which keeps the graph shape fixed)."""
    own = distance(p_mixed, targets)
    filler = distance(p_mixed, targets[branch.perm])
    return (branch.weight_own * own + branch.weight_filler * filler).mean()


def ntxent_rows(a: torch.Tensor, b: torch.Tensor, tau: float, offset: int = 0,
                a_all: torch.Tensor | None = None, b_all: torch.Tensor | None = None,
                partner_a=None, partner_b=None) -> torch.Tensor:
    """NT-Xent terms of the rows of `a` and `b` (L2-normalized) over the set [A; B], self
    excluded from every denominator, as `soft_infonce(queue=None)` terms: returns [2n, P].

    `a_all`/`b_all` are the sets gathered over ranks (default: `a`, `b`) and `offset` the
    global index of this rank's first row. `partner_a` is the list of (index into B's rows,
    local) positives of each `a` row as a [n, P] long tensor, `partner_b` likewise into A;
    default: row i of a pairs with row i of b (plain SimCLR).
    """
    n = a.size(0)
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    n_a = a_all.size(0)
    rows = torch.arange(n, device=a.device)
    partner_a = rows[:, None] if partner_a is None else partner_a
    partner_b = rows[:, None] if partner_b is None else partner_b
    keys = torch.cat([a_all, b_all])
    queries = torch.cat([a, b])
    pos = torch.cat([n_a + offset + partner_a, offset + partner_b])
    exclude = torch.cat([offset + rows, n_a + offset + rows])
    # pos and exclude are built above from the batch size: not read back on the host
    return ops.soft_infonce(queries, keys, None, pos, tau, exclude=exclude, validate=False)

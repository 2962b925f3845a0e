"""SimCLR across two ranks: the gathered NT-Xent is the single-process loss over the global
batch, and the gradient that reaches each rank's rows is that loss's gradient.

Two gloo processes each hold half of a fixed global batch and call `SimCLR._ntxent`, the path
the trainer takes (differentiable `all_gather_with_grad`, ranks' row offsets, local partner
lists with per-row weights as the MixMask/Un-Mix branches build them). The reference is the
NT-Xent definition written as a loop over all 2N rows in one process. Data parallel averages
gradients over ranks, so rank r's gradient divided by the world size must equal the
reference's gradient on r's rows.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mixfast.config import RunConfig
from mixfast.methods.simclr import SimCLR

WORLD, N, DIM, TAU = 2, 5, 8, 0.3  # N rows per rank


def _global_inputs():
    """Global embeddings, and per rank: a local permutation, its partner lists and weights."""
    g = torch.Generator().manual_seed(11)
    a = F.normalize(torch.randn(WORLD * N, DIM, generator=g), dim=1)
    b = F.normalize(torch.randn(WORLD * N, DIM, generator=g), dim=1)
    per_rank = []
    for _ in range(WORLD):
        perm = torch.randperm(N, generator=g)
        rows = torch.arange(N)
        partner_a = torch.stack([rows, torch.argsort(perm)], 1)  # a[j] <-> b[j], b[π⁻¹(j)]
        partner_b = torch.stack([rows, perm], 1)                 # b[i] <-> a[i], a[π(i)]
        weight = torch.rand(2 * N, 2, generator=g) + 0.1         # rows of a first, then b
        per_rank.append((partner_a, partner_b, weight))
    return a, b, per_rank


def _method(rank: int) -> SimCLR:
    cfg = RunConfig.model_validate({"method": {"name": "simclr", "temperature": TAU},
                                    "data": {"name": "synthetic"}})
    return SimCLR(cfg, rank, WORLD)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a_full, b_full, per_rank = _global_inputs()
        mine = slice(rank * N, (rank + 1) * N)
        a = a_full[mine].clone().requires_grad_()
        b = b_full[mine].clone().requires_grad_()
        method = _method(rank)
        partner_a, partner_b, weight = per_rank[rank]
        loss = method._ntxent(a, b) + method._ntxent(a, b, partner_a, partner_b, weight)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference(a: torch.Tensor, b: torch.Tensor, per_rank) -> torch.Tensor:
    """Plain NT-Xent over [A; B] plus the weighted partner terms, from the definition: each
    of the 2N rows against the other 2N-1 embeddings, mean over rows."""
    z = torch.cat([a, b])
    total_n = a.size(0)

    def term(i: int, j: int) -> torch.Tensor:
        sims = torch.stack([z[i] @ z[k] / TAU for k in range(2 * total_n) if k != i])
        return torch.logsumexp(sims, 0) - z[i] @ z[j] / TAU

    plain = sum(term(i, (i + total_n) % (2 * total_n)) for i in range(2 * total_n)) / (2 * total_n)
    weighted = 0.0
    for r, (partner_a, partner_b, weight) in enumerate(per_rank):
        for i in range(N):
            gi = r * N + i
            for p in range(2):
                weighted = weighted + weight[i, p] * term(gi, total_n + r * N + int(partner_a[i, p]))
                weighted = weighted + weight[N + i, p] * term(total_n + gi, r * N + int(partner_b[i, p]))
    return plain + weighted / (2 * total_n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_ntxent_equals_the_global_loss_and_its_gradient(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    a_full, b_full, per_rank = _global_inputs()
    a_ref = a_full.clone().requires_grad_()
    b_ref = b_full.clone().requires_grad_()
    expected = _reference(a_ref, b_ref, per_rank)
    expected.backward()

    # The trainer's loss on each rank covers its own 2n rows; their mean is the global loss.
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, expected.detach(), rtol=1e-5, atol=1e-5)
    # The ranks' losses differ (different rows), so the check above is not trivially one rank's.
    assert not torch.isclose(results[0]["loss"], results[1]["loss"])
    for r, res in enumerate(results):
        rows = slice(r * N, (r + 1) * N)
        # all_gather_with_grad sums the other rank's gradient into the owner; data parallel
        # then divides by the world size.
        torch.testing.assert_close(res["grad_a"] / WORLD, a_ref.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["grad_b"] / WORLD, b_ref.grad[rows], rtol=1e-5, atol=1e-6)

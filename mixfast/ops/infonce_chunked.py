"""soft-InfoNCE primitives in chunked PyTorch: the CPU backend (and the fallback for what the GPU kernels do not take).

Every backend implements the same two primitives over one *column block* `cols` (the MoCo queue, or the keys);
`infonce.py` builds the loss and its gradient from them. With `s_rj = scale * q_r . cols_j`:

    lse(q, cols, exclude, scale)  ->  lse_r = logsumexp_{j != exclude[r]} s_rj                       [M]

    grads(q, cols, exclude, lse, gl, pos, gs, scale, in_denom, need_dq, need_dcols) -> (dq, dcols)
        the gradients, with respect to q and cols, of

            F = [in_denom] * sum_r gl_r * lse_r  +  sum_{r,p} gs_rp * s_{r, pos_rp}

        i.e. with coef_rj = [in_denom] gl_r softmax_r(s)_j + sum_p gs_rp [pos_rp == j]:
            dq_r    = scale * sum_j coef_rj cols_j          [M, D]
            dcols_j = scale * sum_r coef_rj q_r             [N, D]

Here the columns are processed `chunk` at a time. The only buffers whose size depends on the number of columns
are [M, chunk] (plus a [chunk, D] upcast of low-precision columns), so peak memory does not grow with K; the
backward recomputes each chunk's logits from the saved `lse` instead of storing the softmax. Matmuls go to torch
(BLAS / cuBLAS); there is no hand-written GEMM. Everything here is plain torch, so it runs on any device and in
float64 (the gradcheck path). Results are deterministic: chunks are visited in a fixed order and positives are
added with one scatter per positive slot (one index per row, so no two writes collide).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# [M, chunk] fp32 buffers of 32 MiB: few enough chunks (a K = 65536 queue at M = 768 is 7) that the handful of
# parallel regions per chunk stays small -- on a loaded machine each region can stall on a descheduled thread, and
# 8 MiB chunks measured 2x slower there -- while the buffer stays a small fraction of an M x K matrix. The bound
# does not depend on K. See benchmarks/README.md.
_CHUNK_ELEMENTS = 1 << 23
_MIN_CHUNK = 256


def chunk_columns(m: int) -> int:
    """Columns per chunk for `m` query rows: about `_CHUNK_ELEMENTS` logits, a multiple of 256."""
    cols = max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(m, 1))
    return cols - cols % _MIN_CHUNK


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _rows_view(buf: torch.Tensor, m: int, width: int) -> torch.Tensor:
    """A contiguous [m, width] view on the front of a flat scratch buffer (the last chunk may be narrower)."""
    return buf[:m * width].view(m, width)


def _fill_excluded(block: torch.Tensor, exclude: Optional[torch.Tensor], c0: int, value: float) -> None:
    """block[r, exclude[r] - c0] = value for the rows whose excluded column falls in this block, in place.

    Without a host sync (no nonzero, no data-dependent shape): every row writes one entry through scatter, rows
    whose excluded column lies elsewhere write back the value they already hold."""
    if exclude is None:
        return
    local = exclude - c0
    hit = (local >= 0) & (local < block.shape[1])
    local = torch.where(hit, local, torch.zeros_like(local))[:, None]
    keep = block.gather(1, local)
    block.scatter_(1, local, torch.where(hit[:, None], torch.full_like(keep, value), keep))


def lse(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], scale: float,
        chunk: Optional[int] = None) -> torch.Tensor:
    """Row logsumexp of `scale * q @ cols.T`, skipping column `exclude[r]` of row r (-1: none). -inf if empty."""
    acc = _acc_dtype(q)
    M, N = q.shape[0], cols.shape[0]
    chunk = chunk or chunk_columns(M)
    qs = q.to(acc) * scale  # 1/tau folded into q once: M*D multiplies instead of M*K
    if N == 0:
        return torch.full((M,), float("-inf"), dtype=acc, device=q.device)
    buf = torch.empty(M * min(chunk, N), dtype=acc, device=q.device)
    parts = []
    for c0 in range(0, N, chunk):
        c1 = min(c0 + chunk, N)
        s = torch.mm(qs, cols[c0:c1].to(acc).t(), out=_rows_view(buf, M, c1 - c0))
        _fill_excluded(s, exclude, c0, float("-inf"))
        # logsumexp in place (torch.logsumexp would allocate a second [M, chunk] temporary for exp(s - max))
        row_max = s.amax(dim=1, keepdim=True).clamp_(min=torch.finfo(acc).min)  # all -inf (excluded): exp gives 0
        parts.append(s.sub_(row_max).exp_().sum(dim=1).log_().add_(row_max.squeeze(1)))
    # The chunks' logsumexps combine exactly into the row's (an online logsumexp, reduced once at the end over a
    # [chunks, M] tensor: fixed order, every intermediate bounded).
    return torch.logsumexp(torch.stack(parts), dim=0)


def _add_positives(coef: torch.Tensor, pos: torch.Tensor, gs: torch.Tensor, c0: int, c1: int) -> None:
    """coef[r, pos[r,p] - c0] += gs[r,p] for the positives that fall in columns [c0, c1)."""
    for p in range(pos.shape[1]):
        idx = pos[:, p]
        hit = (idx >= c0) & (idx < c1)
        local = torch.where(hit, idx - c0, torch.zeros_like(idx))
        coef.scatter_add_(1, local[:, None], torch.where(hit, gs[:, p], torch.zeros_like(gs[:, p]))[:, None])


def grads(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], lse_: Optional[torch.Tensor],
          gl: Optional[torch.Tensor], pos: Optional[torch.Tensor], gs: Optional[torch.Tensor], scale: float,
          in_denom: bool, need_dq: bool, need_dcols: bool,
          chunk: Optional[int] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of F (module docstring) with respect to q and cols; each None unless asked for."""
    acc = _acc_dtype(q)
    M, N = q.shape[0], cols.shape[0]
    chunk = chunk or chunk_columns(M)
    qs = q.to(acc) * scale
    dq = torch.zeros((M, q.shape[1]), dtype=acc, device=q.device) if need_dq else None
    dcols = torch.empty((N, q.shape[1]), dtype=acc, device=q.device) if need_dcols else None
    if not (need_dq or need_dcols):
        return dq, dcols
    if in_denom:
        neg_lse, gl_col = -lse_.to(acc)[:, None], gl.to(acc)[:, None]
    # Without positives in this block (the MoCo queue, the hot path), gl_r factors out of sum_j gl_r softmax_rj x_j:
    # it is applied once to the [M, D] result (dq) or to q's rows (dcols) instead of to every logit.
    fold_gl = in_denom and pos is None
    q_dcols = qs * gl_col if fold_gl and need_dcols else qs
    buf = torch.empty(M * min(chunk, N), dtype=acc, device=q.device)
    for c0 in range(0, N, chunk):
        c1 = min(c0 + chunk, N)
        c = cols[c0:c1].to(acc)
        coef = _rows_view(buf, M, c1 - c0)
        if in_denom:
            torch.addmm(neg_lse, qs, c.t(), out=coef).exp_()  # softmax_rj = exp(s_rj - lse_r), in place
            if not fold_gl:
                coef.mul_(gl_col)
            _fill_excluded(coef, exclude, c0, 0.0)
        else:
            coef.zero_()
        if pos is not None:
            _add_positives(coef, pos, gs.to(acc), c0, c1)
        if need_dq:
            dq.addmm_(coef, c)
        if need_dcols:
            torch.mm(coef.t(), q_dcols, out=dcols[c0:c1])  # q_dcols already carries the scale
    if need_dq:
        dq.mul_(gl_col * scale if fold_gl else scale)
    return dq, dcols

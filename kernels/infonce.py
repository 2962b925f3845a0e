"""Fused soft-InfoNCE in Triton: flash-style column streaming with an online logsumexp, split over columns.

Implements the two primitives every soft-InfoNCE backend provides (definitions in
`mixfast/ops/infonce_chunked.py`; the loss and its gradient are assembled from them in `mixfast/ops/infonce.py`):

* `lse(q, cols, exclude, scale)`: per-row logsumexp of `scale * q @ cols.T`. Programs form a grid
  (row block, column split); each streams its split's column tiles through a running max and sum (base 2) and
  writes one partial (max, sum) pair per row. The partials are combined afterwards by a fixed-order logsumexp
  over the splits (flash-decoding): M = 512..768 rows are only 4..12 row blocks, far too few to fill a GPU without
  splitting the K = 65536 columns, and a fixed-order combine keeps results bitwise reproducible (no atomics).
* `grads(...)`: the backward recomputes each tile's logits from the saved per-row lse (nothing of size M x K is
  ever stored). `dq` comes from a row-parallel kernel split over columns, `dcols` (only when asked: in-batch keys,
  or MoCo keys through their positives; never the queue) from a column-parallel kernel split over rows; both write
  per-split partials that are summed in a fixed order.

Precision: loads in the input dtype (fp32/bf16/fp16), accumulation in fp32. The temperature and log2(e) are folded
into the one multiply that turns a dot product into a base-2 logit (it fuses with the max subtraction feeding exp2):
scaling a bf16 `q` by 1/tau before the dot would round q a second time, as coarsely as its own storage did.
fp32 inputs use IEEE fp32 dots (TF32 off) on the FMA units, over D in slices (`_logits`) so that no thread holds a
whole row of D in registers. Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) tiles are upcast to fp32
after loading because the interpreter has no bf16 dot.

No autotuning: block sizes come from a small table by kernel, dtype and D (autotune's benchmarking does not run under
the interpreter, and a fixed table keeps results reproducible); D up to 256.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels import aot
from kernels.aot import Launch
from kernels.splits import plan as split_plan

# Whether these kernels were defined in interpreter mode. Triton decides at definition time, so it is captured at
# import; CPU tensors can only run through kernels defined this way.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_DIM = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, dims, row_ok, stride, D: tl.constexpr, DOT_F32: tl.constexpr):
    """Tile [len(rows), BLOCK_D] of a row-major matrix with unit column stride; zero outside."""
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * stride + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot_nt(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b.T with fp32 accumulation (IEEE fp32 when DOT_F32, else the inputs' tensor-core dtype)."""
    if DOT_F32:
        s = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        s = tl.dot(a, tl.trans(b), acc)
    return s


@triton.jit
def _logits(Q, C, q, c, rows, cols, row_ok, col_ok, stride_q, stride_c, D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """q @ c.T (fp32 [BLOCK_M, BLOCK_N]) for a row tile and a column tile.

    BLOCK_K == BLOCK_D: one dot of the resident tiles `q` and `c`. BLOCK_K < BLOCK_D (fp32): D is walked in BLOCK_K
    slices of Q and C loaded here (`q`, `c` are unused), each slice's dot accumulating into the last one's: an IEEE
    fp32 dot runs on the FMA units, where each thread holds every k of its rows and columns in registers, and a
    whole D of 128 spills."""
    if BLOCK_K < BLOCK_D:
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, BLOCK_D, BLOCK_K):
            dims = k0 + tl.arange(0, BLOCK_K)
            s = _dot_nt(_load_rows(Q, rows, dims, row_ok, stride_q, D, DOT_F32),
                        _load_rows(C, cols, dims, col_ok, stride_c, D, DOT_F32), s, DOT_F32)
    else:
        s = _dot_nt(q, c, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_F32)
    return s


@triton.jit
def _dot_nn(coef, b, DOT_F32: tl.constexpr):
    """coef @ b, coef fp32; coef is rounded to b's dtype for the tensor cores when b is 16-bit."""
    if DOT_F32:
        s = tl.dot(coef, b, input_precision="ieee")
    else:
        s = tl.dot(coef.to(b.dtype), b)
    return s


@triton.jit
def _coef(Q, C, q, c, rows, cols, row_ok, col_ok, stride_q, stride_c, excl, lse2, gl, POS, GS, scale_log2,
          P: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_K: tl.constexpr, HAS_EXCL: tl.constexpr, IN_DENOM: tl.constexpr, HAS_POS: tl.constexpr,
          DOT_F32: tl.constexpr):
    """d F / d s for one tile: gl_r softmax_rj (if the columns are in the denominator) + the positives' gs_rp."""
    if IN_DENOM:
        s2 = _logits(Q, C, q, c, rows, cols, row_ok, col_ok, stride_q, stride_c, D, BLOCK_M, BLOCK_N, BLOCK_D,
                     BLOCK_K, DOT_F32) * scale_log2
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_EXCL:
            valid = valid & (cols[None, :] != excl[:, None])
        coef = tl.where(valid, tl.exp2(s2 - lse2[:, None]) * gl[:, None], 0.0)
    else:
        coef = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HAS_POS:
        for p in tl.static_range(P):
            target = tl.load(POS + rows.to(tl.int64) * P + p, mask=row_ok, other=-1)
            g = tl.load(GS + rows.to(tl.int64) * P + p, mask=row_ok, other=0.0)
            coef += tl.where(target[:, None] == cols[None, :], g[:, None], 0.0)
    return coef


# ---------------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _lse_partials_kernel(Q, C, EXCL, PART_MAX, PART_SUM, M, N, stride_q, stride_c, cols_per_split, scale_log2,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_K: tl.constexpr, HAS_EXCL: tl.constexpr, DOT_F32: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    # q resident for the whole split, unless D is walked in slices (see _logits)
    q = _load_rows(Q, rows, dims, row_ok, stride_q, D, DOT_F32) if BLOCK_K == BLOCK_D else rows
    if HAS_EXCL:
        excl = tl.load(EXCL + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        c = _load_rows(C, cols, dims, col_ok, stride_c, D, DOT_F32) if BLOCK_K == BLOCK_D else cols
        s2 = _logits(Q, C, q, c, rows, cols, row_ok, col_ok, stride_q, stride_c, D, BLOCK_M, BLOCK_N, BLOCK_D,
                     BLOCK_K, DOT_F32) * scale_log2
        valid = col_ok[None, :]
        if HAS_EXCL:
            valid = valid & (cols[None, :] != excl[:, None])
        s2 = tl.where(valid, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid column yet: keep l = 0
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), 1)
        m_i = m_new
    out = split.to(tl.int64) * M + rows
    tl.store(PART_MAX + out, m_i, mask=row_ok)
    tl.store(PART_SUM + out, l_i, mask=row_ok)


@triton.jit
def _row_terms(EXCL, LSE2, GL, rows, row_ok, BLOCK_M: tl.constexpr, HAS_EXCL: tl.constexpr,
               IN_DENOM: tl.constexpr):
    """Per-row inputs of both backward kernels: the excluded column (a placeholder when there
    is no exclusion) and, for rows whose columns are in the denominator, the saved lse2 and
    the upstream gradient of that logsumexp (zeros otherwise)."""
    excl = rows
    lse2 = tl.zeros([BLOCK_M], tl.float32)
    gl = tl.zeros([BLOCK_M], tl.float32)
    if HAS_EXCL:
        excl = tl.load(EXCL + rows, mask=row_ok, other=-1)
    if IN_DENOM:
        lse2 = tl.load(LSE2 + rows, mask=row_ok, other=0.0)
        gl = tl.load(GL + rows, mask=row_ok, other=0.0)
    return excl, lse2, gl


@triton.jit
def _grad_q_kernel(Q, C, EXCL, LSE2, GL, POS, GS, PART_DQ, M, N, stride_q, stride_c, cols_per_split,
                   scale_log2, scale, P: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, HAS_EXCL: tl.constexpr,
                   IN_DENOM: tl.constexpr, HAS_POS: tl.constexpr, DOT_F32: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    q = _load_rows(Q, rows, dims, row_ok, stride_q, D, DOT_F32) if BLOCK_K == BLOCK_D else rows  # see _logits
    excl, lse2, gl = _row_terms(EXCL, LSE2, GL, rows, row_ok, BLOCK_M, HAS_EXCL, IN_DENOM)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        c = _load_rows(C, cols, dims, col_ok, stride_c, D, DOT_F32)
        coef = _coef(Q, C, q, c, rows, cols, row_ok, col_ok, stride_q, stride_c, excl, lse2, gl, POS, GS,
                     scale_log2, P, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, HAS_EXCL, IN_DENOM, HAS_POS, DOT_F32)
        acc += _dot_nn(coef, c, DOT_F32)
    out = (split.to(tl.int64) * M + rows.to(tl.int64))[:, None] * D + dims[None, :]
    tl.store(PART_DQ + out, acc * scale, mask=row_ok[:, None] & (dims[None, :] < D))


@triton.jit
def _grad_cols_kernel(Q, C, EXCL, LSE2, GL, POS, GS, PART_DC, M, N, stride_q, stride_c, rows_per_split,
                      scale_log2, scale, P: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_EXCL: tl.constexpr, IN_DENOM: tl.constexpr, HAS_POS: tl.constexpr, DOT_F32: tl.constexpr):
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    # resident for the whole split, unless D is walked in slices (see _logits)
    c = _load_rows(C, cols, dims, col_ok, stride_c, D, DOT_F32) if BLOCK_K == BLOCK_D else cols
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        q = _load_rows(Q, rows, dims, row_ok, stride_q, D, DOT_F32)
        excl, lse2, gl = _row_terms(EXCL, LSE2, GL, rows, row_ok, BLOCK_M, HAS_EXCL, IN_DENOM)
        coef = _coef(Q, C, q, c, rows, cols, row_ok, col_ok, stride_q, stride_c, excl, lse2, gl, POS, GS,
                     scale_log2, P, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, HAS_EXCL, IN_DENOM, HAS_POS, DOT_F32)
        acc += _dot_nn(tl.trans(coef), q, DOT_F32)
    out = (split.to(tl.int64) * N + cols.to(tl.int64))[:, None] * D + dims[None, :]
    tl.store(PART_DC + out, acc * scale, mask=col_ok[:, None] & (dims[None, :] < D))


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------


def supports(q: torch.Tensor, cols: torch.Tensor) -> bool:
    """Whether these kernels take this problem: a device they can run on, a supported dtype, D <= 256."""
    if q.device.type == "cpu" and not INTERPRETED:
        return False
    return q.dtype in DTYPES and cols.dtype == q.dtype and q.shape[1] <= MAX_DIM


def _config(dtype: torch.dtype, d: int, device_type: str, kernel: str) -> dict:
    """Tile sizes of `kernel` ("lse" or "grad"): small tiles under the interpreter (it executes every program in
    numpy), GPU tiles otherwise, chosen so that no variant spills registers on sm_80 or sm_90 (ptxas' report is read
    by tests/ops/test_triton_aot.py)."""
    block_d = max(16, triton.next_power_of_2(d))
    if device_type == "cpu":  # fp32 walks D in slices as on a GPU, so that path runs under the interpreter too
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, BLOCK_K=16 if dtype == torch.float32 else block_d,
                    DOT_F32=True, launch={})
    wide = block_d > 128
    # FMA contraction stays on (named, since Triton's default is changing): the scale folds into exp2's argument as
    # one FMA, and a contracted multiply-add is never less accurate than the two rounded steps.
    if dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units, which hold every k of a thread's operand rows in registers: the
        # logits walk D in slices of 32 (_logits), and the backward's second product, whose k runs over the streamed
        # tile (columns for dq, rows for dcols), keeps that tile at 32 (16 next to a 256-wide accumulator).
        tiles = (64, 64) if kernel == "lse" else ((32, 16) if wide else (32, 32))
        return dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], BLOCK_D=block_d, BLOCK_K=32, DOT_F32=True,
                    launch=dict(num_warps=8, num_stages=2, enable_fp_fusion=True))
    # 16-bit: tensor-core dots over the whole D of resident tiles; the backward (an [rows, D] fp32 accumulator next
    # to the logits tile) needs 8 warps not to spill
    return dict(BLOCK_M=64, BLOCK_N=32 if wide else 64, BLOCK_D=block_d, BLOCK_K=block_d, DOT_F32=False,
                launch=dict(num_warps=8 if wide or kernel == "grad" else 4, num_stages=3, enable_fp_fusion=True))


def _plan(extent: int, block: int, programs: int, device: torch.device, splits: Optional[int]) -> Tuple[int, int]:
    """(elements per split, splits): kernels/splits.py's plan with this device's multiprocessor count."""
    sms = None if device.type == "cpu" else _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return split_plan(extent, block, programs, sms, splits)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def lse_launch(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], scale: float,
               splits: Optional[int] = None,
               device_type: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, Launch]:
    """The partials (max, sum) [splits, M] and the launch that fills them, for M, N > 0. `device_type` picks the
    configuration (default: q's device; "cuda" with CPU tensors to compile the GPU launch anywhere)."""
    M, N = q.shape[0], cols.shape[0]
    cfg = _config(q.dtype, q.shape[1], device_type or q.device.type, "lse")
    row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    per, n_splits = _plan(N, cfg["BLOCK_N"], row_blocks, q.device, splits)
    part_max = torch.empty((n_splits, M), dtype=torch.float32, device=q.device)
    part_sum = torch.empty((n_splits, M), dtype=torch.float32, device=q.device)
    launch = Launch(_lse_partials_kernel, (row_blocks, n_splits), (), dict(
        Q=q, C=cols, EXCL=exclude if exclude is not None else q, PART_MAX=part_max, PART_SUM=part_sum, M=M, N=N,
        stride_q=q.stride(0), stride_c=cols.stride(0), cols_per_split=per, scale_log2=scale * _LOG2E,
        D=q.shape[1], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"],
        HAS_EXCL=exclude is not None, DOT_F32=cfg["DOT_F32"], **cfg["launch"]))
    return part_max, part_sum, launch


def lse(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], scale: float,
        splits: Optional[int] = None) -> torch.Tensor:
    """Row logsumexp of `scale * q @ cols.T` (float32 [M]), skipping `exclude[r]`; see the module docstring."""
    M, N = q.shape[0], cols.shape[0]
    if M == 0 or N == 0:
        return torch.full((M,), float("-inf"), dtype=torch.float32, device=q.device)
    part_max, part_sum, launch = lse_launch(q, cols, exclude, scale, splits)
    launch()
    # Deterministic combine: each split's lse in base 2 (-inf for an empty sum), then a logsumexp over splits.
    return torch.logsumexp((part_max + torch.log2(part_sum)) * _LN2, dim=0)


def grad_launches(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], lse_: Optional[torch.Tensor],
                  gl: Optional[torch.Tensor], pos: Optional[torch.Tensor], gs: Optional[torch.Tensor], scale: float,
                  in_denom: bool, need_dq: bool, need_dcols: bool, splits: Optional[int] = None,
                  device_type: Optional[str] = None) -> Dict[str, Tuple[torch.Tensor, Launch]]:
    """{"grad_q": (partials [splits, M, D], launch), "grad_cols": (partials [splits, N, D], launch)}, each only when
    asked for, for M, N > 0; `device_type` as in `lse_launch`."""
    M, N, D = q.shape[0], cols.shape[0], q.shape[1]
    cfg = _config(q.dtype, D, device_type or q.device.type, "grad")
    flags = dict(P=pos.shape[1] if pos is not None else 1, D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], HAS_EXCL=in_denom and exclude is not None,
                 IN_DENOM=in_denom, HAS_POS=pos is not None, DOT_F32=cfg["DOT_F32"], **cfg["launch"])
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    args = dict(Q=q, C=cols, EXCL=exclude if exclude is not None else q,
                LSE2=lse_.float().mul(_LOG2E) if in_denom else dummy,
                GL=gl.float().contiguous() if in_denom else dummy,
                POS=pos if pos is not None else q,
                GS=gs.float().contiguous() if pos is not None else dummy,
                M=M, N=N, stride_q=q.stride(0), stride_c=cols.stride(0), scale_log2=scale * _LOG2E, scale=scale)
    launches = {}
    if need_dq:
        row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
        per, n_splits = _plan(N, cfg["BLOCK_N"], row_blocks, q.device, splits)
        part = torch.empty((n_splits, M, D), dtype=torch.float32, device=q.device)
        launches["grad_q"] = part, Launch(_grad_q_kernel, (row_blocks, n_splits), (),
                                          dict(**args, PART_DQ=part, cols_per_split=per, **flags))
    if need_dcols:
        col_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        per, n_splits = _plan(M, cfg["BLOCK_M"], col_blocks, q.device, splits)
        part = torch.empty((n_splits, N, D), dtype=torch.float32, device=q.device)
        launches["grad_cols"] = part, Launch(_grad_cols_kernel, (col_blocks, n_splits), (),
                                             dict(**args, PART_DC=part, rows_per_split=per, **flags))
    return launches


def grads(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], lse_: Optional[torch.Tensor],
          gl: Optional[torch.Tensor], pos: Optional[torch.Tensor], gs: Optional[torch.Tensor], scale: float,
          in_denom: bool, need_dq: bool, need_dcols: bool,
          splits: Optional[int] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dq, dcols) in float32, each None unless asked for; see `mixfast/ops/infonce_chunked.py` for F."""
    M, N, D = q.shape[0], cols.shape[0], q.shape[1]
    if M == 0 or N == 0 or not (need_dq or need_dcols):
        return (torch.zeros((M, D), dtype=torch.float32, device=q.device) if need_dq else None,
                torch.zeros((N, D), dtype=torch.float32, device=q.device) if need_dcols else None)
    launches = grad_launches(q, cols, exclude, lse_, gl, pos, gs, scale, in_denom, need_dq, need_dcols, splits)
    out = {}
    for name, (part, launch) in launches.items():
        launch()
        out[name] = part.sum(dim=0)  # fixed-order sum of the splits' partials (no zero-filled buffer first)
    return out.get("grad_q"), out.get("grad_cols")


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for a GPU target (no GPU needed): lets a CPU-only CI check the GPU code path
# ---------------------------------------------------------------------------------------------------------------

def example_launches(dtype: torch.dtype, d: int, *, exclude: bool = False, in_denom: bool = True, p: int = 0,
                     need_dcols: bool = False, m: int = 96, n: int = 256) -> Dict[str, Launch]:
    """The GPU launches of one soft_infonce call, built by `lse_launch` / `grad_launches` on CPU tensors: "lse" and
    "grad_q" always, "grad_cols" with `need_dcols`. `exclude`: in-batch rows skip a column; `in_denom`: the columns
    are in the denominator (False: MoCo keys reached only through their positives); `p` positives per row (0: none).
    Sizes matter only through Triton's value specializations (M, N and strides divisible by 16, as in training)."""
    q, cols = torch.zeros((m, d), dtype=dtype), torch.zeros((n, d), dtype=dtype)
    excl = torch.zeros((m,), dtype=torch.int64) if exclude else None
    pos = torch.zeros((m, p), dtype=torch.int64) if p else None
    gs = torch.zeros((m, p)) if p else None
    row = torch.zeros((m,))
    _, _, launch = lse_launch(q, cols, excl, 5.0, splits=4, device_type="cuda")
    grads_ = grad_launches(q, cols, excl, row if in_denom else None, row if in_denom else None, pos, gs, 5.0,
                           in_denom, True, need_dcols, splits=4, device_type="cuda")
    return {"lse": launch, **{name: launch for name, (_, launch) in grads_.items()}}


def compile_for_gpu(dtype: torch.dtype, d: int, arch: int = 90, **variant) -> dict:
    """Compile `example_launches(dtype, d, **variant)` for CUDA sm_`arch` without a GPU: {name: CompiledKernel}.
    Raises if Triton cannot compile them. Needs kernels defined outside the interpreter."""
    if INTERPRETED:
        raise RuntimeError("compile_for_gpu needs kernels defined without TRITON_INTERPRET=1")
    return {name: aot.compile_launch(launch, arch) for name, launch in example_launches(dtype, d, **variant).items()}

"""Homologous (TopK) attention forward in Triton: flash-style attention whose rows keep only keys above a threshold.

The op layer (`mixfast/ops/topk_attention.py`) first computes, per query row, a score threshold `thr[b, h, i]` that
separates its `topk` largest scores `s = q k^T * scale` from the rest (-inf for global rows). This kernel then runs
one program per (row block, batch x head): it streams the key blocks, computes the fp32 scores, drops those below the
row's threshold (and past the sequence end), and keeps a running max / sum / weighted V (online softmax), so no
L x L tensor is ever written. The output is written contiguous [B, H, Lq, d] in the inputs' dtype.

Precision: fp32 inputs use IEEE fp32 dots (TF32 off) so that the kernel's scores are those the threshold was computed
from up to summation order; bf16 / fp16 use the tensor cores with fp32 accumulation, and P is rounded to the input
dtype for P @ V as in flash attention. Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) tiles are upcast
to fp32 after loading (the interpreter has no bf16 dot).

Forward only: the op's backward recomputes the kept probabilities in row chunks in torch (documented there).
Nothing here imports mixfast (`kernels` is a leaf).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import aot
from kernels.aot import Launch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_DIM = 256


@triton.jit
def _topk_attn_fwd_kernel(Q, K, V, THR, O,
                          sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                          H, LQ, LK, scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    dim_ok = dims < D
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_base + rows[:, None] * sql + dims[None, :] * sqd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    thr = tl.load(THR + bh.to(tl.int64) * LQ + rows, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        kt = tl.load(k_base + cols[:, None] * skl + dims[None, :] * skd, mask=col_ok[:, None] & dim_ok[None, :],
                     other=0.0)
        vt = tl.load(v_base + cols[:, None] * svl + dims[None, :] * svd, mask=col_ok[:, None] & dim_ok[None, :],
                     other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = s * scale
        keep = (s >= thr[:, None]) & col_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key kept yet: keep exp() away from -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            acc = tl.dot(p, vt, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptr = O + bh.to(tl.int64) * LQ * D + rows[:, None] * D + dims[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes this call: a device it runs on (CUDA, or CPU under the interpreter), a supported
    dtype, d <= 256."""
    if q.device.type == "cpu" and not INTERPRETED:
        return False
    if q.device.type not in ("cpu", "cuda"):
        return False
    return q.dtype in DTYPES and q.shape[-1] <= MAX_DIM


def _config(dtype: torch.dtype, d: int, device_type: str) -> dict:
    """Tile sizes and launch options; GPU variants chosen so that none spills registers on sm_90 (ptxas' report is
    read by tests/ops/test_topk_attention.py). FMA contraction stays on (named: Triton's default is changing)."""
    if device_type == "cpu":  # the interpreter runs every program in Python: few, small ones
        return dict(BLOCK_M=32, BLOCK_N=32)
    if dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units and hold their operand tiles in registers: small tiles
        tiles = (32, 32) if d <= 128 else (16, 16)
        return dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], num_warps=4, num_stages=2, enable_fp_fusion=True)
    tiles = (64, 64) if d <= 64 else ((64, 32) if d <= 128 else (32, 32))
    return dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], num_warps=4, num_stages=2, enable_fp_fusion=True)


def forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, thr: torch.Tensor, out: torch.Tensor,
                   scale: float, device_type: str | None = None) -> Launch:
    """The launch that writes `out` (contiguous [B, H, Lq, d], q's dtype) from q [B, H, Lq, d], k and v
    [B, H, Lk, d] (any strides) and the float32 row thresholds `thr` (contiguous [B, H, Lq])."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    cfg = _config(q.dtype, D, device_type or q.device.type)
    block_d = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(LQ, cfg["BLOCK_M"]), B * H)
    dot_f32 = q.dtype == torch.float32 or (device_type or q.device.type) == "cpu"
    return Launch(_topk_attn_fwd_kernel, grid,
                  (q, k, v, thr, out, *q.stride(), *k.stride(), *v.stride(), H, LQ, LK, float(scale)),
                  dict(D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, DOT_F32=dot_f32,
                       **{k: cfg[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in cfg}))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, thr: torch.Tensor, scale: float) -> torch.Tensor:
    """Thresholded attention forward (see the module docstring): contiguous [B, H, Lq, d] in q's dtype."""
    B, H, LQ, D = q.shape
    out = torch.empty((B, H, LQ, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    thr = thr.to(torch.float32).contiguous()
    launch = forward_launch(q, k, v, thr, out, scale)
    if q.is_cuda:
        with torch.cuda.device(q.device):
            launch()
    else:
        launch()
    return out


def example_launch(dtype: torch.dtype, d: int, *, b: int = 2, h: int = 4, lq: int = 197, lk: int = 197) -> Launch:
    """The GPU launch of one call, built on CPU tensors (ViT-B's 197 tokens by default; sizes matter only through
    Triton's value specializations)."""
    q = torch.zeros((b, h, lq, d), dtype=dtype)
    k = torch.zeros((b, h, lk, d), dtype=dtype)
    thr = torch.zeros((b, h, lq), dtype=torch.float32)
    out = torch.empty_like(q)
    return forward_launch(q, k, k, thr, out, d ** -0.5, device_type="cuda")


def compile_for_gpu(dtype: torch.dtype, d: int, arch: int = 90, **sizes):
    """Compile `example_launch(dtype, d, **sizes)` for CUDA sm_`arch` without a GPU (Triton's CompiledKernel)."""
    if INTERPRETED:
        raise RuntimeError("compile_for_gpu needs kernels defined without TRITON_INTERPRET=1")
    return aot.compile_launch(example_launch(dtype, d, **sizes), arch)

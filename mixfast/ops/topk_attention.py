"""MixedAE homologous attention: each query row attends only to its `topk` highest-scoring keys, without an L x L
score tensor for the whole batch.

`topk_attention(q, k, v, topk, global_rows=1, backend="auto")` computes what `reference.topk_attention` specifies
(scores `s = q k^T / sqrt(d)`; rows >= `global_rows` keep their `topk` largest scores, the CLS row(s) keep all; softmax
over the kept keys; @V). The reference materializes [B, H, Lq, Lk] scores, a mask and the probabilities (and keeps
them for the backward); the fused backends work in row chunks of bounded size (`CHUNK_BYTES` of fp32 scores per
chunk, a few such temporaries at a time):

    chunked    pure torch, any device and float dtype: per row chunk, scores -> per-row threshold (torch.topk) ->
               masked softmax -> @V. Only the [B, H, Lq] thresholds are kept for the backward.
    flex       two passes: (a) the row thresholds in row chunks (`row_thresholds`, chunked torch.topk), then
               (b) `torch.nn.attention.flex_attention` with a `score_mod` that sets scores below the row's threshold
               to -inf. Compiled with torch.compile (MIXFAST_FLEX_COMPILE=0: eager; a compile that fails falls back to
               eager with a warning; eager flex_attention is PyTorch's math path, which does materialize the scores).
               On CUDA the backward is FlexAttention's own; on the CPU FlexAttention has no backward, so the chunked
               backward below is used.
    triton     (a) as flex, then (b) a flash-style Triton forward that drops keys below the threshold
               (kernels/topk_attention.py); CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before it was
               imported. Its backward is the chunked backward below (not a Triton kernel).
    reference  `reference.topk_attention` (materializes everything).

The chunked backward (shared by chunked, triton, and flex on the CPU) recomputes each row chunk's scores, the kept
probabilities `p` from the saved thresholds, and forms dV += p^T dO, dS = p (dO V^T - delta) with
delta = rowsum(dO . p V), dQ = dS K / sqrt(d), dK += dS^T Q / sqrt(d), in float32 (float64 for float64 inputs), two
chunk-sized buffers at a time. Dropped keys get exactly zero gradient from a row, and the selection itself carries
none (as in the reference).

Threshold semantics and ties: a row keeps every key whose score is >= its threshold, the midpoint between its
`topk`-th and `(topk+1)`-th largest scores (-inf for global rows and for topk = Lk). That is exactly the reference's
top-k set whenever those two scores differ (always, in practice, for real-valued scores; the tests use random floats),
and the midpoint leaves half their gap as margin for the different summation orders of the kernels' score
computations. Keys tied with the topk-th score (or within one ulp of it) are all kept, so a row may then keep more
than `topk` keys, where the reference keeps exactly `topk` (torch.topk's choice among the tied).

Precision: scores, softmax and accumulation in float32 (float64 for float64 inputs); the output in q's dtype. The
flex and triton backends take float32, bfloat16 and float16.

Backend choice: `backend="auto"` uses, on CUDA, flex (compiled FlexAttention, fused forward and backward) then
triton then chunked, whichever first runs the call; on any other device chunked. `auto` also follows
MIXFAST_BACKEND: `torch` -> reference, `cpu` -> chunked, `triton` -> triton (loudly unavailable if it cannot run),
`cuda` / `auto` -> the automatic choice (there is no CUDA C++ kernel of this op). A backend named explicitly must
run the call or `BackendUnavailable` is raised.

`topk_accuracy(q, k, segment_ids, topk, global_rows=1)` is MixedAE's logged "TopK accuracy" (the share of kept keys
from the query's own source image), computed in the same row chunks.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator, Tuple

import torch
from torch.autograd.function import once_differentiable

from mixfast.ops import _backend, reference
from mixfast.ops._backend import BackendUnavailable, optional_module
from mixfast.ops.reference import check_segment_ids, check_topk_attention_args

__all__ = ["topk_attention", "topk_accuracy", "row_thresholds", "backend_for", "available_backends", "BACKENDS"]

BACKENDS = ("auto", "reference", "chunked", "flex", "triton")
# One fp32 score chunk [rows, Lk] (over a slice of batch x heads) is at most this many bytes; a chunk holds two such
# buffers at a time (scores / probabilities, dP / dS), plus a bool mask of a quarter of the size.
CHUNK_BYTES = 32 << 20
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_AUTO_PREFERENCE = {"cuda": ("flex", "triton", "chunked")}  # any other device: chunked
_ENV_TO_BACKEND = {"torch": "reference", "cpu": "chunked", "triton": "triton"}
# Devices whose FlexAttention has a backward; elsewhere (CPU, MPS) the chunked backward serves the flex forward.
_FLEX_BACKWARD_DEVICES = ("cuda", "xpu", "hpu")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# row chunks and thresholds
# ---------------------------------------------------------------------------------------------------------------


def _chunks(BH: int, Lq: int, Lk: int, itemsize: int) -> Iterator[Tuple[slice, slice]]:
    """(batch x head slice, row slice) chunks whose score block [bh, rows, Lk] holds at most CHUNK_BYTES (or one row
    of one head, if even that is larger)."""
    budget = max(1, CHUNK_BYTES // itemsize)
    bhc = min(BH, max(1, budget // (Lq * Lk)))
    rc = Lq if budget >= Lq * Lk else min(Lq, max(1, budget // Lk))
    for b0 in range(0, BH, bhc):
        for r0 in range(0, Lq, rc):
            yield slice(b0, min(b0 + bhc, BH)), slice(r0, min(r0 + rc, Lq))


def _chunk_threshold(s: torch.Tensor, topk: int, rows: slice, global_rows: int) -> torch.Tensor:
    """Thresholds [bh, rows] of a score chunk [bh, rows, Lk]: midpoint of the topk-th and (topk+1)-th largest scores
    (-inf where every key is kept: topk = Lk, or a global row)."""
    Lk = s.shape[-1]
    if topk >= Lk:
        thr = torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype, device=s.device)
    else:
        vals = torch.topk(s, topk + 1, dim=-1, sorted=True).values
        thr = (vals[..., topk - 1] + vals[..., topk]) * 0.5
    g = min(global_rows, rows.stop) - rows.start
    if g > 0:
        thr[:, :g] = float("-inf")
    return thr


def _flat(t: torch.Tensor) -> torch.Tensor:
    B, H, L, d = t.shape
    return t.reshape(B * H, L, d)


def _thresholds(q: torch.Tensor, k: torch.Tensor, topk: int, global_rows: int, scale: float) -> torch.Tensor:
    B, H, Lq, _ = q.shape
    acc = _acc(q.dtype)
    qf, kf = _flat(q), _flat(k).to(acc)
    thr = torch.empty((B * H, Lq), dtype=acc, device=q.device)
    for bs, rs in _chunks(B * H, Lq, k.shape[2], torch.finfo(acc).bits // 8):
        s = torch.matmul(qf[bs, rs].to(acc), kf[bs].transpose(1, 2)).mul_(scale)
        thr[bs, rs] = _chunk_threshold(s, topk, rs, global_rows)
    return thr.view(B, H, Lq)


def row_thresholds(q: torch.Tensor, k: torch.Tensor, topk: int, global_rows: int = 1) -> torch.Tensor:
    """Per query row, the score threshold of homologous attention, [B, H, Lq] in float32 (float64 for float64
    inputs): a row keeps the keys with `q.k / sqrt(d) >= threshold` (see the module docstring). Computed in row
    chunks (bounded memory), without gradient."""
    check_topk_attention_args(q, k, k, topk, global_rows, op="row_thresholds")
    with torch.no_grad():
        return _thresholds(q, k, topk, global_rows, q.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------------------------
# chunked torch forward and backward
# ---------------------------------------------------------------------------------------------------------------


def _chunked_forward(q, k, v, topk: int, global_rows: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Lq, d] in q's dtype, thresholds [B, H, Lq] in the accumulation dtype)."""
    B, H, Lq, d = q.shape
    acc = _acc(q.dtype)
    qf, kf, vf = _flat(q), _flat(k).to(acc), _flat(v).to(acc)
    out = torch.empty((B * H, Lq, d), dtype=acc, device=q.device)
    thr = torch.empty((B * H, Lq), dtype=acc, device=q.device)
    for bs, rs in _chunks(B * H, Lq, k.shape[2], torch.finfo(acc).bits // 8):
        s = torch.matmul(qf[bs, rs].to(acc), kf[bs].transpose(1, 2)).mul_(scale)
        t = _chunk_threshold(s, topk, rs, global_rows)
        thr[bs, rs] = t
        p = torch.softmax(s.masked_fill_(s < t[..., None], float("-inf")), dim=-1)
        del s
        out[bs, rs] = torch.matmul(p, vf[bs])
    return out.view(B, H, Lq, d).to(q.dtype), thr.view(B, H, Lq)


def _chunked_backward(q, k, v, thr, dout, scale: float, need_q: bool, need_k: bool, need_v: bool):
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    acc = _acc(q.dtype)
    qf, kf, vf, gf = _flat(q), _flat(k).to(acc), _flat(v).to(acc), _flat(dout)
    tf = thr.reshape(B * H, Lq)
    dq = torch.empty((B * H, Lq, d), dtype=acc, device=q.device) if need_q else None
    dk = torch.zeros((B * H, Lk, d), dtype=acc, device=q.device) if need_k else None
    dv = torch.zeros((B * H, Lk, d), dtype=acc, device=q.device) if need_v else None
    for bs, rs in _chunks(B * H, Lq, Lk, torch.finfo(acc).bits // 8):
        # two [bh, rows, Lk] buffers at a time: the probabilities, and dP turned into dS in place
        qc = qf[bs, rs].to(acc)
        s = torch.matmul(qc, kf[bs].transpose(1, 2)).mul_(scale)
        p = torch.softmax(s.masked_fill_(s < tf[bs, rs][..., None], float("-inf")), dim=-1)
        del s
        go = gf[bs, rs].to(acc)
        if need_v:
            dv[bs] += torch.matmul(p.transpose(1, 2), go)
        if need_q or need_k:
            # rowsum(p * dP) = dO . O, with O recomputed in the accumulation dtype (no third L-wide buffer)
            delta = (go * torch.matmul(p, vf[bs])).sum(-1, keepdim=True)
            ds = torch.matmul(go, vf[bs].transpose(1, 2)).sub_(delta).mul_(p)
            del p
            if need_q:
                dq[bs, rs] = torch.matmul(ds, kf[bs]).mul_(scale)
            if need_k:
                dk[bs] += torch.matmul(ds.transpose(1, 2), qc).mul_(scale)
    return tuple(None if g is None else g.view(B, H, -1, d).to(q.dtype) for g in (dq, dk, dv))


# ---------------------------------------------------------------------------------------------------------------
# flex and triton forwards
# ---------------------------------------------------------------------------------------------------------------

_FLEX_COMPILED = {}  # device type -> compiled callable, or None once compiling failed there


def _flex_module():
    """torch.nn.attention.flex_attention, or None in a torch without it."""
    return optional_module("torch.nn.attention.flex_attention")


def _flex_threshold_attention(q, k, v, thr, scale):
    """FlexAttention whose score_mod drops the scores below each row's threshold (thr [B, H, Lq], float32)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(score >= thr[b, h, q_idx], score, float("-inf"))

    return _flex_module().flex_attention(q, k, v, score_mod=score_mod, scale=scale)


def _flex_eager(q, k, v, thr, scale):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
        return _flex_threshold_attention(q, k, v, thr, scale)


def _flex_compile_wanted() -> bool:
    return os.environ.get("MIXFAST_FLEX_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def _flex_forward(q, k, v, thr, scale):
    """The flex forward, compiled where torch.compile handles it (cached per device type), else eager."""
    thr = thr.to(torch.float32)
    dev = q.device.type
    if not _flex_compile_wanted() or _FLEX_COMPILED.get(dev, True) is None:
        return _flex_eager(q, k, v, thr, scale)
    fn = _FLEX_COMPILED.get(dev)
    if fn is None:
        fn = _FLEX_COMPILED[dev] = torch.compile(_flex_threshold_attention, dynamic=False)
    try:
        return fn(q, k, v, thr, scale)
    except Exception as e:  # noqa: BLE001 - a compiler that fails here (no C++ toolchain, ...) leaves eager flex
        if q.requires_grad or k.requires_grad or v.requires_grad:
            raise  # the compiled graph may already be recorded for autograd: do not hide a failure in training
        _FLEX_COMPILED[dev] = None
        warnings.warn(f"topk_attention: torch.compile of FlexAttention failed on {dev} ({type(e).__name__}: {e}); "
                      "using eager FlexAttention (which materializes the scores)", RuntimeWarning)
        return _flex_eager(q, k, v, thr, scale)


def _triton():
    """kernels.topk_attention, or None if Triton is missing."""
    return optional_module("kernels.topk_attention")


def _triton_forward(q, k, v, thr, scale):
    return _triton().forward(q, k, v, thr, scale)


_FORWARDS = {"flex": _flex_forward, "triton": _triton_forward}


class _TopKAttention(torch.autograd.Function):
    """Forward by `impl` (chunked, or thresholds + a flex / triton forward); backward chunked."""

    @staticmethod
    def forward(ctx, q, k, v, topk: int, global_rows: int, impl: str):
        scale = q.shape[-1] ** -0.5
        if impl == "chunked":
            out, thr = _chunked_forward(q, k, v, topk, global_rows, scale)
        else:
            thr = _thresholds(q, k, topk, global_rows, scale)
            out = _FORWARDS[impl](q.detach(), k.detach(), v.detach(), thr, scale)  # (CPU flex refuses grad inputs)
        ctx.save_for_backward(q, k, v, thr)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, thr = ctx.saved_tensors
        dq, dk, dv = _chunked_backward(q, k, v, thr, dout, ctx.scale, *ctx.needs_input_grad[:3])
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------------------


def _runs(name: str, q: torch.Tensor) -> bool:
    """Whether backend `name` can run a call with these (checked) inputs."""
    if name in ("reference", "chunked"):
        return True
    if q.dtype not in _FUSED_DTYPES:
        return False
    if name == "flex":
        return _flex_module() is not None and q.device.type in ("cuda", "cpu", "xpu", "hpu")
    if name == "triton":
        return _triton() is not None and _triton().supports(q, q, q)
    raise ValueError(f"topk_attention: backend must be one of {', '.join(BACKENDS)}, got backend={name!r}")


def available_backends(q: torch.Tensor) -> Tuple[str, ...]:
    """The backends (other than auto) that can run a call on tensors like `q` here."""
    return tuple(name for name in BACKENDS[1:] if _runs(name, q))


def backend_for(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend `topk_attention(q, ..., backend=backend)` runs: reference, chunked, flex or triton."""
    if backend not in BACKENDS:
        raise ValueError(f"topk_attention: backend must be one of {', '.join(BACKENDS)}, got backend={backend!r}")
    if backend == "auto":
        env = _backend.requested_backend()
        backend = _ENV_TO_BACKEND.get(env, "auto")
    if backend == "auto":
        for name in _AUTO_PREFERENCE.get(q.device.type, ("chunked",)):
            if _runs(name, q):
                return name
        return "chunked"
    if not _runs(backend, q):
        why = ""
        if backend == "triton" and q.device.type == "cpu" and _triton() is not None:
            why = " (Triton runs CPU tensors only when TRITON_INTERPRET=1 was set before it was imported)"
        elif backend == "triton" and _triton() is None:
            why = " (Triton is not installed)"
        elif q.dtype not in _FUSED_DTYPES:
            why = f" (it takes {', '.join(str(t).replace('torch.', '') for t in _FUSED_DTYPES)}, got {q.dtype})"
        raise BackendUnavailable(f"topk_attention: backend {backend!r} cannot run a {q.dtype} call on "
                                 f"{q.device.type} here{why}; available: {', '.join(available_backends(q))}")
    return backend


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, global_rows: int = 1,
                   backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """Homologous TopK attention, ``[B, H, Lq, d]`` in q's dtype: see `reference.topk_attention` for the math and the
    module docstring for the backends, the tie rule and precision. q ``[B, H, Lq, d]``, k and v ``[B, H, Lk, d]``
    (any strides); ``1 <= topk <= Lk``; rows ``< global_rows`` attend to every key. Differentiable in q, k and v.
    ``validate=False`` skips the argument checks (shapes only; nothing here reads tensor values)."""
    if validate:
        check_topk_attention_args(q, k, v, topk, global_rows)
    name = backend_for(q, backend)
    if name == "reference":
        return reference.topk_attention(q, k, v, topk, global_rows)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if name == "flex" and (not needs_grad or q.device.type in _FLEX_BACKWARD_DEVICES):
        # FlexAttention's own autograd where it has one (the selection carries no gradient: thresholds detached)
        with torch.no_grad():
            thr = _thresholds(q, k, topk, global_rows, q.shape[-1] ** -0.5)
        if not needs_grad:  # (CPU flex refuses inputs that require grad, even under no_grad)
            q, k, v = q.detach(), k.detach(), v.detach()
        return _flex_forward(q, k, v, thr, q.shape[-1] ** -0.5)
    return _TopKAttention.apply(q, k, v, topk, global_rows, name)


def topk_accuracy(q: torch.Tensor, k: torch.Tensor, segment_ids: torch.Tensor, topk: int, global_rows: int = 1,
                  validate: bool = True) -> torch.Tensor:
    """MixedAE's TopK accuracy (see `reference.topk_accuracy`): among the keys kept by rows >= global_rows, the share
    whose segment id equals the query's; a float32 scalar tensor on q's device, computed in row chunks without
    gradient, with the threshold rule of the fused backends."""
    if validate:
        check_topk_attention_args(q, k, k, topk, global_rows, op="topk_accuracy")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"topk_accuracy: needs self-attention (Lq == Lk), got Lq={q.shape[2]}, Lk={k.shape[2]}")
        check_segment_ids(segment_ids, q)
    B, H, L, _ = q.shape
    acc = _acc(q.dtype)
    scale = q.shape[-1] ** -0.5
    hits = torch.zeros((), dtype=torch.float64, device=q.device)
    kept = torch.zeros((), dtype=torch.float64, device=q.device)
    with torch.no_grad():
        qf, kf = _flat(q), _flat(k).to(acc)
        seg = segment_ids[:, None].expand(B, H, L).reshape(B * H, L)
        for bs, rs in _chunks(B * H, L, L, torch.finfo(acc).bits // 8):
            r0 = max(rs.start, global_rows)
            if r0 >= rs.stop:
                continue
            rows = slice(r0, rs.stop)
            s = torch.matmul(qf[bs, rows].to(acc), kf[bs].transpose(1, 2)) * scale
            keep = s >= _chunk_threshold(s, topk, rows, global_rows)[..., None]
            same = seg[bs, rows, None] == seg[bs, None, :]
            hits += (keep & same).sum(dtype=torch.float64)
            kept += keep.sum(dtype=torch.float64)
    return (hits / kept).to(torch.float32)

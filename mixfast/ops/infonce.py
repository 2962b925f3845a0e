"""Fused soft-InfoNCE: public op, argument checks, backend dispatch and the autograd.Function.

`soft_infonce(q, keys, queue, pos, tau, exclude=None) -> [M, P]` computes exactly what
`mixfast.ops.reference.soft_infonce` specifies, without ever holding an M x K matrix. With `s = q @ cols.T / tau`:

    MoCo (queue given):  lse_r = logsumexp_j s(q_r, queue_j)        -- once per row, shared by all P terms
                         out_rp = logaddexp(s_rp, lse_r) - s_rp     with s_rp = q_r . keys[pos_rp] / tau
    in-batch (no queue): lse_r = logsumexp_{j != exclude[r]} s(q_r, keys_j)
                         out_rp = lse_r - s_rp

The heavy part, a logsumexp over a column block and its backward, is a *primitive* that every backend provides
(`infonce_chunked.py` defines it): `lse` streams the columns with an online logsumexp; `grads` recomputes tile
logits from the saved lse and returns dq (always) and the column block's gradient (only when asked: the keys, in
MoCo mode through their positives, in in-batch mode also through the softmax; never the queue). The positive
logits (an [M, P] gather) and the logaddexp epilogue are plain torch here, shared by all backends.

Backends (MIXFAST_BACKEND, `_backend.py`):
    cuda    the CUDA C++ kernels in mixfast._C (csrc/cuda/infonce.cu), CUDA tensors
    triton  kernels/infonce.py; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before it was imported
    cpu     infonce_chunked.py: chunked torch, any device, any float dtype (float64 included)
    torch   the reference (materializes M x K)
`auto` tries cuda -> triton -> cpu on a GPU and uses cpu on the CPU. What a kernel does not take (D > 256, float64)
falls back quietly under `auto` and fails loudly when that kernel is asked for by name. Inputs of mixed dtypes are
first promoted to one dtype (torch.promote_types), and the gradients flow back through that cast.

Accuracy at bfloat16 (the bf16 trainer's MoCo call: unit vectors, queue kept in bf16): the dots multiply the bf16
values exactly and accumulate in fp32, the log-sum-exp is fp32, the output is fp32. Against the float64 reference on
the same bf16 values each output term is off by fp32 accumulation only, at most about D * 2^-24 / tau per logit
(tested bound 2e-4 at D = 128, tau = 0.2; measured 7e-7 on the CPU path); gradients come back in bf16, within one bf16
rounding of that. Against the unrounded fp32 vectors, rounding a unit vector to bf16 (unit roundoff 2^-8) moves each
logit by at most (2^-7 + 2^-16) / tau and so each term by at most (2^-6 + 2^-15) / tau: 0.078 at tau = 0.2 in the
worst case, 3e-3 measured on random unit vectors (tests/ops/test_infonce.py, bf16 trainer call).

The primitives are registered as torch.library custom ops with fake implementations, so a torch.compile'd training
step traces through the autograd.Function without graph breaks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from kernels.splits import plan as split_plan
from mixfast.ops import _backend, _native, infonce_chunked
from mixfast.ops import reference

__all__ = ["soft_infonce", "backend_for"]


# ---------------------------------------------------------------------------------------------------------------
# argument checks: every backend relies on these (the kernels only compare pos / exclude, never index with them)
# ---------------------------------------------------------------------------------------------------------------


def _check_args(q, keys, queue, pos, tau, exclude, validate: bool) -> float:
    """The reference's checks. Index ranges are read on the host (a device sync for GPU
    tensors) only when `validate`, and never while torch.compile traces (they would force a
    graph break, and a compiled step was already checked by its eager runs)."""
    return reference.check_soft_infonce_args(q, keys, queue, pos, tau, exclude,
                                             check_values=validate and not torch.compiler.is_compiling())


# ---------------------------------------------------------------------------------------------------------------
# backends: objects with supports(q, cols), lse(...), grads(...) as defined in infonce_chunked.py
# ---------------------------------------------------------------------------------------------------------------


class _Chunked:
    name = "cpu"

    @staticmethod
    def supports(q: torch.Tensor, cols: torch.Tensor) -> bool:
        return True

    lse = staticmethod(infonce_chunked.lse)
    grads = staticmethod(infonce_chunked.grads)


def _triton():
    """kernels.infonce, or None if Triton is missing."""
    return _backend.optional_module("kernels.infonce")


class _NativeCuda:
    """The CUDA kernels of mixfast._C (csrc/cuda/infonce.cu): raw pointers, sizes, strides, a stream.

    Tensors are validated here (CUDA, one dtype, unit column stride, D within the kernels' limit); the binding
    checks the scalar arguments again before it launches."""

    name = "cuda"
    _DTYPE_CODES = _native.DTYPE_CODES

    def __init__(self, lib):
        self.lib = lib

    def supports(self, q: torch.Tensor, cols: torch.Tensor) -> bool:
        return (q.is_cuda and q.dtype in self._DTYPE_CODES and cols.dtype == q.dtype
                and q.shape[1] <= self.lib.infonce_max_dim())

    @staticmethod
    def _plan(extent: int, block: int, programs: int, device: torch.device) -> Tuple[int, int]:
        """(elements per split, splits): the plan the Triton kernels use too (kernels/splits.py)."""
        return split_plan(extent, block, programs,
                          _native.sm_count(device.index if device.index is not None else torch.cuda.current_device()))

    def _problem(self, q, cols, exclude, scale):
        """``_C.InfoNCEProblem``, built once per call for all its launches; positionally, in its ``_fields`` order
        (a keyword call costs several times as much)."""
        return self.lib.InfoNCEProblem(q.data_ptr(), q.stride(0), cols.data_ptr(), cols.stride(0),
                                       exclude.data_ptr() if exclude is not None else 0, q.shape[0], cols.shape[0],
                                       q.shape[1], scale, self._DTYPE_CODES[q.dtype],
                                       torch.cuda.current_stream(q.device).cuda_stream)

    def lse(self, q, cols, exclude, scale):
        M, N = q.shape[0], cols.shape[0]
        if M == 0 or N == 0:
            return torch.full((M,), float("-inf"), dtype=torch.float32, device=q.device)
        block_m, block_n = self.lib.infonce_blocks(q.shape[1])
        per, splits = self._plan(N, block_n, -(-M // block_m), q.device)
        part_max = torch.empty((splits, M), dtype=torch.float32, device=q.device)
        part_sum = torch.empty((splits, M), dtype=torch.float32, device=q.device)
        with torch.cuda.device(q.device):
            self.lib.infonce_lse_partials(self._problem(q, cols, exclude, scale), part_max.data_ptr(),
                                          part_sum.data_ptr(), splits, per)
        return torch.logsumexp(part_max + torch.log(part_sum), dim=0)  # natural-log partials, fixed-order combine

    def grads(self, q, cols, exclude, lse_, gl, pos, gs, scale, in_denom, need_dq, need_dcols):
        M, N, D = q.shape[0], cols.shape[0], q.shape[1]
        dq = dcols = None
        if M == 0 or N == 0 or not (need_dq or need_dcols):
            return (torch.zeros((M, D), dtype=torch.float32, device=q.device) if need_dq else None,
                    torch.zeros((N, D), dtype=torch.float32, device=q.device) if need_dcols else None)
        block_m, block_n = self.lib.infonce_blocks(D)
        lse_ = lse_.float().contiguous() if in_denom else None
        gl = gl.float().contiguous() if in_denom else None
        gs = gs.float().contiguous() if pos is not None else None
        grad = self.lib.InfoNCEGradTerms(lse_.data_ptr() if in_denom else 0, gl.data_ptr() if in_denom else 0,
                                         pos.data_ptr() if pos is not None else 0,
                                         gs.data_ptr() if pos is not None else 0,
                                         pos.shape[1] if pos is not None else 0, in_denom)  # in _fields order
        problem = self._problem(q, cols, exclude if in_denom else None, scale)
        with torch.cuda.device(q.device):
            if need_dq:
                per, splits = self._plan(N, block_n, -(-M // block_m), q.device)
                part = torch.empty((splits, M, D), dtype=torch.float32, device=q.device)
                self.lib.infonce_grad_q_partials(problem, grad, part.data_ptr(), splits, per)
                dq = part.sum(dim=0)  # fixed-order sum of the splits' partials
            if need_dcols:
                per, splits = self._plan(M, block_m, -(-N // block_n), q.device)
                part = torch.empty((splits, N, D), dtype=torch.float32, device=q.device)
                self.lib.infonce_grad_cols_partials(problem, grad, part.data_ptr(), splits, per)
                dcols = part.sum(dim=0)
        return dq, dcols


_CUDA = None  # _NativeCuda once mixfast._C with CUDA soft-InfoNCE kernels was found, False otherwise


def _cuda():
    global _CUDA
    if _CUDA is None:
        lib = _native.native()
        ready = lib is not None and hasattr(lib, "infonce_lse_partials") and _native.cuda_ready()
        _CUDA = _NativeCuda(lib) if ready and lib.infonce_has_cuda() else False
    return _CUDA or None


def _backend_object(name: str):
    return {"cpu": _Chunked, "triton": _triton(), "cuda": _cuda()}[name]


class _Name:
    """A row's implementation in the backend table: its name, which the custom ops carry (the objects themselves are
    found by `_backend_object` inside the op)."""

    def __init__(self, name: str):
        self.name = name


BACKENDS = _backend.Table(
    "soft_infonce",
    rows=[
        _backend.Row(_Name("cuda"), lambda q, cols: q.is_cuda and _cuda() is not None and _cuda().supports(q, cols)),
        _backend.Row(_Name("triton"), lambda q, cols: _triton() is not None and _triton().supports(q, cols)),
        _backend.Row(_Name("cpu"), lambda q, cols: True),  # chunked torch: any device, any float dtype
        _backend.Row(_Name("torch"), lambda q, cols: True),
    ],
    preference={"cuda": ("cuda", "triton", "cpu"), "*": ("cpu",)},  # chunked on every other device (no M x K)
)


def backend_for(q: torch.Tensor, cols: torch.Tensor, requested: Optional[str] = None) -> str:
    """The backend that runs soft_infonce for these (already dtype-unified) inputs: cuda, triton, cpu or torch."""
    requested = requested or _backend.requested_backend()
    if requested == "triton" and not q.is_cuda and not (_triton() and _triton().INTERPRETED):
        raise _backend.BackendUnavailable(
            "MIXFAST_BACKEND=triton was requested for soft_infonce on a CPU tensor: Triton runs on CPU tensors only "
            "in its interpreter, which needs TRITON_INTERPRET=1 set before kernels/infonce.py is imported"
            + ("" if _triton() else " (and Triton is not installed)"))
    return BACKENDS.choose("soft_infonce", q.device.type, q.dtype, q, cols, requested=requested).name


# ---------------------------------------------------------------------------------------------------------------
# the primitives as custom ops (opaque to torch.compile, with fake implementations for tracing)
# ---------------------------------------------------------------------------------------------------------------


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("mixfast::infonce_lse", mutates_args=())
def _lse_op(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], scale: float,
            backend: str) -> torch.Tensor:
    return _backend_object(backend).lse(q, cols, exclude, scale)


@_lse_op.register_fake
def _(q, cols, exclude, scale, backend):
    return q.new_empty((q.shape[0],), dtype=_acc_dtype(q))


@torch.library.custom_op("mixfast::infonce_grads", mutates_args=())
def _grads_op(q: torch.Tensor, cols: torch.Tensor, exclude: Optional[torch.Tensor], lse: Optional[torch.Tensor],
              gl: Optional[torch.Tensor], pos: Optional[torch.Tensor], gs: Optional[torch.Tensor], scale: float,
              in_denom: bool, need_dq: bool, need_dcols: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    dq, dcols = _backend_object(backend).grads(q, cols, exclude, lse, gl, pos, gs, scale, in_denom, need_dq,
                                               need_dcols)
    empty = q.new_empty((0,), dtype=_acc_dtype(q))  # custom ops cannot return None
    return (dq if dq is not None else empty), (dcols if dcols is not None else empty.clone())


@_grads_op.register_fake
def _(q, cols, exclude, lse, gl, pos, gs, scale, in_denom, need_dq, need_dcols, backend):
    acc = _acc_dtype(q)
    dq = q.new_empty(q.shape if need_dq else (0,), dtype=acc)
    dcols = q.new_empty(cols.shape if need_dcols else (0,), dtype=acc)
    return dq, dcols


# ---------------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------------


class SoftInfoNCE(torch.autograd.Function):
    """out [M, P] from q, keys (both differentiable) and the queue (never differentiated).

    All tensors arrive in one dtype with unit column stride (`soft_infonce` sees to it); saved for backward are the
    inputs, the per-row lse [M] and the positive logits [M, P] -- nothing that grows with K."""

    @staticmethod
    def forward(ctx, q, keys, queue, pos, exclude, scale: float, backend: str):
        acc = _acc_dtype(q)
        cols = queue if queue is not None else keys
        lse = _lse_op(q, cols, exclude, scale, backend).to(acc)
        # The positive logits: an [M, P] gather, the same for every backend.
        s = torch.einsum("md,mpd->mp", q.to(acc), keys.to(acc)[pos]) * scale
        if queue is not None:
            out = torch.logaddexp(s, lse[:, None]) - s
        else:
            out = lse[:, None] - s
        ctx.save_for_backward(q, keys, queue, pos, exclude, lse, s)
        ctx.scale, ctx.backend = scale, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, keys, queue, pos, exclude, lse, s = ctx.saved_tensors
        need_q, need_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_q or need_keys):
            return None, None, None, None, None, None, None
        g = grad_out.to(lse.dtype)
        scale, backend = ctx.scale, ctx.backend
        if queue is not None:
            # out = logaddexp(s, lse) - s:  d/dlse = w,  d/ds = -w,  with w = sigmoid(lse - s)
            w = torch.sigmoid(lse[:, None] - s) * g
            gl, gs = w.sum(1), -w
            dq, _ = _grads_op(q, queue, None, lse, gl, None, None, scale, True, need_q, False, backend)
            dq_pos, dkeys = _grads_op(q, keys, None, None, None, pos, gs, scale, False, need_q, need_keys, backend)
            if need_q:
                dq = dq + dq_pos
        else:
            # out = lse - s
            dq, dkeys = _grads_op(q, keys, exclude, lse, g.sum(1), pos, -g, scale, True, need_q, need_keys,
                                  backend)
        return (dq.to(q.dtype) if need_q else None, dkeys.to(keys.dtype) if need_keys else None,
                None, None, None, None, None)


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def soft_infonce(q: torch.Tensor, keys: torch.Tensor, queue: Optional[torch.Tensor], pos: torch.Tensor, tau: float,
                 exclude: Optional[torch.Tensor] = None, *, validate: bool = True) -> torch.Tensor:
    """Per-term InfoNCE cross-entropies [M, P]; the math, shapes and errors of `reference.soft_infonce`.

    Dots in the inputs' dtype (bfloat16 tiles go to the tensor cores on a GPU) with float32 accumulation and a
    float32 log-sum-exp (float64 throughout if any input is float64), without an M x K intermediate; differentiable
    in q and keys, never in the queue. MIXFAST_BACKEND picks the implementation (module docstring).

    `validate=False` skips the index-range checks of `pos` / `exclude`, which read them on the host (a device sync
    for GPU tensors): for index tables the caller built itself, as the training methods do. Out-of-range indices
    are then undefined behaviour."""
    tau = _check_args(q, keys, queue, pos, tau, exclude, validate)
    queue = queue.detach() if queue is not None else None
    tensors = (q, keys) if queue is None else (q, keys, queue)
    common = tensors[0].dtype
    for t in tensors[1:]:
        common = torch.promote_types(common, t.dtype)
    q, keys = _unit_column_stride(q.to(common)), _unit_column_stride(keys.to(common))
    if queue is not None:
        queue = _unit_column_stride(queue.to(common))
    backend = backend_for(q, queue if queue is not None else keys)
    if backend == "torch":
        return reference.soft_infonce(q, keys, queue, pos, tau, exclude)
    return SoftInfoNCE.apply(q, keys, queue, pos.contiguous(), exclude.contiguous() if exclude is not None else None,
                             1.0 / tau, backend)

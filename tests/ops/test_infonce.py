"""soft_infonce backends (chunked torch, Triton, CUDA) against the reference, `mixfast.ops.reference.soft_infonce`.

Backends are parametrized over what this machine has: `cpu` (the chunked torch path) always; `triton` and `cuda` on
a GPU (marked gpu). Triton also runs on the CPU under its interpreter, which must be switched on before Triton
defines the kernels: `test_triton_under_interpreter` reruns this file's triton cases in a subprocess with
TRITON_INTERPRET=1, so the variable never leaks into this process or other tests.

Errors are measured against the reference evaluated in float64 on the same (rounded) inputs: fp32 within a tight
tolerance; bf16 / fp16 at most 2x the error of eager PyTorch computing the same loss in that dtype.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mixfast.ops import _native, infonce, infonce_chunked, reference
from mixfast.ops._backend import BackendUnavailable
from mixfast.ops.infonce import soft_infonce

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _backends():
    names = [pytest.param("cpu", id="cpu")]
    if HAS_GPU:
        names += [pytest.param("triton", marks=gpu, id="triton"), pytest.param("cuda", marks=gpu, id="cuda")]
    elif INTERPRETER:
        names.append(pytest.param("triton", id="triton"))
    return names


BACKENDS = _backends()
MODES = ["moco", "inbatch", "inbatch_exclude"]
TAU = 0.2


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32: TF32 matmuls would put the reference itself 1e-3 off."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _device(backend: str) -> str:
    return "cuda" if backend != "cpu" and HAS_GPU else "cpu"


# ---------------------------------------------------------------------------------------------------------------
# inputs and references
# ---------------------------------------------------------------------------------------------------------------


def _unit(n, d, gen, dtype, device):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype).to(device)


def _inputs(mode, M, N, K, D, P, seed, dtype=torch.float32, device="cpu"):
    """(q, keys, queue, pos, exclude). MoCo: N keys + a K-row queue; in-batch: the K columns are the keys."""
    gen = torch.Generator().manual_seed(seed)
    q = _unit(M, D, gen, dtype, device)
    if mode == "moco":
        keys, queue = _unit(N, D, gen, dtype, device), _unit(K, D, gen, dtype, device)
        n_keys = N
    else:
        keys, queue, n_keys = _unit(K, D, gen, dtype, device), None, K
    pos = torch.randint(0, n_keys, (M, P), generator=gen)
    exclude = None
    if mode == "inbatch_exclude":
        exclude = torch.randint(-1, n_keys, (M,), generator=gen)
        clash = (pos == exclude[:, None]).any(1)
        exclude[clash] = -1  # a positive may not be excluded; these rows exclude nothing
        free = sorted(set(range(n_keys)) - set(pos[0].tolist()))
        exclude[0] = free[0] if free else -1  # at least one row really excludes a column
    return q, keys, queue, pos.to(device), exclude.to(device) if exclude is not None else None


def _run(backend, q, keys, queue, pos, exclude, g, monkeypatch, keys_grad=True, q_grad=True):
    """(out, dq, dkeys) of sum(out * g) through soft_infonce with MIXFAST_BACKEND=backend."""
    monkeypatch.setenv("MIXFAST_BACKEND", backend)
    q = q.detach().clone().requires_grad_(q_grad)
    keys = keys.detach().clone().requires_grad_(keys_grad)
    out = soft_infonce(q, keys, queue, pos, TAU, exclude)
    if q_grad or keys_grad:
        (out * g).sum().backward()
    return out.detach(), q.grad, keys.grad


def _truth(q, keys, queue, pos, exclude, g):
    """The reference in float64 on the very same (possibly rounded) input values."""
    q64 = q.detach().double().requires_grad_()
    k64 = keys.detach().double().requires_grad_()
    out = reference.soft_infonce(q64, k64, queue.double() if queue is not None else None, pos, TAU, exclude)
    (out * g.double()).sum().backward()
    return out.detach(), q64.grad, k64.grad


def _plain_torch(q, keys, queue, pos, exclude, g):
    """Eager PyTorch computing the loss in the inputs' own dtype, no upcast: the baseline for 16-bit errors."""
    q = q.detach().clone().requires_grad_()
    keys = keys.detach().clone().requires_grad_()
    M, P = pos.shape
    if queue is not None:
        neg = q @ queue.t() / TAU
        zeros = torch.zeros(M, dtype=torch.long, device=q.device)
        terms = [F.cross_entropy(torch.cat([(q * keys[pos[:, p]]).sum(1, keepdim=True) / TAU, neg], 1), zeros,
                                 reduction="none") for p in range(P)]
        out = torch.stack(terms, 1)
    else:
        logits = q @ keys.t() / TAU
        if exclude is not None:
            rows = torch.nonzero(exclude >= 0).squeeze(1)
            drop = torch.zeros_like(logits, dtype=torch.bool)
            drop[rows, exclude[rows]] = True
            logits = logits.masked_fill(drop, float("-inf"))
        out = torch.logsumexp(logits, 1, keepdim=True) - logits.gather(1, pos)
    (out.float() * g).sum().backward()
    return out.detach(), q.grad, keys.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


SHAPES = [  # (M, N, K, D): ragged everywhere, D past a power of two and past 128, a single row
    (37, 11, 300, 24),
    (50, 20, 129, 130),
    (1, 3, 17, 16),
    (16, 16, 64, 64),
]


# ---------------------------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_reference(backend, mode, P, shape, monkeypatch):
    M, N, K, D = shape
    if mode != "moco" and K <= P:
        pytest.skip("needs more keys than positives")
    q, keys, queue, pos, exclude = _inputs(mode, M, N, K, D, P, seed=zlib.crc32(repr((mode, P, shape)).encode()),
                                           device=_device(backend))
    g = torch.randn(M, P, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, dq, dk = _run(backend, q, keys, queue, pos, exclude, g.float().to(q.device), monkeypatch)
    t_out, t_dq, t_dk = _truth(q, keys, queue, pos, exclude, g.to(q.device))
    assert out.dtype == torch.float32 and out.shape == (M, P)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq.double(), t_dq, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dk.double(), t_dk, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_within_twice_plain_torch(backend, mode, dtype, monkeypatch):
    M, N, K, D, P = 45, 13, 333, 40, 2
    q, keys, queue, pos, exclude = _inputs(mode, M, N, K, D, P, seed=11, dtype=dtype, device=_device(backend))
    g = torch.randn(M, P, generator=torch.Generator().manual_seed(3)).to(q.device)
    ours = _run(backend, q, keys, queue, pos, exclude, g, monkeypatch)
    plain = _plain_torch(q, keys, queue, pos, exclude, g)
    truth = _truth(q, keys, queue, pos, exclude, g)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, a, b, t in zip(("out", "dq", "dkeys"), ours, plain, truth):
        err, base = _max_err(a, t), _max_err(b, t)
        assert base > 0, f"{name}: plain torch was exact -- the comparison would be meaningless"
        assert err <= 2 * base, f"{name}: error {err:.3g} > 2 x plain torch's {base:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_trainer_call_within_the_documented_bound(backend, monkeypatch):
    """The MoCo loss as the bf16 trainer calls it: unit-norm fp32 queries and keys cast to bf16, a bf16 queue,
    D = 128, tau = 0.2, two weighted positives per mixed row. Bounds of ops/infonce.py: against float64 on the same
    bf16 values, fp32 accumulation only (outputs within 2e-4; gradients, returned in bf16, within one bf16 rounding
    plus that); against the unrounded fp32 inputs, at most (2^-6 + 2^-15) / tau per term (the rounding of unit
    vectors to bf16 moves each logit by at most (2^-7 + 2^-16) / tau)."""
    B, D, K, P = 24, 128, 520, 2
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    dev = _device(backend)
    q32 = _unit(3 * B, D, gen, torch.float32, dev)       # original, Un-Mix and MixMask rows
    k32 = _unit(B, D, gen, torch.float32, dev)
    queue32 = _unit(K, D, gen, torch.float32, dev)
    pos = torch.stack([torch.arange(3 * B) % B, torch.randint(0, B, (3 * B,), generator=gen)], 1).to(dev)
    g = torch.rand(3 * B, P, generator=gen).to(dev)     # the loss weights (lambda, 1 - lambda)
    q, keys, queue = q32.bfloat16(), k32.bfloat16(), queue32.bfloat16()
    out, dq, dk = _run(backend, q, keys, queue, pos, None, g, monkeypatch)
    assert out.dtype == torch.float32 and dq.dtype == torch.bfloat16
    t_out, t_dq, t_dk = _truth(q, keys, queue, pos, None, g)
    assert _max_err(out, t_out) <= 2e-4
    for got, want in ((dq, t_dq), (dk, t_dk)):
        err = (got.double() - want).abs()
        assert bool((err <= 2**-8 * want.abs() + 2e-4 * want.abs().max()).all()), err.max().item()
    exact = _truth(q32, k32, queue32, pos, None, g)[0]
    rounding = _max_err(out, exact)
    assert 0 < rounding <= (2**-6 + 2**-15) / TAU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["keys_frozen", "q_frozen"])
def test_gradients_only_where_asked(backend, mode, which, monkeypatch):
    M, N, K, D, P = 20, 9, 70, 32, 2
    q, keys, queue, pos, exclude = _inputs(mode, M, N, K, D, P, seed=5, device=_device(backend))
    g = torch.randn(M, P, generator=torch.Generator().manual_seed(1)).to(q.device)
    q_grad, keys_grad = which == "keys_frozen", which == "q_frozen"
    out, dq, dk = _run(backend, q, keys, queue, pos, exclude, g, monkeypatch, keys_grad=keys_grad, q_grad=q_grad)
    t_out, t_dq, t_dk = _truth(q, keys, queue, pos, exclude, g)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-5)
    if q_grad:
        assert dk is None
        torch.testing.assert_close(dq.double(), t_dq, rtol=1e-5, atol=2e-5)
    else:
        assert dq is None
        torch.testing.assert_close(dk.double(), t_dk, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_never_receives_a_gradient(backend, monkeypatch):
    q, keys, queue, pos, _ = _inputs("moco", 12, 6, 40, 16, 2, seed=2, device=_device(backend))
    monkeypatch.setenv("MIXFAST_BACKEND", backend)
    q.requires_grad_()
    queue.requires_grad_()
    soft_infonce(q, keys, queue, pos, TAU).sum().backward()
    assert queue.grad is None and q.grad is not None and keys.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queue_and_empty_batch(backend, monkeypatch):
    monkeypatch.setenv("MIXFAST_BACKEND", backend)
    dev = _device(backend)
    q, keys, queue, pos, _ = _inputs("moco", 5, 4, 3, 16, 2, seed=0, device=dev)
    out = soft_infonce(q, keys, queue[:0], pos, TAU)  # K = 0: each term is CE over its positive alone
    assert torch.equal(out, torch.zeros(5, 2, device=dev))
    out = soft_infonce(q[:0], keys, queue, pos[:0], TAU)
    assert out.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_mixed_dtype_inputs(backend, monkeypatch):
    dev = _device(backend)
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(30, 64, generator=gen).to(dev)
    q = F.normalize(wide[:, ::2], dim=1)                       # column stride 2
    keys = F.normalize(torch.randn(9, 80, generator=gen).to(dev), dim=1)[:, :32]  # row stride 80
    queue = F.normalize(torch.randn(32, 50, generator=gen).to(dev).t(), dim=1).to(torch.bfloat16)  # bf16, transposed
    pos = torch.randint(0, 9, (30, 2), generator=gen).to(dev)
    g = torch.randn(30, 2, generator=gen).to(dev)
    out, dq, dk = _run(backend, q, keys, queue, pos, None, g, monkeypatch)
    t_out, t_dq, t_dk = _truth(q, keys, queue.float(), pos, None, g)  # promotion: the queue is used as fp32
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq.double(), t_dq, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dk.double(), t_dk, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_deterministic(backend, monkeypatch):
    q, keys, queue, pos, _ = _inputs("moco", 70, 24, 500, 32, 2, seed=9, device=_device(backend))
    g = torch.randn(70, 2, generator=torch.Generator().manual_seed(0)).to(q.device)
    first = _run(backend, q, keys, queue, pos, None, g, monkeypatch)
    second = _run(backend, q, keys, queue, pos, None, g, monkeypatch)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# the primitives, with the column dimension split into several pieces that must be combined
# ---------------------------------------------------------------------------------------------------------------


def _primitives(backend):
    return {"cpu": infonce._Chunked, "triton": infonce._triton(), "cuda": infonce._cuda()}[backend]


def _forced_split(backend) -> dict:
    """Keyword that makes a backend's primitive cut the columns (or rows) into many pieces, if it has one."""
    return {"cpu": {"chunk": 48}, "triton": {"splits": 5}}.get(backend, {})


def _dense_primitives(q, cols, exclude, pos, gs, gl, scale, in_denom):
    """lse and the gradients of F = [in_denom] sum gl*lse + sum gs*s[pos] by autograd in float64 (M x N dense)."""
    q64 = q.double().requires_grad_()
    c64 = cols.double().requires_grad_()
    s = q64 @ c64.t() * scale
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        mask = torch.zeros_like(s, dtype=torch.bool)
        mask[rows, exclude[rows]] = True
        s_den = s.masked_fill(mask, float("-inf"))
    else:
        s_den = s
    lse = torch.logsumexp(s_den, 1)
    f = (gl.double() * lse).sum() if in_denom else s.new_zeros(())
    if pos is not None:
        f = f + (gs.double() * s.gather(1, pos)).sum()
    dq, dc = torch.autograd.grad(f, (q64, c64), allow_unused=True)
    dq = dq if dq is not None else torch.zeros_like(q64)
    return lse.detach(), dq, dc if dc is not None else torch.zeros_like(c64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["queue", "keys_positives_only", "inbatch_exclude"])
def test_several_column_splits_are_combined(backend, case):
    dev = _device(backend)
    M, N, D, P = 83, 300, 40, 2
    gen = torch.Generator().manual_seed(13)
    q = _unit(M, D, gen, torch.float32, dev)
    cols = _unit(N, D, gen, torch.float32, dev)
    pos = torch.randint(0, N, (M, P), generator=gen).to(dev) if case != "queue" else None
    gs = torch.randn(M, P, generator=gen).to(dev) if pos is not None else None
    gl = torch.rand(M, generator=gen).to(dev)
    exclude = None
    if case == "inbatch_exclude":
        exclude = torch.randint(-1, N, (M,), generator=gen).to(dev)
        exclude[(pos == exclude[:, None]).any(1)] = -1
    in_denom = case != "keys_positives_only"
    prim, split = _primitives(backend), _forced_split(backend)
    scale = 1 / TAU
    t_lse, t_dq, t_dc = _dense_primitives(q, cols, exclude, pos, gs, gl, scale, in_denom)
    if in_denom:
        torch.testing.assert_close(prim.lse(q, cols, exclude, scale, **split).double(), t_lse, rtol=1e-5, atol=1e-5)
    dq, dc = prim.grads(q, cols, exclude, t_lse.float() if in_denom else None, gl if in_denom else None, pos, gs,
                        scale, in_denom, True, True, **split)
    torch.testing.assert_close(dq.double(), t_dq, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(dc.double(), t_dc, rtol=1e-5, atol=5e-5)


def test_chunked_op_combines_many_chunks_at_scale(monkeypatch):
    """At the op level with the production chunk width: K spans several chunks of the queue."""
    M, N, K, D, P = 200, 64, 90_000, 32, 2
    assert K > 2 * infonce_chunked.chunk_columns(M)
    q, keys, queue, pos, _ = _inputs("moco", M, N, K, D, P, seed=21)
    g = torch.randn(M, P, generator=torch.Generator().manual_seed(2))
    out, dq, dk = _run("cpu", q, keys, queue, pos, None, g, monkeypatch)
    t_out, t_dq, t_dk = _truth(q, keys, queue, pos, None, g)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq.double(), t_dq, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dk.double(), t_dk, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# float64 gradient checks
# ---------------------------------------------------------------------------------------------------------------


def _gradcheck_case(mode):
    q, keys, queue, pos, exclude = _inputs(mode, 5, 4, 11, 6, 2, seed=17, dtype=torch.float64)
    return q.requires_grad_(), keys.requires_grad_(), queue, pos, exclude


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_reference_float64(mode):
    q, keys, queue, pos, exclude = _gradcheck_case(mode)
    assert torch.autograd.gradcheck(lambda a, b: reference.soft_infonce(a, b, queue, pos, 0.3, exclude), (q, keys))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_chunked_float64(mode, monkeypatch):
    monkeypatch.setattr(infonce_chunked, "chunk_columns", lambda m: 3)  # 11 columns: four chunks, one ragged
    monkeypatch.setenv("MIXFAST_BACKEND", "cpu")
    q, keys, queue, pos, exclude = _gradcheck_case(mode)
    assert soft_infonce(q, keys, queue, pos, 0.3, exclude).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: soft_infonce(a, b, queue, pos, 0.3, exclude), (q, keys))


# ---------------------------------------------------------------------------------------------------------------
# memory: nothing of size M x K
# ---------------------------------------------------------------------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Records the largest fresh storage (in elements) any aten op returns; views of existing tensors do not count.
    (Temporaries inside one aten kernel are invisible here; the benchmark's peak-RSS measurement covers those.)"""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def _largest_allocation(K, monkeypatch, op_backend=None):
    """Largest allocation of the chunked primitives for an MoCo forward + backward (or, with op_backend, of the
    whole op through that backend -- custom ops hide their insides from the mode, the reference has none)."""
    M, D = 96, 16
    q, keys, queue, pos, _ = _inputs("moco", M, 16, K, D, 2, seed=1)
    with _LargestAllocation() as mode:
        if op_backend is not None:
            monkeypatch.setenv("MIXFAST_BACKEND", op_backend)
            soft_infonce(q.requires_grad_(), keys, queue, pos, TAU).sum().backward()
        else:
            lse = infonce_chunked.lse(q, queue, None, 1 / TAU)
            infonce_chunked.grads(q, queue, None, lse, torch.rand(M), None, None, 1 / TAU, True, True, False)
            infonce_chunked.grads(q, keys, None, None, None, pos, torch.rand(M, 2), 1 / TAU, False, True, True)
    return mode.largest


def test_chunked_path_never_materializes_m_by_k(monkeypatch):
    monkeypatch.setattr(infonce_chunked, "_CHUNK_ELEMENTS", 1 << 16)  # 512-column chunks: many of them at this K
    M = 96
    small, large = 60_000, 120_000
    chunk = M * infonce_chunked.chunk_columns(M)
    assert _largest_allocation(small, monkeypatch) == chunk  # the [M, chunk] scratch buffer, nothing larger ...
    assert _largest_allocation(large, monkeypatch) == chunk  # ... whatever K is
    assert _largest_allocation(small, monkeypatch, op_backend="cpu") < M * small // 4  # the op adds only [M, *]
    assert _largest_allocation(small, monkeypatch, op_backend="torch") >= M * small  # the check sees an M x K


# ---------------------------------------------------------------------------------------------------------------
# dispatch and argument checks
# ---------------------------------------------------------------------------------------------------------------


def test_dispatch_on_cpu(monkeypatch):
    q, keys, queue, pos, _ = _inputs("moco", 8, 4, 16, 8, 1, seed=0)
    monkeypatch.delenv("MIXFAST_BACKEND", raising=False)
    assert infonce.backend_for(q, queue) == "cpu"
    assert infonce.backend_for(q.double(), queue.double()) == "cpu"
    monkeypatch.setenv("MIXFAST_BACKEND", "torch")
    assert torch.equal(soft_infonce(q, keys, queue, pos, TAU), reference.soft_infonce(q, keys, queue, pos, TAU))
    monkeypatch.setenv("MIXFAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        soft_infonce(q, keys, queue, pos, TAU)
    monkeypatch.setenv("MIXFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MIXFAST_BACKEND"):
        soft_infonce(q, keys, queue, pos, TAU)


@pytest.mark.skipif(INTERPRETER, reason="this process runs Triton in its interpreter")
def test_triton_on_cpu_tensors_without_interpreter_fails_loudly(monkeypatch):
    q, keys, queue, pos, _ = _inputs("moco", 8, 4, 16, 8, 1, seed=0)
    monkeypatch.setenv("MIXFAST_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        soft_infonce(q, keys, queue, pos, TAU)


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_backend_runs_or_refuses_float64_and_wide_d(backend, monkeypatch):
    """The chunked path takes any D and float64; a kernel backend asked for by name refuses them (D > 256, float64)
    instead of silently running something else, while `auto` falls back quietly."""
    dev = _device(backend)
    for D, dtype in ((257, torch.float32), (16, torch.float64)):
        q, keys, queue, pos, _ = _inputs("moco", 4, 4, 8, D, 1, seed=0, dtype=dtype, device=dev)
        monkeypatch.setenv("MIXFAST_BACKEND", backend)
        if backend == "cpu":
            torch.testing.assert_close(soft_infonce(q, keys, queue, pos, TAU),
                                       reference.soft_infonce(q, keys, queue, pos, TAU))
        else:
            with pytest.raises(BackendUnavailable):
                soft_infonce(q, keys, queue, pos, TAU)
        monkeypatch.setenv("MIXFAST_BACKEND", "auto")
        torch.testing.assert_close(soft_infonce(q, keys, queue, pos, TAU),
                                   reference.soft_infonce(q, keys, queue, pos, TAU))


def _bad_calls():
    q, keys, queue, pos, _ = _inputs("moco", 4, 4, 10, 8, 1, seed=0)
    ok = dict(q=q, keys=keys, queue=queue, pos=pos, tau=TAU, exclude=None)
    return [
        ("q must be a 2-D", dict(ok, q=q[0])),
        ("q must be a 2-D floating", dict(ok, q=q.long())),
        ("keys must be", dict(ok, keys=keys[:, :5])),
        ("queue must be", dict(ok, queue=queue[:, :5])),
        ("queue must be a 2-D floating", dict(ok, queue=queue.int())),
        ("exclude is only supported", dict(ok, exclude=torch.full((4,), -1))),
        ("pos must be an int64", dict(ok, pos=pos.int())),
        ("pos must be an int64", dict(ok, pos=pos[:, 0])),
        ("pos must be an int64", dict(ok, pos=pos[:3])),
        (r"pos entries must lie in \[0, N=4\)", dict(ok, pos=pos + 4)),
        (r"pos entries must lie", dict(ok, pos=torch.full_like(pos, -1))),
        ("exclude entries", dict(ok, queue=None, exclude=torch.full((4,), 4))),
        ("exclude entries", dict(ok, queue=None, exclude=torch.full((4,), -2))),
        ("exclude must be an int64", dict(ok, queue=None, exclude=torch.full((3,), -1))),
        ("excluded index", dict(ok, queue=None, exclude=pos[:, 0])),
        ("tau must be", dict(ok, tau=0.0)),
        ("tau must be", dict(ok, tau=-1.0)),
        ("tau must be", dict(ok, tau=float("inf"))),
        ("tau must be", dict(ok, tau=float("nan"))),
        ("tau must be", dict(ok, tau=True)),
        ("tau must be", dict(ok, tau=torch.tensor(0.2))),
    ]


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("torch", id="torch")])
@pytest.mark.parametrize("match,kwargs", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise(backend, match, kwargs, monkeypatch):
    monkeypatch.setenv("MIXFAST_BACKEND", backend)
    dev = _device(backend)
    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) and k != "tau" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        soft_infonce(**kwargs)


@pytest.mark.gpu
def test_inputs_on_different_devices_raise():
    q, keys, queue, pos, _ = _inputs("moco", 4, 4, 10, 8, 1, seed=0)
    with pytest.raises(ValueError, match="device"):
        soft_infonce(q.cuda(), keys, queue.cuda(), pos.cuda(), TAU)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, the Triton interpreter, the CUDA sources
# ---------------------------------------------------------------------------------------------------------------


def test_traces_into_one_graph_with_torch_compile(monkeypatch):
    """The kernels are custom ops with fake implementations: a compiled loss needs no graph break."""
    monkeypatch.setenv("MIXFAST_BACKEND", "cpu")
    q, keys, queue, pos, _ = _inputs("moco", 12, 6, 40, 16, 2, seed=3)
    q.requires_grad_()
    torch._dynamo.reset()
    loss = torch.compile(lambda a: soft_infonce(a, keys, queue, pos, TAU).sum(), backend="aot_eager", fullgraph=True)
    (grad,) = torch.autograd.grad(loss(q), q)
    q2 = q.detach().clone().requires_grad_()
    (expect,) = torch.autograd.grad(reference.soft_infonce(q2, keys, queue, pos, TAU).sum(), q2)
    torch.testing.assert_close(grad, expect, rtol=1e-5, atol=2e-5)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the triton cases run on the device, in this process")
@pytest.mark.skipif(INTERPRETER, reason="this process already runs the triton cases under the interpreter")
def test_triton_under_interpreter(triton_cases_in_interpreter):
    """This file's triton-parametrized cases in a subprocess with TRITON_INTERPRET=1 (small sizes, CPU tensors)."""
    print(triton_cases_in_interpreter(__file__, min_passed=50))


def _native_infonce():
    lib = _native.native()
    return lib if lib is not None and hasattr(lib, "infonce_lse_partials") else None


@pytest.mark.skipif(_native_infonce() is None, reason="mixfast._C is not built, or without csrc/bind_infonce.cpp")
def test_native_binding_checks_every_argument_before_it_launches():
    """The C++ API layer rejects bad structs and scalars with ValueError naming the entry point and the argument,
    before anything touches a pointer (so this is safe with the fake addresses below), and only then asks for a
    GPU."""
    lib = _native_infonce()
    assert lib.infonce_max_dim() == 256
    assert tuple(lib.infonce_blocks(128)) == (64, 64) and tuple(lib.infonce_blocks(200)) == (32, 32)
    ok = dict(q=16, q_stride=128, cols=16, cols_stride=128, exclude=0, m=10, n=300, d=128, scale=5.0, dtype=0,
              stream=0)
    terms = dict(lse=16, gl=16, pos=0, gs=0, p=0, in_denom=True)

    def lse(problem=None, **launch):
        launch = {**dict(part_max=16, part_sum=16, splits=5, per_split=64), **launch}
        return lib.infonce_lse_partials(lib.InfoNCEProblem(**{**ok, **(problem or {})}), **launch)

    def grad(entry, problem=None, grad_terms=None, **launch):
        launch = {**dict(out=16, splits=1, per_split=320), **launch}
        return getattr(lib, entry)(lib.InfoNCEProblem(**{**ok, **(problem or {})}),
                                   lib.InfoNCEGradTerms(**{**terms, **(grad_terms or {})}), **launch)

    bad_problems = [(dict(d=257), "d must be in \\[1, 256\\], got 257"), (dict(d=0), "d must be"),
                    (dict(m=0), "m and n"), (dict(n=0), "m and n"), (dict(dtype=3), "dtype code"),
                    (dict(q_stride=100), "row strides"), (dict(cols_stride=100), "row strides"),
                    (dict(q=0), "q must be non-null"), (dict(cols=0), "cols must be non-null"),
                    (dict(scale=float("nan")), "scale"), (dict(scale=0.0), "scale"),
                    (dict(scale=float("inf")), "scale")]
    for change, message in bad_problems:  # every entry point checks the problem
        with pytest.raises(ValueError, match="infonce_lse_partials: .*" + message):
            lse(change)
        for entry in ("infonce_grad_q_partials", "infonce_grad_cols_partials"):
            with pytest.raises(ValueError, match=f"{entry}: .*{message}"):
                grad(entry, change, splits=1, per_split=320)
    bad_launches = [(dict(splits=4), "do not tile"), (dict(splits=6), "do not tile"), (dict(splits=0), "splits"),
                    (dict(per_split=60), "multiple of 64"), (dict(part_max=0), "part_max must be non-null"),
                    (dict(part_sum=0), "part_sum must be non-null")]
    for change, message in bad_launches:
        with pytest.raises(ValueError, match="infonce_lse_partials: .*" + message):
            lse(**change)
    bad_grads = [(dict(gl=0), "lse and gl"), (dict(lse=0), "lse and gl"), (dict(pos=16), "together"),
                 (dict(gs=16), "together"), (dict(pos=16, gs=16, p=0), "p must be")]
    for entry in ("infonce_grad_q_partials", "infonce_grad_cols_partials"):
        for change, message in bad_grads:
            with pytest.raises(ValueError, match=f"{entry}: .*{message}"):
                grad(entry, grad_terms=change)
        with pytest.raises(ValueError, match=f"{entry}: out must be non-null"):
            grad(entry, out=0)
    # dq splits the n=300 columns, dcols the m=10 rows
    with pytest.raises(ValueError, match="do not tile 300"):
        grad("infonce_grad_q_partials", splits=1, per_split=64)
    with pytest.raises(ValueError, match="do not tile 10"):
        grad("infonce_grad_cols_partials", splits=2, per_split=64)
    if not HAS_GPU:
        assert not lib.infonce_has_cuda()
        valid = [lse, lambda: grad("infonce_grad_q_partials"),
                 lambda: grad("infonce_grad_cols_partials", splits=1, per_split=64),
                 lambda: grad("infonce_grad_q_partials", grad_terms=dict(lse=0, gl=0, in_denom=False, pos=16, gs=16,
                                                                         p=2))]
        for call in valid:  # valid arguments: only now does the missing GPU matter
            with pytest.raises(RuntimeError, match="CUDA"):
                call()


@pytest.mark.skipif(INTERPRETER, reason="compiles the GPU code path, which this process replaced by the interpreter")
@pytest.mark.parametrize("dtype,d,arch", [(torch.bfloat16, 128, 80), (torch.bfloat16, 128, 90),
                                          (torch.float32, 128, 90), (torch.float16, 200, 90)],
                         ids=["bf16-d128-sm80", "bf16-d128-sm90", "fp32-d128-sm90", "fp16-d200-sm90"])
def test_triton_gpu_kernels_compile_ahead_of_time(dtype, d, arch):
    """The interpreter runs the kernels with fp32 dots; on a GPU 16-bit tiles go to the tensor cores and tiles are
    larger. Compiling that configuration for sm_80 / sm_90 (no GPU needed) catches what only the GPU path has."""
    pytest.importorskip("triton")
    from kernels import infonce as triton_infonce

    compiled = triton_infonce.compile_for_gpu(dtype, d, arch, exclude=True, p=2, need_dcols=True)
    assert set(compiled) == {"lse", "grad_q", "grad_cols"}
    shared = {name: kernel.metadata.shared for name, kernel in compiled.items()}
    assert all(0 < v <= 160 * 1024 for v in shared.values()), shared  # fits an A100's shared memory

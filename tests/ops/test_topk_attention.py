"""MixedAE homologous TopK attention: the reference against a float64 per-row loop and SDPA, every fused backend
(chunked, flex, triton) against the reference, gradients, dispatch and argument checks.

Backends are parametrized over what this machine has: `chunked` and `flex` always (on the CPU, FlexAttention runs
eagerly unless a test compiles it: compiling takes seconds per shape; on the CPU it has no backward, so the chunked
backward serves it), `triton` on a GPU, or on the CPU under the Triton interpreter: `test_triton_under_interpreter`
reruns this file's triton cases in a subprocess with TRITON_INTERPRET=1.

Tolerances (against the reference evaluated in float64 on the same, already rounded, inputs; outputs and gradients
are O(1)): float32 forward 2e-5 and gradients 1e-4 absolute; bfloat16 forward 3e-2 and gradients 6e-2 absolute
(bf16 output rounding is 2^-8 relative, plus P rounded to bf16 for P @ V in the GPU kernels).
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mixfast.ops import reference as ref
from mixfast.ops._backend import BackendUnavailable
from mixfast.ops.topk_attention import topk_accuracy, topk_attention

tka = importlib.import_module("mixfast.ops.topk_attention")  # the module (the package exports the function by its name)

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available()
DEV = "cuda" if HAS_GPU else "cpu"
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 6e-2)}


def _backends():
    names = [pytest.param("chunked", id="chunked"), pytest.param("flex", id="flex")]
    if HAS_GPU or INTERPRETER:
        names.append(pytest.param("triton", id="triton"))
    return names


BACKENDS = _backends()


@pytest.fixture(autouse=True)
def _eager_flex_no_tf32(monkeypatch):
    """Eager FlexAttention unless a test compiles it; fp32 means fp32 (no TF32 in the reference's matmuls)."""
    monkeypatch.setenv("MIXFAST_FLEX_COMPILE", "0")
    monkeypatch.delenv("MIXFAST_BACKEND", raising=False)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _qkv(b, h, l, d, *, dtype=torch.float32, seed=0, device=DEV, grad=False, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "qkv":  # slices of a fused [B, L, 3, H, d] projection, as a ViT block makes them: non-contiguous
        qkv = torch.randn(b, l, 3, h, d, generator=g).to(device=device, dtype=dtype)
        out = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    else:
        out = [torch.randn(b, h, l, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    return [t.requires_grad_() if grad else t for t in out]


def _naive(q, k, v, topk, global_rows):
    """Float64 per-row loop: Python sorts the scores (no torch.topk), softmax over the kept keys, weighted sum of V."""
    q, k, v = (t.detach().cpu().double() for t in (q, k, v))
    B, H, L, d = q.shape
    out = torch.zeros(B, H, L, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                s = [float((q[b, h, i] * k[b, h, j]).sum()) / math.sqrt(d) for j in range(L)]
                kept = range(L) if i < global_rows else sorted(range(L), key=lambda j: -s[j])[:topk]
                m = max(s[j] for j in kept)
                w = {j: math.exp(s[j] - m) for j in kept}
                z = sum(w.values())
                for j in kept:
                    out[b, h, i] += (w[j] / z) * v[b, h, j]
    return out


def _ref64(q, k, v, topk, global_rows):
    """The reference in float64 on the same (rounded) inputs, with its gradients available."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return q64, k64, v64, ref.topk_attention(q64, k64, v64, topk, global_rows)


# ---------------------------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,topk,global_rows", [(17, 5, 1), (50, 12, 1), (17, 1, 0), (17, 17, 2)])
def test_reference_mask_keeps_exactly_topk_keys(L, topk, global_rows):
    q, k, _ = _qkv(2, 3, L, 8, device="cpu")
    mask = ref.topk_mask(q, k, topk, global_rows)
    assert mask.shape == (2, 3, L, L) and mask.dtype == torch.bool
    assert torch.all(mask[:, :, :global_rows])  # global rows keep every key
    assert torch.equal(mask[:, :, global_rows:].sum(-1), torch.full((2, 3, L - global_rows), topk))


@pytest.mark.parametrize("L,topk,global_rows", [(17, 4, 1), (50, 7, 1), (17, 17, 0), (9, 1, 3)])
def test_reference_equals_float64_loop(L, topk, global_rows):
    q, k, v = _qkv(2, 2, L, 8, dtype=torch.float64, device="cpu", seed=L)
    assert torch.allclose(ref.topk_attention(q, k, v, topk, global_rows), _naive(q, k, v, topk, global_rows),
                          atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("global_rows", [0, 1, 5])
def test_reference_with_all_keys_is_sdpa(dtype, global_rows):
    q, k, v = _qkv(2, 3, 17, 16, dtype=dtype, device="cpu")
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.allclose(ref.topk_attention(q, k, v, 17, global_rows), F.scaled_dot_product_attention(q, k, v),
                          atol=atol, rtol=0)


def test_reference_bf16_is_computed_in_float32():
    q, k, v = _qkv(2, 2, 17, 16, dtype=torch.bfloat16, device="cpu")
    out = ref.topk_attention(q, k, v, 5)
    want = ref.topk_attention(q.float(), k.float(), v.float(), 5).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


# ---------------------------------------------------------------------------------------------------------------
# every backend against the reference
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [(2, 3, 50, 16, 7, 1), (2, 2, 17, 8, 5, 1), (1, 2, 17, 32, 17, 0), (2, 2, 65, 32, 16, 1), (1, 1, 9, 8, 2, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}L{}d{}K{}g{}".format(*s))
def test_backend_matches_reference_forward_and_gradients(backend, dtype, shape):
    B, H, L, d, topk, g = shape
    q, k, v = _qkv(B, H, L, d, dtype=dtype, grad=True, seed=L + d)
    out = topk_attention(q, k, v, topk, g, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    q64, k64, v64, want = _ref64(q, k, v, topk, g)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), gout.double())
    fwd_tol, grad_tol = TOL[dtype]
    assert (out.double() - want).abs().max().item() <= fwd_tol
    for name, got, exp in zip("qkv", grads, want_grads):
        assert got.dtype == dtype and got.shape == exp.shape
        err = (got.double() - exp).abs().max().item()
        assert err <= grad_tol, (name, err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_on_non_contiguous_qkv(backend, dtype):
    q, k, v = _qkv(2, 3, 50, 16, dtype=dtype, grad=True, layout="qkv")
    assert not q.is_contiguous()
    out = topk_attention(q, k, v, 12, 1, backend=backend)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q64, k64, v64, want = _ref64(q, k, v, 12, 1)
    want_grads = torch.autograd.grad(want.square().sum(), (q64, k64, v64))
    fwd_tol, grad_tol = TOL[dtype]
    assert (out.double() - want).abs().max().item() <= fwd_tol
    for got, exp in zip(grads, want_grads):
        assert (got.double() - exp).abs().max().item() <= 2 * grad_tol * max(1.0, exp.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_with_fewer_queries_than_keys_and_odd_head_dim(backend):
    """Lq != Lk (queries attend to a longer key sequence) and d = 24 (not a power of two)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 9, 24, generator=g).to(DEV).requires_grad_()
    k, v = (torch.randn(2, 2, 17, 24, generator=g).to(DEV).requires_grad_() for _ in range(2))
    out = topk_attention(q, k, v, 6, 2, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    q64, k64, v64, want = _ref64(q, k, v, 6, 2)
    assert torch.allclose(want.cpu(), _naive_cross(q, k, v, 6, 2), atol=1e-12)
    want_grads = torch.autograd.grad(want.sum(), (q64, k64, v64))
    assert out.shape == (2, 2, 9, 24) and (out.double() - want).abs().max().item() <= 2e-5
    for got, exp in zip(grads, want_grads):
        assert (got.double() - exp).abs().max().item() <= 1e-4


def _naive_cross(q, k, v, topk, global_rows):
    """Float64 per-row loop for Lq != Lk."""
    q, k, v = (t.detach().cpu().double() for t in (q, k, v))
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                s = (k[b, h] @ q[b, h, i]) / math.sqrt(q.shape[3])
                kept = list(range(k.shape[2])) if i < global_rows else sorted(range(k.shape[2]), key=lambda j: -s[j])[:topk]
                w = torch.softmax(s[kept], 0)
                out[b, h, i] = w @ v[b, h, kept]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_with_all_keys_is_sdpa_and_cls_row_is_global(backend):
    q, k, v = _qkv(2, 3, 50, 16)
    full = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(topk_attention(q, k, v, 50, 0, backend=backend), full, atol=2e-5, rtol=0)
    # topk < L: the CLS row (row 0) still attends to every key, the other rows do not
    out = topk_attention(q, k, v, 5, 1, backend=backend)
    assert torch.allclose(out[:, :, 0], full[:, :, 0], atol=2e-5, rtol=0)
    assert (out[:, :, 1:] - full[:, :, 1:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")] + BACKENDS)
def test_dropped_keys_get_zero_gradient(backend):
    """A key no row keeps (global_rows = 0) gets exactly zero k and v gradient; so does every key that the reference
    mask shows no row keeping."""
    B, H, L, d = 2, 2, 17, 8
    q, k, v = _qkv(B, H, L, d, device="cpu")
    q = q.abs() + 0.1  # every query has positive entries ...
    k[:, :, 3] = -5.0  # ... so key 3 scores lowest for every row
    q, k, v = (t.to(DEV).requires_grad_() for t in (q, k, v))
    out = topk_attention(q, k, v, 4, 0, backend=backend)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEV))
    never = ~ref.topk_mask(q.detach(), k.detach(), 4, 0).any(dim=2)  # [B, H, Lk]: kept by no row
    assert bool(never[:, :, 3].all()) and int(never.sum()) > B * H
    assert torch.all(k.grad[never] == 0) and torch.all(v.grad[never] == 0)
    assert torch.all(k.grad[~never].abs().sum(-1) > 0) and torch.all(v.grad[~never].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_row_keeps_exactly_topk_keys(backend):
    """With V the identity (one value dimension per key), the output row is the row's attention distribution: exactly
    topk non-zero entries per non-global row, all L for the CLS row."""
    B, H, L, topk = 1, 2, 32, 6
    q, k, _ = _qkv(B, H, L, 32)
    v = torch.eye(L, device=DEV).expand(B, H, L, L).contiguous()
    p = topk_attention(q, k, v, topk, 1, backend=backend)
    assert torch.equal((p[:, :, 1:] > 0).sum(-1), torch.full((B, H, L - 1), topk, device=DEV))
    assert bool((p[:, :, 0] > 0).all())
    assert torch.equal(p[:, :, 1:] > 0, ref.topk_mask(q, k, topk, 1)[:, :, 1:])


def test_ties_keep_every_key_tied_with_the_kth_score():
    """Documented difference: with all scores equal (q = 0), the threshold path keeps every key (the mean of V),
    while the reference keeps exactly topk of them."""
    q, k, v = _qkv(1, 1, 9, 8, device="cpu")
    q = torch.zeros_like(q)
    out = topk_attention(q, k, v, 3, 0, backend="chunked")
    assert torch.allclose(out, v.mean(2, keepdim=True).expand_as(out), atol=1e-6)
    assert torch.equal(ref.topk_mask(q, k, 3, 0).sum(-1), torch.full((1, 1, 9), 3))


def test_row_chunks_agree_with_one_chunk(monkeypatch):
    """Small chunks (split over batch x heads and over rows) give what one chunk gives, and stay within the byte
    budget."""
    q, k, v = _qkv(2, 3, 50, 16, device="cpu", grad=True)
    want = ref.topk_attention(q, k, v, 7, 14)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for budget in (50 * 4 * 12, 50 * 50 * 4 * 2):  # 12 rows of one head (a global row range crossing); two heads
        monkeypatch.setattr(tka, "CHUNK_BYTES", budget)
        chunks = list(tka._chunks(6, 50, 50, 4))
        assert all((bs.stop - bs.start) * (rs.stop - rs.start) * 50 * 4 <= budget for bs, rs in chunks)
        assert len(chunks) > 1
        out = topk_attention(q, k, v, 7, 14, backend="chunked")
        assert torch.allclose(out, want, atol=2e-6)
        for got, exp in zip(torch.autograd.grad(out.sum(), (q, k, v)), want_grads):
            assert torch.allclose(got, exp, atol=1e-5)
        assert torch.equal(tka.row_thresholds(q, k, 7, 14), tka._chunked_forward(q, k, v, 7, 14, 0.25)[1])


def test_compiled_flex_forward_and_chunked_backward(monkeypatch):
    """The flex backend with torch.compile (one shape: compiling takes seconds on the CPU)."""
    monkeypatch.setenv("MIXFAST_FLEX_COMPILE", "1")
    q, k, v = _qkv(2, 2, 50, 16, grad=True)
    out = topk_attention(q, k, v, 12, 1, backend="flex")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = ref.topk_attention(q, k, v, 12, 1)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    assert torch.allclose(out, want, atol=2e-5, rtol=0)
    for got, exp in zip(grads, want_grads):
        assert torch.allclose(got, exp, atol=1e-4, rtol=0)
    assert tka._FLEX_COMPILED.get(q.device.type) is not None  # it compiled (no fallback to eager)


# ---------------------------------------------------------------------------------------------------------------
# TopK accuracy
# ---------------------------------------------------------------------------------------------------------------


def test_topk_accuracy_matches_reference_and_a_loop():
    B, H, L, topk, g = 2, 3, 17, 5, 1
    q, k, _ = _qkv(B, H, L, 8, device="cpu")
    seg = torch.randint(0, 4, (B, L), generator=torch.Generator().manual_seed(0))
    seg[:, 0] = -1  # CLS
    mask = ref.topk_mask(q, k, topk, g)
    hits = kept = 0
    for b in range(B):
        for h in range(H):
            for i in range(g, L):
                for j in range(L):
                    if mask[b, h, i, j]:
                        kept += 1
                        hits += int(seg[b, i] == seg[b, j])
    want = hits / kept
    assert kept == B * H * (L - g) * topk
    assert abs(ref.topk_accuracy(q, k, seg, topk, g).item() - want) < 1e-6
    assert abs(topk_accuracy(q, k, seg, topk, g).item() - want) < 1e-6
    # every token (CLS included) labelled with one source: accuracy 1
    same = torch.zeros_like(seg)
    assert topk_accuracy(q, k, same, topk, g).item() == 1.0


# ---------------------------------------------------------------------------------------------------------------
# dispatch and argument checks
# ---------------------------------------------------------------------------------------------------------------


def test_auto_dispatch_and_env(monkeypatch):
    q = torch.zeros(1, 1, 4, 8, device=DEV)
    assert tka.backend_for(q) == ("flex" if HAS_GPU else "chunked")
    assert tka.backend_for(q.cpu()) == "chunked"
    assert tka.backend_for(q.double()) == "chunked"
    monkeypatch.setenv("MIXFAST_BACKEND", "torch")
    assert tka.backend_for(q) == "reference"
    monkeypatch.setenv("MIXFAST_BACKEND", "cpu")
    assert tka.backend_for(q) == "chunked"
    monkeypatch.setenv("MIXFAST_BACKEND", "cuda")  # no CUDA C++ kernel of this op: the automatic choice
    assert tka.backend_for(q.cpu()) == "chunked"
    assert tka.backend_for(q, "flex") == "flex"  # an explicit argument wins over the variable


def test_named_backend_that_cannot_run_fails_loudly():
    q, k, v = _qkv(1, 1, 9, 8, dtype=torch.float64, device="cpu")
    with pytest.raises(BackendUnavailable, match="flex"):
        topk_attention(q, k, v, 3, backend="flex")
    assert torch.allclose(topk_attention(q, k, v, 3, backend="chunked"), ref.topk_attention(q, k, v, 3), atol=1e-12)
    if not INTERPRETER and tka._triton() is not None:
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            topk_attention(q.float(), k.float(), v.float(), 3, backend="triton")


@pytest.mark.parametrize("fn", [topk_attention, ref.topk_attention], ids=["fused", "reference"])
def test_bad_arguments_name_the_argument(fn):
    q, k, v = _qkv(2, 2, 9, 8, device="cpu")
    for topk in (0, 10, True, 2.0):
        with pytest.raises(ValueError, match="topk"):
            fn(q, k, v, topk)
    for g in (-1, 10, 1.0):
        with pytest.raises(ValueError, match="global_rows"):
            fn(q, k, v, 3, g)
    with pytest.raises(ValueError, match="k must be"):
        fn(q, k[..., :4], v, 3)
    with pytest.raises(ValueError, match="k must be"):
        fn(q, k[:1], v, 3)
    with pytest.raises(ValueError, match="v must have"):
        fn(q, k, v[:, :, :5], 3)
    with pytest.raises(ValueError, match="one dtype"):
        fn(q, k.double(), v, 3)
    with pytest.raises(ValueError, match="q must be"):
        fn(q[0], k, v, 3)
    with pytest.raises(ValueError, match="v must be"):
        fn(q, k, v.long(), 3)


def test_bad_backend_and_segment_ids():
    q, k, v = _qkv(2, 2, 9, 8, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        topk_attention(q, k, v, 3, backend="cuda")
    for fn in (topk_accuracy, ref.topk_accuracy):
        with pytest.raises(ValueError, match="segment_ids"):
            fn(q, k, torch.zeros(2, 8, dtype=torch.long), 3)
        with pytest.raises(ValueError, match="segment_ids"):
            fn(q, k, torch.zeros(2, 9, dtype=torch.int32), 3)
        with pytest.raises(ValueError, match="topk"):
            fn(q, k, torch.zeros(2, 9, dtype=torch.long), 0)


# ---------------------------------------------------------------------------------------------------------------
# the Triton kernel: interpreter cases, and the GPU compile without a GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the triton cases run on the device, in this process")
@pytest.mark.skipif(INTERPRETER, reason="this process already runs the triton cases under the interpreter")
def test_triton_under_interpreter(triton_cases_in_interpreter):
    """This file's triton-parametrized cases in a subprocess with TRITON_INTERPRET=1 (CPU tensors)."""
    print(triton_cases_in_interpreter(__file__, min_passed=16))


@pytest.mark.skipif(INTERPRETER, reason="kernels defined in interpreter mode cannot be compiled for a GPU")
@pytest.mark.parametrize("arch,smem", [(80, 163 * 1024), (90, 227 * 1024)], ids=["sm80", "sm90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_kernel_compiles_for_sm80_and_sm90_without_spills(dtype, arch, smem):
    """The forward kernel as the op launches it (ViT-B: d = 64, 197 tokens; the demo's d = 32) compiles for sm_80
    (A100) and sm_90 (H100/H200), fits in that GPU's shared memory per block and uses no local memory (stack or
    spills, from ptxas -v)."""
    kt = pytest.importorskip("kernels.topk_attention")
    from kernels import aot

    for d in (32, 64):
        compiled = kt.compile_for_gpu(dtype, d, arch)
        assert compiled.metadata.target.arch == arch
        assert 0 < compiled.metadata.shared <= smem
        usage = aot.resource_usage(compiled)
        assert not (usage["stack"] or usage["spill_stores"] or usage["spill_loads"]), (dtype, d, usage)

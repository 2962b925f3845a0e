"""SplitBatchNorm against its definition, in both memory formats.

The oracle is independent of the module's code: group g (samples n with n % s == g) goes
through its own native F.batch_norm with its own copy of the running statistics, and the
module's running statistics must be the mean of the groups'. Inputs are fresh random draws
(seeded per test) with a non-zero mean, so the statistics are not trivially centred.

Tolerances: float32 round-off. Outputs and input gradients are O(1) and are compared at
atol 2e-5 (a few ulps after summing ~10^3 terms in another order); weight/bias gradients are
sums over a whole batch, O(10), compared at rtol 1e-5 / atol 1e-4; running statistics at 1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mixfast.models import SplitBatchNorm, convert_to_split_bn

CL = torch.channels_last
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": CL}


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _input(shape, layout, seed, dtype=torch.float32, mean=1.5, std=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean
    return x.to(dtype).contiguous(memory_format=LAYOUTS[layout])


def _module(c, splits, seed, momentum=0.1):
    gen = torch.Generator().manual_seed(seed + 1)
    bn = SplitBatchNorm(c, splits, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return bn


class Reference:
    """Each group through its own native BatchNorm (train mode) with its own running stats."""

    def __init__(self, bn: SplitBatchNorm):
        self.splits = bn.num_splits
        self.weight = bn.weight.detach().clone().requires_grad_()
        self.bias = bn.bias.detach().clone().requires_grad_()
        self.running = [(bn.running_mean.clone(), bn.running_var.clone()) for _ in range(self.splits)]
        self.momentum, self.eps, self.steps = bn.momentum, bn.eps, int(bn.num_batches_tracked)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.splits
        if x.shape[0] % s:  # the module's fallback: one BatchNorm over the whole batch
            mean, var = self.running_mean().clone(), self.running_var().clone()
            self.steps += 1
            out = F.batch_norm(x, mean, var, self.weight, self.bias, True, self._factor(), self.eps)
            self.running = [(mean.clone(), var.clone()) for _ in range(s)]
            return out
        self.steps += 1
        parts = []
        for g in range(s):
            mean, var = self.running[g]
            parts.append(F.batch_norm(x[g::s], mean, var, self.weight, self.bias, True, self._factor(), self.eps))
        return torch.stack(parts, 1).reshape(x.shape)  # row n = i * s + g

    def _factor(self):
        return self.momentum if self.momentum is not None else 1.0 / self.steps

    def running_mean(self):
        return torch.stack([m for m, _ in self.running]).mean(0)

    def running_var(self):
        return torch.stack([v for _, v in self.running]).mean(0)


def _forward_backward(module_or_ref, x, grad):
    x = x.detach().clone().requires_grad_()
    out = module_or_ref(x)
    out.backward(grad)
    return out, x.grad


def _assert_matches(bn, ref, out, out_ref, gx, gx_ref):
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn.running_var, ref.running_var(), atol=1e-6, rtol=1e-6)
    assert int(bn.num_batches_tracked) == ref.steps


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,splits", [(16, 4), (16, 8), (8, 1), (6, 4), (10, 4)])
def test_train_mode_matches_per_group_batch_norm(layout, n, splits):
    """Values, gradients (input, weight, bias) and running statistics over three steps;
    n = 6 and 10 with 4 splits take the whole-batch fallback."""
    c, h, w = 5, 6, 7
    bn = _module(c, splits, seed=n * 10 + splits)
    ref = Reference(bn)
    for step in range(3):
        x = _input((n, c, h, w), layout, seed=100 * step + n + splits)
        grad = _input((n, c, h, w), layout, seed=100 * step + 7, mean=0.0, std=1.0)
        bn.zero_grad()
        ref.weight.grad = ref.bias.grad = None
        out, gx = _forward_backward(bn, x, grad)
        out_ref, gx_ref = _forward_backward(ref, x, grad)
        _assert_matches(bn, ref, out, out_ref, gx, gx_ref)
        assert _is_cl(out) == (layout == "channels_last") and _is_cl(gx) == (layout == "channels_last")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_momentum_none_is_a_cumulative_average(layout):
    bn = _module(4, 2, seed=3, momentum=None)
    bn.num_batches_tracked.fill_(2)  # as if two batches had been seen
    ref = Reference(bn)
    for step in range(2):
        x = _input((8, 4, 5, 5), layout, seed=step)
        grad = torch.ones_like(x)
        bn.zero_grad()
        ref.weight.grad = ref.bias.grad = None
        out, gx = _forward_backward(bn, x, grad)
        out_ref, gx_ref = _forward_backward(ref, x, grad)
        _assert_matches(bn, ref, out, out_ref, gx, gx_ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("splits", [1, 4])
def test_eval_mode_is_batch_norm_with_the_running_statistics(layout, splits):
    bn = _module(5, splits, seed=1).eval()
    plain = torch.nn.BatchNorm2d(5).eval()
    plain.load_state_dict(bn.state_dict())
    x = _input((8, 5, 4, 4), layout, seed=2)
    out = bn(x)
    torch.testing.assert_close(out, plain(x), atol=0, rtol=0)
    assert _is_cl(out) == (layout == "channels_last")
    assert int(bn.num_batches_tracked) == 0


def test_state_dict_keys_are_batch_norms():
    assert list(SplitBatchNorm(3, 4).state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())


def test_convert_keeps_the_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].weight.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_split_bn(model, 4)
    assert isinstance(model[1], SplitBatchNorm) and model[1].num_splits == 4
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_statistics_of_a_large_mean_do_not_cancel():
    """Mean 100, std 1: E[x²] - E[x]² in float32 would lose ~4 of the variance's 7 digits;
    the two-pass statistics must stay within float32 round-off of a float64 computation."""
    bn = _module(3, 4, seed=5)
    x = _input((16, 3, 8, 8), "channels_last", seed=6, mean=100.0, std=1.0)
    out = bn(x)
    want = F.batch_norm(x.double()[0::4], None, None, bn.weight.double(), bn.bias.double(), True, 0.0, bn.eps)
    torch.testing.assert_close(out[0::4].double(), want, atol=1e-4, rtol=0)


def test_bfloat16_channels_last_stays_bfloat16_and_accurate():
    """bf16 activations (autocast): statistics in float32, output rounded once to bf16.
    Compared with float64 batch norm of the same bf16 values: within two bf16 ulps of O(4)."""
    bn = _module(6, 4, seed=7)
    x = _input((16, 6, 5, 5), "channels_last", seed=8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(x)
    assert out.dtype == torch.bfloat16 and _is_cl(out)
    ref = Reference(bn)
    ref.weight, ref.bias = ref.weight.double(), ref.bias.double()
    ref.running = [(m.double(), v.double()) for m, v in ref.running]
    want = ref(x.double())
    torch.testing.assert_close(out.double(), want, atol=2 * 2 ** -6, rtol=0)


class _ActivationSizedTensors(TorchDispatchMode):
    """Records every 4-D tensor with `numel` elements that an op creates."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.created = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.numel() == self.numel:
                self.created.append((str(func), _is_cl(t)))
        return out


def test_channels_last_has_no_layout_round_trip():
    """Forward and backward of a channels_last batch create no NCHW activation-sized
    tensor: no transposing copy into the folded (n / s, s * c, h, w) layout and back."""
    bn = _module(8, 4, seed=9)
    x = _input((16, 8, 6, 6), "channels_last", seed=10).requires_grad_()
    grad = _input((16, 8, 6, 6), "channels_last", seed=11)
    with _ActivationSizedTensors(x.numel()) as mode:
        bn(x).backward(grad)
    assert mode.created, "nothing recorded: the dispatch mode did not see the ops"
    nchw = [name for name, is_cl in mode.created if not is_cl]
    assert not nchw, f"NCHW activation-sized tensors created: {nchw}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_affine_parameters(layout):
    bn = SplitBatchNorm(4, 4, affine=False)
    x = _input((16, 4, 5, 5), layout, seed=12).requires_grad_()
    grad = _input((16, 4, 5, 5), layout, seed=13, mean=0.0, std=1.0)
    out = bn(x)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    want = torch.stack([F.batch_norm(x_ref[g::4], None, None, None, None, True, 0.0, bn.eps) for g in range(4)], 1)
    want = want.reshape(x.shape)
    want.backward(grad)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=2e-5, rtol=1e-5)
    assert _is_cl(out) == (layout == "channels_last")

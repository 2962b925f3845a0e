"""SplitBatchNorm: per-group batch statistics on one device, emulating shuffle-BN.

MoCo's shuffle-BN stops the query/key encoders from cheating through BatchNorm statistics
shared within one GPU's batch. On a single process there is nothing to shuffle across, so
(as in the official MoCo CIFAR demo) the batch is split into `num_splits` groups with their
own statistics. Group g holds samples n with n % num_splits == g (MoCo's in-batch key
shuffle relies on exactly this grouping). Running statistics are the mean over groups, so
the module is a drop-in BatchNorm2d in eval mode and its state_dict has BatchNorm2d's keys.

Memory format: the output has the input's memory format. An NCHW batch folds the groups
into channels, `x.view(n // s, s * c, h, w)` (a free view), for the native batch-norm kernel.
For channels_last that fold is a full transposing copy (channels are innermost, groups
outermost), the native kernel then returns NCHW and the next convolution copies it back,
and the backward repeats both copies. So a channels_last batch takes `_SplitBatchNormFn`:
per-sample channel sums (a coalesced reduction over h, w in either layout) added up per
group on the small [n, c] result, and elementwise passes that write into tensors laid out
like x, through the free view `x.view(n // s, s, c, h, w)`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _group_sums(t: torch.Tensor, splits: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, c, h, w] -> [splits, c]: sums over the samples n ≡ g (mod splits) and over h, w.

    Summing h, w per sample first keeps the big reduction coalesced in both layouts (a
    reduction of the 5-D group view over dims (0, 3, 4) is not, and torch.var_mean over it
    runs at ~5 ns per element on CPU, 20-100x slower than these sums).
    """
    n, c = t.shape[:2]
    return t.sum((2, 3), dtype=dtype).view(n // splits, splits, c).sum(0)


class _SplitBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm with statistics per (group, channel), layout-preserving.

    forward(x, weight, bias, splits, eps) -> (out, sum_x, sum_sq): out has x's dtype and
    strides; sum_x = Σ x and sum_sq = Σ (x - mean)² per (group, channel), [splits, c], in
    float32 (float64 for float64 x) and without gradient: the module turns them into its
    running statistics. Two-pass statistics (the mean, then the centred sum of squares), as
    the native kernels, so a large mean does not cancel the variance.

    With m = values per (group, channel) and r = 1 / sqrt(sum_sq + eps·m) (so that
    invstd = r·sqrt(m)), the backward is batch norm's gradient written out in terms of the
    saved centred input xc:  dx = k·dy - k·Σdy/m - k·r²·Σ(dy·xc)·xc,  k = weight·invstd.
    The scalars 1/m and sqrt(m) ride on `alpha` / `value` arguments instead of extra small
    ops on the [splits, c] tensors.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                splits: int, eps: float):
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) gradients
        with torch.autocast(x.device.type, enabled=False):  # the dtypes below are chosen here
            n, c, h, w = x.shape
            shape5, stat5 = (n // splits, splits, c, h, w), (splits, c, 1, 1)  # splitting dim 0: a view in any layout
            count = (n // splits) * h * w
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            sum_x = _group_sums(x, splits, acc)
            centred = torch.empty_like(x)  # preserve_format: x's strides, so its 5-D view is free
            torch.add(x.view(shape5), sum_x.view(stat5), alpha=-1.0 / count, out=centred.view(shape5))
            sum_sq = _group_sums(centred * centred, splits, acc)
            r = torch.rsqrt(sum_sq + eps * count)
            out = torch.empty_like(x)
            # out = centred·weight·invstd + bias, computed in `acc`, rounded once to x.dtype.
            scale = r if weight is None else r * weight
            if bias is None:
                torch.mul(centred.view(shape5), (scale * math.sqrt(count)).view(stat5), out=out.view(shape5))
            else:
                torch.addcmul(bias.view(c, 1, 1), centred.view(shape5), scale.view(stat5), value=math.sqrt(count),
                              out=out.view(shape5))
        ctx.save_for_backward(centred, scale, r)  # scale = weight·r = k / sqrt(m)
        ctx.splits, ctx.count = splits, count
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(sum_x, sum_sq)
        return out, sum_x, sum_sq

    @staticmethod
    def backward(ctx, grad_out: Optional[torch.Tensor], _grad_sum_x, _grad_sum_sq):
        if grad_out is None:
            return None, None, None, None, None
        with torch.autocast(grad_out.device.type, enabled=False):
            centred, kr, r = ctx.saved_tensors  # kr = k / sqrt(m)
            splits, count = ctx.splits, ctx.count
            n, c, h, w = centred.shape
            shape5, stat5 = (n // splits, splits, c, h, w), (splits, c, 1, 1)
            root = math.sqrt(count)
            sum_dy = _group_sums(grad_out, splits, r.dtype)
            sum_dy_xc = _group_sums(grad_out * centred, splits, r.dtype)
            r_sum_dy_xc = sum_dy_xc * r  # Σ(dy·xc)·invstd / sqrt(m)
            grad_x = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                a = (kr * r).mul_(r_sum_dy_xc)  # k·r²·Σ(dy·xc) / sqrt(m): the coefficient of xc, over -sqrt(m)
                b = torch.mul(kr, sum_dy).mul_(-1.0 / root)  # -k·Σdy/m
                grad_x = torch.empty_like(centred)
                gx5 = grad_x.view(shape5)
                torch.addcmul(b.view(stat5), centred.view(shape5), a.view(stat5), value=-root, out=gx5)
                gx5.addcmul_(grad_out.view(shape5), kr.view(stat5), value=root)
            if ctx.weight_dtype is not None and ctx.needs_input_grad[1]:
                grad_weight = r_sum_dy_xc.sum(0).mul_(root).to(ctx.weight_dtype)  # Σ dy·xc·invstd
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = sum_dy.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


def _is_channels_last(x: torch.Tensor) -> bool:
    # Strictly: with h = w = 1 a tensor is both, and the NCHW fold is free.
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        splits = self.num_splits
        if not self.training or splits == 1 or n % splits != 0:
            # Eval, or a batch that cannot be split evenly (e.g. after skipped images):
            # ordinary BatchNorm over the whole batch (native; keeps the memory format).
            return super().forward(x)
        self._check_input_dim(x)
        if not _is_channels_last(x):
            return self._forward_folded(x)
        count = x.numel() // (splits * x.shape[1])  # values per (group, channel)
        if count < 2:  # as F.batch_norm: a variance needs two values
            raise ValueError(f"Expected more than 1 value per channel and group when training, "
                             f"got input size {list(x.shape)} with {splits} groups")
        out, sum_x, sum_sq = _SplitBatchNormFn.apply(x, self.weight, self.bias, splits, self.eps)
        if self.track_running_stats:
            # addmv is on autocast's low-precision list; these updates stay in float32.
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                self.num_batches_tracked.add_(1)
                # BatchNorm2d's factor: momentum, or a cumulative average when momentum is None.
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                # Each group updates as BatchNorm does (unbiased var); the module keeps the groups' mean:
                # r ← (1 - f)·r + f·mean_g(stat_g) with mean_g(mean) = Σx / (s·m) and
                # mean_g(var) = Σxc² / (s·(m-1)); the sum over groups is a matrix-vector product, so
                # each buffer takes one op.
                ones = sum_x.new_ones(splits)
                self.running_mean.addmv_(sum_x.t(), ones, beta=1 - factor, alpha=factor / (splits * count))
                self.running_var.addmv_(sum_sq.t(), ones, beta=1 - factor, alpha=factor / (splits * (count - 1)))
        return out

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW (or any non-channels_last) input: groups folded into channels, native kernel."""
        n, c, h, w = x.shape
        splits = self.num_splits
        track = self.track_running_stats
        mean_split = self.running_mean.repeat(splits) if track else None
        var_split = self.running_var.repeat(splits) if track else None
        weight = self.weight.repeat(splits) if self.weight is not None else None
        bias = self.bias.repeat(splits) if self.bias is not None else None
        if track:
            self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # reshape: a view for NCHW, a copy for other strides.
        out = F.batch_norm(x.reshape(n // splits, c * splits, h, w), mean_split, var_split, weight, bias,
                           True, factor, self.eps).view(n, c, h, w)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean_split.view(splits, c).mean(0))
                self.running_var.copy_(var_split.view(splits, c).mean(0))
        return out


def convert_to_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` with a SplitBatchNorm holding the same state."""
    if num_splits <= 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_to_split_bn(child, num_splits)
    return module

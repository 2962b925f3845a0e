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

    forward(x, weight, bias, splits, eps) -> (out, mean, var): out has x's dtype and
    strides; mean and the biased var are [splits, c] in float32 (float64 for float64 x),
    without gradient (the module folds them into its running statistics). Two-pass
    statistics (mean, then the centred sum of squares) as the native kernels, so a large
    mean does not cancel the variance. The backward is batch norm's gradient written out
    in terms of the saved centred input.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                splits: int, eps: float):
        with torch.autocast(x.device.type, enabled=False):  # the dtypes below are chosen here
            n, c, h, w = x.shape
            shape5 = (n // splits, splits, c, h, w)  # splitting dim 0 is a view in any layout
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            count = (n // splits) * h * w
            mean = _group_sums(x, splits, acc).div_(count)
            centred = torch.empty_like(x)  # preserve_format: x's strides, so its 5-D view is free
            torch.sub(x.view(shape5), mean[..., None, None], out=centred.view(shape5))
            var = _group_sums(centred * centred, splits, acc).div_(count)
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else invstd * weight
            out = torch.empty_like(x)
            # out = centred * scale + bias, computed in the accumulation dtype, rounded once.
            if bias is None:
                torch.mul(centred.view(shape5), scale[..., None, None], out=out.view(shape5))
            else:
                torch.addcmul(bias[:, None, None], centred.view(shape5), scale[..., None, None], out=out.view(shape5))
        ctx.save_for_backward(centred, weight, invstd)
        ctx.splits = splits
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_mean, _grad_var):
        with torch.autocast(grad_out.device.type, enabled=False):
            centred, weight, invstd = ctx.saved_tensors
            splits = ctx.splits
            n, c, h, w = centred.shape
            shape5 = (n // splits, splits, c, h, w)
            count = (n // splits) * h * w
            sum_dy = _group_sums(grad_out, splits, invstd.dtype)
            sum_dy_xc = _group_sums(grad_out * centred, splits, invstd.dtype)
            grad_x = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                # dx = k·(dy - Σdy/count - xc·invstd²·Σ(dy·xc)/count) with k = weight·invstd,
                # as dx = k·dy + a·xc + b with per-(group, channel) a and b: two passes.
                k = invstd if weight is None else invstd * weight
                a = k * invstd * invstd * sum_dy_xc / -count
                b = k * sum_dy / -count
                grad_x = torch.empty_like(centred)
                gx5 = grad_x.view(shape5)
                torch.addcmul(b[..., None, None], centred.view(shape5), a[..., None, None], out=gx5)
                gx5.addcmul_(grad_out.view(shape5), k[..., None, None])
            if weight is not None and ctx.needs_input_grad[1]:
                grad_weight = (sum_dy_xc * invstd).sum(0).to(weight.dtype)
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
        out, mean, var = _SplitBatchNormFn.apply(x, self.weight, self.bias, splits, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # BatchNorm2d's factor: momentum, or a cumulative average when momentum is None.
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                # Each group's update is BatchNorm's (unbiased running var); the module keeps their mean.
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
                unbiased = var.mean(0) * (count / (count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
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

"""SplitBatchNorm: per-group batch statistics on one device, emulating shuffle-BN.

MoCo's shuffle-BN stops the query/key encoders from cheating through BatchNorm statistics
shared within one GPU's batch. On a single process there is nothing to shuffle across, so
(as in the official MoCo CIFAR demo) the batch is split into `num_splits` groups with their
own statistics. Group g holds samples n with n % num_splits == g. Running statistics are
the mean over groups, so the module is a drop-in BatchNorm2d in eval mode and its
state_dict has BatchNorm2d's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        splits = self.num_splits
        if not self.training or splits == 1 or n % splits != 0:
            # Eval, or a batch that cannot be split evenly (e.g. after skipped images):
            # ordinary BatchNorm over the whole batch.
            return super().forward(x)
        mean_split = self.running_mean.repeat(splits)
        var_split = self.running_var.repeat(splits)
        # reshape (not view): a channels_last input cannot be viewed with groups merged into C.
        out = F.batch_norm(
            x.reshape(n // splits, c * splits, h, w), mean_split, var_split,
            self.weight.repeat(splits), self.bias.repeat(splits), True, self.momentum, self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(splits, c).mean(0))
            self.running_var.copy_(var_split.view(splits, c).mean(0))
            self.num_batches_tracked += 1
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

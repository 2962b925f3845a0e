"""Memory layout of the mix ops' images, shared by the op layer and the kernels' host code.

torch only (no Triton), so the ops import it on machines without Triton; `kernels` imports
nothing from `mixfast`.
"""

from __future__ import annotations

from typing import Tuple

import torch


def out_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs are channels_last iff x is channels_last-contiguous and not NCHW-contiguous
    (the rule of the reference, ``mixfast.ops.reference``)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def per_image_dense(t: torch.Tensor, fmt: torch.memory_format) -> Tuple[torch.Tensor, int]:
    """``t`` (or a dense copy) whose images are each dense in ``fmt``, and its batch stride."""
    B, C, H, W = t.shape
    if fmt == torch.channels_last:
        if t.is_contiguous(memory_format=torch.channels_last):
            return t, C * H * W
        t = t.contiguous(memory_format=torch.channels_last)
        return t, C * H * W
    if B > 0 and t[0].is_contiguous() and t.stride(0) >= C * H * W:
        return t, (t.stride(0) if B > 1 else C * H * W)
    return t.contiguous(), C * H * W

"""Occluded views of a batch under N soft masks (ADIOS, sequential adversarial masking).

out[k, b] = x[b] * (1 - m[b, k]): one broadcast multiply over all N masks, so x is read once
per output element and nothing is looped in Python. It is a single elementwise kernel with the
minimum traffic (read x and the masks, write N copies), so no fused backend is kept for it;
`reference.occlude` (one multiply per mask) is its specification.
"""

from __future__ import annotations

import torch

from mixfast.ops.reference import check_occlude_args


def occlude(x: torch.Tensor, masks: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """x [B, C, H, W], masks [B, N, H, W] (float, 1 = removed) -> [N, B, C, H, W] in x's dtype and
    memory format per copy; differentiable in both x and the masks. `validate=False` skips the shape
    checks (callers that built the masks for x)."""
    if validate:
        check_occlude_args(x, masks)
    # [N, B, 1, H, W] made contiguous (1/C of an image's bytes): the broadcast then lays the output out
    # N-major, so every copy out[k] is a dense batch in x's memory format (NCHW or channels_last), which the
    # encoders take without a copy
    keep = (1 - masks).to(x.dtype).transpose(0, 1).contiguous().unsqueeze(2)
    return x.unsqueeze(0) * keep

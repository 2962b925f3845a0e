"""Occluded views of a batch under N soft masks (ADIOS, sequential adversarial masking).

out[k, b] = x[b] * (1 - m[b, k]): one broadcast multiply over all N masks, nothing looped in
Python. With a per-channel `fill` f the removed pixels become f instead of 0:
out[k, b] = x[b] * (1 - m[b, k]) + f * m[b, k] (`masker.fill`: zero in normalized space is the data
set's mean colour; on images with a uniform background that grey draws the mask's outline). It moves the minimum bytes (read x and the masks, write the N copies the encoder reads),
so a fused kernel could only run it closer to the copy speed, not move less; none is kept.
`benchmarks/bench_occlude.py` measures it against the per-mask loop of `reference.occlude` (its
specification) and a copy of the same bytes (benchmarks/results/occlude-cpu-2cpus.json): on the
2-core CPU, float32, 1.25-1.54x the loop at 0.29-0.67 of copy speed; bfloat16 channels_last
only 0.05-0.26 of copy speed and 1.05x / 0.83x the loop (slower than the loop at 224 px: the
CPU's bf16 broadcast path). Not yet measured on a GPU, the case it is meant for.
"""

from __future__ import annotations

import torch

from mixfast.ops.reference import check_occlude_args


def occlude(x: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor | None = None,
            validate: bool = True) -> torch.Tensor:
    """x [B, C, H, W], masks [B, N, H, W] (float, 1 = removed) -> [N, B, C, H, W] in x's dtype and
    memory format per copy; differentiable in both x and the masks. `fill` [C]: the value of removed
    pixels per channel (None = 0). `validate=False` skips the shape checks (callers that built the
    masks for x)."""
    if validate:
        check_occlude_args(x, masks, fill)
    # [N, B, 1, H, W] made contiguous (1/C of an image's bytes): the broadcast then lays the output out
    # N-major, so every copy out[k] is a dense batch in x's memory format (NCHW or channels_last), which the
    # encoders take without a copy
    keep = (1 - masks).to(x.dtype).transpose(0, 1).contiguous().unsqueeze(2)
    out = x.unsqueeze(0) * keep
    if fill is not None:  # + f * m, as the reference rounds it (a removed pixel becomes exactly f)
        removed = masks.to(x.dtype).transpose(0, 1).contiguous().unsqueeze(2)
        out = out + fill.to(x.dtype).view(1, 1, -1, 1, 1) * removed
    return out

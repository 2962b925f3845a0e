"""Occluded views of a batch under N soft masks (ADIOS, sequential adversarial masking).

out[k, b] = x[b] * (1 - m[b, k]): one broadcast multiply over all N masks, nothing looped in
Python. It moves the minimum bytes (read x and the masks, write the N copies the encoder reads),
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

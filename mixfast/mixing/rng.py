"""Counter-style seeding: every random choice of a step is a pure function of
(seed, rank, stream, step), never of how many draws happened before. A run resumed at
step N therefore draws exactly what the uninterrupted run drew at step N."""

from __future__ import annotations

import numpy as np
import torch

from mixfast.ops.mix_backends import flip

# Independent streams, so adding a draw to one mixer never shifts another's.
STREAM_MIXMASK = 1
STREAM_UNMIX = 2
STREAM_SHUFFLE_BN = 3
STREAM_NOISE = 4


def _entropy(seed: int, rank: int, stream: int, step: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, rank, stream, step]).generate_state(2, np.uint64)[0] >> 1)


def step_generator(seed: int, rank: int, stream: int, step: int, device="cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(_entropy(seed, rank, stream, step))
    return gen


def step_numpy_rng(seed: int, rank: int, stream: int, step: int) -> np.random.Generator:
    return np.random.default_rng(_entropy(seed, rank, stream, step))


def flip_permutation(n: int, device="cpu") -> torch.Tensor:
    """i -> n-1-i, the papers' default partner (its own inverse)."""
    return flip(n, torch.device(device))

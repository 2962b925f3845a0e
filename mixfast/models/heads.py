"""Projection heads (MoCo v2 MLP, MoCo v1 / CIFAR linear)."""

from __future__ import annotations

from torch import nn


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """'mlp': in-in-out with ReLU (MoCo v2: 2048-2048-128); 'linear': in-out (MoCo v1, CIFAR)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"model.head must be 'mlp' or 'linear', got {kind!r}")

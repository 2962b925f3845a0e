"""Projection heads and the BYOL/SimSiam predictor."""

from __future__ import annotations

from typing import Optional

from torch import nn


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: Optional[int] = None, layers: int = 2) -> nn.Module:
    """Projection head from the backbone's pooled features to the embedding.

    'linear'   in-out (MoCo v1, MoCo on CIFAR)
    'mlp'      in-hidden-out with ReLU (MoCo v2: 2048-2048-128)
    'mlp_bn'   `layers` linear layers, BN and ReLU after all but the last (SimCLR, BYOL)
    'simsiam'  as 'mlp_bn' plus BN without affine after the last layer (SimSiam: 3 layers on
               ImageNet, 2 on CIFAR); the linear layers before a BN carry no bias
    """
    hidden = hidden_dim or in_dim
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
    if kind in ("mlp_bn", "simsiam"):
        if layers < 2:
            raise ValueError(f"model.head_layers must be >= 2 for head {kind!r}, got {layers}")
        parts, dim = [], in_dim
        for _ in range(layers - 1):
            parts += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            dim = hidden
        if kind == "mlp_bn":
            parts.append(nn.Linear(dim, out_dim))
        else:
            parts += [nn.Linear(dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)]
        return nn.Sequential(*parts)
    raise ValueError(f"model.head must be one of 'linear', 'mlp', 'mlp_bn', 'simsiam', got {kind!r}")


def build_predictor(dim: int, hidden_dim: int) -> nn.Module:
    """BYOL / SimSiam predictor: dim-hidden-dim bottleneck with BN and ReLU."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))

"""torchvision ResNet backbones with an optional CIFAR stem and a width multiplier.

The blocks, layer layout and weight init are torchvision's own; we only change the stem
(3x3 stride-1 conv1 and no max-pool for 32/64-pixel images, as MoCo's official CIFAR-10
demo does) and, for fast CPU demos, the channel width of every stage. The classifier is
removed: the backbone returns the pooled feature vector, and `export_torchvision_state_dict`
writes weights that load into `torchvision.models.resnetXX()` (width 64) with
`strict=False` (no `fc`).
"""

from __future__ import annotations

import mixfast._compat  # noqa: F401  (torchvision import on CPU-only torch)

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_LAYOUT = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}
_TORCHVISION_WIDTH = 64


class ScaledResNet(ResNet):
    """torchvision ResNet whose stage widths are `width, 2*width, 4*width, 8*width`."""

    def __init__(self, block, layers, width: int = _TORCHVISION_WIDTH, cifar_stem: bool = False):
        # torchvision's __init__ hard-codes 64 channels; _make_layer below rescales each stage.
        self._width_scale = width / _TORCHVISION_WIDTH
        super().__init__(block, list(layers))
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, _TORCHVISION_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        if width != _TORCHVISION_WIDTH or cifar_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=self.conv1.kernel_size, stride=self.conv1.stride,
                                   padding=self.conv1.padding, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.bn1 = self._norm_layer(width)
        self.feature_dim = int(8 * width) * block.expansion  # torchvision's fc.in_features assumes width 64
        self.fc = nn.Identity()

    def __setattr__(self, name, value):
        # `_width_scale` is set before nn.Module.__init__ runs, when Module's own
        # __setattr__ cannot be used yet.
        if name == "_width_scale":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == _TORCHVISION_WIDTH:  # first stage: its input is the stem's output
            self.inplanes = int(_TORCHVISION_WIDTH * self._width_scale)
        return super()._make_layer(block, int(planes * self._width_scale), blocks, stride, dilate)


def build_backbone(arch: str, width: int = 64, cifar_stem: bool = False) -> ScaledResNet:
    """Backbone returning pooled features of size `.feature_dim` (2048 for ResNet-50)."""
    if arch not in _LAYOUT:
        raise ValueError(f"model.arch must be one of {sorted(_LAYOUT)}, got {arch!r}")
    block, layers = _LAYOUT[arch]
    return ScaledResNet(block, layers, width=width, cifar_stem=cifar_stem)


def export_torchvision_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Backbone weights in torchvision's key format (no `fc`), on CPU, SplitBN folded to BN."""
    state = {}
    for key, value in backbone.state_dict().items():
        if key.startswith("fc."):
            continue
        state[key] = value.detach().cpu().clone()
    return state

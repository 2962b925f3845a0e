"""The learned masker of ADIOS and sequential adversarial masking: a Genesis-style U-Net.

Trunk: `blocks` = int(log2(image) - 1) encoder and decoder blocks (32 px: 4, 64/96 px: 5,
224 px: 6), each Conv3x3 (bias only without a norm) -> norm -> ReLU. Encoder widths are c for all but the last
three blocks, which are 2c; the decoder mirrors them (2c, 2c, then c). Nearest x0.5 down
after every encoder block but the last, an MLP bottleneck (Flatten -> 128 -> 128 -> back,
ReLU after each) on the f x f map (f = image / 2^(blocks-1)), nearest x2 up after every
decoder block but the last, and decoder block i reads cat(up, skip[-1-i]). At c = 32 this is
0.58 M parameters at 32 px, 0.93 M at 96 px and 1.18 M at 224 px (N = 6): the ADIOS masker.

Heads (all return masks in [0, 1], 1 = the pixel is removed, shape [B, N, H, W], float32):

* ``adios``: Conv1x1(c -> N) and a softmax over the N channels, so the masks partition every
  pixel (sum_k m_k = 1).
* ``sequential`` with ``condition="features"``: one trunk pass; mask k is
  sigmoid(Conv1x1(c+1 -> 1)(cat(F, S_{k-1}))) with S_{k-1} = sum_{j<k} m_j (S_0 = 0), so mask k
  sees what the earlier masks already cover. The N heads are stored as one Conv(c+1 -> N)
  weight, row k being head k (the same arithmetic as N separate convolutions).
* ``sequential`` with ``condition="input"``: the trunk reads [x, S_{k-1}] (a 4th input
  channel) and runs once per mask; head k is row k of a Conv1x1(c -> N).

No running statistics anywhere (GroupNorm / InstanceNorm without tracking), so two forward
passes with the same weights give the same masks: the ADIOS step reuses one pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("gn", "in", "none")
HEADS = ("adios", "sequential")
CONDITIONS = ("features", "input")
MLP_HIDDEN = 128


def default_blocks(image_size: int) -> int:
    """int(log2(size) - 1): the ADIOS code's rule (32 px: 4, 64 and 96 px: 5, 224 px: 6)."""
    return int(math.log2(image_size) - 1)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(8, channels)
    if kind == "in":
        return nn.InstanceNorm2d(channels, affine=True)  # track_running_stats=False: no state between passes
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Conv3x3 -> norm -> ReLU; the convolution has a bias only without a norm (as the ADIOS code)."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout),
                         nn.ReLU(inplace=True))


class UNetTrunk(nn.Module):
    """Encoder, MLP bottleneck and decoder; returns the c-channel map at full resolution."""

    def __init__(self, image_size: int, in_channels: int = 3, width: int = 32, norm: str = "gn",
                 blocks: int | None = None):
        super().__init__()
        blocks = default_blocks(image_size) if blocks is None else blocks
        if norm not in NORMS:
            raise ValueError(f"masker.norm must be one of {NORMS}, got {norm!r}")
        if blocks < 3:
            raise ValueError(f"masker.blocks must be >= 3 (images of 16 px or more), got {blocks} for "
                             f"{image_size}-px images")
        if image_size % 2 ** (blocks - 1):
            raise ValueError(f"the masker halves the image {blocks - 1} times: data.image_size={image_size} must be "
                             f"divisible by {2 ** (blocks - 1)} (or set masker.blocks)")
        if norm == "gn" and width % 8:
            raise ValueError(f"masker.norm='gn' uses GroupNorm(8): masker.width must be a multiple of 8, got {width}")
        c = width
        enc_out = [c] * (blocks - 3) + [2 * c] * 3
        enc_in = [in_channels] + enc_out[:-1]
        dec_out = [2 * c, 2 * c] + [c] * (blocks - 2)
        dec_in = [enc_out[-1] + 2 * c] + [dec_out[i - 1] + enc_out[-1 - i] for i in range(1, blocks)]
        self.down = nn.ModuleList(ConvBlock(i, o, norm) for i, o in zip(enc_in, enc_out))
        self.up = nn.ModuleList(ConvBlock(i, o, norm) for i, o in zip(dec_in, dec_out))
        self.side = image_size // 2 ** (blocks - 1)
        flat = 2 * c * self.side ** 2
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(flat, MLP_HIDDEN), nn.ReLU(inplace=True),
                                 nn.Linear(MLP_HIDDEN, MLP_HIDDEN), nn.ReLU(inplace=True),
                                 nn.Linear(MLP_HIDDEN, flat), nn.ReLU(inplace=True))
        self.image_size, self.out_channels = image_size, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"the masker was built for {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        skips, h = [], x
        for i, block in enumerate(self.down):
            h = block(h)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.interpolate(h, scale_factor=0.5, mode="nearest")
        h = self.mlp(h).view(x.size(0), -1, self.side, self.side)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips[-1 - i]], dim=1))
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return h


class MaskerUNet(nn.Module):
    """U-Net masker: `forward(x) -> masks [B, N, H, W]` in [0, 1] (float32), 1 = removed."""

    def __init__(self, image_size: int, num_masks: int, width: int = 32, norm: str = "gn", head: str = "adios",
                 condition: str = "features", blocks: int | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"masker head must be one of {HEADS}, got {head!r}")
        if condition not in CONDITIONS:
            raise ValueError(f"masker.condition must be one of {CONDITIONS}, got {condition!r}")
        if num_masks < 1 or (head == "adios" and num_masks < 2):
            raise ValueError(f"masker.num_masks must be >= 2 for ADIOS (a partition) and >= 1 otherwise, "
                             f"got {num_masks}")
        self.head_kind, self.num_masks = head, num_masks
        self.condition = condition if head == "sequential" else "features"
        in_channels = 4 if self.condition == "input" else 3
        self.trunk = UNetTrunk(image_size, in_channels, width, norm, blocks)
        c = self.trunk.out_channels
        # sequential/features: row k of the weight is head k = Conv1x1(c+1 -> 1) on cat(F, S_{k-1})
        extra = 1 if (head == "sequential" and self.condition == "features") else 0
        self.head = nn.Conv2d(c + extra, num_masks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "adios":
            return torch.softmax(self.head(self.trunk(x)).float(), dim=1)
        if self.condition == "features":
            return self._sequential_on_features(x)
        return self._sequential_on_input(x)

    def _sequential_on_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(x)
        c = feats.size(1)
        weight = self.head.weight
        # every head's Conv on F in one pass; the S_{k-1} column is added per mask below
        base = F.conv2d(feats, weight[:, :c], self.head.bias).float()
        prior = weight[:, c, 0, 0].float()
        covered = torch.zeros_like(base[:, 0])
        masks = []
        for k in range(self.num_masks):  # N elementwise ops on [B, H, W]: mask k needs S_{k-1}
            m = torch.sigmoid(base[:, k] + prior[k] * covered)
            masks.append(m)
            covered = covered + m
        return torch.stack(masks, 1)

    def _sequential_on_input(self, x: torch.Tensor) -> torch.Tensor:
        covered = torch.zeros_like(x[:, :1])
        masks = []
        for k in range(self.num_masks):  # one trunk pass per mask: its input carries S_{k-1}
            feats = self.trunk(torch.cat([x, covered.to(x.dtype)], dim=1))
            m = torch.sigmoid(F.conv2d(feats, self.head.weight[k:k + 1], self.head.bias[k:k + 1]).float())
            masks.append(m[:, 0])
            covered = covered + m
        return torch.stack(masks, 1)

"""Two-view pre-training augmentations and the evaluation transform.

Recipes, each applied independently to both views: ``mocov2`` and ``mocov1`` are the
augmentations of MoCo v2 / v1 in MoCo's official ``main_moco.py`` (also MixMask's ImageNet
setting); ``cifar`` is Un-Mix's CIFAR recipe (Shen et al., official code: crop scale
0.08-1, flip, colour jitter p 0.8, grayscale p 0.2, no blur), used for Tiny-ImageNet too.

All transforms take a PIL RGB image and return float32 tensors ``[3, S, S]``, normalized
with the data set's mean/std. Every random choice uses torch's RNG, so DataLoader workers
(seeded by the DataLoader) draw independent augmentations.
"""

from __future__ import annotations

from typing import Callable

import mixfast._compat  # noqa: F401  (must run before torchvision is imported)

import torch
from PIL import Image
from torchvision import transforms as T

MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

RECIPES = ("mocov2", "mocov1", "cifar", "mae")

# Above this crop size the eval transform resizes by 256/224 before the centre crop
# (ImageNet protocol); small images (CIFAR, digits) would lose too much border.
_LARGE_IMAGE_PX = 64

ViewTransform = Callable[[Image.Image], torch.Tensor]


class TwoViews:
    """Apply the same random view transform twice, independently: PIL -> (x1, x2)."""

    def __init__(self, view_transform: ViewTransform):
        self.view_transform = view_transform

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view_transform(image), self.view_transform(image)

    def __repr__(self) -> str:
        return f"TwoViews({self.view_transform!r})"


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; allowed: {', '.join(RECIPES)}")


def mean_std(recipe: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of a recipe's inputs: CIFAR's for 'cifar', ImageNet's for the MoCo recipes."""
    return MEAN_STD["cifar" if recipe == "cifar" else "imagenet"]


def normalize(recipe: str) -> T.Normalize:
    """The recipe's mean/std normalization of a ``[0, 1]`` tensor image."""
    mean, std = mean_std(recipe)
    return T.Normalize(mean, std)


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel of about 10% of the crop (23 px at 224, as in MoCo v2), at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _flip(hflip: bool) -> list:
    return [T.RandomHorizontalFlip()] if hflip else []


def _mocov2_view(size: int, min_scale: float = 0.2, hflip: bool = True) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5),
        *_flip(hflip),
        T.ToTensor(),
        normalize("mocov2"),
    ])


def _mocov1_view(size: int, min_scale: float = 0.2, hflip: bool = True) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.RandomGrayscale(p=0.2),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        *_flip(hflip),
        T.ToTensor(),
        normalize("mocov1"),
    ])


def _cifar_view(size: int, min_scale: float = 0.08, hflip: bool = True) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        *_flip(hflip),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        normalize("cifar"),
    ])


def _mae_view(size: int, min_scale: float = 0.2, hflip: bool = True) -> T.Compose:
    """MAE pre-training: RandomResizedCrop (bicubic) and flip only."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        *_flip(hflip),
        T.ToTensor(),
        normalize("mae"),
    ])


_VIEW_BUILDERS = {"mocov2": _mocov2_view, "mocov1": _mocov1_view, "cifar": _cifar_view, "mae": _mae_view}


def two_view_transform(recipe: str, image_size: int, min_scale: float | None = None, hflip: bool = True) -> TwoViews:
    """The pre-training transform: PIL image -> two independently augmented views.

    `min_scale` overrides the recipe's RandomResizedCrop lower bound (None = the recipe's:
    0.2 for MoCo, 0.08 for CIFAR); `hflip=False` drops the horizontal flip (for data that
    is not mirror-symmetric, such as digits)."""
    _check_recipe(recipe)
    if min_scale is not None and not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must lie in (0, 1], got {min_scale}")
    kwargs = {"hflip": hflip} if min_scale is None else {"hflip": hflip, "min_scale": min_scale}
    return TwoViews(_VIEW_BUILDERS[recipe](image_size, **kwargs))


def eval_transform(recipe: str, image_size: int) -> T.Compose:
    """Deterministic transform for the kNN monitor (memory bank and test set)."""
    _check_recipe(recipe)
    resize = int(image_size * 256 / 224) if image_size > _LARGE_IMAGE_PX else image_size
    return T.Compose([
        T.Resize(resize),
        T.CenterCrop(image_size),
        T.ToTensor(),
        normalize(recipe),
    ])

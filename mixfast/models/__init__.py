"""Backbones (ResNets, ViTs), projection heads and predictors, the masker U-Net."""

from torch import nn

from mixfast.models.heads import build_head, build_predictor
from mixfast.models.norm import SplitBatchNorm, convert_to_split_bn
from mixfast.models.resnet import build_backbone as build_resnet
from mixfast.models.resnet import export_torchvision_state_dict
from mixfast.models.vit import VisionTransformer, build_vit, param_groups_no_decay, vit_sizes

VIT_ARCHS = tuple(vit_sizes())


def build_backbone(arch: str, width: int = 64, cifar_stem: bool = False, image_size: int | None = None,
                   pool: str = "cls", drop_path: float = 0.0) -> nn.Module:
    """The backbone of `model.arch`, returning pooled features of size `.feature_dim`: a ResNet
    (`width`, `cifar_stem`), or a ViT for `image_size` px (`pool` = its CLS token or the mean of its
    patch tokens; `drop_path` for fine-tuning). Its state_dict uses torchvision's (ResNet) or timm's
    (ViT) key names."""
    if arch in VIT_ARCHS:
        return build_vit(arch, img_size=image_size, pool=pool, drop_path_rate=drop_path)
    return build_resnet(arch, width, cifar_stem)


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS


__all__ = ["build_backbone", "build_resnet", "export_torchvision_state_dict", "build_head", "build_predictor",
           "SplitBatchNorm", "convert_to_split_bn", "VisionTransformer", "VIT_ARCHS", "is_vit", "param_groups_no_decay"]

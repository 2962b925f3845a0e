from mixfast.models.resnet import build_backbone, export_torchvision_state_dict
from mixfast.models.heads import build_head, build_predictor
from mixfast.models.norm import SplitBatchNorm, convert_to_split_bn

__all__ = ["build_backbone", "export_torchvision_state_dict", "build_head", "build_predictor", "SplitBatchNorm", "convert_to_split_bn"]

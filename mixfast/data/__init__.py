"""Data sets, two-view augmentations and resumable distributed loaders."""

from mixfast.data.datasets import (
    CIFARPickle,
    Datasets,
    DigitsDemo,
    EvalDataset,
    SafeImageFolder,
    SafeImageList,
    STL10Binary,
    SyntheticImages,
    TwoViewDataset,
    build_datasets,
)
from mixfast.data.loader import (
    ResumableDistributedSampler,
    SeededSampler,
    build_pretrain_loader,
    choose_loader,
    build_eval_loader,
    build_train_loader,
    collate_eval,
    collate_two_views,
)
from mixfast.data.transforms import MEAN_STD, RECIPES, TwoViews, eval_transform, mean_std, normalize, two_view_transform

__all__ = [
    "CIFARPickle", "Datasets", "DigitsDemo", "EvalDataset", "SafeImageFolder", "SafeImageList", "STL10Binary", "SyntheticImages",
    "TwoViewDataset", "build_datasets",
    "ResumableDistributedSampler", "SeededSampler", "build_pretrain_loader", "choose_loader", "build_eval_loader", "build_train_loader", "collate_eval",
    "collate_two_views",
    "MEAN_STD", "RECIPES", "TwoViews", "eval_transform", "mean_std", "normalize", "two_view_transform",
]

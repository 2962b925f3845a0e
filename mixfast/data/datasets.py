"""Data sets for pre-training and the kNN monitor.

Design: every *base* data set returns ``(PIL RGB image, int label)``; the wrappers
``TwoViewDataset`` and ``EvalDataset`` apply the transforms. A base item may be ``None``
(``SafeImageFolder`` on an unreadable file); wrappers pass the ``None`` through and the
collate functions in ``mixfast.data.loader`` drop it and count it. Counting in the
collate rather than in the data set is what makes the count survive DataLoader worker
processes, whose copies of the data set do not share state with the trainer.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import mixfast._compat  # noqa: F401  (must run before torchvision is imported)

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from mixfast.config import DataConfig
from mixfast.data import files as file_lists
from mixfast.data.transforms import TwoViews, eval_transform, two_view_transform

Sample = Optional[tuple[Image.Image, int]]

# ---------------------------------------------------------------------------------------
# CIFAR (official python-pickle layout)
# ---------------------------------------------------------------------------------------

_CIFAR_FILES = {
    (10, True): [f"data_batch_{i}" for i in range(1, 6)],
    (10, False): ["test_batch"],
    (100, True): ["train"],
    (100, False): ["test"],
}
_CIFAR_LABEL_KEY = {10: b"labels", 100: b"fine_labels"}


def _read_cifar_file(path: str, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    with open(path, "rb") as f:
        # The official files are Python 2 pickles: byte-string keys.
        entry = pickle.load(f, encoding="bytes")
    return entry[b"data"], list(entry[label_key])


class CIFARPickle(Dataset):
    """CIFAR-10/100 from the official ``cifar-*-python`` directory (no download)."""

    def __init__(self, root: str, train: bool, num_classes: int):
        if num_classes not in (10, 100):
            raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
        chunks, labels = [], []
        for name in _CIFAR_FILES[num_classes, train]:
            data, file_labels = _read_cifar_file(os.path.join(root, name), _CIFAR_LABEL_KEY[num_classes])
            chunks.append(data)
            labels.extend(file_labels)
        # Rows are 1024 red, 1024 green, 1024 blue values of a 32x32 image: -> [N, 32, 32, 3].
        self.images = np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.images[index]), self.labels[index]


# ---------------------------------------------------------------------------------------
# ImageFolder that survives corrupt files
# ---------------------------------------------------------------------------------------


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data directory not found: {path}")


def _load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")  # convert() decodes fully, so corruption surfaces here


class SafeImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose unreadable images become ``None`` items.

    One corrupt JPEG among a million must not end a multi-day run: the file is named in
    a warning and the collate function drops the item and counts it.
    """

    def __init__(self, root: str):
        _require_dir(root)
        super().__init__(root)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.samples[index]
        try:
            image = _load_rgb(path)
        except Exception as err:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError...)
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=2)
            return None
        return image, label


class SafeImageList(Dataset):
    """Like ``SafeImageFolder`` over a ``mixfast.data.files.FileList`` (Tiny-ImageNet,
    ImageNet-100, ...): ``samples``/``classes`` as in ImageFolder, unreadable files -> ``None``."""

    def __init__(self, files: file_lists.FileList):
        self.samples, self.classes = files.samples, files.classes
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    __getitem__ = SafeImageFolder.__getitem__


# ---------------------------------------------------------------------------------------
# STL-10 (official binary layout)
# ---------------------------------------------------------------------------------------

_STL10_SIDE = 96
_STL10_SPLITS = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
                 "unlabeled": ("unlabeled_X.bin", None)}


def stl10_dir(root: str) -> str:
    """``root/stl10_binary`` (as the archive unpacks), or ``root`` itself if it holds the .bin files."""
    inner = os.path.join(root, "stl10_binary")
    return inner if os.path.isdir(inner) else root


class STL10Binary(Dataset):
    """STL-10 from ``stl10_binary/*.bin``: uint8 images of 3x96x96 stored channel by channel,
    each channel column-major (as the official files); labels 1..10 on disk -> 0..9 here,
    -1 for the unlabelled split. ``split`` is 'train', 'test', 'unlabeled' or
    'train+unlabeled' (the pre-training set: 5,000 labelled + 100,000 unlabelled images).
    Images are memory-mapped, so the 2.7 GB unlabelled file is not read into memory."""

    num_classes = 10

    def __init__(self, root: str, split: str):
        parts = split.split("+")
        if not parts or any(p not in _STL10_SPLITS for p in parts):
            raise ValueError(f"STL-10 split must be train, test, unlabeled or train+unlabeled, got {split!r}")
        folder = stl10_dir(root)
        self.chunks, labels = [], []
        side2 = 3 * _STL10_SIDE * _STL10_SIDE
        for part in parts:
            x_name, y_name = _STL10_SPLITS[part]
            x_path = os.path.join(folder, x_name)
            file_lists.require_file(x_path, f"STL-10 {part} images")
            size = os.path.getsize(x_path)
            if size % side2:
                raise ValueError(f"{x_path}: {size} bytes is not a whole number of 3x96x96 images")
            images = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(size // side2, 3, _STL10_SIDE, _STL10_SIDE))
            if y_name is None:
                part_labels = np.full(len(images), -1, dtype=np.int64)
            else:
                y_path = os.path.join(folder, y_name)
                file_lists.require_file(y_path, f"STL-10 {part} labels")
                part_labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
                if len(part_labels) != len(images):
                    raise ValueError(f"{y_path}: {len(part_labels)} labels for {len(images)} images in {x_path}")
            self.chunks.append(images)
            labels.append(part_labels)
        self.labels = np.concatenate(labels).tolist()
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self) -> int:
        return len(self.labels)

    def image_array(self, index: int) -> np.ndarray:
        """[96, 96, 3] uint8 (rows, columns, RGB)."""
        chunk = int(np.searchsorted(self.offsets, index, side="right")) - 1
        # [c, column, row] on disk -> [row, column, c]
        return np.ascontiguousarray(self.chunks[chunk][index - self.offsets[chunk]].transpose(2, 1, 0))

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.image_array(index)), self.labels[index]


# ---------------------------------------------------------------------------------------
# Built-in and synthetic data
# ---------------------------------------------------------------------------------------

_DIGITS_SPLIT_SEED = 0
_DIGITS_TRAIN_FRACTION = 0.8
_DIGITS_SIZE = 32


def _read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (what ``load_digits`` reads): [1797, 8, 8] in 0..16, labels.

    Read from the CSV shipped inside the package instead of calling ``load_digits``:
    importing ``sklearn`` pulls in SciPy, which is slow and not needed for a CSV.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo data set needs scikit-learn installed (it ships the digits)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _upsample_grey(pixels: np.ndarray, size: int) -> np.ndarray:
    """8x8 grey in 0..16 -> size x size x 3 uint8 (grey replicated)."""
    grey = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return np.asarray(grey.resize((size, size), Image.BICUBIC).convert("RGB"))


class DigitsDemo(Dataset):
    """The 1,797 scikit-learn digits as 32x32 RGB images, with a fixed 80/20 split."""

    num_classes = 10

    def __init__(self, train: bool):
        pixels, labels = _read_sklearn_digits()
        order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
        n_train = int(_DIGITS_TRAIN_FRACTION * len(labels))
        self.indices = order[:n_train] if train else order[n_train:]
        self.images = np.stack([_upsample_grey(pixels[i], _DIGITS_SIZE) for i in self.indices])
        self.labels = labels[self.indices].tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.images[index]), self.labels[index]


class SyntheticImages(Dataset):
    """Deterministic uniform-noise RGB images for smoke tests; label = index % num_classes."""

    def __init__(self, n: int, num_classes: int, image_size: int, seed: int):
        self.n, self.num_classes, self.image_size, self.seed = n, num_classes, image_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        # Generated per item (not stored) so large n costs no memory; same (seed, index) -> same image.
        rng = np.random.default_rng([self.seed, index])
        pixels = rng.integers(0, 256, size=(self.image_size, self.image_size, 3), dtype=np.uint8)
        return Image.fromarray(pixels), index % self.num_classes


# ---------------------------------------------------------------------------------------
# Transform wrappers
# ---------------------------------------------------------------------------------------


class TwoViewDataset(Dataset):
    """Pre-training items ``(x1, x2, label, index)``; ``None`` where the base item failed."""

    def __init__(self, base: Dataset, two_view_transform: TwoViews):
        self.base = base
        self.two_view_transform = two_view_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        """``key`` is an index, or ``(index, seed)`` from ``SeededSampler``: then the random
        transforms draw from a torch RNG seeded with ``seed`` (global state restored after)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.base[index]
        if sample is None:
            return None
        image, label = sample
        if seed is None:
            x1, x2 = self.two_view_transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x1, x2 = self.two_view_transform(image)
        return x1, x2, label, index


class EvalDataset(Dataset):
    """kNN items ``(x, label)``; ``None`` where the base item failed."""

    def __init__(self, base: Dataset, eval_transform: Callable):
        self.base = base
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        sample = self.base[index]
        if sample is None:
            return None
        image, label = sample
        return self.eval_transform(image), label


# ---------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------

# Fixed seeds: the synthetic data set must be the same in every run and on every rank.
_SYNTHETIC_TRAIN_SEED = 0
_SYNTHETIC_TEST_SEED = 1


@dataclass
class Datasets:
    train: TwoViewDataset  # pre-training, two views
    knn_train: EvalDataset  # train split under the eval transform = kNN memory bank (InstDisc monitor)
    knn_test: EvalDataset  # test/val split under the eval transform
    num_classes: int


def _base_splits(cfg: DataConfig) -> tuple[Dataset, Dataset, int]:
    """(train split, test split, number of classes) as PIL data sets."""
    if cfg.name == "imagefolder":
        _require_dir(cfg.root)
        train = SafeImageFolder(os.path.join(cfg.root, cfg.train_split))
        test = SafeImageFolder(os.path.join(cfg.root, cfg.val_split))
        return train, test, len(train.classes)
    if cfg.name in ("tinyimagenet", "imagenet100"):
        train = SafeImageList(file_lists.jpeg_tree(cfg.name, cfg.root, cfg.train_split, cfg.class_list, train=True))
        test = SafeImageList(file_lists.jpeg_tree(cfg.name, cfg.root, cfg.val_split, cfg.class_list, train=False))
        return train, test, len(train.classes)
    if cfg.name == "stl10":
        # Pre-training reads train+unlabeled; the kNN monitor uses the labelled train split
        # as memory bank (see build_datasets) and test as queries.
        return STL10Binary(cfg.root, "train+unlabeled"), STL10Binary(cfg.root, "test"), STL10Binary.num_classes
    if cfg.name in ("cifar10", "cifar100"):
        num_classes = 10 if cfg.name == "cifar10" else 100
        return (CIFARPickle(cfg.root, True, num_classes), CIFARPickle(cfg.root, False, num_classes),
                num_classes)
    if cfg.name == "demo":
        return DigitsDemo(train=True), DigitsDemo(train=False), DigitsDemo.num_classes
    if cfg.name == "synthetic":
        size, classes = cfg.image_size, cfg.num_classes
        return (SyntheticImages(cfg.synthetic_size, classes, size, _SYNTHETIC_TRAIN_SEED),
                SyntheticImages(max(1, cfg.synthetic_size // 4), classes, size, _SYNTHETIC_TEST_SEED),
                classes)
    raise ValueError(f"unknown data set {cfg.name!r}")


def build_datasets(data_cfg: DataConfig) -> Datasets:
    """Pre-training set plus the two kNN sets, with the configured recipe and crop size."""
    train, test, num_classes = _base_splits(data_cfg)
    recipe, size = data_cfg.augmentation, data_cfg.image_size
    evaluate = eval_transform(recipe, size)
    # STL-10: the unlabelled images (label -1) cannot vote in the kNN monitor.
    bank = STL10Binary(data_cfg.root, "train") if data_cfg.name == "stl10" else train
    return Datasets(
        train=TwoViewDataset(train, two_view_transform(recipe, size, data_cfg.crop_min_scale, data_cfg.hflip)),
        knn_train=EvalDataset(bank, evaluate),
        knn_test=EvalDataset(test, evaluate),
        num_classes=num_classes,
    )

"""Data sets for pre-training and the kNN monitor.

Design: every *base* data set returns ``(PIL RGB image, int label)``; the wrappers
``TwoViewDataset`` and ``EvalDataset`` apply the transforms. A base item may be ``Unreadable``
(``SafeImageList`` on a file that fails to decode); wrappers pass it through and the
collate functions in ``mixfast.data.loader`` drop it and hand its name to the loader, which
counts it and names it once. Counting after the collate rather than in the data set is what
makes the count survive DataLoader worker processes, whose copies of the data set do not
share state with the trainer.

The image-folder data sets (``imagefolder``, ``tinyimagenet``, ``imagenet100``) are listed by
``mixfast.data.files`` (the val split labelled with the training split's classes) and checked
by ``mixfast.data.check.check_files`` when built: files that do not decode are removed from
both splits before any loader sees them, the same for the torch and the DALI loader.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import mixfast._compat  # noqa: F401  (must run before torchvision is imported)

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mixfast.config import DataConfig
from mixfast.data import files as file_lists
from mixfast.data.check import SkipReport, cache_dir, check_files, describe_error, load_rgb
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
# Image folders that survive unreadable files
# ---------------------------------------------------------------------------------------


class Unreadable(NamedTuple):
    """The item of a file that failed to decode: the collate functions drop it and the loaders
    count it and name the file once (in the main process, not in each worker)."""

    path: str
    reason: str


def is_unreadable(item) -> bool:
    return item is None or isinstance(item, Unreadable)


def _require_dir(path: str, key: str = "data.root") -> None:
    file_lists.require_dir(path, key)


class SafeImageList(Dataset):
    """An image-folder split (a ``mixfast.data.files.FileList``): ``samples``, ``classes`` and
    ``targets`` as in torchvision's ImageFolder, items ``(PIL RGB image, label)`` decoded by
    ``mixfast.data.check.load_rgb`` (EXIF orientation applied), and an ``Unreadable`` item for a
    file that fails to decode, so one bad file among a million does not end a multi-day run.

    ``read_paths``: the file the DALI loader reads for each sample (the file itself or its
    converted copy); ``skipped``: ``[(path, reason)]`` removed by the start-up check;
    ``ignored``: counts of hidden and non-image files; ``report``: names skipped files once."""

    def __init__(self, files: file_lists.FileList, read_paths: Optional[list[str]] = None,
                 report: Optional[SkipReport] = None, root: Optional[str] = None):
        self.samples, self.classes = files.samples, files.classes
        self.targets = [label for _, label in self.samples]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.read_paths = read_paths if read_paths is not None else [p for p, _ in self.samples]
        self.skipped, self.ignored = list(files.skipped), files.ignored
        self.report = report if report is not None else SkipReport()
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as err:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError...)
            return Unreadable(path, describe_error(err))
        return image, label


class SafeImageFolder(SafeImageList):
    """One class-folder split (``root/<class>/**/<image>``), listed by ``mixfast.data.files``
    (the same files as every loader and command), without the start-up check: a file that does
    not decode becomes an ``Unreadable`` item when it is read."""

    def __init__(self, root: str):
        super().__init__(file_lists.class_folders(root), root=root)


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
    """Pre-training items ``(x1, x2, label, index)``; ``Unreadable`` where the base item failed."""

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
        if is_unreadable(sample):
            return sample
        image, label = sample
        if seed is None:
            x1, x2 = self.two_view_transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                # Only the CPU generator, which is all the transforms draw from: the same draws as
                # torch.manual_seed(seed), without its manual_seed_all on every accelerator module
                # (cuda, xpu, mtia), each of which, uninitialised, queues a lazy call with a captured
                # stack trace: the demo loader went from 45.6 to 28.0 ms per batch of 64 (bench_peers.py).
                torch.default_generator.manual_seed(seed)
                x1, x2 = self.two_view_transform(image)
        return x1, x2, label, index


class EvalDataset(Dataset):
    """kNN items ``(x, label)``; ``Unreadable`` where the base item failed."""

    def __init__(self, base: Dataset, eval_transform: Callable):
        self.base = base
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        sample = self.base[index]
        if is_unreadable(sample):
            return sample
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

    def describe_train(self) -> str:
        """'N training images' and, for image folders, what was skipped or ignored (the trainer's start line)."""
        base = self.train.base
        text = f"{len(base)} training images"
        return text + describe_left_out(base) if isinstance(base, SafeImageList) else text


def describe_left_out(base: "SafeImageList") -> str:
    """' (3 unreadable files skipped, listed in RUN/skipped_files.txt; ignored: 2 hidden)', or ''."""
    parts = []
    if base.skipped:
        where = f", listed in {base.report.path}" if base.report.path else ""
        parts.append(f"{len(base.skipped)} unreadable file{'s' if len(base.skipped) != 1 else ''} skipped{where}")
    converted = sum(1 for (path, _), read in zip(base.samples, base.read_paths) if read != path)
    if converted:
        parts.append(f"{converted} read by DALI through converted PNG copies")
    ignored = ", ".join(f"{n} {why}" for why, n in sorted(base.ignored.items()) if n)
    if ignored:
        parts.append(f"ignored: {ignored}")
    return f" ({'; '.join(parts)})" if parts else ""


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def image_folder_splits(cfg: DataConfig, run_dir: Optional[str] = None) -> tuple[SafeImageList, SafeImageList]:
    """The training and validation splits of an image-folder data set, listed (val labelled by the
    training classes) and checked (unreadable files removed, named once, counted)."""
    _require_dir(cfg.root)
    train_files = file_lists.jpeg_tree(cfg.name, cfg.root, cfg.train_split, cfg.class_list, train=True)
    test_files = file_lists.jpeg_tree(cfg.name, cfg.root, cfg.val_split, cfg.class_list, train=False,
                                      classes=train_files.classes, unknown_classes=cfg.unknown_val_classes)
    rank, world = _rank_and_world()
    report = SkipReport(run_dir, rank)
    paths = [p for p, _ in train_files.samples] + [p for p, _ in test_files.samples]
    verdicts = check_files(paths, cfg.root, cache_dir(cfg.check_cache, cfg.root, run_dir), cfg.check_threads,
                           rank, world, use_cache=cfg.check_cache != "off")
    splits = []
    for files, part, key in ((train_files, verdicts[:len(train_files.samples)], "data.train_split"),
                             (test_files, verdicts[len(train_files.samples):], "data.val_split")):
        good = [(s, v.read) for s, v in zip(files.samples, part) if v.problem is None]
        bad = [(s[0], v.problem) for s, v in zip(files.samples, part) if v.problem is not None]
        report.name(bad, f"by the start-up check of {key}")
        checked = file_lists.FileList([s for s, _ in good], files.classes, files.ignored, files.skipped + bad)
        splits.append(SafeImageList(checked, [r for _, r in good], report, root=os.path.join(cfg.root, _split_dir(cfg, key))))
    return splits[0], splits[1]


def _split_dir(cfg: DataConfig, key: str) -> str:
    if cfg.name == "tinyimagenet":
        return "train" if key == "data.train_split" else os.path.join("val", "images")
    return cfg.train_split if key == "data.train_split" else cfg.val_split


def _base_splits(cfg: DataConfig, run_dir: Optional[str] = None) -> tuple[Dataset, Dataset, int]:
    """(train split, test split, number of classes) as PIL data sets."""
    if cfg.name in file_lists.JPEG_TREES:
        train, test = image_folder_splits(cfg, run_dir)
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


def build_datasets(data_cfg: DataConfig, run_dir: Optional[str] = None) -> Datasets:
    """Pre-training set plus the two kNN sets, with the configured recipe and crop size.

    ``run_dir``: where the list of skipped files is written (and the file-check cache when the
    data directory is read-only); None: nowhere (the warnings still name the files)."""
    train, test, num_classes = _base_splits(data_cfg, run_dir)
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

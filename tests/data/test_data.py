"""mixfast.data: data sets, transforms, sampler and loaders, on data generated here."""

from __future__ import annotations

import os
import pickle
import re

import mixfast  # noqa: F401  (patches torchvision before anything imports it)

import numpy as np
import pytest
import torch
from PIL import Image

from mixfast.config import DataConfig
from mixfast.data import (
    RECIPES,
    CIFARPickle,
    DigitsDemo,
    EvalDataset,
    ResumableDistributedSampler,
    SafeImageFolder,
    SyntheticImages,
    TwoViewDataset,
    build_datasets,
    build_eval_loader,
    build_train_loader,
    eval_transform,
    two_view_transform,
)
from mixfast.data.datasets import Unreadable
from mixfast.data.files import DataError

# ---------------------------------------------------------------------------------------
# CIFAR pickles
# ---------------------------------------------------------------------------------------


def _write_cifar_file(path, rows: np.ndarray, labels: list[int], label_key: bytes) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, label_key: labels, b"batch_label": b"test"}, f)


def _write_cifar(root, num_classes: int, rng: np.random.Generator) -> dict:
    """Official layout with 3 images per file; returns {train: bool -> (rows, labels)}."""
    names = {10: ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]), 100: (["train"], ["test"])}
    key = b"labels" if num_classes == 10 else b"fine_labels"
    written = {}
    for train, files in zip((True, False), names[num_classes]):
        rows = rng.integers(0, 256, size=(3 * len(files), 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=len(rows)).tolist()
        for i, name in enumerate(files):
            _write_cifar_file(root / name, rows[3 * i : 3 * i + 3], labels[3 * i : 3 * i + 3], key)
        written[train] = (rows, labels)
    return written


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickle_round_trip(tmp_path, num_classes):
    written = _write_cifar(tmp_path, num_classes, np.random.default_rng(num_classes))
    for train in (True, False):
        rows, labels = written[train]
        data = CIFARPickle(str(tmp_path), train=train, num_classes=num_classes)
        assert len(data) == len(rows)
        for i in range(len(data)):
            image, label = data[i]
            assert image.mode == "RGB" and image.size == (32, 32)
            assert label == labels[i]
            # Row layout: 1024 R, 1024 G, 1024 B values, each row-major over 32x32.
            np.testing.assert_array_equal(np.asarray(image), rows[i].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_through_build_datasets(tmp_path):
    _write_cifar(tmp_path, 10, np.random.default_rng(0))
    data = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), image_size=32, augmentation="cifar"))
    assert (len(data.train), len(data.knn_train), len(data.knn_test), data.num_classes) == (15, 15, 3, 10)
    x1, x2, label, index = data.train[4]
    assert x1.shape == x2.shape == (3, 32, 32) and x1.dtype == torch.float32
    assert (label, index) == (data.knn_train.base[4][1], 4)
    x, _ = data.knn_test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_cifar_missing_file_names_path(tmp_path):
    _write_cifar(tmp_path, 10, np.random.default_rng(0))
    missing = tmp_path / "data_batch_3"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        CIFARPickle(str(tmp_path), train=True, num_classes=10)


# ---------------------------------------------------------------------------------------
# ImageFolder with a corrupt file
# ---------------------------------------------------------------------------------------

CLASSES, PER_CLASS = ("cat", "dog", "owl"), 8


def _write_image_tree(root, corrupt: bool = True):
    rng = np.random.default_rng(0)
    for name in CLASSES:
        os.makedirs(root / "train" / name)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.jpg", quality=90)
    bad = root / "train" / "dog" / "corrupt.jpg"
    if corrupt:
        good_bytes = (root / "train" / "dog" / "0.jpg").read_bytes()
        bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated JPEG
    return bad


def test_image_folder_skips_corrupt_file_across_workers(tmp_path):
    bad = _write_image_tree(tmp_path)
    folder = SafeImageFolder(str(tmp_path / "train"))
    assert folder.classes == list(CLASSES) and len(folder) == len(CLASSES) * PER_CLASS + 1
    bad_index = [path for path, _ in folder.samples].index(str(bad))

    data = TwoViewDataset(folder, two_view_transform("cifar", 16))
    loader = build_train_loader(data, batch_size_per_rank=5, rank=0, world_size=1, seed=0, num_workers=2)
    loader.sampler.set_epoch(0)
    seen, skipped = set(), 0
    for batch in loader:
        assert batch["x1"].shape == batch["x2"].shape == (5, 3, 16, 16)  # refilled to full size
        assert batch["label"].dtype == batch["index"].dtype == torch.int64
        seen.update(batch["index"].tolist())
        skipped += batch["skipped"]
    assert skipped == 1
    assert seen == set(range(len(folder))) - {bad_index}


def test_image_folder_names_the_unreadable_file_once(tmp_path):
    bad = _write_image_tree(tmp_path)
    bad.write_bytes(b"not a JPEG at all" * 10)  # garbage under a .jpg name
    folder = SafeImageFolder(str(tmp_path / "train"))  # no start-up check: fails when read
    item = folder[[p for p, _ in folder.samples].index(str(bad))]
    assert isinstance(item, Unreadable) and item.path == str(bad) and "not an image" in item.reason
    loader = build_train_loader(TwoViewDataset(folder, two_view_transform("cifar", 16)), 5, 0, 1, seed=0,
                                num_workers=0)
    with pytest.warns(UserWarning, match=re.escape(str(bad))) as named:
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            assert sum(b["skipped"] for b in loader) == 1  # counted in each epoch that draws it
    assert sum(str(bad) in str(w.message) for w in named) == 1  # named once


def test_eval_loader_drops_corrupt_file(tmp_path):
    _write_image_tree(tmp_path)
    data = EvalDataset(SafeImageFolder(str(tmp_path / "train")), eval_transform("mocov2", 16))
    with pytest.warns(UserWarning, match="corrupt.jpg"):
        batches = list(build_eval_loader(data, batch_size=10, num_workers=0))
    labels = torch.cat([label for _, label in batches])
    assert sum(len(x) for x, _ in batches) == len(labels) == len(CLASSES) * PER_CLASS
    assert torch.bincount(labels).tolist() == [PER_CLASS] * len(CLASSES)


def test_image_folder_missing_dirs_name_the_path(tmp_path):
    _write_image_tree(tmp_path, corrupt=False)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), val_split="val", image_size=16)
    with pytest.raises(DataError, match=re.escape(f"data.val_split: {tmp_path / 'val'} does not exist")):
        build_datasets(cfg)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nowhere"))):
        build_datasets(cfg.model_copy(update={"root": str(tmp_path / "nowhere")}))


# ---------------------------------------------------------------------------------------
# Demo and synthetic data
# ---------------------------------------------------------------------------------------


def test_digits_demo_split():
    train, test = DigitsDemo(train=True), DigitsDemo(train=False)
    assert len(train) + len(test) == 1797 and len(train) == int(0.8 * 1797)
    assert not set(train.indices) & set(test.indices)
    again = DigitsDemo(train=False)
    np.testing.assert_array_equal(again.indices, test.indices)
    np.testing.assert_array_equal(again.images, test.images)
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 2]) and pixels.max() > 200  # grey, full range
    assert sorted(set(train.labels)) == sorted(set(test.labels)) == list(range(10))


def test_synthetic_is_deterministic():
    data = build_datasets(DataConfig(name="synthetic", synthetic_size=40, num_classes=4, image_size=16))
    assert (len(data.train), len(data.knn_test), data.num_classes) == (40, 10, 4)
    a, b = SyntheticImages(8, 4, 16, seed=3), SyntheticImages(8, 4, 16, seed=3)
    np.testing.assert_array_equal(np.asarray(a[5][0]), np.asarray(b[5][0]))
    assert [a[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


# ---------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_view_transform(recipe):
    images = SyntheticImages(16, 2, 48, seed=0)
    transform = two_view_transform(recipe, 32)
    views = [transform(images[i][0]) for i in range(len(images))]
    x1 = torch.stack([v[0] for v in views])
    x2 = torch.stack([v[1] for v in views])
    assert x1.shape == x2.shape == (16, 3, 32, 32) and x1.dtype == torch.float32
    assert not torch.equal(x1, x2)  # independent random views
    assert abs(x1.mean().item()) < 0.5 and x1.min() < 0  # normalized, not in [0, 1]


@pytest.mark.parametrize("size, recipe", [(32, "cifar"), (96, "mocov2")])
def test_eval_transform_is_deterministic(size, recipe):
    image = SyntheticImages(1, 1, 128, seed=0)[0][0]
    transform = eval_transform(recipe, size)
    x = transform(image)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert torch.equal(x, transform(image))


def test_unknown_recipe_names_it_and_the_allowed_ones():
    for factory in (two_view_transform, eval_transform):
        with pytest.raises(ValueError, match="simclr.*mocov2.*mocov1.*cifar"):
            factory("simclr", 32)


# ---------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------


def _epoch(length, rank, epoch, start=0, replicas=2, seed=7):
    sampler = ResumableDistributedSampler(length, replicas, rank, seed)
    sampler.set_epoch(epoch, start)
    assert len(sampler) == length // replicas - start
    return list(sampler)


def test_sampler_shards_are_disjoint_and_equal():
    rank0, rank1 = _epoch(101, 0, 0), _epoch(101, 1, 0)
    assert len(rank0) == len(rank1) == 50
    assert not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) <= set(range(101))


def test_sampler_order_depends_on_epoch_only():
    assert _epoch(100, 0, 3) == _epoch(100, 0, 3)
    assert _epoch(100, 0, 3) != _epoch(100, 0, 4)
    assert set(_epoch(100, 0, 3) + _epoch(100, 1, 3)) == set(range(100))


def test_sampler_resumes_mid_epoch():
    full = _epoch(101, 1, 2)
    k = 17
    interrupted = full[:k]  # a run that stopped after k samples of epoch 2
    assert interrupted + _epoch(101, 1, 2, start=k) == full
    assert _epoch(101, 1, 2, start=len(full)) == []
    with pytest.raises(ValueError):
        _epoch(101, 1, 2, start=len(full) + 1)


def test_train_loader_resumes_mid_epoch():
    data = TwoViewDataset(SyntheticImages(24, 3, 8, seed=0), two_view_transform("cifar", 8))

    def indices(start):
        loader = build_train_loader(data, batch_size_per_rank=4, rank=1, world_size=2, seed=5, num_workers=0)
        loader.sampler.set_epoch(1, start)
        return [batch["index"].tolist() for batch in loader]

    full = indices(0)
    assert len(full) == 3  # 12 samples per rank, 4 per batch
    assert indices(4) == full[1:]


@pytest.mark.parametrize("recipe", ["cifar", "mocov2", "mae"])
def test_seeded_views_are_those_of_torch_manual_seed_and_leave_the_global_rng_alone(recipe):
    # The kill/resume guarantee rests on these draws: seeding only the CPU generator (fast) must
    # give exactly the views that torch.manual_seed(seed) gave, whatever the global state.
    data = TwoViewDataset(SyntheticImages(4, 2, 16, seed=0), two_view_transform(recipe, 16))
    seed = int(torch.randint(0, 2**62, ()).item())  # a fresh seed each run
    torch.manual_seed(seed)
    expected = data.two_view_transform(data.base[2][0])
    before = torch.get_rng_state()
    x1, x2, label, index = data[(2, seed)]
    assert torch.equal(torch.get_rng_state(), before)
    assert index == 2 and label == data.base[2][1]
    assert torch.equal(x1, expected[0]) and torch.equal(x2, expected[1])
    assert not torch.equal(x1, data[(2, seed + 1)][0])  # the seed does decide the views

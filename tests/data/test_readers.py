"""Readers of the papers' data sets on tiny fakes in the official layouts: Tiny-ImageNet,
ImageNet-100, STL-10 (CIFAR is in test_data.py), and the JPEG integrity check."""

from __future__ import annotations

import re

import mixfast  # noqa: F401  (patches torchvision before anything imports it)

import numpy as np
import pytest
from PIL import Image

from mixfast.config import ConfigError, DataConfig, load_config
from mixfast.data import STL10Binary, build_datasets
from mixfast.data.check import inspect_file
from mixfast.data.files import DataError, jpeg_tree, read_class_list


def _jpeg(path, rng, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path, quality=90)


# ---------------------------------------------------------------------------------------
# Tiny-ImageNet
# ---------------------------------------------------------------------------------------

WNIDS = ("n01443537", "n01629819", "n01641577")


def write_tinyimagenet(root, per_class=4, val_per_class=2):
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        for i in range(per_class):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rng)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # as in the archive; not an image
    lines = []
    for k in range(val_per_class * len(WNIDS)):
        wnid = WNIDS[(k * 2) % len(WNIDS)]
        _jpeg(root / "val" / "images" / f"val_{k}.JPEG", rng)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {f"val_{k}.JPEG": WNIDS.index(WNIDS[(k * 2) % len(WNIDS)]) for k in range(val_per_class * len(WNIDS))}


def test_tinyimagenet_train_and_val_annotations(tmp_path):
    val_labels = write_tinyimagenet(tmp_path)
    data = build_datasets(DataConfig(name="tinyimagenet", root=str(tmp_path), image_size=16, augmentation="cifar"))
    assert (len(data.train), len(data.knn_test), data.num_classes) == (12, 6, 3)
    train = data.train.base
    assert train.classes == list(WNIDS)
    assert [label for _, label in train.samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(path.endswith(".JPEG") and "/images/" in path for path, _ in train.samples)
    test = data.knn_test.base
    assert {p.rsplit("/", 1)[1]: label for p, label in test.samples} == val_labels
    x1, x2, label, index = data.train[5]
    assert x1.shape == x2.shape == (3, 16, 16) and (label, index) == (1, 5)


def test_tinyimagenet_missing_annotations_names_the_path(tmp_path):
    write_tinyimagenet(tmp_path)
    (tmp_path / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "val" / "val_annotations.txt"))):
        build_datasets(DataConfig(name="tinyimagenet", root=str(tmp_path), image_size=16))


def test_tinyimagenet_annotation_with_unknown_wnid_names_the_line(tmp_path):
    write_tinyimagenet(tmp_path)
    with open(tmp_path / "val" / "val_annotations.txt", "a") as f:
        f.write("val_x.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:7"):
        jpeg_tree("tinyimagenet", str(tmp_path), "val", train=False)


# ---------------------------------------------------------------------------------------
# ImageNet-100 (class list over an ImageNet tree)
# ---------------------------------------------------------------------------------------


def write_imagenet(root, wnids=("n02", "n01", "n04", "n03"), per_class=3):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for wnid in wnids:
            for i in range(per_class if split == "train" else 1):
                _jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", rng)


def test_imagenet100_selects_the_listed_classes(tmp_path):
    write_imagenet(tmp_path / "in")
    classes = tmp_path / "in100.txt"
    classes.write_text("n04\n# a comment\n\nn01\n")
    data = build_datasets(DataConfig(name="imagenet100", root=str(tmp_path / "in"), class_list=str(classes),
                                     image_size=16))
    assert data.num_classes == 2 and data.train.base.classes == ["n01", "n04"]  # sorted, as ImageFolder
    assert [(p.split("/")[-2], label) for p, label in data.train.base.samples] == [("n01", 0)] * 3 + [("n04", 1)] * 3
    assert len(data.knn_test) == 2


def test_imagenet100_missing_class_folder_names_it(tmp_path):
    write_imagenet(tmp_path / "in")
    classes = tmp_path / "in100.txt"
    classes.write_text("n01\nn77\n")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "in" / "train" / "n77"))):
        build_datasets(DataConfig(name="imagenet100", root=str(tmp_path / "in"), class_list=str(classes)))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.txt"))):
        read_class_list(str(tmp_path / "nope.txt"))


def test_imagenet100_needs_a_class_list(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"data": {"name": "imagenet100", "root": "%s"}}' % tmp_path)
    with pytest.raises(ConfigError, match="data.class_list"):
        load_config(path)


# ---------------------------------------------------------------------------------------
# STL-10 (official binary layout)
# ---------------------------------------------------------------------------------------


def write_stl10(root, n_train=4, n_test=3, n_unlabeled=5):
    """Images as [row, column, RGB] arrays; on disk channel by channel, each column-major."""
    rng = np.random.default_rng(2)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        images.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")  # [n, c, column, row]
        labels = rng.integers(1, 11, size=n).astype(np.uint8)  # 1..10 on disk
        if split != "unlabeled":
            labels.tofile(folder / f"{split}_y.bin")
        written[split] = (images, labels.astype(int) - 1 if split != "unlabeled" else np.full(n, -1))
    return written


def test_stl10_binary_layout_and_pretraining_split(tmp_path):
    written = write_stl10(tmp_path)
    train = STL10Binary(str(tmp_path), "train")
    assert len(train) == 4 and train.labels == written["train"][1].tolist()
    np.testing.assert_array_equal(np.asarray(train[2][0]), written["train"][0][2])  # row-major RGB again
    pre = STL10Binary(str(tmp_path), "train+unlabeled")
    assert len(pre) == 9 and pre.labels == written["train"][1].tolist() + [-1] * 5
    np.testing.assert_array_equal(pre.image_array(6), written["unlabeled"][0][2])

    data = build_datasets(DataConfig(name="stl10", root=str(tmp_path), image_size=32, augmentation="mocov2"))
    assert (len(data.train), len(data.knn_train), len(data.knn_test), data.num_classes) == (9, 4, 3, 10)
    x1, _, label, _ = data.train[7]
    assert x1.shape == (3, 32, 32) and label == -1
    assert [data.knn_test[i][1] for i in range(3)] == written["test"][1].tolist()


def test_stl10_missing_file_names_path(tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "stl10_binary" / "unlabeled_X.bin"))):
        build_datasets(DataConfig(name="stl10", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------
# integrity check
# ---------------------------------------------------------------------------------------


def test_inspect_file_decodes_and_names_the_problem(tmp_path):
    """The start-up check decodes: a truncated, cut-header, foreign or empty file fails with a reason."""
    rng = np.random.default_rng(3)
    good = tmp_path / "good.jpg"
    _jpeg(good, rng)
    data = good.read_bytes()
    convert = str(tmp_path / "converted")
    assert inspect_file(str(good), convert).problem is None and inspect_file(str(good), convert).read == str(good)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert "truncated" in inspect_file(str(tmp_path / "cut.jpg"), convert).problem
    (tmp_path / "head.jpg").write_bytes(data[:20] + b"\xff\xd9")  # EOI present, frame header cut
    assert inspect_file(str(tmp_path / "head.jpg"), convert).problem is not None
    (tmp_path / "text.jpg").write_bytes(b"not an image" * 20)
    assert "not an image" in inspect_file(str(tmp_path / "text.jpg"), convert).problem
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert inspect_file(str(tmp_path / "empty.jpg"), convert).problem is not None
    Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    assert inspect_file(str(tmp_path / "ok.png"), convert).problem is None
    png = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) - 12])
    assert inspect_file(str(tmp_path / "cut.png"), convert).problem is not None
    missing = inspect_file(str(tmp_path / "missing.jpg"), convert)
    assert "FileNotFoundError" in missing.problem and missing.transient  # not cached: it may appear

"""Real-world image folders on both loaders: what is listed, what is skipped and how it is
counted, the decoded pixels of every format variant, class indices of every split, and the
one-line errors. The tree (``folder_tree.py``) is written with real encoders."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import mixfast  # noqa: F401  (patches torchvision before anything imports it)

import numpy as np
import pytest
import torch

import folder_tree
from mixfast.config import DataConfig, RunConfig
from mixfast.data import build_datasets, build_pretrain_loader
from mixfast.data import check as file_check
from mixfast.data.dali import decode_full
from mixfast.data.files import DataError

REPO = Path(__file__).resolve().parents[2]

# DALI's CPU decoders and Pillow both decode JPEG with libjpeg-turbo and PNG with libpng/zlib, and
# the formats whose DALI decode differs reach DALI as converted PNG copies: on the CPU the two
# loaders' pixels are equal, so the tolerance is 0. (DALI's GPU decoder, nvJPEG, rounds its
# inverse DCT and colour conversion differently: see the gpu-marked test in test_dali.py.)
CPU_PIXEL_TOLERANCE = 0
# nvJPEG (DALI's GPU decoder) uses its own inverse DCT and chroma upsampling: a few levels per
# pixel, more along sharp colour edges, so the GPU test bounds the mean and the 99th percentile of
# the absolute difference rather than the maximum. Not measured here (no GPU on the machine that
# wrote this): the bounds are an estimate for the gpu-marked test to confirm or correct.
GPU_MEAN_TOLERANCE, GPU_P99_TOLERANCE = 2.0, 12
# The variants DALI reads as converted copies (its own decode differs or fails).
CONVERTED = {"rgb16.png", "grey_alpha.tiff", "bilevel.tif"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("folders")
    return root, folder_tree.write_tree(root)


@pytest.fixture(scope="module")
def data(tree):
    root, _ = tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_datasets(DataConfig(name="imagefolder", root=str(root), image_size=16, num_workers=0))


def test_listing_skips_and_class_indices(tree, data):
    root, expect = tree
    train, val = data.train.base, data.knn_test.base
    assert train.classes == val.classes == expect["classes"]
    assert sorted(p for p, _ in train.samples) == expect["train_valid"]  # every valid variant, nested, linked
    # damaged, truncated, empty, foreign, bad checksum, dangling
    assert sorted(p for p, _ in train.skipped) == expect["train_bad"]
    reasons = {Path(p).name: why for p, why in train.skipped}
    assert "IDAT chunk" in reasons["idat_checksum.png"] and "CRC" in reasons["idat_checksum.png"]
    assert "truncated" in reasons["truncated.jpg"] and "No such file" in reasons["dangling_link.jpg"]
    # .DS_Store, ._baseline.jpg, .hidden.jpg, .ipynb_checkpoints/ are hidden; notes.txt is no image
    assert dict(train.ignored) == {"hidden": 4, "not an image": 1}
    # val holds animals and rocks only: they keep the training indices 0 and 2, not 0 and 1
    assert dict(val.samples) == expect["val_valid"]
    assert [p for p, _ in val.skipped] == expect["val_bad"]
    assert dict(val.ignored) == {"hidden": 1}
    assert data.describe_train() == ("32 training images (8 unreadable files skipped; 3 read by DALI through "
                                     "converted PNG copies; ignored: 4 hidden, 1 not an image)")


def test_every_valid_variant_decodes_to_the_same_pixels_on_both_loaders(data):
    """torch path (Pillow via load_rgb) against the expected pixels (EXIF orientation applied,
    16-bit scaled, alpha dropped), and the DALI pipeline's decoder against the torch path."""
    train = data.train.base
    variants = folder_tree.variants()
    index = {Path(p).name: i for i, (p, _) in enumerate(train.samples) if "/animals/" in p}
    assert set(index) == set(variants)
    names = sorted(variants)
    converted = {n for n in names if train.read_paths[index[n]] != train.samples[index[n]][0]}
    assert converted == CONVERTED
    dali = decode_full([train.read_paths[index[n]] for n in names])
    for name, from_dali in zip(names, dali):
        _, expected, codec_error = variants[name]
        image, label = train[index[name]]
        pixels = np.asarray(image)
        assert label == 0 and image.mode == "RGB"
        assert pixels.shape == expected.shape, name  # an EXIF rotation shows as 56x40 instead of 40x56
        assert np.abs(pixels.astype(int) - expected).mean() <= codec_error, name
        assert from_dali.shape == pixels.shape, name
        assert np.abs(from_dali.astype(int) - pixels).max() <= CPU_PIXEL_TOLERANCE, name


@pytest.mark.gpu
def test_gpu_decoder_pixels_match_the_torch_path_within_rounding(data):
    """data.dali_device=gpu decodes with nvJPEG ('mixed'); every valid variant against Pillow."""
    train = data.train.base
    decoded = decode_full(train.read_paths, device="gpu", device_id=0)
    for i, from_gpu in enumerate(decoded):
        pixels = np.asarray(train[i][0]).astype(int)
        assert from_gpu.shape == pixels.shape, train.samples[i][0]
        diff = np.abs(from_gpu.astype(int) - pixels)
        assert diff.mean() <= GPU_MEAN_TOLERANCE and np.percentile(diff, 99) <= GPU_P99_TOLERANCE, \
            (train.samples[i][0], diff.mean(), np.percentile(diff, 99))


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_full_epochs_on_two_ranks_count_each_skipped_file_once(tree, data, loader):
    root, expect = tree
    cfg = RunConfig.model_validate({"data": {"name": "imagefolder", "root": str(root), "image_size": 16,
                                             "loader": loader, "num_workers": 0, "dali_threads": 1},
                                    "train": {"precision": "fp32"}})
    n, bad = len(data.train.base), len(expect["train_bad"])
    per_rank = []
    for rank in (0, 1):
        batches_of = build_pretrain_loader(cfg, data, 4, rank, 2, torch.device("cpu"))
        counts = []
        for epoch in (0, 1):
            batches_of.sampler.set_epoch(epoch)
            batches = list(batches_of)
            assert len(batches) == n // 2 // 4
            assert all(b["x1"].shape == (4, 3, 16, 16) for b in batches)
            assert set(torch.cat([b["index"] for b in batches]).tolist()) <= set(range(n))
            counts.append(sum(int(b["skipped"]) for b in batches))
        assert counts[0] == counts[1]
        per_rank.append(counts[0])
    # each of the 8 files the check removed counted once per epoch: file j on rank j % 2
    assert per_rank == [(bad + 1) // 2, bad // 2]


def test_skipped_files_are_named_once_in_the_run_directory(tree, tmp_path):
    root, expect = tree
    run = tmp_path / "run"
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16)
    with pytest.warns(UserWarning, match=r"skipping 8 unreadable image files found by the start-up check of "
                                         r"data.train_split: .*\(listed in .*skipped_files.txt\)") as caught:
        build_datasets(cfg, run_dir=str(run))
    lines = (run / file_check.SKIPPED_FILES).read_text().splitlines()
    listed = [line.split("\t")[0] for line in lines]
    assert sorted(listed) == sorted(expect["train_bad"] + expect["val_bad"])
    assert all(len(line.split("\t")) == 3 and line.split("\t")[1] for line in lines)
    assert sum("data.train_split" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings(record=True) as again:  # a resumed run (same run directory)
        warnings.simplefilter("always")
        build_datasets(cfg, run_dir=str(run))
    assert not [w for w in again if "skipping" in str(w.message)]  # names nothing again
    assert (run / file_check.SKIPPED_FILES).read_text().splitlines() == lines


def test_check_is_cached_and_rechecks_changed_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    folder_tree.write(root / "train" / "a", {n: v[0] for n, v in list(folder_tree.variants().items())[:6]})
    folder_tree.write(root / "val" / "a", {"x.png": folder_tree.variants()["rgb.png"][0]})
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16)
    decoded = []
    real = file_check.inspect_file
    monkeypatch.setattr(file_check, "inspect_file", lambda path, *a, **k: (decoded.append(path), real(path, *a, **k))[1])
    build_datasets(cfg)
    assert len(decoded) == 7
    assert (root / ".mixfast").is_dir()  # next to the data (writable here), hidden from the listing
    decoded.clear()
    build_datasets(cfg)
    assert decoded == []  # every verdict from the cache
    changed = root / "train" / "a" / "baseline.jpg"
    changed.write_bytes(changed.read_bytes()[:300])  # replaced by a truncated copy
    with pytest.warns(UserWarning, match="baseline.jpg"):
        again = build_datasets(cfg)
    assert decoded == [str(changed)]
    assert [p for p, _ in again.train.base.skipped] == [str(changed)]
    decoded.clear()
    build_datasets(cfg.model_copy(update={"check_cache": "off"}))
    assert len(decoded) == 7


@pytest.mark.parametrize("case", ["empty class folder", "only hidden files", "missing val split", "unknown val class"])
def test_data_errors_are_one_line_and_name_the_path(tmp_path, case):
    root = tmp_path / "data"
    folder_tree.write(root / "train" / "a", {"0.jpg": folder_tree.variants()["baseline.jpg"][0]})
    folder_tree.write(root / "val" / "a", {"0.jpg": folder_tree.variants()["baseline.jpg"][0]})
    if case == "empty class folder":
        (root / "train" / "b").mkdir()
        match = f"data.train_split: class folder {root / 'train' / 'b'} holds no image file"
    elif case == "only hidden files":
        folder_tree.write(root / "train" / "b", {".DS_Store": b"\x00\x00\x00\x01Bud1", "._0.jpg": b"\x00\x05\x16\x07"})
        match = f"data.train_split: class folder {root / 'train' / 'b'} holds no image file (2 hidden"
    elif case == "missing val split":
        (root / "val" / "a" / "0.jpg").unlink()
        (root / "val" / "a").rmdir()
        (root / "val").rmdir()
        match = f"data.val_split: {root / 'val'} does not exist"
    else:
        folder_tree.write(root / "val" / "zebra", {"0.jpg": folder_tree.variants()["baseline.jpg"][0]})
        match = f"data.val_split: {root / 'val'} has class folders that the training split lacks: zebra"
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(name="imagefolder", root=str(root), image_size=16))
    assert str(err.value).startswith(match) and "\n" not in str(err.value)


@pytest.mark.slow
def test_trainer_reports_a_data_error_in_one_line(tmp_path):
    root = tmp_path / "data"
    folder_tree.write(root / "train" / "a", {"0.jpg": folder_tree.variants()["baseline.jpg"][0]})
    folder_tree.write(root / "val" / "a", {"0.jpg": folder_tree.variants()["baseline.jpg"][0]})
    folder_tree.write(root / "train" / "b", {".DS_Store": b"\x00\x00\x00\x01Bud1"})
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mixfast.train", "--config", str(REPO / "configs" / "demo.json"),
           "--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set", f"train.output_dir={tmp_path / 'o'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"data.train_split: class folder {root / 'train' / 'b'} holds no image file" in proc.stderr

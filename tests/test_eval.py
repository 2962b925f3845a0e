"""Evaluation commands (kNN, linear probe, fine-tune, Detectron2 export) and their shared parts,
on a tiny ResNet-18 and the synthetic data set, in-process through each command's main(argv)."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import warnings
import shutil
from pathlib import Path

import mixfast  # noqa: F401
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mixfast.config import RunConfig, dump_config
from mixfast.eval import common, export_detectron2, finetune, knn, linear, subsets
from mixfast.models import build_backbone, build_head, export_torchvision_state_dict

TINY_CONFIG = {
    "model": {"arch": "resnet18", "width": 8, "cifar_stem": False},
    "data": {"name": "synthetic", "synthetic_size": 48, "num_classes": 10, "image_size": 32,
             "augmentation": "cifar", "num_workers": 0, "hflip": False},
    "eval": {"knn_k": 5},
}


def _make_run(root: Path, export: bool = True, checkpoint: bool = True, seed: int = 0) -> tuple[Path, dict]:
    """A run directory as the trainer leaves it: config.json, checkpoints/<tag>/mp_rank_00_model_states.pt
    (DeepSpeed's layout: {'module': {'backbone.*', 'head.*'}, ...}) and backbone_torchvision.pth."""
    torch.manual_seed(seed)
    cfg = RunConfig.model_validate(TINY_CONFIG)
    backbone = build_backbone("resnet18", 8, False)
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up of buffers would show
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    head = build_head("mlp", backbone.feature_dim, 16)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(dump_config(cfg), indent=2))
    state = export_torchvision_state_dict(backbone)
    if checkpoint:
        module = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        module.update({f"head.{k}": v for k, v in head.state_dict().items()})
        for tag in ("step000000001", "step000000002"):
            (root / "checkpoints" / tag).mkdir(parents=True)
            torch.save({"module": module, "global_steps": 2, "optimizer": None},
                       root / "checkpoints" / tag / "mp_rank_00_model_states.pt")
        (root / "checkpoints" / "latest").write_text("step000000002")
    if export:
        torch.save(state, root / "backbone_torchvision.pth")
    return root, state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("eval") / "run")[0]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- sources ----------------------------------------------------------------------------------------


def test_run_dir_checkpoint_and_export_give_identical_backbones(tmp_path):
    run, state = _make_run(tmp_path / "run")
    sources = {
        "run dir": common.resolve_source(run),
        "checkpoints dir": common.resolve_source(run / "checkpoints"),
        "tag dir": common.resolve_source(run / "checkpoints" / "step000000001"),
        "model states file": common.resolve_source(run / "checkpoints" / "step000000002" / "mp_rank_00_model_states.pt"),
        "export": common.resolve_source(run / "backbone_torchvision.pth"),
    }
    assert sources["run dir"].kind == "export" and sources["tag dir"].kind == "checkpoint"
    assert sources["checkpoints dir"].weights.endswith(os.path.join("step000000002", "mp_rank_00_model_states.pt"))
    weights = []
    for name, source in sources.items():
        assert source.config_path == str(run / "config.json"), name
        cfg = common.resolve_config(source)
        backbone = common.load_backbone(source, cfg)
        weights.append(backbone.state_dict())
        assert _same(source.state_dict, state), name
    assert all(_same(w, weights[0]) for w in weights[1:])

    # An exported .pth alone (no config.json next to it) needs the architecture on the command line.
    alone = tmp_path / "alone" / "b.pth"
    alone.parent.mkdir()
    shutil.copy(run / "backbone_torchvision.pth", alone)
    source = common.resolve_source(alone)
    assert source.config_path is None
    with pytest.raises(common.SourceError, match="--arch"):
        common.resolve_config(source)
    cfg = common.resolve_config(source, arch="resnet18", width=8, overrides=["data.name=synthetic"])
    assert _same(common.load_backbone(source, cfg).state_dict(), weights[0])

    # Without the export, a run directory falls back to its newest checkpoint.
    (run / "backbone_torchvision.pth").unlink()
    source = common.resolve_source(run)
    assert source.kind == "checkpoint" and "step000000002" in source.weights
    assert _same(source.state_dict, state)


def test_bad_sources_raise_errors_that_name_them(tmp_path, run_dir, capsys):
    missing = tmp_path / "no-such-run"
    with pytest.raises(common.SourceError, match=str(missing)):
        common.resolve_source(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.SourceError, match=f"{empty}.*neither"):
        common.resolve_source(empty)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(common.SourceError, match=str(junk)):
        common.resolve_source(junk)
    notresnet = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, notresnet)
    with pytest.raises(common.SourceError, match=f"{notresnet}.*conv1.weight"):
        common.resolve_source(notresnet)
    nobackbone = tmp_path / "ck" / "t"
    nobackbone.mkdir(parents=True)
    torch.save({"module": {"head.0.weight": torch.zeros(2)}}, nobackbone / "mp_rank_00_model_states.pt")
    with pytest.raises(common.SourceError, match="no 'backbone"):
        common.resolve_source(nobackbone)
    # Weights that do not fit the architecture: the message names the file and the model keys.
    source = common.resolve_source(run_dir)
    cfg = common.resolve_config(source, width=16)
    with pytest.raises(common.SourceError, match=r"backbone_torchvision.pth: weights do not fit .*model.width=16"):
        common.load_backbone(source, cfg)
    # Through a command: SystemExit with the path, no traceback.
    with pytest.raises(SystemExit, match=str(missing)):
        linear.main([str(missing), "--no-progress"])
    with pytest.raises(SystemExit, match="--config .*nope.json"):
        linear.main([str(run_dir), "--config", str(tmp_path / "nope.json"), "--no-progress"])
    with pytest.raises(SystemExit, match="data.nmae"):
        knn.main([str(run_dir), "--set", "data.nmae=demo", "--no-progress"])


# --- subsets -----------------------------------------------------------------------------------------


def test_subset_is_balanced_deterministic_and_rejects_bad_percentages():
    labels = np.repeat(np.arange(5), [100, 50, 20, 7, 1])
    rng = np.random.default_rng(3)
    labels = labels[rng.permutation(len(labels))]
    ten = subsets.select_subset(labels, 10, seed=0)
    counts = np.bincount(labels[ten], minlength=5)
    assert counts.tolist() == [10, 5, 2, 1, 1]  # round(10% of n_c), at least one per class
    assert len(set(ten.tolist())) == len(ten) and np.all(np.diff(ten) > 0)
    assert np.array_equal(ten, subsets.select_subset(labels, 10, seed=0))
    assert not np.array_equal(ten, subsets.select_subset(labels, 10, seed=1))
    one = subsets.select_subset(labels, 1, seed=0)
    assert np.bincount(labels[one], minlength=5).tolist() == [1, 1, 1, 1, 1]
    assert np.array_equal(subsets.select_subset(labels, 100, seed=5), np.arange(len(labels)))
    for bad in (0, -1, 101, float("nan"), 100.5):
        with pytest.raises(ValueError, match="percentage"):
            subsets.select_subset(labels, bad, seed=0)


class _Indexed:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_subset_file_round_trip_indices_and_image_paths(tmp_path):
    indices = np.array([0, 3, 7, 9])
    path = subsets.write_subset(str(tmp_path / "s.txt"), indices, _Indexed(10), header="a header")
    assert (tmp_path / "s.txt").read_text().splitlines() == ["# a header", "0", "3", "7", "9"]
    assert np.array_equal(subsets.read_subset(path, _Indexed(10)), indices)

    # ImageFolder: relative paths are written; relative, absolute and bare file names are read.
    root = tmp_path / "train"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4)).save(root / cls / f"{cls}{i}.png")
    folder = torchvision.datasets.ImageFolder(str(root))
    written = subsets.write_subset(str(tmp_path / "f.txt"), [1, 4], folder)
    assert Path(written).read_text().splitlines() == [os.path.join("a", "a1.png"), os.path.join("b", "b1.png")]
    assert subsets.read_subset(written, folder).tolist() == [1, 4]
    (tmp_path / "g.txt").write_text(f"b2.png\n{root / 'a' / 'a0.png'}\n")
    assert subsets.read_subset(str(tmp_path / "g.txt"), folder).tolist() == [0, 5]

    for text, message in (("1\n1\n", "repeats line 1"), ("1\n12\n", "index 12 outside"),
                          ("cat.jpg\n", "neither an index nor an image"), ("# only a comment\n", "lists no images")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ValueError, match=message):
            subsets.read_subset(str(tmp_path / "bad.txt"), _Indexed(10))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        subsets.read_subset(str(tmp_path / "missing.txt"), _Indexed(10))


# --- schedules ----------------------------------------------------------------------------------------


def _lrs_by_epoch(optimizer, scheduler, epochs):
    seen = []
    for _ in range(epochs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()  # no gradients: a no-op, in the order torch expects
        scheduler.step()
    return seen


def test_linear_protocol_schedules():
    args = linear.parse_args(["run"])  # imagenet = SPEC §6
    assert (args.epochs, args.lr, args.momentum, args.weight_decay, args.batch_size) == (100, 30.0, 0.9, 0.0, 256)
    assert args.augment == "rrc"
    opt, sched = linear.build_optimizer(torch.nn.Linear(4, 2), args)
    lrs = [lr[0] for lr in _lrs_by_epoch(opt, sched, 100)]
    assert lrs[0] == lrs[59] == 30.0
    assert lrs[60] == pytest.approx(3.0) and lrs[79] == pytest.approx(3.0)
    assert lrs[80] == pytest.approx(0.3) and lrs[99] == pytest.approx(0.3)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 0.0

    args = linear.parse_args(["run", "--protocol", "cifar"])
    assert (args.lr, args.epochs, args.milestones, args.augment) == (0.1, 100, [60, 80], "crop")
    args = linear.parse_args(["run", "--protocol", "cifar", "--lr", "0.5", "--epochs", "10", "--milestones", "3",
                              "--gamma", "0.5"])
    opt, sched = linear.build_optimizer(torch.nn.Linear(4, 2), args)
    assert [lr[0] for lr in _lrs_by_epoch(opt, sched, 5)] == pytest.approx([0.5, 0.5, 0.5, 0.25, 0.25])
    args = linear.parse_args(["run", "--schedule", "cosine", "--epochs", "4", "--lr", "1"])
    opt, sched = linear.build_optimizer(torch.nn.Linear(4, 2), args)
    assert [lr[0] for lr in _lrs_by_epoch(opt, sched, 4)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    with pytest.raises(SystemExit):
        linear.parse_args(["run", "--milestones", "80", "60"])
    with pytest.raises(SystemExit):
        linear.parse_args(["run", "--precompute", "on"])  # augmentations on: features change every epoch


@pytest.mark.parametrize("labels,backbone_lr,classifier_lr", [(1, 0.002, 0.5), (10, 0.002, 0.5), (100, 0.001, 0.05)])
def test_finetune_schedule_per_group(labels, backbone_lr, classifier_lr):
    args = finetune.parse_args(["run", "--labels", str(labels)])
    assert (args.epochs, args.batch_size, args.momentum, args.weight_decay, args.milestones) == (20, 256, 0.9, 0.0,
                                                                                               [12, 16])
    model = finetune.Classifier(build_backbone("resnet18", 8), 10)
    opt, sched = finetune.build_optimizer(model, args)
    assert [g["name"] for g in opt.param_groups] == ["backbone", "classifier"]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    lrs = _lrs_by_epoch(opt, sched, 20)
    for epoch, factor in ((0, 1.0), (11, 1.0), (12, 0.1), (15, 0.1), (16, 0.01), (19, 0.01)):
        assert lrs[epoch] == pytest.approx([backbone_lr * factor, classifier_lr * factor]), epoch
    with pytest.raises(SystemExit):
        finetune.parse_args(["run", "--labels", "5"])


# --- the commands ----------------------------------------------------------------------------------


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def test_linear_command_writes_metrics_and_precompute_matches_streaming(run_dir, tmp_path, capsys):
    common_args = [str(run_dir), "--protocol", "cifar", "--epochs", "2", "--batch-size", "16", "--augment", "none",
                   "--no-progress"]
    fast = linear.main([*common_args, "--out", str(tmp_path / "pre")])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("linear top-1: ")
    record = _metrics(tmp_path / "pre" / "linear_metrics.json")
    assert record["protocol"] == "cifar" and record["precomputed_features"] is True
    assert 0.0 <= record["top1"] <= 100.0 and record["top5"] >= record["top1"]
    assert record["hyperparameters"]["lr"] == 0.1 and record["hyperparameters"]["milestones"] == [60, 80]
    assert record["source"]["kind"] == "export" and record["data"]["test_images"] == 12
    lines = (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2] and "top1" in json.loads(lines[-1])["val"]

    slow = linear.main([*common_args, "--precompute", "off", "--out", str(tmp_path / "stream")])
    assert slow["precomputed_features"] is False
    a = torch.load(tmp_path / "pre" / "linear_classifier.pth")
    b = torch.load(tmp_path / "stream" / "linear_classifier.pth")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert fast["top1"] == slow["top1"]


def test_linear_resumes_from_the_saved_epoch(run_dir, tmp_path, monkeypatch):
    args = [str(run_dir), "--protocol", "cifar", "--epochs", "3", "--batch-size", "8", "--augment", "none",
            "--no-progress"]
    linear.main([*args, "--out", str(tmp_path / "full")])
    saved = []
    real_save = common.save_state
    # (deep copies: a state_dict holds the live tensors, which the next epochs change)
    monkeypatch.setattr(common, "save_state",
                        lambda out, state: (saved.append(copy.deepcopy(state)), real_save(out, state)))
    linear.main([*args, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(common, "save_state", real_save)
    # Pretend the run died after its first epoch: only that epoch's state is on disk.
    torch.save(saved[0], tmp_path / "killed" / "state.pt")
    (tmp_path / "killed" / "linear_metrics.json").unlink()
    resumed = linear.main([*args, "--out", str(tmp_path / "killed")])
    assert resumed["epochs_run"] == 3
    a = torch.load(tmp_path / "full" / "linear_classifier.pth")
    b = torch.load(tmp_path / "killed" / "linear_classifier.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="other settings.*lr"):
        linear.main([*args, "--lr", "0.2", "--out", str(tmp_path / "full")])


def test_finetune_command_and_subset_file_reuse(run_dir, tmp_path, capsys):
    args = [str(run_dir), "--labels", "10", "--epochs", "1", "--batch-size", "8", "--no-progress"]
    first = finetune.main([*args, "--out", str(tmp_path / "a")])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("finetune (10% labels) top-1: ")
    record = _metrics(tmp_path / "a" / "finetune_metrics.json")
    assert record["labels_percent"] == 10 and record["hyperparameters"]["lr_backbone"] == 0.002
    assert record["hyperparameters"]["lr_classifier"] == 0.5 and record["subset"]["images"] == 10  # 1 of 4-5 per class
    assert 0.0 <= record["top1"] <= 100.0 and "top5" in record
    subset_file = tmp_path / "a" / "subset_10pct_seed0.txt"
    listed = [int(x) for x in subset_file.read_text().splitlines() if not x.startswith("#")]
    assert listed == subsets.select_subset(np.arange(48) % 10, 10, 0).tolist()
    second = finetune.main([*args, "--subset-file", str(subset_file), "--out", str(tmp_path / "b")])
    assert second["subset"]["digest"] == first["subset"]["digest"]
    assert second["top1"] == first["top1"]  # same subset, seed and weights: same run
    state = torch.load(tmp_path / "a" / "finetuned_torchvision.pth")
    assert "fc.weight" in state and "layer4.1.bn2.running_var" in state
    with pytest.raises(SystemExit, match="nope.txt"):
        finetune.main([*args, "--subset-file", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "c")])


def test_knn_command_matches_knn_accuracy(run_dir, tmp_path, capsys):
    record = knn.main([str(run_dir), "--k", "3", "--out", str(tmp_path / "knn"), "--no-progress"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"kNN top-1: {record['top1']:.2f}%"
    source = common.resolve_source(run_dir)
    cfg = common.resolve_config(source)
    data = common.labelled_data(cfg)
    tf = common.val_transform(data.recipe, data.image_size)
    bank = common.make_loader(data.train, tf, 7, 0)
    test = common.make_loader(data.test, tf, 5, 0)
    expected = knn.knn_accuracy(common.load_backbone(source, cfg), bank, test, data.num_classes, k=3, t=0.1)
    assert record["top1"] == pytest.approx(expected)
    assert _metrics(tmp_path / "knn" / "knn_metrics.json")["hyperparameters"] == {"k": 3, "t": 0.1,
                                                                                  "features": "backbone"}


# --- Detectron2 export ----------------------------------------------------------------------------------


def _detectron2_names(blocks, bottleneck: bool) -> set[str]:
    """Detectron2's ResNet parameter/buffer names (build_resnet_backbone; BN norm), written out."""
    bn = ("weight", "bias", "running_mean", "running_var")
    names = {"stem.conv1.weight", *(f"stem.conv1.norm.{b}" for b in bn)}
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for stage, n in zip(range(2, 6), blocks):
        for i in range(n):
            for c in convs:
                names |= {f"res{stage}.{i}.conv{c}.weight", *(f"res{stage}.{i}.conv{c}.norm.{b}" for b in bn)}
            if i == 0 and (bottleneck or stage > 2):  # projection shortcut where shapes change
                names |= {f"res{stage}.{i}.shortcut.weight", *(f"res{stage}.{i}.shortcut.norm.{b}" for b in bn)}
    return names


@pytest.mark.parametrize("arch,blocks,bottleneck", [("resnet50", (3, 4, 6, 3), True),
                                                    ("resnet18", (2, 2, 2, 2), False)])
def test_detectron2_key_mapping(arch, blocks, bottleneck):
    state = getattr(torchvision.models, arch)().state_dict()
    converted = export_detectron2.convert(state)
    kept = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert len(converted) == len(kept)  # every key mapped, none merged
    assert set(converted) == _detectron2_names(blocks, bottleneck)
    for key in kept:
        assert converted[export_detectron2.detectron2_key(key)].shape == tuple(state[key].shape), key
        assert np.array_equal(converted[export_detectron2.detectron2_key(key)], state[key].numpy())
    assert export_detectron2.detectron2_key("conv1.weight") == "stem.conv1.weight"
    assert export_detectron2.detectron2_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert export_detectron2.detectron2_key("layer1.0.conv1.weight") == "res2.0.conv1.weight"
    assert export_detectron2.detectron2_key("layer1.0.bn1.running_mean") == "res2.0.conv1.norm.running_mean"
    assert export_detectron2.detectron2_key("layer4.1.bn2.bias") == "res5.1.conv2.norm.bias"
    if bottleneck:
        assert export_detectron2.detectron2_key("layer1.0.downsample.0.weight") == "res2.0.shortcut.weight"
        assert export_detectron2.detectron2_key("layer1.0.downsample.1.weight") == "res2.0.shortcut.norm.weight"
    assert not any(k.startswith(("backbone.", "bottom_up", "layer", "fc")) for k in converted)
    with pytest.raises(KeyError, match="head.0.weight"):
        export_detectron2.detectron2_key("head.0.weight")


def test_detectron2_export_command(run_dir, tmp_path, capsys):
    out = tmp_path / "d2.pkl"
    export_detectron2.main([str(run_dir / "checkpoints"), str(out)])
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "mixfast" and obj["matching_heuristics"] is True
    state = torch.load(run_dir / "backbone_torchvision.pth")
    assert np.array_equal(obj["model"]["res3.0.shortcut.norm.running_mean"],
                          state["layer2.0.downsample.1.running_mean"].numpy())
    assert all(isinstance(v, np.ndarray) for v in obj["model"].values())
    assert "warning: stem conv" in capsys.readouterr().err  # width 8 is not Detectron2's 64
    with pytest.raises(SystemExit, match="no-such"):
        export_detectron2.main([str(tmp_path / "no-such"), str(out)])


def test_module_entry_point_runs_and_reports_bad_paths_without_traceback(run_dir, tmp_path):
    """`python -m mixfast.eval.<command>` as users run it (one command; the others share the code)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "mixfast.eval.knn", str(run_dir), "--k", "3", "--no-progress",
                         "--out", str(tmp_path / "k")], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.strip().splitlines()[-1].startswith("kNN top-1: ")
    missing = tmp_path / "no-such-run"
    bad = subprocess.run([sys.executable, "-m", "mixfast.eval.knn", str(missing)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and str(missing) in bad.stderr and "Traceback" not in bad.stderr


# --- image folders: class maps, skipped files, one-line errors -----------------------------------------


def _write_folders(root: Path, train=("a", "b", "c"), val=("a", "c"), per_class: int = 4) -> dict:
    """train/<class>/<i>.jpg (noise, distinct) and val/<class>/<i>.jpg byte copies of the first two
    train images of the same class, plus one damaged file in each split. Returns the copies."""
    rng = np.random.default_rng(0)
    copies = {}
    for c in train:
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.jpg")
    for c in val:
        (root / "val" / c).mkdir(parents=True)
        for i in range(2):
            source = root / "train" / c / f"{i}.jpg" if c in train else None
            data = source.read_bytes() if source else _jpeg_bytes(rng)
            (root / "val" / c / f"{i}.jpg").write_bytes(data)
            copies[str(root / "val" / c / f"{i}.jpg")] = c
    good = (root / "train" / train[0] / "0.jpg").read_bytes()
    (root / "train" / train[0] / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "val" / val[0] / "empty.jpg").write_bytes(b"")
    (root / "val" / val[0] / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    return copies


def _jpeg_bytes(rng) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _folder_args(root: Path) -> list[str]:
    return ["--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set", "data.image_size=16",
            "--no-progress"]


def test_knn_labels_val_by_the_training_classes_and_reports_used_and_skipped(run_dir, tmp_path, capsys):
    """val lacks train class 'b': its classes keep the training indices (a=0, c=2), so val images
    that are byte copies of training images find themselves (k=1): 100%, not the 50% of val
    numbered by its own folders. One unreadable file per split is skipped and counted."""
    root = tmp_path / "data"
    _write_folders(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = knn.main([str(run_dir), "--k", "1", "--out", str(tmp_path / "knn"), *_folder_args(root)])
    assert record["top1"] == 100.0
    assert any("training classes have no folder here (b)" in str(w.message) for w in caught)
    assert record["data"]["images"] == {"train": {"used": 12, "skipped": 1, "ignored": 0},
                                        "test": {"used": 4, "skipped": 1, "ignored": 1}}
    assert (record["data"]["train_images"], record["data"]["test_images"]) == (12, 4)
    out = capsys.readouterr().out
    assert "images: bank 12 used, 1 unreadable skipped; test 4 used, 1 unreadable skipped" in out
    listed = (tmp_path / "knn" / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == [str(root / "train" / "a" / "truncated.jpg"),
                                                              str(root / "val" / "a" / "empty.jpg")]
    assert _metrics(tmp_path / "knn" / "knn_metrics.json")["data"]["images"] == record["data"]["images"]


def test_a_file_that_fails_when_read_is_skipped_and_counted(run_dir, tmp_path):
    """A file whose cached verdict still holds (size and mtime kept) but that no longer decodes:
    skipped when read, and counted with the others."""
    root = tmp_path / "data"
    _write_folders(root, val=("a", "b", "c"))
    knn.main([str(run_dir), "--k", "1", "--out", str(tmp_path / "first"), *_folder_args(root)])  # caches the check
    rotten = root / "val" / "c" / "1.jpg"
    stat = rotten.stat()
    data = bytearray(rotten.read_bytes())
    data[2:40] = b"\x00" * 38  # a damaged header, same size
    rotten.write_bytes(bytes(data))
    os.utime(rotten, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.warns(UserWarning, match=re.escape(str(rotten))):
        record = knn.main([str(run_dir), "--k", "1", "--out", str(tmp_path / "second"), *_folder_args(root)])
    assert record["data"]["images"]["test"] == {"used": 5, "skipped": 2, "ignored": 1}
    assert record["top1"] == 100.0


def test_val_class_unknown_to_train_is_an_error_or_excluded_by_flag(run_dir, tmp_path):
    root = tmp_path / "data"
    _write_folders(root, val=("a", "c", "zebra"))
    with pytest.raises(SystemExit, match=r"data.val_split: .*/val has class folders that the training split lacks: "
                                         r"zebra"):
        knn.main([str(run_dir), "--out", str(tmp_path / "k"), *_folder_args(root)])
    with pytest.warns(UserWarning, match="leaving out the class folders the training split lacks.*zebra"):
        record = knn.main([str(run_dir), "--k", "1", "--out", str(tmp_path / "k"), "--exclude-unknown-classes",
                           *_folder_args(root)])
    assert record["data"]["images"]["test"]["used"] == 4 and record["top1"] == 100.0


@pytest.mark.parametrize("case", ["empty class folder", "only hidden files", "missing val split"])
def test_data_errors_are_one_line_naming_the_path(run_dir, tmp_path, case):
    root = tmp_path / "data"
    _write_folders(root)
    if case == "empty class folder":
        (root / "train" / "d").mkdir()
        path, what = root / "train" / "d", "holds no image file"
    elif case == "only hidden files":
        (root / "train" / "d").mkdir()
        (root / "train" / "d" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        path, what = root / "train" / "d", "holds no image file (1 hidden or non-image files ignored)"
    else:
        shutil.rmtree(root / "val")
        path, what = root / "val", "does not exist"
    for command in (knn.main, lambda a: linear.main([*a, "--epochs", "1"]),
                    lambda a: finetune.main([*a, "--labels", "100", "--epochs", "1"])):
        with pytest.raises(SystemExit) as stop:
            command([str(run_dir), "--out", str(tmp_path / "out"), *_folder_args(root)])
        message = str(stop.value)
        assert message.startswith("mixfast: data.") and str(path) in message and what in message
        assert "\n" not in message


def test_linear_and_finetune_report_used_and_skipped_images(run_dir, tmp_path, capsys):
    root = tmp_path / "data"
    _write_folders(root)
    record = linear.main([str(run_dir), "--epochs", "1", "--batch-size", "8", "--augment", "none",
                          "--out", str(tmp_path / "lin"), *_folder_args(root)])
    assert record["data"]["images"]["train"] == {"used": 12, "skipped": 1, "ignored": 0}
    assert record["data"]["images"]["test"] == {"used": 4, "skipped": 1, "ignored": 1}
    assert "images: train 12 used, 1 unreadable skipped; val 4 used, 1 unreadable skipped" in capsys.readouterr().out
    record = finetune.main([str(run_dir), "--labels", "10", "--epochs", "1", "--batch-size", "8",
                            "--out", str(tmp_path / "ft"), *_folder_args(root)])
    assert record["data"]["images"]["train"] == {"used": 3, "skipped": 1, "ignored": 0}  # the subset: 1 per class
    assert record["subset"]["images"] == 3
    listed = [x for x in Path(record["subset"]["file"]).read_text().splitlines() if not x.startswith("#")]
    assert sorted(x.split(os.sep)[0] for x in listed) == ["a", "b", "c"]  # paths relative to the split
    assert all((root / "train" / x).is_file() and "truncated" not in x for x in listed)
    (tmp_path / "bad_subset.txt").write_text("a/truncated.jpg\n")
    with pytest.raises(SystemExit, match=r"bad_subset.txt:1: 'a/truncated.jpg' is an unreadable image"):
        finetune.main([str(run_dir), "--labels", "10", "--epochs", "1", "--subset-file",
                       str(tmp_path / "bad_subset.txt"), "--out", str(tmp_path / "ft2"), *_folder_args(root)])

"""Evaluation commands on a ViT backbone (kNN, linear probe with feature BatchNorm, fine-tune with
MAE's recipe) and the ViT recipe's parts: layer-wise lr decay under the per-step schedule, drop
path, label smoothing and mixup / cutmix targets, RandAugment; and that the ResNet recipe's
defaults did not move. A tiny ViT (vit_tiny, 32 px) saved as a fake run on the synthetic data."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import mixfast  # noqa: F401
import numpy as np
import pytest
import torch
from torchvision import transforms as T

from mixfast.config import RunConfig, dump_config
from mixfast.eval import common, export_detectron2, finetune, knn, linear
from mixfast.models import build_backbone
from mixfast.models.vit import timm_state_dict

from test_eval import _make_run as _make_resnet_run
from test_eval import _same

VIT_CONFIG = {
    "model": {"arch": "vit_tiny", "pool": "cls"},
    "method": {"name": "mae"},
    "data": {"name": "synthetic", "synthetic_size": 48, "num_classes": 10, "image_size": 32,
             "augmentation": "mae", "num_workers": 0, "hflip": False},
    "eval": {"knn_k": 5},
}
DEPTH = 4  # vit_tiny's blocks


def _make_vit_run(root: Path, seed: int = 0) -> tuple[Path, dict]:
    """A ViT run directory as the trainer leaves it: config.json, a DeepSpeed-layout checkpoint
    ({'module': {'backbone.*', 'head.*' (the decoder)}}) and backbone_torchvision.pth (timm keys)."""
    torch.manual_seed(seed)
    cfg = RunConfig.model_validate(VIT_CONFIG)
    backbone = build_backbone("vit_tiny", image_size=32)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(dump_config(cfg), indent=2))
    state = timm_state_dict(backbone)
    module = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    module["head.decoder_embed.weight"] = torch.zeros(64, 96)
    (root / "checkpoints" / "step000000001").mkdir(parents=True)
    torch.save({"module": module}, root / "checkpoints" / "step000000001" / "mp_rank_00_model_states.pt")
    torch.save(state, root / "backbone_torchvision.pth")
    return root, state


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine a second OpenMP
    thread makes the fine-tunes 10-50x slower (spin-waiting), not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    return _make_vit_run(tmp_path_factory.mktemp("evalvit") / "run")[0]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    return _make_resnet_run(tmp_path_factory.mktemp("evalvit") / "resnet", checkpoint=False)[0]


# --- sources and the backbone ---------------------------------------------------------------------------


def test_vit_backbone_loads_from_run_checkpoint_and_export(vit_run, tmp_path):
    run, state = vit_run, torch.load(vit_run / "backbone_torchvision.pth")
    loaded = []
    for path in (run, run / "checkpoints", run / "backbone_torchvision.pth"):
        source = common.resolve_source(path)
        cfg = common.resolve_config(source)
        backbone = common.load_backbone(source, cfg)
        assert backbone.pool == "cls" and backbone.img_size == (32, 32) and backbone.feature_dim == 96
        loaded.append(backbone.state_dict())
    assert all(_same(s, state) for s in loaded)
    # --pool overrides model.pool; a timm state dict with a classifier head loads without it.
    source = common.resolve_source(run)
    assert common.load_backbone(source, common.resolve_config(source, pool="mean")).pool == "mean"
    alone = tmp_path / "alone" / "vit.pth"
    alone.parent.mkdir()
    torch.save({**state, "head.weight": torch.zeros(10, 96), "head.bias": torch.zeros(10)}, alone)
    source = common.resolve_source(alone)
    assert "head.weight" not in source.state_dict
    cfg = common.resolve_config(source, arch="vit_tiny", overrides=["data.name=synthetic", "data.image_size=32"])
    assert _same(common.load_backbone(source, cfg).state_dict(), state)


def test_weights_that_do_not_fit_name_the_arch_and_the_keys(vit_run, resnet_run):
    # ResNet weights, --arch vit_tiny: the arch and the kind of weights are named.
    with pytest.raises(SystemExit, match=r"weights do not fit model.arch=vit_tiny.*a ResNet's.*missing keys: "
                                         r"cls_token"):
        knn.main([str(resnet_run), "--arch", "vit_tiny", "--no-progress"])
    with pytest.raises(SystemExit, match="model.arch=vit_tiny"):
        finetune.main([str(resnet_run), "--arch", "vit_tiny", "--labels", "100", "--no-progress"])
    # ViT weights read as a ResNet.
    source = common.resolve_source(vit_run)
    with pytest.raises(common.SourceError, match=r"model.arch=resnet18 .*a ViT's"):
        common.load_backbone(source, common.resolve_config(source, arch="resnet18"))
    # The right kind at another image size: the position table's shape is named.
    with pytest.raises(common.SourceError, match=r"data.image_size=16 .*pos_embed \(1, 65, 96\) in the weights, "
                                                 r"\(1, 17, 96\) in the model"):
        common.load_backbone(source, common.resolve_config(source, overrides=["data.image_size=16"]))
    with pytest.raises(common.SourceError, match=r"cannot build model.arch=vit_tiny data.image_size=30"):
        common.load_backbone(source, common.resolve_config(source, overrides=["data.image_size=30"]))
    with pytest.raises(SystemExit, match="a ViT backbone .*ResNet names only"):
        export_detectron2.main([str(vit_run), str(vit_run / "d2.pkl")])


# --- kNN and the linear probe -----------------------------------------------------------------------------


def test_knn_and_linear_probe_on_a_vit(vit_run, tmp_path, capsys):
    record = knn.main([str(vit_run), "--k", "3", "--out", str(tmp_path / "knn"), "--no-progress"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"kNN top-1: {record['top1']:.2f}%"
    assert 0.0 <= record["top1"] <= 100.0
    assert record["model"] == {"arch": "vit_tiny", "pool": "cls", "image_size": 32}

    args = [str(vit_run), "--protocol", "cifar", "--epochs", "1", "--batch-size", "8", "--no-progress"]
    record = linear.main([*args, "--out", str(tmp_path / "lin")])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("linear top-1: ")
    assert 0.0 <= record["top1"] <= 100.0 and record["top5"] >= record["top1"]
    assert record["feature_bn"] is True and record["hyperparameters"]["feature_bn"] is True
    head = torch.load(tmp_path / "lin" / "linear_classifier.pth")
    assert set(head) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}
    assert head["0.num_batches_tracked"] == 6  # 48 images, batch 8: the BN saw every training batch
    record = linear.main([*args, "--no-feature-bn", "--augment", "none", "--out", str(tmp_path / "plain")])
    assert record["feature_bn"] is False and "feature_bn" not in record["hyperparameters"]
    assert set(torch.load(tmp_path / "plain" / "linear_classifier.pth")) == {"weight", "bias"}


def test_feature_bn_is_off_for_resnets_and_standardizes_vit_features():
    args = linear.parse_args(["run"])
    assert args.feature_bn is None  # decided by the architecture
    assert "feature_bn" not in linear.hyper_parameters(args)
    plain = linear.probe_head(8, 3, False)
    assert isinstance(plain, torch.nn.Linear)
    torch.manual_seed(0)
    head = linear.probe_head(8, 3, True)
    bn, fc = head[0], head[1]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    feats = torch.randn(16, 8) * 5 + 3
    head.train()
    out = head(feats)
    standardized = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + 1e-6)
    torch.testing.assert_close(out, fc(standardized))


# --- fine-tuning: the ViT recipe ---------------------------------------------------------------------------


def _lr_formula(epoch: float, args) -> float:
    """MAE's util/lr_sched.adjust_learning_rate, written out."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_vit_recipe_defaults_and_flag_checks():
    args = finetune.parse_args(["run", "--labels", "100", "--arch", "vit_tiny"])
    assert args.recipe == "vit"
    assert (args.epochs, args.batch_size, args.blr, args.weight_decay, args.layer_decay, args.drop_path,
            args.label_smoothing, args.warmup_epochs, args.min_lr) == (100, 1024, 5e-4, 0.05, 0.75, 0.1, 0.1, 5, 1e-6)
    assert (args.mixup, args.cutmix, args.randaug) == (0.0, 0.0, None)
    assert args.lr == pytest.approx(5e-4 * 1024 / 256)
    assert args.momentum is None and args.lr_backbone is None  # the ResNet recipe's flags are unset
    args = finetune.parse_args(["run", "--labels", "10", "--arch", "vit_tiny", "--batch-size", "64", "--blr", "1e-3",
                                "--randaug", "2,9", "--mixup", "0.8", "--cutmix", "1.0"])
    assert args.lr == pytest.approx(1e-3 * 64 / 256) and args.randaug == (2, 9)
    # Without --arch the recipe waits for the run: resnet defaults now, ViT ones once its model is known.
    args = finetune.parse_args(["run", "--labels", "100"])
    assert args.recipe == "resnet" and args.epochs == 20
    vit_cfg = RunConfig.model_validate(VIT_CONFIG)
    assert finetune.configure(args, vit_cfg) == {"drop_path": 0.1}
    assert args.recipe == "vit" and args.epochs == 100 and args.momentum is None
    args = finetune.parse_args(["run", "--labels", "100", "--drop-path", "0.2"])  # a ViT flag: vit until known
    assert args.recipe == "vit" and finetune.configure(args, vit_cfg) == {"drop_path": 0.2}
    resnet_cfg = RunConfig.model_validate({"model": {"arch": "resnet18"}, "data": {"name": "synthetic"}})
    with pytest.raises(SystemExit, match=r"--drop-path: flag\(s\) of --recipe vit; .*--recipe resnet \(the default "
                                         r"for model.arch=resnet18\)"):
        finetune.configure(args, resnet_cfg)
    args = finetune.parse_args(["run", "--labels", "100", "--recipe", "vit"])
    with pytest.raises(SystemExit, match="model.arch=resnet18 is a ResNet"):
        finetune.configure(args, resnet_cfg)
    for bad in (["--arch", "vit_tiny", "--momentum", "0.9"], ["--arch", "resnet18", "--layer-decay", "0.65"],
                ["--arch", "vit_tiny", "--layer-decay", "0"], ["--arch", "vit_tiny", "--randaug", "2"],
                ["--arch", "vit_tiny", "--randaug", "2,11"], ["--arch", "vit_tiny", "--randaug", "2,9", "--augment",
                                                              "none"]):
        with pytest.raises(SystemExit):
            finetune.parse_args(["run", "--labels", "100", *bad])


def test_layer_decay_groups_get_base_lr_times_scale_at_every_step():
    args = finetune.parse_args(["run", "--labels", "100", "--arch", "vit_tiny", "--epochs", "4", "--warmup-epochs",
                                "1", "--batch-size", "8", "--layer-decay", "0.6"])
    model = finetune.Classifier(build_backbone("vit_tiny", image_size=32), 10, head_std=finetune.HEAD_STD)
    opt, sched = finetune.build_optimizer(model, args)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    # every trainable parameter in exactly one group; no decay on 1-D tensors and the CLS token
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            no_decay = p.ndim <= 1 or names[id(p)] == "backbone.cls_token"
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), names[id(p)]
    scale_of = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale_of["backbone.cls_token"] == scale_of["backbone.patch_embed.proj.weight"] == pytest.approx(0.6 ** 5)
    assert scale_of["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.6 ** 4)
    assert scale_of["backbone.blocks.3.mlp.fc2.bias"] == pytest.approx(0.6 ** 1)
    assert scale_of["backbone.norm.weight"] == scale_of["fc.weight"] == scale_of["fc.bias"] == 1.0
    for epoch in (0.0, 0.25, 0.5, 1.0, 1.5, 2.75, 3.9):
        sched.set(epoch)
        expected = _lr_formula(epoch, args)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected * 0.6 ** (DEPTH + 1 - g["layer_id"]), rel=1e-12, abs=1e-15)
    # after the warm-up the top groups are at the full lr
    sched.set(1.0)
    assert opt.param_groups[-1]["lr"] == pytest.approx(args.lr)


def _spy_lrs(monkeypatch) -> list:
    """Record [(lr, lr_scale) of every group] at each optimizer step of the fine-tune."""
    seen = []
    real = finetune.build_optimizer

    def spy(model, args):
        opt, sched = real(model, args)
        step = opt.step

        def recording_step(*a, **k):
            seen.append([(g["lr"], g["lr_scale"]) for g in opt.param_groups])
            return step(*a, **k)

        opt.step = recording_step
        return opt, sched

    monkeypatch.setattr(finetune, "build_optimizer", spy)
    return seen


def test_finetune_vit_recipe_runs_with_per_step_layer_decayed_lrs(vit_run, tmp_path, capsys, monkeypatch):
    seen = _spy_lrs(monkeypatch)
    argv = [str(vit_run), "--labels", "100", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "8",
            "--blr", "1e-3", "--no-progress", "--out", str(tmp_path / "ft")]
    record = finetune.main(argv)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("finetune (100% labels) top-1: ")
    assert record["recipe"] == "vit" and 0.0 <= record["top1"] <= 100.0 and "top5" in record
    hyper = record["hyperparameters"]
    assert hyper["recipe"] == "vit" and hyper["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert (hyper["layer_decay"], hyper["drop_path"], hyper["label_smoothing"], hyper["mixup"]) == (0.75, 0.1, 0.1, 0)
    args = finetune.parse_args(argv)
    steps = 6  # 48 images, batch 8
    assert len(seen) == 2 * steps
    for i, groups in enumerate(seen):
        expected = _lr_formula(i / steps, args)
        for lr, scale in groups:
            assert lr == pytest.approx(expected * scale, rel=1e-12, abs=1e-15), i
    assert seen[0][0][0] == 0.0 and seen[steps][-1][0] == pytest.approx(args.lr)  # warm-up from 0, then the top
    state = torch.load(tmp_path / "ft" / "finetuned_torchvision.pth")
    assert {"head.weight", "head.bias", "blocks.3.mlp.fc2.weight", "cls_token"} <= set(state)
    assert not any(k.startswith("fc.") for k in state)
    epochs = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [e["steps"] for e in epochs] == [steps, steps] and epochs[0]["lr_first"] == 0.0


def test_finetune_vit_with_mixup_cutmix_randaug_resumes_exactly(vit_run, tmp_path, monkeypatch):
    argv = [str(vit_run), "--labels", "100", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16",
            "--mixup", "0.8", "--cutmix", "1.0", "--randaug", "2,9", "--no-progress"]
    full = finetune.main([*argv, "--out", str(tmp_path / "full")])
    assert full["hyperparameters"]["randaug"] == [2, 9] and full["hyperparameters"]["cutmix"] == 1.0
    assert 0.0 <= full["top1"] <= 100.0 and full["epochs_run"] == 2
    saved = []
    real_save = common.save_state
    monkeypatch.setattr(common, "save_state",
                        lambda out, state: (saved.append(copy.deepcopy(state)), real_save(out, state)))
    finetune.main([*argv, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(common, "save_state", real_save)
    assert saved[0]["scheduler"] == {"warmup_cosine": {"lr": 16 * 5e-4 / 256, "min_lr": 1e-6, "warmup_epochs": 1,
                                                       "epochs": 2}}
    assert "lr_scale" in saved[0]["optimizer"]["param_groups"][0]
    torch.save(saved[0], tmp_path / "killed" / "state.pt")  # as if it died after epoch 1
    (tmp_path / "killed" / "finetune_metrics.json").unlink()
    resumed = finetune.main([*argv, "--out", str(tmp_path / "killed")])
    assert resumed["epochs_run"] == 2 and resumed["top1"] == full["top1"]
    a = torch.load(tmp_path / "full" / "finetuned_torchvision.pth")
    b = torch.load(tmp_path / "killed" / "finetuned_torchvision.pth")
    assert _same(a, b)
    with pytest.raises(SystemExit, match="other settings.*layer_decay"):
        finetune.main([*argv, "--layer-decay", "0.65", "--out", str(tmp_path / "full")])


def test_drop_path_is_active_in_train_mode_only(vit_run):
    source = common.resolve_source(vit_run)
    cfg = common.resolve_config(source)
    plain = common.load_backbone(source, cfg)
    dropping = common.load_backbone(source, cfg, drop_path=0.5)
    assert [b.drop_path_rate for b in dropping.blocks] == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    assert all(b.drop_path_rate == 0.0 for b in plain.blocks)
    assert _same(plain.state_dict(), dropping.state_dict())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain.eval()
    dropping.eval()
    with torch.no_grad():
        reference = plain(x)
        torch.testing.assert_close(dropping(x), reference, rtol=0, atol=0)
        dropping.train()
        torch.manual_seed(1)
        first = dropping(x)
        torch.manual_seed(2)
        second = dropping(x)
        plain.train()  # no drop path: train mode changes nothing (LayerNorm only)
        torch.testing.assert_close(plain(x), reference, rtol=0, atol=0)
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)


# --- loss, targets, RandAugment --------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _smoothed_one_hot(labels, k: int, s: float) -> np.ndarray:
    t = np.full((len(labels), k), s / k)
    t[np.arange(len(labels)), labels] = 1.0 - s + s / k
    return t


def test_label_smoothing_loss_matches_an_independent_computation():
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 2, 2, 5])
    s = 0.1
    logp = _log_softmax(logits.numpy())
    expected = np.mean([-(1 - s) * logp[i, y] - s * logp[i].mean() for i, y in enumerate(labels.tolist())])
    assert finetune.vit_loss(logits, labels, None, s).item() == pytest.approx(expected, rel=1e-6)
    assert finetune.vit_loss(logits, labels, None, 0.0).item() == pytest.approx(
        -np.mean(logp[np.arange(6), labels.numpy()]), rel=1e-6)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_targets_give_the_loss_of_an_independent_computation(kind):
    b, k, s = 6, 7, 0.1
    x = torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    mix = finetune.build_mixup(0.8 if kind == "mixup" else 0.0, 1.0 if kind == "cutmix" else 0.0, k)
    torch.manual_seed(3)
    mixed, targets = mix(x, labels)
    logits = torch.randn(b, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = finetune.vit_loss(logits, labels, targets, s).item()

    # From the mixed images alone: each image's partner j and its own share lam.
    xs, ms = x.numpy().reshape(b, -1).astype(np.float64), mixed.numpy().reshape(b, -1).astype(np.float64)
    expected_targets = np.zeros((b, k))
    for i in range(b):
        best = None
        for j in range(b):
            if j == i:
                continue
            if kind == "mixup":  # m = lam x_i + (1 - lam) x_j: least squares for lam
                d = xs[i] - xs[j]
                lam = float(np.dot(ms[i] - xs[j], d) / np.dot(d, d))
                err = float(np.abs(lam * xs[i] + (1 - lam) * xs[j] - ms[i]).max())
            else:  # each pixel is x_i's or x_j's; lam = the share that is x_i's
                own = np.isclose(ms[i], xs[i])
                err = float(np.abs(ms[i][~own] - xs[j][~own]).max()) if (~own).any() else 0.0
                lam = float(own.reshape(3, 8, 8)[0].mean())
            if best is None or err < best[0]:
                best = (err, j, lam)
        err, j, lam = best
        assert err < 1e-5 and 0.0 <= lam <= 1.0
        expected_targets[i] = lam * _smoothed_one_hot([labels[i]], k, s)[0] + \
            (1 - lam) * _smoothed_one_hot([labels[j]], k, s)[0]
    expected = np.mean(-(expected_targets * _log_softmax(logits.numpy())).sum(axis=1))
    assert loss == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(finetune.smooth_targets(targets.double(), s).numpy(), expected_targets, atol=1e-6)


def test_mixup_options_and_randaugment_transform():
    from torchvision.transforms import v2

    assert finetune.build_mixup(0.0, 0.0, 10) is None
    assert isinstance(finetune.build_mixup(0.8, 0.0, 10), v2.MixUp)
    assert isinstance(finetune.build_mixup(0.0, 1.0, 10), v2.CutMix)
    both = finetune.build_mixup(0.8, 1.0, 10)
    assert isinstance(both, v2.RandomChoice) and both.p == [0.5, 0.5]
    assert [type(t) for t in both.transforms] == [v2.MixUp, v2.CutMix]
    assert common.parse_randaug("2,9") == (2, 9)
    tf = common.train_transform("crop", "mae", 32, False, (2, 9))
    ra = [t for t in tf.transforms if isinstance(t, T.RandAugment)]
    assert len(ra) == 1 and (ra[0].num_ops, ra[0].magnitude, ra[0].num_magnitude_bins) == (2, 9, 11)
    assert not any(isinstance(t, T.RandAugment) for t in common.train_transform("crop", "mae", 32, False).transforms)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert tf(image).shape == (3, 32, 32)


# --- the ResNet recipe did not move -----------------------------------------------------------------------


@pytest.mark.parametrize("labels,lr_backbone,lr_classifier", [(1, 0.002, 0.5), (10, 0.002, 0.5), (100, 0.001, 0.05)])
def test_resnet_recipe_defaults_are_unchanged(labels, lr_backbone, lr_classifier):
    # the hyper-parameters the fine-tune parsed before the ViT recipe existed, written out
    before = {"labels": labels, "epochs": 20, "lr_backbone": lr_backbone, "lr_classifier": lr_classifier,
              "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256, "schedule": "step", "milestones": [12, 16],
              "gamma": 0.1, "augment": "auto", "hflip": None, "seed": 0, "subset_seed": 0, "subset_file": None,
              "subset_digest": "d"}
    for extra in ([], ["--arch", "resnet18"], ["--recipe", "resnet"]):
        args = finetune.parse_args(["run", "--labels", str(labels), *extra])
        assert args.recipe == "resnet" and finetune.hyper_parameters(args, "d") == before
        assert finetune.configure(args, RunConfig.model_validate({"model": {"arch": "resnet50"}, "data": {"name": "synthetic"}})) == {}
        assert finetune.hyper_parameters(args, "d") == before
    model = finetune.Classifier(build_backbone("resnet18", 8), 10)
    opt, _ = finetune.build_optimizer(model, args)
    assert type(opt) is torch.optim.SGD and [g["name"] for g in opt.param_groups] == ["backbone", "classifier"]
    assert [g["lr"] for g in opt.param_groups] == [lr_backbone, lr_classifier]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert "fc.weight" in model.torchvision_state_dict()


def test_resnet_fine_tune_ignores_vit_defaults(resnet_run, tmp_path):
    record = finetune.main([str(resnet_run), "--labels", "10", "--epochs", "1", "--batch-size", "8", "--no-progress",
                            "--out", str(tmp_path / "ft")])
    assert record["recipe"] == "resnet" and record["protocol"] == "semi-supervised 10%"
    assert set(record["hyperparameters"]) == {"labels", "epochs", "lr_backbone", "lr_classifier", "momentum",
                                              "weight_decay", "batch_size", "schedule", "milestones", "gamma",
                                              "augment", "hflip", "seed", "subset_seed", "subset_file",
                                              "subset_digest"}
    shutil.rmtree(tmp_path / "ft")

"""Semi-supervised fine-tuning on 1% / 10% / 100% of the labels (MixMask paper, Table 10), and
MAE's fine-tuning recipe for ViTs.

    python -m mixfast.eval.finetune RUN_OR_CKPT --labels 1|10|100 [--subset-seed S | --subset-file F]
                                    [--recipe resnet|vit]

``--recipe resnet`` (the default for ResNets): the whole network is trained (BatchNorm in train
mode): 20 epochs, batch 256, SGD momentum 0.9, weight decay 0, lr backbone 0.002 / 0.002 / 0.001
and classifier 0.5 / 0.5 / 0.05 for 1 / 10 / 100% of the labels, both ×0.1 at epochs 12 and 16.

``--recipe vit`` (the default for ViTs; MAE's ``main_finetune.py``, with MixedAE's ViT-B values):
AdamW β (0.9, 0.999), lr = blr · batch / 256 with blr 5e-4, batch 1024, 100 epochs, per-step
linear warm-up over 5 epochs then half cosine to min lr 1e-6; layer-wise lr decay 0.75 (each
group's lr × 0.75^(depth + 1 - layer); the classifier and final norm × 1); weight decay 0.05, none
on 1-D parameters and the CLS token; drop path 0.1; label smoothing 0.1; the classifier starts
at trunc_normal(std 2e-5), zero bias. Options (off by default, for the small demo): mixup /
cutmix (``--mixup 0.8 --cutmix 1.0``: one of the two per batch, chosen with probability 0.5
when both are on, torchvision's v2.MixUp / v2.CutMix, soft-target cross-entropy with the label
smoothing applied to the mixed targets, as timm's Mixup) and RandAugment (``--randaug 2,9``).
The flags of one recipe are refused with the other. Every value has a flag.

The labelled subset is class-balanced and a pure function of ``--subset-seed`` (see
``mixfast.eval.subsets``); it is written to ``<out>/subset_<p>pct_seed<s>.txt`` and any such
file can be given back with ``--subset-file`` so that runs use the same images. Train
transform: RandomResizedCrop + flip for images above 64 px (``--augment rrc``), RandomCrop with
padding + flip below (``crop``); the flip follows the run's ``data.hflip``. Evaluation is on the
whole val/test split (Resize 256 + CenterCrop 224 at ImageNet size). The model, optimizer and
epoch are saved every epoch in ``<out>/state.pt``; the same command resumes there.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import mixfast  # noqa: F401  (torchvision compatibility shim first)
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixfast.engine.logging import info
from mixfast.eval import common, subsets
from mixfast.models import is_vit
from mixfast.models.vit import param_groups_layer_decay

# MixMask paper, Table 10: percent of labels -> (backbone lr, classifier lr)
PROTOCOL_LRS = {1: (0.002, 0.5), 10: (0.002, 0.5), 100: (0.001, 0.05)}
DEFAULTS = {"epochs": 20, "batch_size": 256, "momentum": 0.9, "weight_decay": 0.0, "schedule": "step",
            "milestones": [12, 16], "gamma": 0.1}
# MAE's main_finetune.py with the fine-tuning values of MixedAE (SPEC §5): blr 5e-4, batch 1024,
# 100 epochs, wd 0.05, drop path 0.1, label smoothing 0.1; MAE's 5 warm-up epochs and min lr 1e-6;
# layer decay 0.75 (MixedAE: 0.65-0.75). Mixup, cutmix and RandAugment are options (off).
VIT_DEFAULTS = {"epochs": 100, "batch_size": 1024, "weight_decay": 0.05, "blr": 5e-4, "min_lr": 1e-6,
                "warmup_epochs": 5, "layer_decay": 0.75, "drop_path": 0.1, "label_smoothing": 0.1,
                "mixup": 0.0, "cutmix": 0.0, "randaug": None}
RESNET_ONLY = ("lr_backbone", "lr_classifier", "momentum", "schedule", "milestones", "gamma")
VIT_ONLY = ("blr", "min_lr", "warmup_epochs", "layer_decay", "drop_path", "label_smoothing", "mixup", "cutmix",
            "randaug")
RECIPE_KEYS = (*DEFAULTS, *RESNET_ONLY, *VIT_DEFAULTS)
HEAD_STD = 2e-5  # MAE's fine-tuning: trunc_normal_(head.weight, std=2e-5)


class RecipeError(ValueError):
    """Flags that do not go together (or with the run's architecture); the message names them."""


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def apply_recipe(args: argparse.Namespace, arch: Optional[str]) -> None:
    """Choose the recipe (``--recipe``, else by the architecture: vit for ViTs, resnet otherwise) and
    fill every flag not given with the recipe's value; ``args.cli`` holds what the command line gave.
    Without the architecture (a run not read yet, no ``--arch``) the recipe is vit when a ViT-recipe
    flag was given, else resnet, and ``main`` applies it again once the run's model is known."""
    cli = args.cli
    given_vit = [_flag(k) for k in VIT_ONLY if cli[k] is not None]
    given_resnet = [_flag(k) for k in RESNET_ONLY if cli[k] is not None]
    if cli["recipe"] is not None:
        recipe, why = cli["recipe"], ""
    elif arch is not None:
        recipe, why = ("vit" if is_vit(arch) else "resnet"), f" (the default for model.arch={arch})"
    else:
        recipe, why = ("vit" if given_vit else "resnet"), ""
    if recipe == "vit" and arch is not None and not is_vit(arch):
        raise RecipeError(f"--recipe vit fine-tunes a ViT (layer-wise lr decay over its blocks); model.arch={arch} "
                          f"is a ResNet: use --recipe resnet")
    wrong = given_resnet if recipe == "vit" else given_vit
    if wrong:
        other = "resnet" if recipe == "vit" else "vit"
        raise RecipeError(f"{', '.join(wrong)}: flag(s) of --recipe {other}; this fine-tune uses --recipe "
                          f"{recipe}{why}")
    for key in RECIPE_KEYS:
        setattr(args, key, cli[key])
    args.recipe = recipe
    if recipe == "resnet":
        for key, value in DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        lr_b, lr_c = PROTOCOL_LRS[args.labels]
        args.lr_backbone = lr_b if args.lr_backbone is None else args.lr_backbone
        args.lr_classifier = lr_c if args.lr_classifier is None else args.lr_classifier
        if args.epochs < 1 or args.batch_size < 1 or args.lr_backbone < 0 or args.lr_classifier <= 0:
            raise RecipeError("--epochs, --batch-size and --lr-classifier must be positive, --lr-backbone not "
                              "negative")
        common.check_milestones(args.milestones, args.epochs)
        args.lr = None
        return
    for key, value in VIT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    checks = (("--epochs", args.epochs >= 1), ("--batch-size", args.batch_size >= 1), ("--blr", args.blr > 0),
              ("--min-lr", args.min_lr >= 0), ("--warmup-epochs", args.warmup_epochs >= 0),
              ("--weight-decay", args.weight_decay >= 0), ("--layer-decay", 0 < args.layer_decay <= 1),
              ("--drop-path", 0 <= args.drop_path < 1), ("--label-smoothing", 0 <= args.label_smoothing < 1),
              ("--mixup", args.mixup >= 0), ("--cutmix", args.cutmix >= 0))
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise RecipeError(f"{', '.join(bad)} out of range (epochs, batch size, blr > 0; layer decay in (0, 1]; "
                          f"drop path and label smoothing in [0, 1); the others >= 0)")
    if args.randaug is not None and args.augment == "none":
        raise RecipeError("--randaug needs a random train transform, not --augment none")
    args.lr = args.blr * args.batch_size / 256  # MAE: absolute lr = blr * effective batch / 256


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the recipe's value for every flag not given (the ResNet recipe:
    MixMask paper, Table 10; the ViT recipe: MAE's fine-tuning)."""
    parser = argparse.ArgumentParser(prog="python -m mixfast.eval.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--labels", type=int, choices=sorted(PROTOCOL_LRS), required=True,
                        help="percent of the training labels used")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the class-balanced subset")
    parser.add_argument("--subset-file", default=None,
                        help="read the subset from this file (one index or image path per line) instead")
    parser.add_argument("--recipe", choices=["resnet", "vit"], default=None,
                        help="resnet: SGD, two lr groups, step schedule (MixMask); vit: MAE's AdamW recipe "
                             "(default: vit for a ViT backbone, resnet otherwise)")
    common.add_schedule_args(parser)
    parser.add_argument("--lr-backbone", type=float, default=None, help="resnet recipe")
    parser.add_argument("--lr-classifier", type=float, default=None, help="resnet recipe")
    vit = parser.add_argument_group("vit recipe (MAE fine-tuning)")
    vit.add_argument("--blr", type=float, default=None, help="base lr: lr = blr * batch / 256 (default 5e-4)")
    vit.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default 1e-6)")
    vit.add_argument("--warmup-epochs", type=int, default=None, help="linear per-step warm-up (default 5)")
    vit.add_argument("--layer-decay", type=float, default=None,
                     help="layer-wise lr decay: block i's lr x decay^(depth - i) (default 0.75)")
    vit.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default 0.1)")
    vit.add_argument("--label-smoothing", type=float, default=None, help="(default 0.1)")
    vit.add_argument("--mixup", type=float, default=None, help="mixup alpha; 0 = off (default; MAE: 0.8)")
    vit.add_argument("--cutmix", type=float, default=None, help="cutmix alpha; 0 = off (default; MAE: 1.0)")
    vit.add_argument("--randaug", type=common.parse_randaug, default=None, metavar="N,M",
                     help="RandAugment: N ops of magnitude M on a 0..10 scale (MAE: 2,9); default off")
    parser.add_argument("--augment", choices=["auto", *common.AUGMENTS], default="auto",
                        help="train transform (auto: rrc above 64 px, crop below)")
    common.add_loop_args(parser)
    args = parser.parse_args(argv)
    args.cli = {k: getattr(args, k) for k in ("recipe", *RECIPE_KEYS)}
    try:
        apply_recipe(args, args.arch)
    except RecipeError as err:
        parser.error(str(err))
    return args


def configure(args: argparse.Namespace, cfg) -> dict:
    """Once the run config is read: the recipe for its architecture, and the backbone's drop path."""
    try:
        apply_recipe(args, cfg.model.arch)
    except RecipeError as err:
        raise SystemExit(f"mixfast: {err}") from None
    return {"drop_path": args.drop_path} if args.recipe == "vit" else {}


class Classifier(nn.Module):
    """Backbone + linear classifier ``fc``. ``torchvision_state_dict``: the ResNet under torchvision's
    names with ``fc``, a ViT under timm's with the classifier as ``head``. ``head_std``: the
    classifier starts at trunc_normal(std) with zero bias (MAE's fine-tuning) instead of N(0, 0.01)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_std: Optional[float] = None):
        super().__init__()
        self.backbone = backbone
        self.fc = common.linear_classifier(backbone.feature_dim, num_classes)
        if head_std is not None:
            nn.init.trunc_normal_(self.fc.weight, std=head_std)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images."""
        return self.fc(self.backbone(x))

    @property
    def head_name(self) -> str:
        """The classifier's name in the exported weights: timm's ``head`` for a ViT, else ``fc``."""
        return "head" if hasattr(self.backbone, "blocks") else "fc"

    def torchvision_state_dict(self) -> dict:
        """Backbone and classifier weights (see the class), on the CPU."""
        head = self.head_name
        state = {k: v.detach().cpu() for k, v in self.backbone.state_dict().items() if not k.startswith(f"{head}.")}
        state.update({f"{head}.{k}": v.detach().cpu() for k, v in self.fc.state_dict().items()})
        return state


def vit_param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """MAE's fine-tuning groups: the backbone's by layer and decay / no decay
    (``param_groups_layer_decay``: lr_scale = layer_decay^(depth + 1 - layer), no decay on 1-D
    parameters and the CLS token), then the classifier at the top layer (scale 1), its bias not decayed."""
    groups = param_groups_layer_decay(model.backbone, weight_decay, layer_decay)
    top = len(model.backbone.blocks) + 1
    for group in groups:
        group["name"] = f"layer{group['layer_id']}_{'no_decay' if group['weight_decay'] == 0 else 'decay'}"
    groups.append({"params": [model.fc.weight], "weight_decay": weight_decay, "lr_scale": 1.0, "layer_id": top,
                   "name": "classifier_decay"})
    groups.append({"params": [model.fc.bias], "weight_decay": 0.0, "lr_scale": 1.0, "layer_id": top,
                   "name": "classifier_no_decay"})
    return groups


def build_optimizer(model: Classifier, args):
    """resnet: SGD with two groups, [backbone, classifier], each with its own lr; one per-epoch
    schedule multiplies both. vit: AdamW β (0.9, 0.999) over ``vit_param_groups`` with the
    per-step ``common.WarmupCosine`` (lr = blr · batch / 256, each group × its lr_scale)."""
    if args.recipe == "vit":
        groups = vit_param_groups(model, args.weight_decay, args.layer_decay)
        for group in groups:
            group["lr"] = args.lr * group["lr_scale"]
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
        return optimizer, common.WarmupCosine(optimizer, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    optimizer = torch.optim.SGD([
        {"params": list(model.backbone.parameters()), "lr": args.lr_backbone, "name": "backbone"},
        {"params": list(model.fc.parameters()), "lr": args.lr_classifier, "name": "classifier"},
    ], lr=args.lr_classifier, momentum=args.momentum, weight_decay=args.weight_decay)
    return optimizer, common.build_scheduler(optimizer, args.epochs, args.schedule, args.milestones, args.gamma)


RESNET_HYPER = ("labels", "epochs", "lr_backbone", "lr_classifier", "momentum", "weight_decay", "batch_size",
                "schedule", "milestones", "gamma", "augment", "hflip", "seed", "subset_seed", "subset_file")
VIT_HYPER = ("labels", "recipe", "epochs", "batch_size", "blr", "lr", "min_lr", "warmup_epochs", "weight_decay",
             "layer_decay", "drop_path", "label_smoothing", "mixup", "cutmix", "randaug", "augment", "hflip", "seed",
             "subset_seed", "subset_file")


def hyper_parameters(args, subset_digest: str) -> dict:
    """The settings (and subset) a resumed run must share with the saved one (the ResNet recipe's
    keys as before the ViT recipe existed, so its saved states still resume)."""
    keys = VIT_HYPER if args.recipe == "vit" else RESNET_HYPER
    hyper = {k: getattr(args, k) for k in keys}
    if hyper.get("randaug") is not None:
        hyper["randaug"] = list(hyper["randaug"])  # as JSON (and the saved state) hold it
    return {**hyper, "subset_digest": subset_digest}


# --- the ViT recipe's targets and loss -------------------------------------------------------------------


def build_mixup(mixup: float, cutmix: float, num_classes: int) -> Optional[Callable]:
    """``(images, labels) -> (mixed images, soft targets)``: torchvision's v2.MixUp (alpha ``mixup``)
    and/or v2.CutMix (alpha ``cutmix``; lam = the kept area), one per batch, chosen with probability
    0.5 when both are on (timm's Mixup: prob 1, switch prob 0.5, mode batch); None when both are 0.
    Each image is mixed with its neighbour in the batch (roll by one); randomness: torch's global RNG."""
    from torchvision.transforms import v2

    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def smooth_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of (soft) targets [B, K]: (1 - s) · targets + s / K (timm's Mixup: off value
    s / K, on value 1 - s + s / K, then mixed: the same, as both are linear)."""
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of Σ_k -targets_k · log_softmax(logits)_k (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def vit_loss(logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor],
             smoothing: float) -> torch.Tensor:
    """The ViT recipe's loss: soft-target cross-entropy on smoothed mixup targets when mixing, else
    cross-entropy with label smoothing (MAE: SoftTargetCrossEntropy / LabelSmoothingCrossEntropy)."""
    if targets is not None:
        return soft_target_cross_entropy(logits, smooth_targets(targets, smoothing))
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


@dataclass
class Subset:
    """The labelled images fine-tuned on: their indices, the subset file and a digest of the indices."""

    indices: np.ndarray
    path: str
    digest: str


def choose_subset(args: argparse.Namespace, data: common.LabelledData, out: str) -> Subset:
    """The ``--subset-file`` when given, else a class-balanced subset written to ``out``."""
    if args.subset_file:
        try:
            indices = subsets.read_subset(args.subset_file, data.train)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"mixfast: {err}") from None
        path = args.subset_file
    else:
        indices = subsets.select_subset(common.dataset_labels(data.train), args.labels, args.subset_seed)
        path = os.path.join(out, f"subset_{args.labels}pct_seed{args.subset_seed}.txt")
        subsets.write_subset(path, indices, data.train,
                             header=f"mixfast fine-tuning subset: {args.labels}% of the labels, class-balanced, "
                                    f"subset seed {args.subset_seed}, {len(indices)} of {len(data.train)} images")
    digest = hashlib.sha256(",".join(map(str, indices.tolist())).encode()).hexdigest()[:16]
    return Subset(indices, path, digest)


def build_trainee(run: common.EvalRun, args: argparse.Namespace) -> common.Trainee:
    """Backbone + classifier (seeded by ``--seed``) with the recipe's optimizer and schedule."""
    torch.manual_seed(args.seed)
    model = Classifier(run.backbone, run.data.num_classes,
                       head_std=HEAD_STD if args.recipe == "vit" else None).to(run.device)
    return common.Trainee("model", model, *build_optimizer(model, args))


def announce(args: argparse.Namespace, run: common.EvalRun, subset: Subset) -> None:
    """One line with what is fine-tuned, on what, and how."""
    data = run.data
    if args.recipe == "vit":
        how = (f"recipe vit: AdamW lr {args.lr:.3g} (blr {args.blr} x {args.batch_size}/256), warm-up "
               f"{args.warmup_epochs} then cosine to {args.min_lr}, layer decay {args.layer_decay}, wd "
               f"{args.weight_decay}, drop path {args.drop_path}, label smoothing {args.label_smoothing}, mixup "
               f"{args.mixup}, cutmix {args.cutmix}, randaug {args.randaug}")
    else:
        how = (f"lr backbone {args.lr_backbone} / classifier {args.lr_classifier} ({args.schedule} "
               f"{args.milestones})")
    info(f"fine-tune on {args.labels}% of the labels ({len(subset.indices)} of {len(data.train)} images, subset "
         f"{subset.path}) of {run.source.weights} on {run.cfg.data.name}: {len(data.test)} val images, "
         f"{data.num_classes} classes, {args.epochs} epochs, batch {args.batch_size}, {how}, "
         f"augment {args.augment} -> {run.out}")


def _epoch_loader(run: common.EvalRun, args: argparse.Namespace, subset: Subset, train_tf: Callable, epoch: int):
    """This epoch's loader over the subset (order and augmentations seeded by (seed, epoch))."""
    order = common.epoch_order(subset.indices, args.seed, epoch, args.batch_size)
    common.seed_augmentations(args.seed, epoch)
    return common.make_loader(run.data.train, train_tf, args.batch_size, run.workers, order,
                              failed=run.failed_train)


def train_one_epoch(trainee: common.Trainee, run: common.EvalRun, args: argparse.Namespace, subset: Subset,
                    train_tf: Callable, epoch: int) -> tuple[dict, str]:
    """One epoch of the whole network (BatchNorm in train mode) over the subset; returns its
    record and lr text (backbone/classifier)."""
    if args.recipe == "vit":
        return train_one_epoch_vit(trainee, run, args, subset, train_tf, epoch)
    model, optimizer = trainee.module, trainee.optimizer
    lrs = [g["lr"] for g in optimizer.param_groups]
    loader = _epoch_loader(run, args, subset, train_tf, epoch)
    model.train()
    bar = common.progress_bar(loader, f"epoch {epoch + 1}/{args.epochs}", run.progress)
    loss = common.sgd_pass(lambda x: model(x.to(run.device, non_blocking=True)), optimizer, bar, run.device)
    trainee.scheduler.step()
    return {"train_loss": loss, "lr_backbone": lrs[0], "lr_classifier": lrs[1]}, f"{lrs[0]:.3g}/{lrs[1]:.3g}"


def train_one_epoch_vit(trainee: common.Trainee, run: common.EvalRun, args: argparse.Namespace, subset: Subset,
                        train_tf: Callable, epoch: int) -> tuple[dict, str]:
    """One epoch of the ViT recipe (drop path on): before each step the lr of the fractional epoch
    (epoch + step / steps), mixup / cutmix on the device batch when on, the recipe's loss. Returns
    the record and lr text (the classifier's lr, scale 1, at the first and last step)."""
    model, optimizer, schedule = trainee.module, trainee.optimizer, trainee.scheduler
    mix = build_mixup(args.mixup, args.cutmix, run.data.num_classes)
    loader = _epoch_loader(run, args, subset, train_tf, epoch)
    steps = max(1, len(loader))
    model.train()
    bar = common.progress_bar(loader, f"epoch {epoch + 1}/{args.epochs}", run.progress)
    loss_sum, n, lrs = 0.0, 0, []
    for step, (x, y) in enumerate(bar):
        lrs.append(schedule.set(epoch + step / steps))
        x, y = x.to(run.device, non_blocking=True), y.to(run.device)
        targets = None
        if mix is not None:
            x, targets = mix(x, y)
        loss = vit_loss(model(x), y, targets, args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * y.numel()
        n += y.numel()
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", lr=f"{lrs[-1]:.3g}", refresh=False)
    lr_first, lr_last = (lrs[0], lrs[-1]) if lrs else (0.0, 0.0)
    record = {"train_loss": loss_sum / max(1, n), "lr": lr_last, "lr_first": lr_first, "steps": len(lrs)}
    return record, f"{lr_first:.3g}->{lr_last:.3g}"


def evaluate(model: Classifier, run: common.EvalRun, val_loader: Iterable) -> dict:
    """The model's accuracy and loss on the val split (BatchNorm in eval mode, no drop path)."""
    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(run.device, non_blocking=True)).float()

    model.eval()
    return common.accuracy_over(logits, common.progress_bar(val_loader, "val", run.progress), run.data.num_classes,
                                run.device)


def report(args: argparse.Namespace, run: common.EvalRun, loop: common.EpochLoop, subset: Subset, result: dict,
           t_start: float) -> dict:
    """Write finetune_metrics.json and finetuned_torchvision.pth, print the top-1 line; returns the metrics."""
    images = run.images()
    # The fine-tune trains on the subset: its used images are the subset's that decoded.
    failed = {i for i in subset.indices.tolist() if run.data.train.samples[i][0] in run.failed_train} \
        if hasattr(run.data.train, "samples") else set()
    images["train"]["used"] = int(len(subset.indices)) - len(failed)
    info(f"images: train subset {common.counts_text(images['train'])}; val {common.counts_text(images['test'])}")
    metrics = {**common.base_record("finetune", run.source, run.cfg, run.data, images),
               "protocol": (f"semi-supervised {args.labels}%" if args.recipe == "resnet" else
                            f"MAE fine-tune (vit recipe), {args.labels}% labels"),
               "recipe": args.recipe, "labels_percent": args.labels, "top1": result["top1"],
               "top5": result.get("top5"), "val_loss": result["loss"],
               "subset": {"file": subset.path, "images": int(len(subset.indices)), "digest": subset.digest},
               "hyperparameters": loop.hyper, "epochs_run": len(loop.history), "wall_s": time.perf_counter() - t_start}
    return common.write_report(run.out, "finetune", metrics, loop.trainee.module.torchvision_state_dict(),
                               "finetuned_torchvision.pth", f"finetune ({args.labels}% labels)")


def main(argv=None) -> dict:
    """Fine-tune on the labelled subset, evaluate, write the outputs; returns the metrics."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    run = common.prepare_run(args, f"finetune-{args.labels}pct", functools.partial(configure, args))
    if args.augment == "auto":  # decided here: it needs the data's image size
        args.augment = "rrc" if run.data.image_size > 64 else "crop"
    subset = choose_subset(args, run.data, run.out)
    trainee = build_trainee(run, args)
    loop = common.EpochLoop("finetune", run.out, hyper_parameters(args, subset.digest), trainee, args.epochs,
                            args.eval_every, args.resume)
    announce(args, run, subset)
    train_tf = common.train_transform(args.augment, run.data.recipe, run.data.image_size, args.hflip,
                                      args.randaug if args.recipe == "vit" else None)
    val_loader = common.make_loader(run.data.test, common.val_transform(run.data.recipe, run.data.image_size),
                                    args.batch_size, run.workers, failed=run.failed_test)
    result = loop.run(functools.partial(train_one_epoch, trainee, run, args, subset, train_tf),
                      functools.partial(evaluate, trainee.module, run, val_loader))
    return report(args, run, loop, subset, result, t_start)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Linear probe: a linear classifier on the frozen backbone (BatchNorm in eval mode).

    python -m mixfast.eval.linear RUN_OR_CKPT [--protocol imagenet|cifar] [--epochs N --lr LR ...]

Protocols (every value overridable by its flag):

- ``imagenet`` (MoCo's ``main_lincls.py``; MixMask paper, Table 9): SGD lr 30, momentum 0.9,
  weight decay 0, batch 256, 100 epochs, lr ×0.1 at epochs 60 and 80; train
  RandomResizedCrop(224) + flip, val Resize(256) + CenterCrop(224) (the data's ``image_size``
  stands for 224).
- ``cifar`` (our choice; neither the papers nor the MixMask/Un-Mix code pin one: the CIFAR numbers
  of those papers are kNN or their own scripts): solo-learn's linear recipe — SGD lr 0.1,
  momentum 0.9, weight decay 0, batch 256, 100 epochs, lr ×0.1 at 60 and 80 — with the usual
  CIFAR augmentation, RandomCrop(32, padding 4) + flip; val: the image as is.

The classifier is ``nn.Linear(feature_dim, classes)`` with weights N(0, 0.01) and zero bias
(as in MoCo), trained on the pooled, unnormalized features. ``--feature-bn`` (the default for
ViTs, as MAE's ``main_linprobe.py``) puts ``BatchNorm1d(feature_dim, affine=False, eps=1e-6)``
before it: the features are standardized by batch statistics in training and by their running
averages at evaluation; ResNets keep the plain linear layer (``--no-feature-bn``). The flip follows the run's
``data.hflip`` (off for digits). ``--augment none`` trains on the val transform; the features
are then the same every epoch and are computed once (``--precompute auto``), which makes
small probes fast. The classifier, optimizer and epoch are saved every epoch in
``<out>/state.pt`` and a rerun of the same command resumes there.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Iterable, Iterator, Optional

import mixfast  # noqa: F401  (torchvision compatibility shim first)
import torch
from torch import nn

from mixfast.engine.logging import info
from mixfast.eval import common
from mixfast.models import is_vit

PROTOCOLS = {
    "imagenet": {"epochs": 100, "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256,
                 "schedule": "step", "milestones": [60, 80], "gamma": 0.1, "augment": "rrc"},
    "cifar": {"epochs": 100, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256,
              "schedule": "step", "milestones": [60, 80], "gamma": 0.1, "augment": "crop"},
}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the protocol's value for every flag not given."""
    parser = argparse.ArgumentParser(prog="python -m mixfast.eval.linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="imagenet",
                        help="hyper-parameter set (default imagenet = MoCo's main_lincls.py: SGD lr 30, 100 epochs)")
    common.add_schedule_args(parser)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--augment", choices=common.AUGMENTS, default=None,
                        help="train transform: rrc (RandomResizedCrop+flip), crop (RandomCrop pad+flip), none")
    parser.add_argument("--feature-bn", action=argparse.BooleanOptionalAction, default=None,
                        help="BatchNorm1d without affine before the linear layer (MAE's linear probe; default: on "
                             "for ViTs, off for ResNets)")
    parser.add_argument("--precompute", choices=["auto", "on", "off"], default="auto",
                        help="compute frozen features once (needs --augment none; auto = whenever it is none)")
    common.add_loop_args(parser)
    args = parser.parse_args(argv)
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--epochs, --batch-size and --lr must be positive")
    if args.precompute == "on" and args.augment != "none":
        parser.error("--precompute on needs --augment none (random augmentations change the features every epoch)")
    common.check_milestones(args.milestones, args.epochs)
    return args


def hyper_parameters(args) -> dict:
    """The settings a resumed run must share with the saved one (``feature_bn`` only when on, so
    that the states saved before it existed still resume)."""
    keys = ("protocol", "epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule", "milestones", "gamma",
            "augment", "hflip", "seed")
    hyper = {k: getattr(args, k) for k in keys}
    if getattr(args, "feature_bn", False):
        hyper["feature_bn"] = True
    return hyper


def probe_head(feature_dim: int, num_classes: int, feature_bn: bool) -> nn.Module:
    """The linear classifier (``common.linear_classifier``), after ``BatchNorm1d(affine=False,
    eps=1e-6)`` with ``feature_bn`` (MAE's linear probe: ``Sequential(BatchNorm1d, head)``)."""
    linear = common.linear_classifier(feature_dim, num_classes)
    if not feature_bn:
        return linear
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), linear)


def build_optimizer(classifier: nn.Module, args) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over the classifier and its per-epoch schedule."""
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return optimizer, common.build_scheduler(optimizer, args.epochs, args.schedule, args.milestones, args.gamma)


def _feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int,
                     order: Optional[torch.Tensor] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of precomputed features and labels, in ``order`` (indices on their device) or as stored."""
    for start in range(0, len(labels) if order is None else len(order), batch_size):
        if order is None:
            yield feats[start:start + batch_size], labels[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield feats[idx], labels[idx]


class ProbeInputs:
    """The probe's batches: frozen features computed once (``--precompute``), or images that go
    through the frozen backbone at every step; ``logits`` gives the classifier's output either way."""

    def __init__(self, run: common.EvalRun, args: argparse.Namespace, precompute: bool):
        self.run, self.batch_size = run, args.batch_size
        data = run.data
        self.val_loader = common.make_loader(data.test, common.val_transform(data.recipe, data.image_size),
                                             args.batch_size, run.workers, failed=run.failed_test)
        self.train_tf = common.train_transform(args.augment, data.recipe, data.image_size, args.hflip)
        self.train_feats = self.val_feats = None  # (features, labels) when precomputed
        if precompute:
            self._precompute()

    def _precompute(self) -> None:
        """Features of the train split (under its transform) and of the val split, once."""
        run = self.run
        train_loader = common.make_loader(run.data.train, self.train_tf, self.batch_size, run.workers,
                                          failed=run.failed_train)
        self.train_feats = common.extract_features(run.backbone, train_loader, run.device, run.progress,
                                                   "train features")
        self.val_feats = common.extract_features(run.backbone, self.val_loader, run.device, run.progress,
                                                 "val features")

    def train_batches(self, order: list[int]) -> tuple[Iterable, int]:
        """This epoch's batches in ``order`` and how many there are."""
        if self.train_feats is None:
            loader = common.make_loader(self.run.data.train, self.train_tf, self.batch_size, self.run.workers, order,
                                        failed=self.run.failed_train)
            return loader, len(loader)
        order_t = torch.tensor(order, device=self.run.device)
        return _feature_batches(*self.train_feats, self.batch_size, order_t), -(-len(order) // self.batch_size)

    def val_batches(self) -> Iterable:
        """The val split's batches (with a progress bar when they are images)."""
        if self.val_feats is None:
            return common.progress_bar(self.val_loader, "val", self.run.progress)
        return _feature_batches(*self.val_feats, self.batch_size)

    def logits(self, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Classifier output of a batch: features as they are, images through the frozen backbone."""
        if self.train_feats is None:
            with torch.no_grad():
                x = self.run.backbone(x.to(self.run.device, non_blocking=True)).float()
        return classifier(x)


def build_trainee(run: common.EvalRun, args: argparse.Namespace) -> common.Trainee:
    """Freeze the backbone (BatchNorm in eval mode, no gradients) and build the classifier (seeded
    by ``--seed``; ``--feature-bn`` decided by the architecture when not given) with its optimizer
    and schedule."""
    run.backbone.eval()
    for p in run.backbone.parameters():
        p.requires_grad_(False)
    if args.feature_bn is None:
        args.feature_bn = is_vit(run.cfg.model.arch)
    torch.manual_seed(args.seed)
    classifier = probe_head(run.backbone.feature_dim, run.data.num_classes, args.feature_bn).to(run.device)
    return common.Trainee("classifier", classifier, *build_optimizer(classifier, args))


def announce(args: argparse.Namespace, run: common.EvalRun, precompute: bool) -> None:
    """One line with what is probed, on what, and how."""
    data = run.data
    info(f"linear probe ({args.protocol}) of {run.source.weights} on {run.cfg.data.name}: {len(data.train)} train / "
         f"{len(data.test)} val images, {data.num_classes} classes, feature dim {run.backbone.feature_dim}, "
         f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr} ({args.schedule} {args.milestones}), "
         f"augment {args.augment}{', feature BatchNorm' if args.feature_bn else ''}"
         f"{' (features precomputed)' if precompute else ''} -> {run.out}")


def train_one_epoch(trainee: common.Trainee, inputs: ProbeInputs, args: argparse.Namespace,
                    epoch: int) -> tuple[dict, str]:
    """One epoch of the classifier over every train image; returns its record and lr text."""
    optimizer = trainee.optimizer
    lr = optimizer.param_groups[0]["lr"]
    order = common.epoch_order(list(range(len(inputs.run.data.train))), args.seed, epoch, args.batch_size)
    common.seed_augmentations(args.seed, epoch)
    batches, total = inputs.train_batches(order)
    trainee.module.train()
    bar = common.progress_bar(batches, f"epoch {epoch + 1}/{args.epochs}", inputs.run.progress, total)
    loss = common.sgd_pass(functools.partial(inputs.logits, trainee.module), optimizer, bar, inputs.run.device,
                           lr=f"{lr:.3g}")
    trainee.scheduler.step()
    return {"train_loss": loss, "lr": lr}, f"{lr:.4g}"


def evaluate(trainee: common.Trainee, inputs: ProbeInputs) -> dict:
    """The classifier's accuracy and loss on the val split (its feature BatchNorm, if any, on running statistics)."""
    trainee.module.eval()
    logits = functools.partial(inputs.logits, trainee.module)
    return common.accuracy_over(logits, inputs.val_batches(), inputs.run.data.num_classes, inputs.run.device)


def report(args: argparse.Namespace, run: common.EvalRun, loop: common.EpochLoop, result: dict, precompute: bool,
           t_start: float) -> dict:
    """Write linear_metrics.json and linear_classifier.pth, print the top-1 line; returns the metrics."""
    images = run.images()
    info(f"images: train {common.counts_text(images['train'])}; val {common.counts_text(images['test'])}")
    metrics = {**common.base_record("linear", run.source, run.cfg, run.data, images), "protocol": args.protocol,
               "top1": result["top1"], "top5": result.get("top5"), "val_loss": result["loss"],
               "hyperparameters": loop.hyper, "feature_bn": bool(args.feature_bn), "precomputed_features": precompute,
               "epochs_run": len(loop.history),
               "wall_s": time.perf_counter() - t_start}
    return common.write_report(run.out, "linear", metrics, loop.trainee.module.state_dict(), "linear_classifier.pth",
                               "linear")


def main(argv=None) -> dict:
    """Train and evaluate the linear probe, write its outputs; returns the metrics."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    run = common.prepare_run(args, f"linear-{args.protocol}")
    precompute = args.precompute == "on" or (args.precompute == "auto" and args.augment == "none")
    trainee = build_trainee(run, args)
    loop = common.EpochLoop("linear", run.out, hyper_parameters(args), trainee, args.epochs, args.eval_every,
                            args.resume)
    announce(args, run, precompute)
    # (a finished run that is resumed only reports: no features to compute)
    inputs = ProbeInputs(run, args, precompute and loop.start < args.epochs)
    result = loop.run(functools.partial(train_one_epoch, trainee, inputs, args),
                      functools.partial(evaluate, trainee, inputs))
    return report(args, run, loop, result, precompute, t_start)


if __name__ == "__main__":
    main(sys.argv[1:])

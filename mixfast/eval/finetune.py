"""Semi-supervised fine-tuning on 1% / 10% / 100% of the labels (MixMask paper, Table 10).

    python -m mixfast.eval.finetune RUN_OR_CKPT --labels 1|10|100 [--subset-seed S | --subset-file F]

The whole network is trained (BatchNorm in train mode): 20 epochs, batch 256, SGD momentum
0.9, weight decay 0, lr backbone 0.002 / 0.002 / 0.001 and classifier 0.5 / 0.5 / 0.05 for
1 / 10 / 100% of the labels, both ×0.1 at epochs 12 and 16. Every value has a flag.

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
from typing import Callable, Iterable

import mixfast  # noqa: F401  (torchvision compatibility shim first)
import numpy as np
import torch
from torch import nn

from mixfast.engine.logging import info
from mixfast.eval import common, subsets

# MixMask paper, Table 10: percent of labels -> (backbone lr, classifier lr)
PROTOCOL_LRS = {1: (0.002, 0.5), 10: (0.002, 0.5), 100: (0.001, 0.05)}
DEFAULTS = {"epochs": 20, "batch_size": 256, "momentum": 0.9, "weight_decay": 0.0, "schedule": "step",
            "milestones": [12, 16], "gamma": 0.1}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the protocol's value (MixMask paper, Table 10) for every flag not given."""
    parser = argparse.ArgumentParser(prog="python -m mixfast.eval.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--labels", type=int, choices=sorted(PROTOCOL_LRS), required=True,
                        help="percent of the training labels used")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the class-balanced subset")
    parser.add_argument("--subset-file", default=None,
                        help="read the subset from this file (one index or image path per line) instead")
    common.add_schedule_args(parser)
    parser.add_argument("--lr-backbone", type=float, default=None)
    parser.add_argument("--lr-classifier", type=float, default=None)
    parser.add_argument("--augment", choices=["auto", *common.AUGMENTS], default="auto",
                        help="train transform (auto: rrc above 64 px, crop below)")
    common.add_loop_args(parser)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    lr_b, lr_c = PROTOCOL_LRS[args.labels]
    args.lr_backbone = lr_b if args.lr_backbone is None else args.lr_backbone
    args.lr_classifier = lr_c if args.lr_classifier is None else args.lr_classifier
    if args.epochs < 1 or args.batch_size < 1 or args.lr_backbone < 0 or args.lr_classifier <= 0:
        parser.error("--epochs, --batch-size and --lr-classifier must be positive, --lr-backbone not negative")
    common.check_milestones(args.milestones, args.epochs)
    return args


class Classifier(nn.Module):
    """Backbone + linear classifier; ``state_dict`` in torchvision's ResNet format (with ``fc``)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = common.linear_classifier(backbone.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images."""
        return self.fc(self.backbone(x))

    def torchvision_state_dict(self) -> dict:
        """Backbone and ``fc`` weights under torchvision's ResNet names, on the CPU."""
        state = {k: v.detach().cpu() for k, v in self.backbone.state_dict().items() if not k.startswith("fc.")}
        state.update({f"fc.{k}": v.detach().cpu() for k, v in self.fc.state_dict().items()})
        return state


def build_optimizer(model: Classifier, args) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Two groups, [backbone, classifier], each with its own lr; one schedule multiplies both."""
    optimizer = torch.optim.SGD([
        {"params": list(model.backbone.parameters()), "lr": args.lr_backbone, "name": "backbone"},
        {"params": list(model.fc.parameters()), "lr": args.lr_classifier, "name": "classifier"},
    ], lr=args.lr_classifier, momentum=args.momentum, weight_decay=args.weight_decay)
    return optimizer, common.build_scheduler(optimizer, args.epochs, args.schedule, args.milestones, args.gamma)


def hyper_parameters(args, subset_digest: str) -> dict:
    """The settings (and subset) a resumed run must share with the saved one."""
    keys = ("labels", "epochs", "lr_backbone", "lr_classifier", "momentum", "weight_decay", "batch_size", "schedule",
            "milestones", "gamma", "augment", "hflip", "seed", "subset_seed", "subset_file")
    return {**{k: getattr(args, k) for k in keys}, "subset_digest": subset_digest}


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
    """Backbone + classifier (seeded by ``--seed``) with its two-group optimizer and schedule."""
    torch.manual_seed(args.seed)
    model = Classifier(run.backbone, run.data.num_classes).to(run.device)
    return common.Trainee("model", model, *build_optimizer(model, args))


def announce(args: argparse.Namespace, run: common.EvalRun, subset: Subset) -> None:
    """One line with what is fine-tuned, on what, and how."""
    data = run.data
    info(f"fine-tune on {args.labels}% of the labels ({len(subset.indices)} of {len(data.train)} images, subset "
         f"{subset.path}) of {run.source.weights} on {run.cfg.data.name}: {len(data.test)} val images, "
         f"{data.num_classes} classes, {args.epochs} epochs, batch {args.batch_size}, lr backbone "
         f"{args.lr_backbone} / classifier {args.lr_classifier} ({args.schedule} {args.milestones}), "
         f"augment {args.augment} -> {run.out}")


def train_one_epoch(trainee: common.Trainee, run: common.EvalRun, args: argparse.Namespace, subset: Subset,
                    train_tf: Callable, epoch: int) -> tuple[dict, str]:
    """One epoch of the whole network (BatchNorm in train mode) over the subset; returns its
    record and lr text (backbone/classifier)."""
    model, optimizer = trainee.module, trainee.optimizer
    lrs = [g["lr"] for g in optimizer.param_groups]
    order = common.epoch_order(subset.indices, args.seed, epoch, args.batch_size)
    common.seed_augmentations(args.seed, epoch)
    loader = common.make_loader(run.data.train, train_tf, args.batch_size, run.workers, order,
                                failed=run.failed_train)
    model.train()
    bar = common.progress_bar(loader, f"epoch {epoch + 1}/{args.epochs}", run.progress)
    loss = common.sgd_pass(lambda x: model(x.to(run.device, non_blocking=True)), optimizer, bar, run.device)
    trainee.scheduler.step()
    return {"train_loss": loss, "lr_backbone": lrs[0], "lr_classifier": lrs[1]}, f"{lrs[0]:.3g}/{lrs[1]:.3g}"


def evaluate(model: Classifier, run: common.EvalRun, val_loader: Iterable) -> dict:
    """The model's accuracy and loss on the val split (BatchNorm in eval mode)."""
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
               "protocol": f"semi-supervised {args.labels}%", "labels_percent": args.labels, "top1": result["top1"],
               "top5": result.get("top5"), "val_loss": result["loss"],
               "subset": {"file": subset.path, "images": int(len(subset.indices)), "digest": subset.digest},
               "hyperparameters": loop.hyper, "epochs_run": len(loop.history), "wall_s": time.perf_counter() - t_start}
    return common.write_report(run.out, "finetune", metrics, loop.trainee.module.torchvision_state_dict(),
                               "finetuned_torchvision.pth", f"finetune ({args.labels}% labels)")


def main(argv=None) -> dict:
    """Fine-tune on the labelled subset, evaluate, write the outputs; returns the metrics."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    run = common.prepare_run(args, f"finetune-{args.labels}pct")
    if args.augment == "auto":  # decided here: it needs the data's image size
        args.augment = "rrc" if run.data.image_size > 64 else "crop"
    subset = choose_subset(args, run.data, run.out)
    trainee = build_trainee(run, args)
    loop = common.EpochLoop("finetune", run.out, hyper_parameters(args, subset.digest), trainee, args.epochs,
                            args.eval_every, args.resume)
    announce(args, run, subset)
    train_tf = common.train_transform(args.augment, run.data.recipe, run.data.image_size, args.hflip)
    val_loader = common.make_loader(run.data.test, common.val_transform(run.data.recipe, run.data.image_size),
                                    args.batch_size, run.workers, failed=run.failed_test)
    result = loop.run(functools.partial(train_one_epoch, trainee, run, args, subset, train_tf),
                      functools.partial(evaluate, trainee.module, run, val_loader))
    return report(args, run, loop, subset, result, t_start)


if __name__ == "__main__":
    main(sys.argv[1:])

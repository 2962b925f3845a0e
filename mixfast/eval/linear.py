"""Linear probe: a linear classifier on the frozen backbone (BatchNorm in eval mode).

    python -m mixfast.eval.linear RUN_OR_CKPT [--protocol imagenet|cifar] [--epochs N --lr LR ...]

Protocols (every value overridable by its flag):

- ``imagenet`` (SPEC §6, MoCo's ``main_lincls.py``): SGD lr 30, momentum 0.9, weight decay 0,
  batch 256, 100 epochs, lr ×0.1 at epochs 60 and 80; train RandomResizedCrop(224) + flip,
  val Resize(256) + CenterCrop(224) (the data's ``image_size`` stands for 224).
- ``cifar`` (our choice; neither SPEC nor the MixMask/Un-Mix code pins one: the CIFAR numbers
  of those papers are kNN or their own scripts): solo-learn's linear recipe — SGD lr 0.1,
  momentum 0.9, weight decay 0, batch 256, 100 epochs, lr ×0.1 at 60 and 80 — with the usual
  CIFAR augmentation, RandomCrop(32, padding 4) + flip; val: the image as is.

The classifier is ``nn.Linear(feature_dim, classes)`` with weights N(0, 0.01) and zero bias
(as in MoCo), trained on the pooled, unnormalized features. The flip follows the run's
``data.hflip`` (off for digits). ``--augment none`` trains on the val transform; the features
are then the same every epoch and are computed once (``--precompute auto``), which makes
small probes fast. The classifier, optimizer and epoch are saved every epoch in
``<out>/state.pt`` and a rerun of the same command resumes there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import mixfast  # noqa: F401  (torchvision compatibility shim first)
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixfast.engine.logging import info
from mixfast.eval import common

PROTOCOLS = {
    "imagenet": {"epochs": 100, "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256,
                 "schedule": "step", "milestones": [60, 80], "gamma": 0.1, "augment": "rrc"},
    "cifar": {"epochs": 100, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256,
              "schedule": "step", "milestones": [60, 80], "gamma": 0.1, "augment": "crop"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixfast.eval.linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="imagenet",
                        help="hyper-parameter set (default imagenet = SPEC §6)")
    common.add_schedule_args(parser)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--augment", choices=common.AUGMENTS, default=None,
                        help="train transform: rrc (RandomResizedCrop+flip), crop (RandomCrop pad+flip), none")
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
    keys = ("protocol", "epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule", "milestones", "gamma",
            "augment", "hflip", "seed")
    return {k: getattr(args, k) for k in keys}


def build_optimizer(classifier: nn.Module, args) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return optimizer, common.build_scheduler(optimizer, args.epochs, args.schedule, args.milestones, args.gamma)


def _batches_of_features(feats, labels, order, batch_size):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield feats[idx], labels[idx]


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    source, cfg, backbone, device = common.setup(args)
    data = common.labelled_data(cfg)
    if args.hflip is None:
        args.hflip = data.hflip
    out = args.out or common.default_out(source, f"linear-{args.protocol}")
    os.makedirs(out, exist_ok=True)
    progress = not args.no_progress
    workers = cfg.data.num_workers
    hyper = hyper_parameters(args)
    precompute = args.precompute == "on" or (args.precompute == "auto" and args.augment == "none")

    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed)
    classifier = nn.Linear(backbone.feature_dim, data.num_classes)
    classifier.weight.data.normal_(0.0, 0.01)
    classifier.bias.data.zero_()
    classifier.to(device)
    optimizer, scheduler = build_optimizer(classifier, args)

    start_epoch, history = common.resume_training(out, hyper, args.resume, "classifier", classifier, optimizer, scheduler)

    info(f"linear probe ({args.protocol}) of {source.weights} on {cfg.data.name}: {len(data.train)} train / "
         f"{len(data.test)} val images, {data.num_classes} classes, feature dim {backbone.feature_dim}, "
         f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr} ({args.schedule} {args.milestones}), "
         f"augment {args.augment}{' (features precomputed)' if precompute else ''} -> {out}")
    val_loader = common.make_loader(data.test, common.val_transform(data.recipe, data.image_size),
                                    args.batch_size, workers)
    train_tf = common.train_transform(args.augment, data.recipe, data.image_size, args.hflip)
    val_feats = train_feats = None
    if precompute and start_epoch < args.epochs:  # (a finished run that is resumed only reports)
        train_feats, train_labels = common.extract_features(
            backbone, common.make_loader(data.train, train_tf, args.batch_size, workers), device, progress,
            "train features")
        val_feats, val_labels = common.extract_features(backbone, val_loader, device, progress, "val features")

    def evaluate() -> dict:
        acc = common.Accuracy(data.num_classes)
        with torch.no_grad():
            if val_feats is not None:
                for start in range(0, len(val_labels), args.batch_size):
                    acc.update(classifier(val_feats[start:start + args.batch_size]),
                               val_labels[start:start + args.batch_size])
            else:
                for x, y in tqdm(val_loader, desc="val", disable=not progress, leave=False, dynamic_ncols=True):
                    y = y.to(device)
                    acc.update(classifier(backbone(x.to(device, non_blocking=True)).float()), y)
        return acc.result()

    log = common.EpochLog(out, "linear")
    result = history[-1]["val"] if history else None
    all_indices = list(range(len(data.train)))
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        order = common.epoch_order(all_indices, args.seed, epoch, args.batch_size)
        torch.manual_seed(args.seed * 100_003 + epoch)  # augmentations (main process) of this epoch
        if train_feats is not None:
            batches = _batches_of_features(train_feats, train_labels, torch.tensor(order, device=device),
                                           args.batch_size)
            total = -(-len(order) // args.batch_size)
        else:
            batches = common.make_loader(data.train, train_tf, args.batch_size, workers, order)
            total = len(batches)
        classifier.train()
        loss_sum, n = 0.0, 0
        bar = tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not progress, leave=False,
                   dynamic_ncols=True)
        for x, y in bar:
            y = y.to(device)
            if train_feats is None:
                with torch.no_grad():
                    x = backbone(x.to(device, non_blocking=True)).float()
            loss = F.cross_entropy(classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * y.numel()
            n += y.numel()
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", lr=f"{lr:.3g}", refresh=False)
        scheduler.step()
        record = {"train_loss": loss_sum / max(1, n), "lr": lr, "seconds": time.perf_counter() - t0}
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % max(1, args.eval_every) == 0:
            result = evaluate()
            record["val"] = result
        history.append(record)
        log.log(epoch + 1, record)
        msg = f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.4f}, lr {lr:.4g}"
        if "val" in record:
            msg += f", val top-1 {result['top1']:.2f}%" + (f" top-5 {result['top5']:.2f}%" if "top5" in result else "")
        info(msg)
        common.save_state(out, {"epoch": epoch + 1, "classifier": classifier.state_dict(),
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "history": history, "hyper": hyper})
    if result is None:  # resumed a finished run: evaluate the saved classifier again
        result = evaluate()

    metrics = {**common.base_record("linear", source, cfg, data), "protocol": args.protocol,
               "top1": result["top1"], "top5": result.get("top5"), "val_loss": result["loss"],
               "hyperparameters": hyper, "precomputed_features": precompute, "epochs_run": len(history),
               "wall_s": time.perf_counter() - t_start}
    path = common.write_json(os.path.join(out, "linear_metrics.json"), metrics)
    torch.save(classifier.state_dict(), os.path.join(out, "linear_classifier.pth"))
    info(f"wrote {path}")
    print(f"linear top-1: {result['top1']:.2f}%" + (f" (top-5 {result['top5']:.2f}%)" if "top5" in result else ""),
          flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

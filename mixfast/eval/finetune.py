"""Semi-supervised fine-tuning on 1% / 10% / 100% of the labels (SPEC §6).

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
import hashlib
import os
import sys
import time

import mixfast  # noqa: F401  (torchvision compatibility shim first)
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixfast.engine.logging import info
from mixfast.eval import common, subsets

# SPEC §6: percent -> (backbone lr, classifier lr)
SPEC_LRS = {1: (0.002, 0.5), 10: (0.002, 0.5), 100: (0.001, 0.05)}
DEFAULTS = {"epochs": 20, "batch_size": 256, "momentum": 0.9, "weight_decay": 0.0, "schedule": "step",
            "milestones": [12, 16], "gamma": 0.1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixfast.eval.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--labels", type=int, choices=sorted(SPEC_LRS), required=True,
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
    lr_b, lr_c = SPEC_LRS[args.labels]
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
        self.fc = nn.Linear(backbone.feature_dim, num_classes)
        self.fc.weight.data.normal_(0.0, 0.01)
        self.fc.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))

    def torchvision_state_dict(self) -> dict:
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
    keys = ("labels", "epochs", "lr_backbone", "lr_classifier", "momentum", "weight_decay", "batch_size", "schedule",
            "milestones", "gamma", "augment", "hflip", "seed", "subset_seed", "subset_file")
    return {**{k: getattr(args, k) for k in keys}, "subset_digest": subset_digest}


def choose_subset(args, data: common.LabelledData, out: str):
    """(indices, file written or read)."""
    if args.subset_file:
        try:
            indices = subsets.read_subset(args.subset_file, data.train)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"mixfast: {err}") from None
        return indices, args.subset_file
    indices = subsets.select_subset(common.dataset_labels(data.train), args.labels, args.subset_seed)
    path = os.path.join(out, f"subset_{args.labels}pct_seed{args.subset_seed}.txt")
    subsets.write_subset(path, indices, data.train,
                         header=f"mixfast fine-tuning subset: {args.labels}% of the labels, class-balanced, "
                                f"subset seed {args.subset_seed}, {len(indices)} of {len(data.train)} images")
    return indices, path


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    source, cfg, backbone, device = common.setup(args)
    data = common.labelled_data(cfg)
    if args.hflip is None:
        args.hflip = data.hflip
    if args.augment == "auto":
        args.augment = "rrc" if data.image_size > 64 else "crop"
    out = args.out or common.default_out(source, f"finetune-{args.labels}pct")
    os.makedirs(out, exist_ok=True)
    progress = not args.no_progress
    workers = cfg.data.num_workers

    indices, subset_path = choose_subset(args, data, out)
    digest = hashlib.sha256(",".join(map(str, indices.tolist())).encode()).hexdigest()[:16]
    hyper = hyper_parameters(args, digest)

    torch.manual_seed(args.seed)
    model = Classifier(backbone, data.num_classes).to(device)
    optimizer, scheduler = build_optimizer(model, args)
    trainee = common.Trainee("model", model, optimizer, scheduler)
    start_epoch, history = common.resume_training(out, hyper, args.resume, trainee)

    info(f"fine-tune on {args.labels}% of the labels ({len(indices)} of {len(data.train)} images, subset "
         f"{subset_path}) of {source.weights} on {cfg.data.name}: {len(data.test)} val images, "
         f"{data.num_classes} classes, {args.epochs} epochs, batch {args.batch_size}, lr backbone "
         f"{args.lr_backbone} / classifier {args.lr_classifier} ({args.schedule} {args.milestones}), "
         f"augment {args.augment} -> {out}")
    train_tf = common.train_transform(args.augment, data.recipe, data.image_size, args.hflip)
    val_loader = common.make_loader(data.test, common.val_transform(data.recipe, data.image_size),
                                    args.batch_size, workers)

    def evaluate() -> dict:
        model.eval()
        acc = common.Accuracy(data.num_classes)
        with torch.no_grad():
            for x, y in tqdm(val_loader, desc="val", disable=not progress, leave=False, dynamic_ncols=True):
                acc.update(model(x.to(device, non_blocking=True)).float(), y.to(device))
        return acc.result()

    log = common.EpochLog(out, "finetune")
    result = history[-1]["val"] if history else None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        lrs = [g["lr"] for g in optimizer.param_groups]
        order = common.epoch_order(indices, args.seed, epoch, args.batch_size)
        torch.manual_seed(args.seed * 100_003 + epoch)
        loader = common.make_loader(data.train, train_tf, args.batch_size, workers, order)
        model.train()
        loss_sum, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not progress, leave=False,
                   dynamic_ncols=True)
        for x, y in bar:
            y = y.to(device)
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * y.numel()
            n += y.numel()
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", refresh=False)
        scheduler.step()
        record = {"train_loss": loss_sum / max(1, n), "lr_backbone": lrs[0], "lr_classifier": lrs[1],
                  "seconds": time.perf_counter() - t0}
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % max(1, args.eval_every) == 0:
            result = evaluate()
            record["val"] = result
        history.append(record)
        log.log(epoch + 1, record)
        msg = f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.4f}, lr {lrs[0]:.3g}/{lrs[1]:.3g}"
        if "val" in record:
            msg += f", val top-1 {result['top1']:.2f}%" + (f" top-5 {result['top5']:.2f}%" if "top5" in result else "")
        info(msg)
        common.save_state(out, {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "history": history, "hyper": hyper})
    if result is None:
        result = evaluate()

    metrics = {**common.base_record("finetune", source, cfg, data), "protocol": f"semi-supervised {args.labels}%",
               "labels_percent": args.labels, "top1": result["top1"], "top5": result.get("top5"),
               "val_loss": result["loss"], "subset": {"file": subset_path, "images": int(len(indices)),
                                                      "digest": digest},
               "hyperparameters": hyper, "epochs_run": len(history), "wall_s": time.perf_counter() - t_start}
    path = common.write_json(os.path.join(out, "finetune_metrics.json"), metrics)
    torch.save(model.torchvision_state_dict(), os.path.join(out, "finetuned_torchvision.pth"))
    info(f"wrote {path}")
    print(f"finetune ({args.labels}% labels) top-1: {result['top1']:.2f}%"
          + (f" (top-5 {result['top5']:.2f}%)" if "top5" in result else ""), flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

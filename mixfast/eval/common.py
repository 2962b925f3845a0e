"""What the evaluation commands share: where the backbone comes from, its run config, the
labelled data and transforms, the LR schedules, accuracy, resumable state and the outputs.

A *source* (the positional argument of every command) is one of

- a run directory (``train.output_dir``): its ``config.json`` gives the model and data; the
  weights are ``backbone_torchvision.pth`` when the run finished, else the newest checkpoint;
- a DeepSpeed checkpoint: the ``checkpoints/`` directory (its ``latest`` tag, else the newest
  tag), a tag directory, or the ``mp_rank_00_model_states.pt`` file itself; the module state
  holds ``backbone.*`` and ``head.*`` and only ``backbone.*`` is used;
- an exported backbone ``.pth`` (``Trainer.finish`` writes one): a torchvision-format ResNet (a
  full torchvision ``resnetXX`` state dict works too, its ``fc`` is dropped) or a timm-format ViT
  encoder (``patch_embed.*``, ``blocks.*``; a ``head`` is dropped).

The run's ``config.json`` is found next to the source (the run directory, or two levels up
from a checkpoint tag); without one, ``--arch`` (and ``--width``/``--cifar-stem`` where they
differ from the defaults; a ViT is built for ``data.image_size``) and the data (``--set
data.name=...`` or ``--config``) must be given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import mixfast._compat  # noqa: F401  (torchvision import on CPU-only torch)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from mixfast.config import ConfigError, RunConfig, config_from_dict, dump_config
from mixfast.data import EvalDataset, build_datasets, collate_eval, eval_transform, normalize
from mixfast.data.loader import EvalLoader
from mixfast.engine.checkpoint import CHECKPOINTS, MODEL_STATES, STEP_TAG, latest_complete_tag
from mixfast.engine import schedule
from mixfast.engine.logging import info
from mixfast.models import VIT_ARCHS, build_backbone, is_vit

EXPORT_NAME = "backbone_torchvision.pth"
CONFIG_NAME = "config.json"
_MODEL_STATES_RE = re.compile(r"^mp_rank_\d+_model_states\.pt$")


class SourceError(ValueError):
    """A source path or model argument that cannot be used; the message names it."""


# ---------------------------------------------------------------------------------------
# Where the weights come from
# ---------------------------------------------------------------------------------------


@dataclass
class BackboneSource:
    """The backbone weights a command evaluates and where they were found."""

    path: str                  # as given by the user
    kind: str                  # "export" | "checkpoint"
    weights: str               # the file actually read
    state_dict: dict           # torchvision-format backbone keys (no fc)
    config_path: Optional[str]  # the run's config.json, when found
    run_dir: Optional[str]      # the run directory, when known

    def describe(self) -> dict:
        """Where the weights came from, for the metrics file."""
        return {"path": self.path, "kind": self.kind, "weights": self.weights, "config": self.config_path}


def _newest_tag(ckpt_dir: Path) -> Path:
    """The tag named in ``latest`` when it exists, else the newest tag directory holding model states."""
    tag, _ = latest_complete_tag(str(ckpt_dir))
    if tag is not None:
        return ckpt_dir / tag
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and (p / MODEL_STATES).is_file()] if ckpt_dir.is_dir() else []
    if not tags:
        raise SourceError(f"{ckpt_dir}: no DeepSpeed checkpoint (no <tag>/{MODEL_STATES}) found there")

    def order(p: Path):
        m = STEP_TAG.match(p.name)
        return (p.stat().st_mtime, int(m.group(1)) if m else -1)

    return max(tags, key=order)


def _config_near(*dirs: Path) -> Optional[Path]:
    """The first of ``dirs`` that holds a config.json, that file; else None."""
    for d in dirs:
        if (d / CONFIG_NAME).is_file():
            return d / CONFIG_NAME
    return None


def _torch_load(path: Path) -> Any:
    """``torch.load`` on the CPU; a file it cannot read is a SourceError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors come in many types
        raise SourceError(f"{path}: cannot be read as a PyTorch file ({type(err).__name__}: {err})") from None


def backbone_from_checkpoint(obj: Any, path: Path) -> dict:
    """``backbone.*`` weights of a DeepSpeed model-states file, prefix removed."""
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict):
        raise SourceError(f"{path}: not a DeepSpeed model-states file (no 'module' state dict)")
    state = {k[len("backbone."):]: v for k, v in module.items() if k.startswith("backbone.")}
    if not state:
        some = ", ".join(list(module)[:3])
        raise SourceError(f"{path}: the checkpoint's module has no 'backbone.*' weights (keys start: {some})")
    return state


RESNET_KEY = "conv1.weight"             # the first key of a torchvision-format ResNet
VIT_KEY = "patch_embed.proj.weight"      # ... of a timm-format ViT encoder


def backbone_from_export(obj: Any, path: Path) -> dict:
    """A torchvision-format ResNet (``fc.*`` dropped) or timm-format ViT (``head.*`` dropped) state
    dict; mixfast exports have neither classifier."""
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        return backbone_from_checkpoint(obj, path)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"{path}: not a backbone state dict (expected a dict of tensors like the "
                          f"{EXPORT_NAME} a run writes)")
    if RESNET_KEY in obj:
        return {k: v for k, v in obj.items() if not k.startswith("fc.")}
    if VIT_KEY in obj:
        return {k: v for k, v in obj.items() if not k.startswith("head.")}
    raise SourceError(f"{path}: neither '{RESNET_KEY}' (a torchvision-format ResNet) nor '{VIT_KEY}' (a "
                      f"timm-format ViT) among its keys: not a backbone state dict")


def resolve_source(path: str | os.PathLike) -> BackboneSource:
    """Find and read the backbone weights behind a run dir / checkpoint / exported .pth."""
    given = str(path)
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{given}: no such file or directory (expected a run directory, a DeepSpeed "
                          f"checkpoint directory or tag, or an exported backbone .pth)")
    if p.is_dir():
        if (p / MODEL_STATES).is_file():  # a tag directory
            tag_dir = p
        elif (p / EXPORT_NAME).is_file():  # a finished run
            weights = p / EXPORT_NAME
            return BackboneSource(given, "export", str(weights), backbone_from_export(_torch_load(weights), weights),
                                  _str(_config_near(p)), str(p))
        elif (p / CHECKPOINTS).is_dir():  # a run that has checkpoints but no export (yet)
            tag_dir = _newest_tag(p / CHECKPOINTS)
        elif (p / "latest").is_file() or any(c.is_dir() and (c / MODEL_STATES).is_file() for c in p.iterdir()):
            tag_dir = _newest_tag(p)  # the checkpoints/ directory itself
        else:
            raise SourceError(f"{given}: a directory with neither {EXPORT_NAME}, {CHECKPOINTS}/, nor a "
                              f"DeepSpeed checkpoint ({MODEL_STATES}) in it")
        weights = tag_dir / MODEL_STATES
        config = _config_near(tag_dir.parent.parent, tag_dir.parent)
        return BackboneSource(given, "checkpoint", str(weights), backbone_from_checkpoint(_torch_load(weights), weights),
                              _str(config), _str(config.parent) if config else None)
    obj = _torch_load(p)
    if _MODEL_STATES_RE.match(p.name):
        config = _config_near(p.parent.parent.parent, p.parent)
        return BackboneSource(given, "checkpoint", given, backbone_from_checkpoint(obj, p), _str(config),
                              _str(config.parent) if config else None)
    state = backbone_from_export(obj, p)
    config = _config_near(p.parent)
    return BackboneSource(given, "export", given, state, _str(config), _str(p.parent) if config else None)


def _str(p: Optional[Path]) -> Optional[str]:
    return None if p is None else str(p)


# ---------------------------------------------------------------------------------------
# Run config and the backbone
# ---------------------------------------------------------------------------------------


def resolve_config(source: BackboneSource, config: Optional[str] = None, arch: Optional[str] = None,
                   width: Optional[int] = None, cifar_stem: Optional[bool] = None,
                   overrides: Sequence[str] = (), pool: Optional[str] = None) -> RunConfig:
    """The run config (``--config``, else the run's config.json) with --arch/--width/--cifar-stem/--pool
    and ``--set`` overrides applied, validated like the trainer's (errors name the key)."""
    path = config or source.config_path
    if path is None:
        if arch is None:
            raise SourceError(f"{source.path}: no {CONFIG_NAME} found next to it, so the model is unknown: pass "
                              f"--arch (and --width / --cifar-stem if not 64 / off) and the data "
                              f"(--set data.name=... or --config RUN/{CONFIG_NAME})")
        raw: dict = {}
        where = "(no config file)"
    else:
        if not Path(path).is_file():
            raise SourceError(f"--config {path}: no such file")
        try:
            full = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise SourceError(f"{path}: invalid JSON ({err})") from None
        # Evaluation reads only the model, data and eval sections; the method/mixing/train
        # sections of a run (possibly of a newer trainer with methods this one lacks) are dropped.
        raw = {k: full[k] for k in ("model", "data", "eval") if k in full}
        where = str(path)
    model_overrides = []
    if arch is not None:
        model_overrides.append(f"model.arch={arch}")
    if width is not None:
        model_overrides.append(f"model.width={width}")
    if cifar_stem is not None:
        model_overrides.append(f"model.cifar_stem={json.dumps(cifar_stem)}")
    if pool is not None:
        model_overrides.append(f"model.pool={pool}")
    return config_from_dict(raw, [*model_overrides, *overrides], source=where)


def model_text(cfg: RunConfig) -> str:
    """The settings that shape the backbone, as ``key=value`` words for messages."""
    mc = cfg.model
    if is_vit(mc.arch):
        return f"model.arch={mc.arch} data.image_size={cfg.data.image_size}"
    return f"model.arch={mc.arch} model.width={mc.width} model.cifar_stem={mc.cifar_stem}"


def _weights_kind(state: dict) -> Optional[str]:
    """'ResNet' or 'ViT' by the first keys of a state dict; None when neither."""
    if RESNET_KEY in state:
        return "ResNet"
    if VIT_KEY in state:
        return "ViT"
    return None


def _key_diff(model_state: dict, given: dict, limit: int = 4) -> str:
    """What keeps ``given`` from loading into a model with ``model_state``: its missing and
    unexpected keys and the shapes that differ (the first few of each)."""
    def few(keys: list) -> str:
        return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")

    missing = [k for k in model_state if k not in given]
    unexpected = [k for k in given if k not in model_state]
    shapes = [f"{k} {tuple(given[k].shape)} in the weights, {tuple(model_state[k].shape)} in the model"
              for k in model_state if k in given and tuple(given[k].shape) != tuple(model_state[k].shape)]
    parts = [f"{name}: {few(keys)}" for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                        ("shapes differ", shapes)) if keys]
    return "; ".join(parts) or "the keys match"


def load_backbone(source: BackboneSource, cfg: RunConfig, drop_path: float = 0.0) -> nn.Module:
    """The run's backbone architecture with the source's weights (strict: every key must fit). A ViT
    is built for ``data.image_size`` with ``model.pool`` and stochastic depth ``drop_path`` (fine-tuning)."""
    mc = cfg.model
    try:
        if is_vit(mc.arch):
            backbone = build_backbone(mc.arch, mc.width, mc.cifar_stem, image_size=cfg.data.image_size,
                                      pool=mc.pool, drop_path=drop_path)
        else:
            backbone = build_backbone(mc.arch, mc.width, mc.cifar_stem)
    except ValueError as err:
        raise SourceError(f"cannot build {model_text(cfg)}: {err}") from None
    kind, wanted = _weights_kind(source.state_dict), ("ViT" if is_vit(mc.arch) else "ResNet")
    if kind is not None and kind != wanted:
        raise SourceError(f"{source.weights}: weights do not fit {model_text(cfg)}: they are a {kind}'s "
                          f"('{RESNET_KEY if kind == 'ResNet' else VIT_KEY}' ...), model.arch={mc.arch} is a "
                          f"{wanted} ({_key_diff(backbone.state_dict(), source.state_dict, 3)}); pass the right "
                          f"--arch")
    try:
        backbone.load_state_dict(source.state_dict, strict=True)
    except RuntimeError:
        hint = "--arch/--set data.image_size" if is_vit(mc.arch) else "--arch/--width/--cifar-stem"
        raise SourceError(f"{source.weights}: weights do not fit {model_text(cfg)} "
                          f"({_key_diff(backbone.state_dict(), source.state_dict)[:800]}); pass the right "
                          f"{hint}") from None
    return backbone


# ---------------------------------------------------------------------------------------
# Command-line plumbing shared by the commands
# ---------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The source, model, config, output and device flags of every command."""
    parser.add_argument("source", help="run directory, DeepSpeed checkpoint (dir, tag dir or model-states file), "
                                       "or exported backbone .pth")
    parser.add_argument("--config", default=None, help="run config JSON (default: the run's config.json)")
    parser.add_argument("--arch", choices=["resnet18", "resnet50", *VIT_ARCHS], default=None,
                        help="override model.arch")
    parser.add_argument("--width", type=int, default=None, help="override model.width")
    parser.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                        help="override model.cifar_stem")
    parser.add_argument("--pool", choices=["cls", "mean"], default=None,
                        help="ViT: override model.pool (the CLS token or the mean of the patch tokens)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key, e.g. --set data.root=/data/imagenet (repeatable)")
    parser.add_argument("--exclude-unknown-classes", action="store_true",
                        help="leave out (with a warning) the val class folders that the training split lacks, "
                             "instead of stopping (data.unknown_val_classes=exclude)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/eval/<command>)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, augmentations and init")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_schedule_args(parser: argparse.ArgumentParser) -> None:
    """SGD and lr-schedule flags of the linear probe and fine-tune; None = the protocol's value."""
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--schedule", choices=["step", "cosine", "constant"], default=None)
    parser.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs where lr *= gamma (step)")
    parser.add_argument("--gamma", type=float, default=None)


def add_loop_args(parser: argparse.ArgumentParser) -> None:
    """Flip, evaluation cadence and resume flags of the linear probe and fine-tune."""
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                        help="random flip in the train transform (default: the run's data.hflip)")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--resume", choices=["auto", "none"], default="auto",
                        help="auto: continue from <out>/state.pt when present")


def setup(args: argparse.Namespace, configure: Optional[Callable[[RunConfig], dict]] = None,
          ) -> tuple[BackboneSource, RunConfig, nn.Module, torch.device]:
    """Source, config and backbone from the common arguments; SystemExit with the message on errors.
    ``configure(cfg)``, called once the run config is known, returns extra ``load_backbone``
    keywords (the fine-tune's drop path)."""
    try:
        source = resolve_source(args.source)
        overrides = [*args.overrides, *(["data.unknown_val_classes=exclude"] if args.exclude_unknown_classes else [])]
        cfg = resolve_config(source, args.config, args.arch, args.width, args.cifar_stem, overrides,
                             getattr(args, "pool", None))
        backbone = load_backbone(source, cfg, **(configure(cfg) if configure else {}))
    except (SourceError, ConfigError) as err:
        raise SystemExit(f"mixfast: {err}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return source, cfg, backbone.to(device), device


def default_out(source: BackboneSource, name: str) -> str:
    """RUN/eval/<name>, or eval/<name> next to the weights when the run directory is unknown."""
    base = source.run_dir or os.path.dirname(os.path.abspath(source.weights))
    return os.path.join(base, "eval", name)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclass
class LabelledData:
    """The run's labelled train and test splits and how its images are shaped and normalized."""

    train: Dataset   # base data set: (PIL image, label)
    test: Dataset
    num_classes: int
    recipe: str      # normalization (cifar or imagenet mean/std) follows the pre-training recipe
    image_size: int
    hflip: bool


def labelled_data(cfg: RunConfig, out: Optional[str] = None) -> LabelledData:
    """The splits the trainer's kNN monitor uses (untransformed), with the data settings: the val
    split labelled with the training split's classes, unreadable files removed (and listed in
    ``<out>/skipped_files.txt``). A data set that cannot be read so is a SystemExit naming the path."""
    try:
        data = build_datasets(cfg.data, run_dir=out)
    except ConfigError as err:
        raise SystemExit(f"mixfast: {err}") from None
    return LabelledData(data.knn_train.base, data.knn_test.base, data.num_classes, cfg.data.augmentation,
                        cfg.data.image_size, cfg.data.hflip)


def image_counts(base: Dataset, failed: Iterable[str] = ()) -> dict:
    """What a command did with a split: ``used`` images (listed and decoded), ``skipped`` files
    (unreadable: removed by the start-up check, or failed when read, ``failed``), ``ignored``
    entries (hidden files, other extensions: image folders only)."""
    failed = set(failed)
    skipped = len(getattr(base, "skipped", ()))
    ignored = getattr(base, "ignored", None)
    counts = {"used": len(base) - len(failed), "skipped": skipped + len(failed)}
    if ignored is not None:
        counts["ignored"] = int(sum(ignored.values()))
    return counts


def counts_text(counts: dict) -> str:
    """'43 used, 13 skipped' (skipped only when some were)."""
    return f"{counts['used']} used" + (f", {counts['skipped']} unreadable skipped" if counts["skipped"] else "")


def dataset_labels(base: Dataset) -> np.ndarray:
    """Labels without decoding images where the data set exposes them."""
    for attr in ("labels", "targets"):
        if hasattr(base, attr):
            return np.asarray(getattr(base, attr), dtype=np.int64)
    if hasattr(base, "num_classes") and hasattr(base, "n"):  # SyntheticImages: label = index % classes
        return np.arange(base.n, dtype=np.int64) % base.num_classes
    return np.asarray([base[i][1] for i in range(len(base))], dtype=np.int64)


AUGMENTS = ("rrc", "crop", "none")
RANDAUG_LEVELS = 10  # RandAugment magnitudes on timm's / MAE's scale: 0..10 (MAE: rand-m9)


def parse_randaug(text: str) -> tuple[int, int]:
    """``--randaug N,M`` -> (N, M): N operations per image, magnitude M in 0..10 (argparse type)."""
    try:
        n, m = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,M (two integers, e.g. 2,9), got {text!r}") from None
    if n < 0 or not 0 <= m <= RANDAUG_LEVELS:
        raise argparse.ArgumentTypeError(f"N must be >= 0 and M in 0..{RANDAUG_LEVELS}, got {text!r}")
    return n, m


def randaugment(randaug: tuple[int, int]) -> T.RandAugment:
    """torchvision's RandAugment with N ops of magnitude M on a 0..10 scale (as timm's ``rand-mM``:
    M/10 of each op's largest magnitude), i.e. ``num_magnitude_bins`` 11."""
    n, m = randaug
    return T.RandAugment(num_ops=n, magnitude=m, num_magnitude_bins=RANDAUG_LEVELS + 1)


def train_transform(augment: str, recipe: str, size: int, hflip: bool,
                    randaug: Optional[tuple[int, int]] = None) -> Callable:
    """'rrc': RandomResizedCrop(size) + flip (the ImageNet linear probe of MoCo's main_lincls.py);
    'crop': resize, RandomCrop(size, padding size/8) + flip (the usual CIFAR recipe); 'none': the
    deterministic eval transform. ``randaug`` (N, M): RandAugment after the crop and flip, on the
    PIL image (as timm's transform of MAE's fine-tuning); not with 'none'."""
    if augment == "none":
        if randaug is not None:
            raise ValueError("RandAugment needs a random train transform, not augment 'none'")
        return eval_transform(recipe, size)
    flip = [T.RandomHorizontalFlip()] if hflip else []
    extra = [randaugment(randaug)] if randaug is not None else []
    if augment == "rrc":
        return T.Compose([T.RandomResizedCrop(size), *flip, *extra, T.ToTensor(), normalize(recipe)])
    if augment == "crop":
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=max(1, size // 8)), *flip,
                          *extra, T.ToTensor(), normalize(recipe)])
    raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")


def val_transform(recipe: str, size: int) -> Callable:
    """Resize(size·256/224) + CenterCrop(size) above 64 px (the ImageNet eval transform, Resize 256
    then CenterCrop 224), the image as is below."""
    return eval_transform(recipe, size)


def make_loader(base: Dataset, transform: Callable, batch_size: int, num_workers: int,
                order: Optional[Sequence[int]] = None, drop_last: bool = False,
                failed: Optional[dict] = None) -> EvalLoader:
    """Loader of ``(x, label)`` over ``order`` (default: every index in sequence); images that fail
    to decode are left out of their batch and added to ``failed`` (path -> reason) when given."""
    dataset = EvalDataset(base, transform)
    sampler = list(range(len(base))) if order is None else [int(i) for i in order]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_eval,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    out = EvalLoader(loader, getattr(base, "report", None))
    if failed is not None:
        out.unreadable = failed  # shared: every pass over the split adds to it
    return out


def progress_bar(iterable: Iterable, desc: str, progress: bool, total: Optional[int] = None) -> tqdm:
    """A tqdm bar over ``iterable`` that is cleared when done; silent with ``--no-progress``."""
    return tqdm(iterable, total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's image order and augmentations."""
    return seed * 100_003 + epoch


def epoch_order(indices: Sequence[int], seed: int, epoch: int, batch_size: int) -> list[int]:
    """A shuffle of ``indices`` that is a pure function of (seed, epoch) (so a resumed run sees the
    same order); a last batch of one image is left out (BatchNorm cannot train on it)."""
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    idx = np.asarray(indices)
    order = idx[torch.randperm(len(idx), generator=gen).numpy()].tolist()
    if len(order) > 1 and len(order) % batch_size == 1:
        order = order[:-1]
    return order


def seed_augmentations(seed: int, epoch: int) -> None:
    """Seed torch's RNG for one epoch's random augmentations (drawn in the main process), so a
    resumed run draws the same ones."""
    torch.manual_seed(_epoch_seed(seed, epoch))


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device: torch.device, progress: bool = False,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (not normalized) and labels of every batch, on ``device``."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in progress_bar(loader, desc, progress):
            feats.append(backbone(x.to(device, non_blocking=True)).float())
            labels.append(y.to(device))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------------------------------
# Schedules, accuracy
# ---------------------------------------------------------------------------------------


def lr_factor(epoch: int, epochs: int, schedule: str, milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of every group's base LR during ``epoch`` (0-based): 'step' = gamma^(number of
    milestones <= epoch), so lr ×0.1 from epoch 60 on with milestone 60; 'cosine' = half cosine
    over the epochs; 'constant' = 1."""
    if schedule == "step":
        return gamma ** sum(1 for m in milestones if epoch >= m)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be 'step', 'cosine' or 'constant', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, schedule: str, milestones: Sequence[int] = (),
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch scheduler (call ``.step()`` after each epoch); each param group keeps its own base LR."""
    lr_factor(0, epochs, schedule, milestones, gamma)  # validates the schedule name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, epochs, schedule, tuple(milestones), gamma))


def warmup_cosine(epoch: float, epochs: float, warmup_epochs: float, lr: float, min_lr: float) -> float:
    """MAE's fine-tuning lr (``util/lr_sched.py``) at the fractional ``epoch`` (epoch + step/steps):
    linear from 0 over the warm-up epochs, then half a cosine from ``lr`` to ``min_lr``."""
    return schedule.warmup_cosine(epoch, epochs, warmup_epochs, lr, 0.0, min_lr)


class WarmupCosine:
    """Per-iteration schedule of the ViT fine-tune: ``set(epoch + step / steps)`` before each
    optimizer step sets every group's lr to ``warmup_cosine(...) * group["lr_scale"]`` (layer-wise
    decay; 1 without). A function of the fractional epoch only, so a resumed run continues exactly;
    ``state_dict`` holds the settings (checked on resume)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_epochs: float,
                 epochs: float):
        self.optimizer = optimizer
        self.settings = {"lr": lr, "min_lr": min_lr, "warmup_epochs": warmup_epochs, "epochs": epochs}

    def lr_at(self, epoch: float) -> float:
        """The base lr (scale 1) at the fractional ``epoch``."""
        s = self.settings
        return warmup_cosine(epoch, s["epochs"], s["warmup_epochs"], s["lr"], s["min_lr"])

    def set(self, epoch: float) -> float:
        """Set every group's lr for the fractional ``epoch``; returns the base lr."""
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def step(self) -> None:
        """Nothing: the lr is set before each optimizer step (``set``)."""

    def state_dict(self) -> dict:
        return {"warmup_cosine": dict(self.settings)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("warmup_cosine") != self.settings:
            raise ValueError(f"saved schedule {state} differs from this run's {self.settings}")


def check_milestones(milestones: Sequence[int], epochs: int) -> None:
    """SystemExit unless ``--milestones`` are increasing positive epochs."""
    if any(m <= 0 for m in milestones) or list(milestones) != sorted(milestones):
        raise SystemExit(f"mixfast: --milestones must be increasing positive epochs, got {list(milestones)}")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """How many labels are among the top-k logits, for each k in ``ks``."""
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(1).sum()) for k in ks]


@dataclass
class Accuracy:
    """Running top-1 / top-5 (top-5 only when there are more than 5 classes)."""

    num_classes: int
    n: int = 0
    loss_sum: float = 0.0
    correct: list = field(default_factory=lambda: [0, 0])

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch."""
        ks = (1, 5) if self.num_classes > 5 else (1,)
        for i, c in enumerate(topk_correct(logits, labels, ks)):
            self.correct[i] += c
        self.loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        self.n += labels.numel()

    def result(self) -> dict:
        """Top-1 (top-5) in percent and the mean cross-entropy so far."""
        out = {"top1": 100.0 * self.correct[0] / max(1, self.n), "loss": self.loss_sum / max(1, self.n)}
        if self.num_classes > 5:
            out["top5"] = 100.0 * self.correct[1] / max(1, self.n)
        return out


# ---------------------------------------------------------------------------------------
# Outputs and resumable state
# ---------------------------------------------------------------------------------------


class EpochLog:
    """Appends one JSON record per epoch to ``<out>/metrics.jsonl``."""

    def __init__(self, out: str, name: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "metrics.jsonl")
        self.name = name

    def log(self, epoch: int, metrics: dict) -> None:
        """Append one record, stamped with the time, command and epoch."""
        record = {"time": time.time(), "command": self.name, "epoch": epoch, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: str, obj: dict) -> str:
    """Write ``obj`` as indented JSON atomically (write, then rename); returns ``path``."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
    return path


STATE_NAME = "state.pt"


def save_state(out: str, state: dict) -> None:
    """Atomically (write, then rename): a run killed while saving keeps the previous epoch."""
    path = os.path.join(out, STATE_NAME)
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_state(out: str, hyper: dict, resume: str) -> Optional[dict]:
    """The saved per-epoch state when resuming ('auto'), after checking it belongs to the same
    hyper-parameters; None for a fresh start ('none' or nothing saved)."""
    path = os.path.join(out, STATE_NAME)
    if resume == "none" or not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("hyper")
    if saved != json.loads(json.dumps(hyper)):
        diff = sorted(k for k in set(saved or {}) | set(hyper) if (saved or {}).get(k) != hyper.get(k))
        raise SystemExit(f"mixfast: {path} was saved by a run with other settings ({', '.join(diff)}); "
                         f"use another --out or --resume none to start over")
    return state


@dataclass
class Trainee:
    """What the linear probe and the fine-tune train, save every epoch and resume: the module
    (saved under ``key``), its optimizer and its LR scheduler."""

    key: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LambdaLR (per epoch) or WarmupCosine (per step)

    def state(self, epoch: int, history: list, hyper: dict) -> dict:
        """The per-epoch state that ``save_state`` writes and ``resume_training`` reads back."""
        return {"epoch": epoch, self.key: self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "history": history, "hyper": hyper}


def resume_training(out: str, hyper: dict, how: str, trainee: Trainee) -> tuple[int, list]:
    """Restore the trainee from the per-epoch state when resuming; returns (first epoch to run,
    metrics history so far)."""
    state = load_state(out, hyper, how)
    if state is None:
        return 0, []
    trainee.module.load_state_dict(state[trainee.key])
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    info(f"resuming from {os.path.join(out, STATE_NAME)} at epoch {state['epoch']}")
    return state["epoch"], state["history"]


def base_record(name: str, source: BackboneSource, cfg: RunConfig, data: LabelledData,
                images: Optional[dict] = None) -> dict:
    """The metrics-file fields every command writes: command, source, model and data. ``images``:
    ``{"train": image_counts(...), "test": ...}``, what the command used and skipped of each split
    (default: the splits as listed and checked)."""
    images = images or {"train": image_counts(data.train), "test": image_counts(data.test)}
    model = ({"arch": cfg.model.arch, "pool": cfg.model.pool, "image_size": cfg.data.image_size}
             if is_vit(cfg.model.arch) else
             {"arch": cfg.model.arch, "width": cfg.model.width, "cifar_stem": cfg.model.cifar_stem})
    return {"command": name, "source": source.describe(), "model": model,
            "data": {**{k: v for k, v in dump_config(cfg)["data"].items()
                        if k in ("name", "root", "train_split", "val_split", "image_size", "augmentation")},
                     "num_classes": data.num_classes, "train_images": images["train"]["used"],
                     "test_images": images["test"]["used"], "images": images}}


# ---------------------------------------------------------------------------------------
# The training loop of the linear probe and the fine-tune
#
# Shared: set-up, the SGD pass, evaluation, the epoch bookkeeping (resume, cadence, logs,
# state) and the report. What each epoch trains stays in the commands, because it differs:
# the probe trains a classifier on frozen (possibly precomputed) features of every image with
# one lr, the fine-tune the whole network in train mode on a subset with two lr groups (ResNet
# recipe) or with AdamW, layer-wise lr decay and a per-step schedule (ViT recipe).
# ---------------------------------------------------------------------------------------


@dataclass
class EvalRun:
    """What the linear probe and the fine-tune work with once their arguments are read."""

    source: BackboneSource
    cfg: RunConfig
    backbone: nn.Module
    device: torch.device
    data: LabelledData
    out: str
    progress: bool
    workers: int
    # files that failed to decode when read (path -> reason), per split, over every pass
    failed_train: dict = field(default_factory=dict)
    failed_test: dict = field(default_factory=dict)

    def images(self) -> dict:
        """Used and skipped images of both splits, for the metrics file."""
        return {"train": image_counts(self.data.train, self.failed_train),
                "test": image_counts(self.data.test, self.failed_test)}


def prepare_run(args: argparse.Namespace, out_name: str,
                configure: Optional[Callable[[RunConfig], dict]] = None) -> EvalRun:
    """Source, config, backbone, labelled data and output directory (default RUN/eval/<out_name>);
    also sets ``args.hflip`` to the run's data.hflip when not given. ``configure``: see ``setup``."""
    source, cfg, backbone, device = setup(args, configure)
    out = args.out or default_out(source, out_name)
    os.makedirs(out, exist_ok=True)
    data = labelled_data(cfg, out)
    if args.hflip is None:
        args.hflip = data.hflip
    return EvalRun(source, cfg, backbone, device, data, out, not args.no_progress, cfg.data.num_workers)


def linear_classifier(feature_dim: int, num_classes: int) -> nn.Linear:
    """``nn.Linear`` with weights N(0, 0.01) and zero bias, as MoCo's linear classifier."""
    classifier = nn.Linear(feature_dim, num_classes)
    classifier.weight.data.normal_(0.0, 0.01)
    classifier.bias.data.zero_()
    return classifier


def sgd_pass(logits: Callable[[Any], torch.Tensor], optimizer: torch.optim.Optimizer, bar: tqdm,
             device: torch.device, **postfix: str) -> float:
    """One pass of cross-entropy SGD over the ``(input, label)`` batches of a ``progress_bar``
    (which shows the running loss and ``postfix``); returns the mean training loss."""
    loss_sum, n = 0.0, 0
    for x, y in bar:
        y = y.to(device)
        loss = F.cross_entropy(logits(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * y.numel()
        n += y.numel()
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", **postfix, refresh=False)
    return loss_sum / max(1, n)


@torch.no_grad()
def accuracy_over(logits: Callable[[Any], torch.Tensor], batches: Iterable, num_classes: int,
                  device: torch.device) -> dict:
    """Top-1 (and top-5) accuracy and mean loss of ``logits`` over ``(input, label)`` batches."""
    acc = Accuracy(num_classes)
    for x, y in batches:
        acc.update(logits(x), y.to(device))
    return acc.result()


def accuracy_text(result: dict) -> str:
    """'top-1 X% top-5 Y%' (top-5 only when measured)."""
    return f"top-1 {result['top1']:.2f}%" + (f" top-5 {result['top5']:.2f}%" if "top5" in result else "")


class EpochLoop:
    """The epochs of the linear probe and the fine-tune: resume, evaluation every ``eval_every``
    epochs and after the last, one metrics.jsonl record, console line and saved state per epoch."""

    def __init__(self, name: str, out: str, hyper: dict, trainee: Trainee, epochs: int, eval_every: int,
                 resume: str):
        self.out, self.hyper, self.trainee = out, hyper, trainee
        self.epochs, self.eval_every = epochs, max(1, eval_every)
        self.start, self.history = resume_training(out, hyper, resume, trainee)
        self.log = EpochLog(out, name)
        self.result = self.history[-1]["val"] if self.history else None

    def run(self, train_one_epoch: Callable[[int], tuple[dict, str]], evaluate: Callable[[], dict]) -> dict:
        """Train the epochs left (``train_one_epoch(epoch)`` -> (record, lr text)); returns the last
        evaluation (a finished run that is resumed evaluates the saved module again)."""
        for epoch in range(self.start, self.epochs):
            t0 = time.perf_counter()
            record, lr_text = train_one_epoch(epoch)
            record["seconds"] = time.perf_counter() - t0
            self._end_epoch(epoch, record, lr_text, evaluate)
        return self.result if self.result is not None else evaluate()

    def _end_epoch(self, epoch: int, record: dict, lr_text: str, evaluate: Callable[[], dict]) -> None:
        """Evaluate when due, then log, print and save the epoch."""
        if epoch + 1 == self.epochs or (epoch + 1) % self.eval_every == 0:
            self.result = evaluate()
            record["val"] = self.result
        self.history.append(record)
        self.log.log(epoch + 1, record)
        msg = f"epoch {epoch + 1}/{self.epochs}: loss {record['train_loss']:.4f}, lr {lr_text}"
        info(msg + (f", val {accuracy_text(self.result)}" if "val" in record else ""))
        save_state(self.out, self.trainee.state(epoch + 1, self.history, self.hyper))


def write_report(out: str, name: str, metrics: dict, weights: dict, weights_file: str, headline: str) -> dict:
    """Write ``<name>_metrics.json`` and the trained weights, then print the headline accuracy as
    the last stdout line; returns ``metrics``."""
    path = write_json(os.path.join(out, f"{name}_metrics.json"), metrics)
    torch.save(weights, os.path.join(out, weights_file))
    info(f"wrote {path}")
    top5 = f" (top-5 {metrics['top5']:.2f}%)" if metrics["top5"] is not None else ""
    print(f"{headline} top-1: {metrics['top1']:.2f}%{top5}", flush=True)
    return metrics

"""Export a backbone to Detectron2's pickle format (detection transfer, MixMask Table 7).

    python -m mixfast.eval.export_detectron2 RUN_OR_CKPT_OR_PTH OUT.pkl

The renaming is that of MoCo's ``detection/convert-pretrain-to-detectron2.py``, applied to a
torchvision-format ResNet state dict (what ``Trainer.finish`` exports):

    conv1.weight                  -> stem.conv1.weight
    bn1.{weight,bias,running_*}   -> stem.conv1.norm.{...}
    layer{1..4}.B.conv{j}.weight  -> res{2..5}.B.conv{j}.weight
    layer{1..4}.B.bn{j}.*         -> res{2..5}.B.conv{j}.norm.*
    layer{1..4}.B.downsample.0.*  -> res{2..5}.B.shortcut.*
    layer{1..4}.B.downsample.1.*  -> res{2..5}.B.shortcut.norm.*

``fc.*`` (there is none in a mixfast export) and ``num_batches_tracked`` (Detectron2's
FrozenBatchNorm/SyncBN have no such buffer) are left out. The file is a pickle of
``{"model": {name: numpy array}, "__author__": "mixfast", "matching_heuristics": True}``;
Detectron2 loads it with ``MODEL.WEIGHTS OUT.pkl``. The weights were trained on RGB input
normalized by the ImageNet mean/std (0..1 scale), so the Detectron2 config needs, as MoCo's
detection configs have: ``INPUT.FORMAT "RGB"``, ``MODEL.PIXEL_MEAN [123.675, 116.280,
103.530]``, ``MODEL.PIXEL_STD [58.395, 57.120, 57.375]``, ``MODEL.RESNETS.STRIDE_IN_1X1 False``
(torchvision strides in the 3x3 conv) and usually ``MODEL.RESNETS.NORM "SyncBN"``. For
ResNet-18 set ``MODEL.RESNETS.DEPTH 18`` and ``RES2_OUT_CHANNELS 64``. Backbones with
``model.cifar_stem`` or a width other than 64 have no matching Detectron2 stem / default
channel counts (a warning says so). Detectron2 itself is not a dependency of mixfast: the
mapping is checked against Detectron2's ResNet naming in the tests, not by loading it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys

import mixfast  # noqa: F401
import numpy as np
import torch

from mixfast.eval import common

_LAYER = re.compile(r"^layer([1-4])\.")
_BN = re.compile(r"\bbn([1-3])\b")


def detectron2_key(key: str) -> str | None:
    """Detectron2 name of one torchvision ResNet key; None for keys Detectron2 has no use for."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    match = _LAYER.match(key)
    if match:
        key = f"res{int(match.group(1)) + 1}." + key[match.end():]
    elif key.startswith(("conv1.", "bn1.")):
        key = "stem." + key
    else:
        raise KeyError(f"{key!r} is not a torchvision ResNet key (conv1, bn1, layer1..4, fc)")
    key = _BN.sub(lambda m: f"conv{m.group(1)}.norm", key)
    key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return key


def convert(state_dict: dict) -> dict:
    """``{detectron2 name: numpy array}``; raises on unknown keys and on two keys mapping to one name."""
    model = {}
    for key, value in state_dict.items():
        new = detectron2_key(key)
        if new is None:
            continue
        if new in model:
            raise KeyError(f"two keys map to {new!r}")
        model[new] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return model


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m mixfast.eval.export_detectron2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory, DeepSpeed checkpoint or exported backbone .pth")
    parser.add_argument("output", help="Detectron2 weights file to write (.pkl)")
    args = parser.parse_args(argv)
    try:
        source = common.resolve_source(args.source)
    except common.SourceError as err:
        raise SystemExit(f"mixfast: {err}") from None
    if common.VIT_KEY in source.state_dict:
        raise SystemExit(f"mixfast: {source.weights}: a ViT backbone ('{common.VIT_KEY}'); this command writes "
                         f"Detectron2's ResNet names only (a ViT's timm-format weights are the run's "
                         f"{common.EXPORT_NAME} as they are)")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise SystemExit(f"mixfast: output directory {out_dir} does not exist")
    try:
        model = convert(source.state_dict)
    except KeyError as err:
        raise SystemExit(f"mixfast: {source.weights}: {err.args[0]}") from None
    stem = model["stem.conv1.weight"]
    if stem.shape[0] != 64 or stem.shape[-1] != 7:
        print(f"[mixfast] warning: stem conv is {tuple(stem.shape)}, not Detectron2's 64x3x7x7 (model.width != 64 or "
              f"model.cifar_stem): set MODEL.RESNETS.STEM_OUT_CHANNELS / RES2_OUT_CHANNELS to match, and a 3x3 "
              f"stride-1 stem has no Detectron2 counterpart", file=sys.stderr)
    with open(args.output, "wb") as f:
        pickle.dump({"model": model, "__author__": "mixfast", "matching_heuristics": True}, f)
    print(f"[mixfast] wrote {args.output}: {len(model)} tensors from {source.weights} (Detectron2 format; set "
          f"INPUT.FORMAT RGB, PIXEL_MEAN [123.675, 116.280, 103.530], PIXEL_STD [58.395, 57.120, 57.375], "
          f"RESNETS.STRIDE_IN_1X1 False)", flush=True)
    return args.output


if __name__ == "__main__":
    main(sys.argv[1:])

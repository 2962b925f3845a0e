"""Every config in configs/ trains, checkpoints and resumes: each must run on the CPU with
`--set data.name=synthetic --set train.max_steps=3`, stop with a checkpoint, and resume from it.

Each config runs as shipped except for sizes: synthetic data, width-4 backbones, small
heads and batch, so that the 40-odd configs fit the CI budget. Their code paths (method,
head kind, optimizer, mixing variant, augmentation recipe, precision) are the shipped
ones. Steps 1-2 run, the run stops with a checkpoint, and the same command with
max_steps=3 must resume at step 2 and run exactly one more step.

Runs go through `mixfast.train.main` in this process (a subprocess per run would spend
most of the budget importing torch and DeepSpeed); the environment variables that the
single-process set-up writes are restored afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mixfast.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))

SHRINK = [
    "data.name=synthetic", "data.synthetic_size=32", "data.image_size=32", "data.num_workers=0",
    "model.width=4", "model.head_hidden_dim=32", "model.feature_dim=16", "model.predictor_hidden_dim=8",
    "method.queue_size=64", "masker.width=8", "train.batch_size=16", "log.every_steps=1", "log.progress=false",
    "log.tensorboard=false", "eval.knn_at_start=false", "eval.knn_every=0",
]


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# The ViT-B/L configs train their ViT as the 32-px demo size (patch 4, 4 blocks): the shrink of a
# ResNet's width, for a transformer (depth and width), with the method's code path unchanged.
SHRINK_VIT = ["model.arch=vit_tiny"]


def _train(config: Path, out: Path, max_steps: int) -> dict:
    from mixfast import train

    argv = ["--config", str(config)]
    vit = json.loads(config.read_text())["model"]["arch"].startswith("vit")
    for item in [*SHRINK, *(SHRINK_VIT if vit else []), f"train.max_steps={max_steps}", f"train.output_dir={out}"]:
        argv += ["--set", item]
    return train.main(argv)


def _logged_steps(out: Path) -> list[int]:
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            steps.append(record["step"])
    return steps


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_checkpoints_and_resumes(config, tmp_path):
    shipped = load_config(config, ["data.name=synthetic"])
    out = tmp_path / "run"
    first = _train(config, out, max_steps=2)
    assert first["step"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000000002"
    second = _train(config, out, max_steps=3)
    assert second["step"] == 3
    # Resumed at step 2: steps 1-2 logged once by the first run, step 3 by the second.
    assert _logged_steps(out) == [1, 2, 3]
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["method"]["name"] == shipped.method.name
    assert resolved["optim"]["name"] == shipped.optim.name
    assert resolved["mixing"]["mixmask"]["enabled"] == shipped.mixing.mixmask.enabled
    assert resolved["mixing"]["unmix"]["enabled"] == shipped.mixing.unmix.enabled

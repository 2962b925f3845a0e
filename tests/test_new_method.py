"""A method added from outside the package trains, logs, draws its grid, checkpoints and resumes with no edit to
the trainer, the engine or the config schema: the extension path the README's "Extending mixfast" describes.

The toy method (a BYOL-like predictor against an EMA target, with a config rule of its own, state carried to the
next step and its own image-grid rows) is defined in a fresh process, registered with `@register`, and run
through `mixfast.train.main` with `method.name=toy`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TOY = textwrap.dedent('''
    import sys
    import torch
    from mixfast.config import ConfigError
    from mixfast.methods.base import Method, StepResult, frozen_copy, register
    from mixfast.methods.encoders import build_predictor_encoder, finalize
    from mixfast.methods.losses import negative_cosine


    class Toy(Method):
        def __init__(self, online, cfg, rank=0, world_size=1):
            super().__init__(cfg, rank, world_size)
            self.target = frozen_copy(online.backbone)
            self.steps_seen = 0

        def momentum_pairs(self, online):
            return [(self.target, online.backbone)]

        def training_step(self, engine, x1, x2, step, backward, sequential=False):
            self.momentum_update(engine.module, step)
            (z1, p1), (z2, p2) = engine(x1, x2)
            loss = negative_cosine(p1, z2).mean() + negative_cosine(p2, z1).mean()
            backward(loss, True)
            self.pending = loss.detach()
            return StepResult(loss.detach(), {"loss_toy": loss.detach()},
                              {"first": x1, "second": x2, "difference": lambda: (x1 - x2).abs()})

        def after_step(self, result):
            self.steps_seen += 1
            self.pending = None


    def check(cfg):
        if cfg.mixing.mixmask.enabled:
            raise ConfigError("method.name='toy' takes no MixMask branch: set mixing.mixmask.enabled=false")


    @register("toy", check=check)
    def build(cfg, rank, world_size):
        online = finalize(build_predictor_encoder(cfg), cfg)
        return online, Toy(online, cfg, rank, world_size)


    from mixfast import train
    train.main(sys.argv[1:])
''')

OVERRIDES = ["method.name=toy", "mixing.mixmask.enabled=false", "mixing.unmix.enabled=false", "model.head=simsiam",
             "data.name=synthetic", "data.synthetic_size=32", "data.image_size=32", "data.num_workers=0",
             "model.width=4", "train.batch_size=16", "log.every_steps=1", "log.progress=false",
             "log.tensorboard=false", "eval.knn_at_start=false", "eval.knn_every=0", "eval.knn_k=5"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = ["--config", str(REPO / "configs/demo_simsiam.json"), "--set", f"train.output_dir={out}"]
    for item in [*OVERRIDES, *extra]:
        argv += ["--set", item]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", TOY, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_a_method_defined_outside_the_package_trains_and_resumes(tmp_path):
    out = tmp_path / "toy"
    first = _run(out, "train.max_steps=2")
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    second = _run(out, "train.max_steps=3")
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss_toy" in r]
    assert steps == [1, 2, 3]  # its own statistic logged, resumed at step 2
    assert (out / "mix_grid.png").stat().st_size > 0  # its labelled rows drawn, a callable row included
    refused = _run(tmp_path / "refused", "mixing.mixmask.enabled=true")
    assert refused.returncode != 0 and "takes no MixMask branch" in refused.stderr
    assert "Traceback" not in refused.stderr

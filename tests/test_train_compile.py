"""train.compile: the encoders are compiled in place under DeepSpeed and train as the eager ones do.

One MoCo v2 + MixMask + Un-Mix step of a tiny model from the same initial weights and batch, three ways: eager
float32, `train.compile=true` float32, and eager float64 (the reference). Inductor reorders sums, so the compiled
gradients are not bitwise the eager ones; what must hold is that they are as close to the float64 gradients as the
eager float32 ones are. (Both are only ~1% close in the first conv: SplitBatchNorm over groups of 8 images with 2x2
pixels in the last stage is badly conditioned, so the comparison has to be against float64, not eager vs compiled.)
The compiled trainer also keeps the parameter names (checkpoints, backbone export).

Slow: the first compiled step compiles (about 1-3 minutes on a 2-core CPU, seconds with inductor's cache warm).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow

OVERRIDES = [
    "data.name=synthetic", "data.synthetic_size=16", "data.image_size=64", "data.num_workers=0",
    "model.arch=resnet18", "model.width=8", "model.bn_splits=2", "method.queue_size=256", "train.batch_size=16",
    "train.precision=fp32", "train.resume=none", "log.tensorboard=false", "log.image_grid=false",
    "log.progress=false",
]


@pytest.fixture(autouse=True)
def restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _trainer(tmp_path, compile_: bool):
    from mixfast.config import load_config
    from mixfast.engine import distributed as dist_utils
    from mixfast.train import Trainer

    device = dist_utils.init_distributed()
    out = tmp_path / ("compiled" if compile_ else "eager")
    cfg = load_config("configs/in1k_mixmask_unmix.json",
                      [*OVERRIDES, f"train.output_dir={out}", f"train.compile={str(compile_).lower()}"])
    return Trainer(cfg, device)


def _forward_backward(trainer, x1, x2):
    trainer.engine.optimizer.zero_grad()
    return trainer.method.training_step(trainer.engine, x1, x2, 0, trainer._backward, trainer._sequential_backward())


class _PlainEngine:
    """What MoCo's step needs of the engine, without DeepSpeed (whose gradient reduction refuses float64)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *views):
        return self.module(*views)


def _float64_forward_backward(trainer, x1, x2):
    trainer.engine.module.double()
    trainer.method.double()
    return trainer.method.training_step(_PlainEngine(trainer.engine.module), x1.double(), x2.double(), 0,
                                        lambda loss, is_last: loss.backward(), trainer._sequential_backward())


def test_compiled_encoders_train_like_eager_under_deepspeed(tmp_path):
    eager, compiled, exact = _trainer(tmp_path, False), _trainer(tmp_path, True), _trainer(tmp_path, False)
    parts = ["backbone", "head", "key_encoder.backbone", "key_encoder.head"]
    assert [n for n, m in [*compiled.engine.module.named_modules(), *compiled.method.named_modules()]
            if getattr(m, "_compiled_call_impl", None) is not None] == parts
    assert list(compiled.engine.module.state_dict()) == list(eager.engine.module.state_dict())

    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 16, 3, 64, 64, generator=gen)
    want = _float64_forward_backward(exact, x1, x2)
    got_eager, got = _forward_backward(eager, x1, x2), _forward_backward(compiled, x1, x2)
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5)
    assert float(got_eager.loss) == pytest.approx(float(want.loss), rel=1e-5)
    params = zip(exact.engine.module.named_parameters(), eager.engine.module.named_parameters(),
                 compiled.engine.module.named_parameters())
    for (name, ref), (_, e), (_, c) in params:
        assert e.grad is not None and c.grad is not None, name
        err_eager = float((e.grad.double() - ref.grad).norm() / ref.grad.norm().clamp_min(1e-30))
        err_compiled = float((c.grad.double() - ref.grad).norm() / ref.grad.norm().clamp_min(1e-30))
        assert err_compiled <= 3 * err_eager + 1e-4, (
            f"{name}: compiled gradient is {err_compiled:.2e} from float64, eager {err_eager:.2e}")

"""model.channels_last end to end under DeepSpeed ZeRO 0, 1 and 2 (CPU, tiny demo recipe).

For each stage, one subprocess (this file run as a script, so DeepSpeed's process group
stays out of the pytest process) trains in-process, in fresh Trainers:

* NCHW, N steps (the reference losses);
* channels_last, N steps, with forward hooks on every convolution and BatchNorm of the
  trained backbone and of MoCo's key encoder, recording whether their outputs are
  channels_last, and the parameters before and after;
* channels_last again, resumed from the first run's step-K checkpoint (copied into a fresh
  output directory, as a run killed after step K would find it), to step N;
* the same NCHW / channels_last pair at train.precision=bf16.

and writes what it saw to a JSON report that the tests below read.

Why parameters matter: ZeRO 1/2 point every `p.data` into a flat buffer that the optimizer
updates (at `deepspeed.initialize`, and again after every optimizer step in DeepSpeed 0.19),
and reduce gradients as `grad.view(-1)`. Converting the trained module to channels_last
after `initialize` replaces `p.data`: the 3x3 weights' channels_last gradients then fail that
view; a DeepSpeed that did not re-point after each step would train a buffer the module no
longer reads. So the tests require every trained parameter to change, the losses to follow
the NCHW run, the parameters to stay contiguous and, where DeepSpeed exposes the buffers
(ZeRO 1/2), to live in them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import TINY, _env, losses_by_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS, RESUME_AT = 6, 3
STAGES = (0, 1, 2)
# Measured on CPU: fp32 losses of the two layouts agree to ~1e-6 relative over the six steps
# (oneDNN runs other convolution kernels for NHWC, summing in another order); bf16 autocast
# rounds every convolution output to 8 bits, and the layouts then part by up to ~6e-4.
LOSS_RTOL = {"fp32": 2e-5, "bf16": 5e-3}

pytestmark = pytest.mark.slow


# --- the subprocess ---------------------------------------------------------------------------

def _overrides(out: Path, stage: int, channels_last: bool, precision: str, resume: str = "none") -> list[str]:
    # 64 px, not TINY's 32: at 32 px layer4 is 1x1, a SplitBatchNorm group there normalizes 4 values
    # per channel, and the run is so sensitive that moving an NCHW run's weights by 1e-6 (relative)
    # moves its step-2 loss by ~1e-3, as far as the channels_last run lies. At 64 px (16 values)
    # the two layouts agree to ~1e-6.
    return [*TINY, "data.image_size=64", f"train.max_steps={STEPS}", f"train.checkpoint_every_steps={RESUME_AT}",
            "train.keep_checkpoints=10",
            f"deepspeed.zero_optimization.stage={stage}", f"model.channels_last={str(channels_last).lower()}",
            f"train.precision={precision}", f"train.resume={resume}", "log.image_grid=false",
            f"train.output_dir={out}"]


def _is_channels_last(t) -> bool:
    import torch

    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _layout_hooks(prefix: str, backbone, seen: dict) -> list:
    """Hooks on every Conv2d / BatchNorm2d: seen[name] = all outputs channels_last (outputs
    with h = w = 1 are both layouts at once and say nothing)."""
    import torch

    handles = []
    for name, module in backbone.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            def hook(_module, _inputs, output, key=f"{prefix}.{name}"):
                if output.shape[-1] * output.shape[-2] > 1:
                    seen[key] = seen.get(key, True) and _is_channels_last(output)
            handles.append(module.register_forward_hook(hook))
    return handles


def _outside_flat_buffers(engine) -> list[str] | None:
    """ZeRO 1/2: names of trained parameters whose storage is not inside DeepSpeed's flat
    buffers (None where the optimizer keeps no such buffers, i.e. stage 0)."""
    flats = getattr(engine.optimizer, "bit16_groups_flat", None)
    if flats is None:
        return None
    spans = [(f.data_ptr(), f.data_ptr() + f.numel() * f.element_size()) for f in flats]
    return [name for name, p in engine.module.named_parameters()
            if not any(lo <= p.data_ptr() < hi for lo, hi in spans)]


def _train(overrides: list[str], device, record: bool = False) -> dict:
    import torch

    from mixfast.config import load_config
    from mixfast.train import Trainer

    cfg = load_config(str(REPO / "configs" / "demo.json"), overrides)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    trainer = Trainer(cfg, device)
    module = trainer.engine.module
    report: dict = {}
    if record:
        seen: dict = {}
        handles = _layout_hooks("query", module.backbone, seen) + _layout_hooks(
            "key", trainer.method.key_encoder.backbone, seen)
        before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer.fit()
    trainer.logger.close()
    if record:
        for h in handles:
            h.remove()
        key_convs = [m.weight for m in trainer.method.key_encoder.backbone.modules()
                     if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        report.update(
            activations=seen,
            unchanged=[name for name, p in module.named_parameters() if torch.equal(p.detach(), before[name])],
            n_params=len(before),
            non_contiguous_params=[name for name, p in module.named_parameters() if not p.is_contiguous()],
            key_weights_channels_last=bool(key_convs) and all(_is_channels_last(w) for w in key_convs),
            outside_flat_buffers=_outside_flat_buffers(trainer.engine),
        )
    report["losses"] = losses_by_step(Path(cfg.train.output_dir))
    return report


def _probe(stage: int, root: Path) -> dict:
    from mixfast.engine.checkpoint import checkpoint_dir
    from mixfast.engine.distributed import init_distributed

    import torch

    device = init_distributed()
    # Compare layouts at float32 (cuDNN would otherwise run fp32 convolutions in TF32).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[f"nchw_{precision}"] = _train(_overrides(root / f"nchw_{precision}", stage, False, precision), device)
        runs[f"cl_{precision}"] = _train(_overrides(root / f"cl_{precision}", stage, True, precision), device,
                                       record=True)
    tag = f"step{RESUME_AT:09d}"
    shutil.copytree(os.path.join(checkpoint_dir(str(root / "cl_fp32")), tag),
                    os.path.join(checkpoint_dir(str(root / "resumed")), tag))
    runs["resumed"] = _train(_overrides(root / "resumed", stage, True, "fp32", resume=tag), device)
    return runs


# --- the tests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=STAGES, ids=lambda s: f"zero{s}")
def runs(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(f"zero{request.param}")
    proc = subprocess.run([sys.executable, __file__, str(request.param), str(root)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads((root / "report.json").read_text())
    return {name: {**run, "losses": {int(k): v for k, v in run["losses"].items()}} for name, run in report.items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_trains_like_nchw(runs, precision):
    cl, nchw = runs[f"cl_{precision}"], runs[f"nchw_{precision}"]
    assert sorted(cl["losses"]) == sorted(nchw["losses"]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert cl["losses"][step] == pytest.approx(nchw["losses"][step], rel=LOSS_RTOL[precision]), f"step {step}"
    # Every trained parameter moved (SGD with weight decay moves all of them), so none was
    # cut off from the optimizer; they stay in the layout DeepSpeed flattens.
    assert cl["n_params"] > 0 and not cl["unchanged"], f"parameters that did not train: {cl['unchanged'][:5]}"
    assert not cl["non_contiguous_params"]
    if cl["outside_flat_buffers"] is not None:  # ZeRO 1/2
        assert not cl["outside_flat_buffers"], f"not in DeepSpeed's buffers: {cl['outside_flat_buffers'][:5]}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_are_channels_last_inside_the_backbone(runs, precision):
    seen = runs[f"cl_{precision}"]["activations"]
    query = [k for k in seen if k.startswith("query.")]
    key = [k for k in seen if k.startswith("key.")]
    # The demo ResNet-18 at 64 px: every convolution and BN down to layer4 (2x2): 40 per encoder.
    assert len(query) >= 30 and len(key) == len(query), sorted(seen)
    assert all(seen.values()), f"NCHW outputs: {sorted(k for k, v in seen.items() if not v)}"
    assert runs[f"cl_{precision}"]["key_weights_channels_last"]


def test_resume_from_a_checkpoint_logs_the_same_losses(runs):
    whole, resumed = runs["cl_fp32"]["losses"], runs["resumed"]["losses"]
    assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), f"step {step}"


if __name__ == "__main__":
    stage_arg, root_arg = int(sys.argv[1]), Path(sys.argv[2])
    report_data = _probe(stage_arg, root_arg)
    (root_arg / "report.json").write_text(json.dumps(report_data))

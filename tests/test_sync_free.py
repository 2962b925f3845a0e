"""No host sync in the ops as the trainer calls them, nor in a training step.

A value read back from a GPU (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, `nonzero`, ...)
makes the host wait until the GPU is idle. The same calls are visible on CPU tensors through
`mixfast.engine.syncs.SyncCounter` (a TorchDispatchMode plus wrappers of the Tensor methods
that dispatch nothing on the CPU), so these CPU tests pin down that a step issues none, except
the one deliberate read for the logs (`Trainer.read_metrics`, every `log.every_steps` steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixfast import ops
from mixfast.engine.syncs import SyncCounter
from mixfast.ops import reference as ref

REPO = Path(__file__).resolve().parents[1]

# Reads of tensors that live on the host on every machine, so never a device sync.
HOST_RESIDENT = {
    # torch's non-capturable optimizers (Adam here) keep each parameter's step counter as a CPU
    # tensor, also when the parameters are on a GPU, and read it to compute the bias correction
    "optim/optimizer.py": "optimizer step counters live on the CPU",
    # the CutMix box is drawn from a CPU torch.Generator (a pure function of seed and step): its centre (two ints)
    " rand_bbox <- mixing/unmix.py": "CutMix centre from a CPU generator",
}


def test_the_counter_sees_every_kind_of_read():
    """The counter must not miss what it is meant to find (else the tests below prove nothing)."""
    t = torch.arange(4.0)
    reads = [lambda: t[1].item(), lambda: int(t[1]), lambda: bool(t[1]), lambda: t.tolist(), lambda: t.cpu(),
             lambda: t.numpy(), lambda: torch.nonzero(t), lambda: torch.equal(t, t), lambda: t[t > 1],
             lambda: torch.unique(t), lambda: torch._assert_async(t[1] > 0)]
    for read in reads:
        with SyncCounter() as syncs:
            read()
        assert syncs.total >= 1, f"not counted: {read}"
    with SyncCounter() as syncs:
        (t * 2).sum().exp_()
        torch.randperm(4, generator=torch.Generator().manual_seed(0))
    assert syncs.total == 0, syncs.report()
    assert torch.Tensor.tolist is not None and "counted" not in torch.Tensor.tolist.__name__  # methods restored


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    perm = torch.randperm(6, generator=g)
    masks = ops.make_masks(6, 4, 0.5, seed=seed, step=3, device=x.device)
    return x, perm, masks


def test_mix_ops_as_the_mixers_call_them_make_no_host_sync():
    x, perm, masks = _inputs(seed=int(torch.randint(0, 1000, (1,))))
    with SyncCounter() as syncs:
        ops.make_masks(6, 4, 0.5, seed=1, step=2, device=x.device)
        ops.make_masks_and_mix(x, None, grid=4, ratio=0.5, seed=1, step=2, want_switch=True, validate=False)
        ops.make_masks_and_mix(x, perm, grid=4, ratio=0.5, per_sample=True, seed=1, step=2, validate=False)
        ops.mix(x, masks, perm, True, validate=False)
        ops.mix(x, masks, None, filler=torch.zeros_like(x), validate=False)
        ops.unmix(x, 0.3, True)
        ops.unmix(x, 0.3, False, box=(2, 9, 1, 12))
        ops.mix_and_unmix(x, masks, perm, 0.3, False, box=(2, 9, 1, 12), validate=False)
    assert syncs.total == 0, syncs.report()
    # A permutation given by a user is checked, which reads it: the counter sees that.
    with SyncCounter() as syncs:
        ops.mix(x, masks, perm)
    assert syncs.total >= 1


@pytest.mark.parametrize("mode", ["moco", "in_batch"])
def test_soft_infonce_forward_and_backward_as_the_methods_call_it_make_no_host_sync(mode):
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, (1,))))
    q = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1).requires_grad_()
    keys = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1).requires_grad_()
    queue = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1) if mode == "moco" else None
    pos = torch.randint(0, 4, (12, 2), generator=g)
    # in-batch mode: each row excludes key 4, key 5 or nothing (-1), never one of its positives
    draw = torch.randint(3, 6, (12,), generator=g)
    exclude = None if mode == "moco" else torch.where(draw == 3, -1, draw)
    with SyncCounter() as syncs:
        out = ops.soft_infonce(q, keys, queue, pos, 0.2, exclude, validate=False)
        out.sum().backward()
    assert syncs.total == 0, syncs.report()
    torch.testing.assert_close(out, ref.soft_infonce(q, keys, queue, pos, 0.2, exclude), rtol=1e-5, atol=1e-5)
    with SyncCounter() as syncs:  # the default checks the index ranges, which reads them
        ops.soft_infonce(q.detach(), keys.detach(), queue, pos, 0.2, exclude)
    assert syncs.total >= 1


def _step_syncs(config: str, *overrides: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "tests/step_syncs.py"), str(REPO / "configs" / config),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SYNCS ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(line[len("SYNCS "):])


@pytest.mark.slow
@pytest.mark.parametrize("config,overrides", [
    ("demo.json", ()),                                              # MoCo v2 + MixMask + Un-Mix, per-branch backward
    ("demo.json", ("train.sequential_backward=false", "train.precision=bf16", "model.channels_last=true")),
    ("demo.json", ("mixing.unmix.enabled=false", "mixing.mixmask.per_sample=true")),  # MixMask alone (flip pairs)
    ("demo_simclr.json", ()),
    ("demo_byol.json", ()),
    ("demo_simsiam.json", ()),
    ("demo_mixsiam.json", ()),
    ("demo_adios.json", ()),                                        # encoder step + masker step (after_step)
    ("demo_sequential.json", ("train.precision=bf16", "model.channels_last=true")),
    ("demo_adios.json", ("method.name=moco_adios", "model.head=mlp", "method.queue_size=64", "masker.kind=adios_s",
                         "model.bn_splits=4")),
    ("demo_mae.json", ("train.precision=bf16",)),
    ("demo_mixedae.json", ("train.precision=bf16",)),               # group mixing, TopK attention + accuracy
], ids=["moco-mixmask-unmix", "moco-fused-bf16-channels-last", "moco-mixmask", "simclr", "byol", "simsiam", "mixsiam",
        "simclr-adios", "simclr-sequential-bf16-channels-last", "moco-adios-s", "mae-bf16", "mixedae-bf16"])
def test_a_training_step_makes_no_host_sync_and_the_log_read_makes_one(config, overrides):
    got = _step_syncs(config, *overrides)
    unexpected = {place: n for place, n in got["step_places"].items() if not any(k in place for k in HOST_RESIDENT)}
    assert unexpected == {}, json.dumps(unexpected, indent=1)
    assert got["read"] == {"Tensor.tolist": 1}, got["read"]  # every logged value in one read
    assert "loss" in got["metric_names"] and got["loss"] == got["loss"]  # a real, finite number came back


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_the_trainer_ops_capture_into_a_cuda_graph(backend, monkeypatch):
    """Sync-free and allocation-safe enough to be captured: the mix op and soft_infonce's forward and backward,
    as the trainer calls them, recorded once in a CUDA graph and replayed, equal the eager results."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("MIXFAST_BACKEND", backend)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g).to(dev, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    perm = torch.randperm(8, generator=g).to(dev)
    q = torch.nn.functional.normalize(torch.randn(24, 128, generator=g), dim=1).to(dev, torch.bfloat16)
    q.requires_grad_()
    keys = torch.nn.functional.normalize(torch.randn(8, 128, generator=g), dim=1).to(dev, torch.bfloat16)
    queue = torch.nn.functional.normalize(torch.randn(4096, 128, generator=g), dim=1).to(dev, torch.bfloat16)
    pos = torch.stack([torch.arange(24) % 8, torch.randint(0, 8, (24,), generator=g)], 1).to(dev)

    def step():
        mixed, switch, lam, _ = ops.make_masks_and_mix(x, perm, grid=8, ratio=0.5, seed=0, step=3, want_switch=True,
                                                       validate=False)
        out = ops.soft_infonce(q, keys, queue, pos, 0.2, validate=False)
        out.sum().backward()
        return mixed, switch, lam, out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (kernel compiles, allocator pools)
        for _ in range(3):
            q.grad = None
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    eager_grad = q.grad.clone()
    q.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(q.grad, eager_grad, rtol=0, atol=0)

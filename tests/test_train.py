"""End-to-end trainer runs, as users run them: `python -m mixfast.train` and the DeepSpeed
launcher, in subprocesses on CPU with small synthetic or generated data."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A tiny MoCo v2 + MixMask + Un-Mix run on the demo config's recipe.
TINY = [
    "data.name=synthetic", "data.synthetic_size=256", "data.image_size=32", "data.num_workers=0",
    "model.width=8", "train.batch_size=16", "method.queue_size=64", "log.every_steps=1",
    "log.tensorboard=false", "log.progress=false", "eval.knn_at_start=false", "eval.knn_every=0",
]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: no oversubscription
    return env


def _args(config: str, out: Path, overrides: list[str]) -> list[str]:
    args = ["--config", str(REPO / "configs" / config)]
    for item in [*overrides, f"train.output_dir={out}"]:
        args += ["--set", item]
    return args


def run_module(config: str, out: Path, overrides: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mixfast.train", *_args(config, out, overrides)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_launcher(config: str, out: Path, overrides: list[str], ranks: int) -> subprocess.CompletedProcess:
    return launch(REPO / "mixfast" / "train.py", _args(config, out, overrides), ranks)


def launch(script: Path, args: list[str], ranks: int) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus ranks script args` on a free port; fails with the output's tail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
           str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    # DeepSpeed's CPU all-reduce leaves a 66 MB /dev/shm file per rank unless init_distributed unlinks it
    leaked = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared-memory buffers left behind: {leaked}"
    return proc


def metrics_by_step(out: Path, key: str) -> dict[int, float]:
    """Last logged value of `key` at every step (a resumed run appends to the same file)."""
    values = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    return values


def losses_by_step(out: Path) -> dict[int, float]:
    return metrics_by_step(out, "train/loss")


@pytest.mark.parametrize("config,epochs", [("demo.json", 3), ("demo_adios.json", 2)])
def test_kill_then_restart_resumes_with_the_uninterrupted_losses(tmp_path, config, epochs):
    """SIGKILL after the first checkpoint, restart: every logged loss equals the uninterrupted run's.
    demo_adios: the masker's weights, SGD state and schedule come back too (its objective and lr are
    compared as well)."""
    overrides = [*TINY, f"train.epochs={epochs}", "train.checkpoint_every_steps=5"]  # 16 steps/epoch
    total = 16 * epochs
    keys = ["train/loss"] + (["train/masker_objective", "train/masker_lr"] if "adios" in config else [])
    run_module(config, tmp_path / "a", overrides)
    reference = {key: metrics_by_step(tmp_path / "a", key) for key in keys}
    assert sorted(reference["train/loss"]) == list(range(1, total + 1))

    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "mixfast.train", *_args(config, out, overrides)]
    victim = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)  # no clean-up, no final checkpoint
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    before = losses_by_step(out)
    assert max(before) < total

    resumed = run_module(config, out, overrides)  # the same command again
    assert "resuming at step" in resumed.stdout
    for key in keys:
        after = metrics_by_step(out, key)
        assert sorted(after) == list(range(1, total + 1)), key
        for step in range(1, total + 1):
            assert after[step] == pytest.approx(reference[key][step], rel=1e-5, abs=1e-6), f"{key} at step {step}"


def test_deepspeed_launcher_two_ranks_mixmask_unmix(tmp_path):
    out = tmp_path / "ds"
    proc = run_launcher("demo.json", out, [*TINY, "train.max_steps=3", "model.shuffle_bn=true"], ranks=2)
    assert "2 rank(s)" in proc.stdout
    assert "kNN top-1: trained" in proc.stdout
    losses = losses_by_step(out)
    assert sorted(losses) == [1, 2, 3] and all(v == v and v > 0 for v in losses.values())
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["train/lam_mixmask"] < 1 and 0 <= record["train/lam_unmix"] <= 1
    assert (out / "checkpoints" / "latest").exists()
    assert (out / "mix_grid.png").exists()


def test_deepspeed_launcher_two_ranks_simclr_gathers_across_ranks(tmp_path):
    """SimCLR's differentiable all-gather under the real launcher (the math of the gathered
    loss is checked against the single-process loss in test_simclr_ranks.py)."""
    out = tmp_path / "simclr"
    tiny = [o for o in TINY if not o.startswith("method.queue_size")]
    proc = run_launcher("demo_simclr.json", out, [*tiny, "train.max_steps=3"], ranks=2)
    assert "2 rank(s)" in proc.stdout
    losses = losses_by_step(out)
    assert sorted(losses) == [1, 2, 3] and all(v == v and v > 0 for v in losses.values())
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["train/lam_mixmask"] < 1
    assert (out / "checkpoints" / "latest").exists()


def test_an_empty_latest_file_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """DeepSpeed opens `latest` before writing the tag into it: a run killed at that instant leaves it
    empty (seen in CI as a crash of the resumed run). The restart takes the newest complete step."""
    out = tmp_path / "run"
    overrides = [*TINY, "train.checkpoint_every_steps=2"]
    run_module("demo.json", out, [*overrides, "train.max_steps=4"])
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step000000002", "step000000004"]
    (ckpts / "latest").write_text("")
    resumed = run_module("demo.json", out, [*overrides, "train.max_steps=5"])
    assert "resuming at step 4" in resumed.stdout
    assert "not a complete checkpoint" in resumed.stderr and "step000000004" in resumed.stderr
    assert sorted(losses_by_step(out)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("config,overrides", [
    ("demo_adios.json", []),                          # SimCLR + ADIOS
    ("demo_sequential.json", []),                     # SimCLR + sequential
    ("stl10_byol_adios.json", []),                    # BYOL + ADIOS
    ("in100s_simsiam_adios.json", []),                # SimSiam + ADIOS, both views masked
    ("in100_simclr_adios_s.json", []),                # ADIOS-s
    ("demo_adios.json", ["method.name=moco_adios", "model.head=mlp"]),  # MoCo: shuffle-BN across ranks
], ids=["simclr-adios", "simclr-sequential", "byol-adios", "simsiam-adios", "simclr-adios-s", "moco-adios"])
def test_deepspeed_launcher_two_ranks_adversarial_masker_stays_identical(tmp_path, config, overrides):
    """ADIOS under the launcher with 2 ranks: each rank's masker sees its own half of the batch, its
    gradients are averaged over ranks, so after every step the maskers are the same on both ranks
    (tests/adios_ranks.py prints a digest of each rank's masker weights after each step)."""
    proc = launch(REPO / "tests" / "adios_ranks.py", [str(REPO / "configs" / config), str(tmp_path / "run"), *overrides],
                  ranks=2)
    digests: dict[int, dict[int, str]] = {}
    for rank, step, digest in re.findall(r"MASKER (\d+) (\d+) ([0-9a-f]{16})", proc.stdout):
        digests.setdefault(int(step), {})[int(rank)] = digest
    assert sorted(digests) == [0, 1, 2, 3], proc.stdout[-3000:]
    for step, by_rank in digests.items():
        assert sorted(by_rank) == [0, 1] and by_rank[0] == by_rank[1], f"step {step}: {by_rank}"
    assert len({digests[s][0] for s in digests}) == 4  # the masker moved at every step


def test_deepspeed_launcher_two_ranks_mixedae(tmp_path):
    """MixedAE under the launcher with 2 ranks: each rank mixes its own groups (per-rank cell maps),
    DeepSpeed averages the gradients; the run checkpoints, logs its terms and exports a timm-keyed ViT."""
    out = tmp_path / "run"
    proc = run_launcher("demo_mixedae.json", out, [*TINY, "train.max_steps=3"], ranks=2)
    assert "kNN top-1: trained" in proc.stdout
    for key in ("train/loss_recon", "train/loss_homocon", "train/topk_accuracy"):
        assert sorted(metrics_by_step(out, key)) == [1, 2, 3], key
    state = torch.load(out / "backbone_torchvision.pth")
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= set(state)


def test_imagenet_config_path_under_launcher(tmp_path):
    """configs/in1k_mixmask.json as shipped (ResNet-50, MLP head, bf16 autocast, block grid 8),
    data swapped for synthetic and sizes shrunk so it runs in seconds on CPU."""
    import mixfast  # noqa: F401
    import torchvision

    out = tmp_path / "in1k"
    small = ["data.name=synthetic", "data.synthetic_size=16", "data.image_size=64", "data.num_workers=0",
             "train.batch_size=8", "method.queue_size=64", "train.max_steps=2", "log.progress=false"]
    proc = run_launcher("in1k_mixmask.json", out, small, ranks=1)
    assert "kNN top-1: trained" in proc.stdout
    state = torch.load(out / "backbone_torchvision.pth")
    missing, unexpected = torchvision.models.resnet50().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def _write_imagefolder(root: Path, per_class: int = 12) -> None:
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(24, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    good = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = tmp_path / "folder"
    _write_imagefolder(root)
    overrides = ["data.name=imagefolder", f"data.root={root}", "data.image_size=16", "data.num_workers=0",
                 "model.width=8", "train.batch_size=5", "method.queue_size=20", "train.epochs=1",
                 "log.tensorboard=false", "log.progress=false", "eval.knn_k=5"]
    proc = run_module("demo.json", tmp_path / "out", overrides)
    assert "skipped 1 unreadable images" in proc.stdout


def test_skipped_images_are_summed_over_ranks(tmp_path):
    """Each unreadable file is charged to one rank; the logged count and the summary line are the sum over ranks."""
    root = tmp_path / "folder"
    _write_imagefolder(root)
    good = (root / "train" / "b" / "0.jpg").read_bytes()
    (root / "train" / "b" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # a second one, for the other rank
    overrides = ["data.name=imagefolder", f"data.root={root}", "data.image_size=16", "data.num_workers=0",
                 "model.width=8", "train.batch_size=10", "method.queue_size=20", "train.epochs=1",
                 "log.tensorboard=false", "log.progress=false", "log.every_steps=1", "eval.knn_k=5"]
    proc = run_launcher("demo.json", tmp_path / "out", overrides, ranks=2)
    assert "skipped 2 unreadable images" in proc.stdout
    counts = [json.loads(line).get("train/skipped_images") for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [c for c in counts if c is not None][-1] == 2


def test_nonfinite_loss_stops_with_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run_module("demo.json", out, [*TINY, "optim.lr=1e30", "optim.warmup_epochs=0", "train.max_steps=10"],
                      check=False)
    assert proc.returncode != 0
    assert "loss is" in proc.stderr and "Lower optim.lr" in proc.stderr
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("nonfinite_step")]
    assert len(saved) == 1


def test_config_errors_name_the_key_and_the_path(tmp_path):
    proc = run_module("demo.json", tmp_path / "x", ["mixing.mixmask.gird=4"], check=False)
    assert proc.returncode != 0
    assert "mixing.mixmask.gird" in proc.stderr and "grid" in proc.stderr
    missing = tmp_path / "no-such-dir"
    proc = run_module("demo.json", tmp_path / "y", ["data.name=imagefolder", f"data.root={missing}"], check=False)
    assert proc.returncode != 0 and str(missing) in proc.stderr


def test_batch_larger_than_the_data_set_is_a_config_error(tmp_path):
    proc = run_module("demo.json", tmp_path / "z", [*TINY, "train.batch_size=4096"], check=False)
    assert proc.returncode != 0
    assert "train.batch_size=4096" in proc.stderr and "Traceback" not in proc.stderr


def test_one_rank_skips_deepspeeds_identity_allreduce_with_the_same_updates():
    # One rank, ZeRO 0: the trainer turns off DeepSpeed's backward all-reduce (flatten, reduce over
    # one rank, copy back). The parameters after a few steps must be bit-identical to those of a
    # trainer that keeps it, and ZeRO >= 1 (which reduces in its optimizer) must be left alone.
    from tiny_trainer import tiny_trainer

    sizes = ["data.synthetic_size=32", "train.batch_size=8", "model.width=4", "train.seed=3"]
    params = []
    for keep_allreduce in (False, True):
        trainer = tiny_trainer(REPO / "configs" / "demo.json", sizes)
        assert trainer.engine.enable_backward_allreduce is False
        trainer.engine.enable_backward_allreduce = keep_allreduce
        batch = next(iter(trainer.train_loader))
        for _ in range(3):
            trainer.train_step(batch)
        params.append({n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()})
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][n], params[1][n]) for n in params[0])
    assert any(not torch.equal(params[0][n], p0) for n, p0 in  # the steps did move the weights
               tiny_trainer(REPO / "configs" / "demo.json", sizes).engine.module.named_parameters())
    zero1 = tiny_trainer(REPO / "configs" / "demo.json", sizes, ["deepspeed.zero_optimization.stage=1"])
    assert zero1.engine.enable_backward_allreduce is True


@pytest.mark.parametrize("every,expected", [(1, [4, 8, 12]), (2, [8]), (0, [])])
def test_epoch_end_checkpoints_follow_checkpoint_every_epochs(every, expected):
    # 4 steps per epoch, 3 epochs, no step cadence within them: the saves fit() makes are the epoch ends
    # that train.checkpoint_every_epochs asks for (finish() then saves the end of the run in any case).
    from tiny_trainer import tiny_trainer

    trainer = tiny_trainer(REPO / "configs" / "demo.json",
                           ["data.synthetic_size=32", "train.batch_size=8", "model.width=4", "train.epochs=3"],
                           ["train.checkpoint_every_steps=1000", f"train.checkpoint_every_epochs={every}",
                            "eval.knn_every=0"])
    saved_at, save = [], trainer.save
    trainer.save = lambda *a, **k: (saved_at.append(trainer.state.step), save(*a, **k))[1]
    trainer.fit()
    assert trainer.state.step == 12 and saved_at == expected

"""DeepSpeed checkpoints plus mixfast's client state, auto-resume and pruning.

DeepSpeed saves the trained module, optimizer and LR scheduler; the client state adds what
it does not own but a resumed run needs: the method's state (`Method.state_dict()`: MoCo's
momentum encoder, queue and pointer; BYOL's target network), the training position
(epoch, global step, batches consumed in the epoch), RNG states and the kNN history.
DeepSpeed writes the `latest` file only after a checkpoint is complete, so a run killed
while saving resumes from the previous one. It opens `latest` before writing the tag into it,
so a kill at that instant leaves it empty: resuming then takes the newest complete step
checkpoint on disk (`resume_tag`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from mixfast.engine import distributed as dist_utils

CHECKPOINTS = "checkpoints"  # below train.output_dir
# The tags `save` writes (step000001234); pruning and eval's newest-tag choice read the step from them.
STEP_TAG = re.compile(r"^step(\d+)$")
# The file every complete (ZeRO 0-2, one model-parallel rank) DeepSpeed checkpoint tag holds.
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0                  # optimizer steps done
    batch_in_epoch: int = 0        # batches of `epoch` already consumed
    knn_random_init: Optional[float] = None
    knn_history: list = field(default_factory=list)  # [(epoch, top1)]
    skipped_images: int = 0


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, method, state: TrainState, output_dir: str, keep: int, tag: Optional[str] = None,
         save_latest: bool = True, loader=None) -> str:
    """Every rank must call this (DeepSpeed's rule). Returns the tag."""
    tag = tag or f"step{state.step:09d}"
    client_state = {
        "mixfast_train_state": asdict(state),
        "mixfast_method": {"name": method.cfg.method.name, "state": method.state_dict()},
        "mixfast_rng": _rng_state(),
    }
    if hasattr(loader, "state_dict"):  # the DALI loader: its pipelines' checkpoints (every rank's)
        client_state["mixfast_loader"] = loader.state_dict()
    engine.save_checkpoint(checkpoint_dir(output_dir), tag=tag, client_state=client_state, save_latest=save_latest)
    if dist_utils.is_main():
        _prune(checkpoint_dir(output_dir), keep)
    dist_utils.barrier()
    return tag


def _prune(ckpt_dir: str, keep: int) -> None:
    steps = sorted((int(m.group(1)), name) for name in os.listdir(ckpt_dir) if (m := STEP_TAG.match(name)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def latest_complete_tag(ckpt_dir: str) -> tuple[Optional[str], str]:
    """(the tag `latest` names if that checkpoint is complete, else None; what `latest` says, '' if
    it is empty or missing)."""
    path = os.path.join(ckpt_dir, "latest")
    named = ""
    if os.path.isfile(path):
        with open(path) as f:
            named = f.read().strip()
    complete = bool(named) and os.path.isfile(os.path.join(ckpt_dir, named, MODEL_STATES))
    return (named if complete else None), named


def resume_tag(ckpt_dir: str) -> Optional[str]:
    """The tag `latest` names when that checkpoint is complete, else (an empty or stale `latest`, from
    a run killed while writing it) the newest complete step checkpoint, with a warning; None if none."""
    tag, named = latest_complete_tag(ckpt_dir)
    if tag is not None:
        return tag
    steps = sorted((int(m.group(1)), name) for name in os.listdir(ckpt_dir)
                   if (m := STEP_TAG.match(name)) and os.path.isfile(os.path.join(ckpt_dir, name, MODEL_STATES)))
    if not steps:
        return None
    import warnings

    warnings.warn(f"{ckpt_dir}/latest names {named or 'nothing'!r}, which is not a complete checkpoint (a run "
                  f"killed while writing it); resuming from the newest complete one, {steps[-1][1]!r}")
    return steps[-1][1]


def resume(engine, method, output_dir: str, how: str, loader=None) -> Optional[TrainState]:
    """Load per `train.resume` ('auto' | 'none' | tag). Returns the state, or None for a fresh run."""
    if how == "none":
        return None
    ckpt_dir = checkpoint_dir(output_dir)
    if how == "auto":
        if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
            return None
        tag = resume_tag(ckpt_dir)
        if tag is None:
            raise RuntimeError(f"train.resume=auto: {ckpt_dir!r} has a 'latest' file but no complete checkpoint "
                               f"(no step*/{MODEL_STATES}); move the directory away to start afresh")
    else:
        tag = how
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise FileNotFoundError(f"train.resume: no checkpoint {os.path.join(ckpt_dir, tag)!r}")
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"train.resume: DeepSpeed could not load a checkpoint from {ckpt_dir!r}")
    saved = client["mixfast_method"]
    if saved["name"] != method.cfg.method.name:
        raise RuntimeError(f"train.resume: the checkpoint in {ckpt_dir!r} was written by method {saved['name']!r}, "
                           f"this run is method.name={method.cfg.method.name!r}; use another train.output_dir")
    method.load_state_dict(saved["state"])
    _set_rng_state(client["mixfast_rng"])
    if hasattr(loader, "load_state_dict") and "mixfast_loader" in client:
        loader.load_state_dict(client["mixfast_loader"])
    return TrainState(**client["mixfast_train_state"])

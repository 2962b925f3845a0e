"""Process-group set-up for both entry points and the few collectives MoCo needs.

`deepspeed mixfast/train.py` sets RANK/WORLD_SIZE/MASTER_* for every process; a plain
`python -m mixfast.train` has none, so we fill them for a world of one (otherwise
DeepSpeed falls back to MPI discovery, which needs mpi4py).
"""

from __future__ import annotations

import atexit
import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> torch.device:
    """Initialise torch.distributed through DeepSpeed; return this rank's device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed  # imported late: DS_ACCELERATOR must be set first

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(shutdown_distributed)
        _unlink_shm_allreduce_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


SHM_DIR = "/dev/shm"


def _unlink_shm_allreduce_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    On the CPU accelerator `deepspeed.init_distributed` gives each rank a 66 MB shared-memory
    file, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, maps the
    other ranks' files, and never unlinks them: every launcher run on CPU (one rank or more) left
    66 MB per rank in /dev/shm (a RAM-backed tmpfs) for good. After the barrier all ranks hold their
    mappings, which stay valid after the unlink, so the memory is freed when the last process exits,
    crash or not.
    """
    if torch.cuda.is_available():
        return
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank())
    if world_size() > 1:
        dist.barrier()  # one rank alone (launcher with 1 process) has a buffer too, and no one to wait for
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:  # a DeepSpeed without the shm all-reduce, or one that cleans up itself
        pass


def shutdown_distributed() -> None:
    """Destroy the process group (registered at exit by `init_distributed`).

    Left to the interpreter's teardown, gloo's and the TCP store's native threads are destroyed
    while still joinable, and the C++ runtime aborts the process ("terminate called without an
    active exception", exit status -6) after the run has finished, now and then, so a finished
    run would report a failure to its launcher.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (no gradient)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, differentiably: the
    backward sums each rank's gradient into the rank that owns the rows (SimCLR's global
    in-batch negatives)."""
    if world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(t.contiguous()))

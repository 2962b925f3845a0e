"""The start-up decode check on two ranks whose nodes keep separate caches: every rank gets a verdict for every
file even when one node already knows some of them (the uncached files are split by a list that is the same on
every rank: the union of what each rank does not know)."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from mixfast.data.check import check_files


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, paths: list, root: str, caches: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        verdicts = check_files(paths, root, caches[rank], threads=1, rank=rank, world_size=2)
        with open(f"{out}.{rank}", "w") as f:
            f.write("\n".join(f"{v.read is not None} {v.problem}" for v in verdicts))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_with_different_caches_each_get_every_verdict(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    paths = [str(root / f"{i}.jpg") for i in range(6)]
    for p in paths:
        Image.new("RGB", (16, 16), (7, 0, 0)).save(p)
    (root / "5.jpg").write_bytes(b"not an image")  # one file every rank must find unreadable
    caches = [str(tmp_path / "cache0"), str(tmp_path / "cache1")]
    check_files(paths[:3], str(root), caches[0], threads=1)  # node 0 knows half of the files from an earlier run
    mp.spawn(_rank, args=(_port(), paths, str(root), caches, str(tmp_path / "verdicts")), nprocs=2)
    got = [(tmp_path / f"verdicts.{r}").read_text().splitlines() for r in (0, 1)]
    assert got[0] == got[1] and len(got[0]) == 6
    assert [line.startswith("True") for line in got[0]] == [True] * 5 + [False]

"""A process that set up torch.distributed through `init_distributed` tears it down at exit.

Left to the interpreter's teardown, gloo's and the TCP store's native threads are destroyed
while joinable and the C++ runtime aborts the finished process now and then (exit status -6,
"terminate called without an active exception"): seen in CI on the step-sync subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit
import torch.distributed as dist
# atexit runs handlers last-registered first: this one runs after init_distributed's own
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
from mixfast.engine.distributed import init_distributed, world_size
init_distributed()
print("world", world_size(), flush=True)
"""


def test_process_group_is_destroyed_before_the_interpreter_exits():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 1" in proc.stdout
    assert "initialized at exit: False" in proc.stdout, proc.stdout

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def triton_cases_in_interpreter():
    """Run a test file's `triton`-parametrized cases in a subprocess with TRITON_INTERPRET=1.

    The variable must be set before triton's kernels are defined, so a CPU-only process that
    has already imported them cannot switch; the subprocess can. Fails with the output's tail
    when a case fails or fewer than `min_passed` ran; returns pytest's summary line."""
    def run(test_file: str, min_passed: int, ignore_warnings=("DeprecationWarning",)) -> str:
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "-k", "triton", "-x"]
        for category in ignore_warnings:
            cmd += ["-W", f"ignore::{category}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        tail = (proc.stdout + proc.stderr)[-6000:]
        assert proc.returncode == 0, tail
        passed = re.search(r"(\d+) passed", proc.stdout)
        assert passed and int(passed.group(1)) >= min_passed, f"too few triton cases ran under the interpreter:\n{tail}"
        return proc.stdout.strip().splitlines()[-1]

    return run

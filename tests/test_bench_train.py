"""Smoke test of benchmarks/bench_train.py: the build-up table on the CPU with a tiny ResNet.

One run in a subprocess (as a user runs it, on the CPU even where a GPU exists): 16 images of 32², a width-4
ResNet-18, one warm-up and two timed steps per row, the rows that can run on a CPU, one torch thread (two threads
on a shared 2-core machine spin in OpenMP and run 10-50x slower). Checks that the table has every
column, that the rows that ran have finite numbers, that a row that fails is reported with its error instead of
stopping the others, and that --results-file writes the JSON and its CSV twin. Not a timing test: the numbers are
not compared with anything.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# channels_last may fail to build under DeepSpeed on the CPU (parameter broadcast of a channels_last weight); the
# fused row builds on it. Either outcome is fine here, as long as it is reported.
MUST_RUN = ["papers", "bf16", "supervised"]
MAY_FAIL = ["channels_last", "fused"]
HEADERS = ["row", "setup", "images/s", "ms/step", "p20", "p80", "peak RSS Δ MiB", "passes fwd+bwd + fwd",
           "ceiling images/s", "of ceiling", "status"]
NUMBERS = ["images_per_s", "ms_median", "ms_p20", "ms_p80", "peak_mib", "ceiling_ips", "frac_ceiling"]


def _cell_number(text: str) -> float:
    return float(text.replace(",", ""))


def test_bench_train_cpu_smoke(tmp_path):
    results = tmp_path / "out" / "train.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--device", "cpu", "--arch", "resnet18",
           "--width", "4", "--batch", "16", "--image-size", "32", "--steps", "2", "--warmup", "1", "--threads", "1",
           "--set", "method.queue_size=256", "--rows", ",".join(MUST_RUN[:2] + MAY_FAIL + MUST_RUN[2:]),
           "--results-file", str(results)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    cells = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cells == HEADERS
    table = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        row = dict(zip(HEADERS, (c.strip() for c in line.strip("|").split("|"))))
        table[row["row"]] = row
    assert len(table) == len(MUST_RUN + MAY_FAIL)
    for label, row in table.items():
        if row["status"] == "ok":
            for col in ["images/s", "ms/step", "p20", "p80", "ceiling images/s", "of ceiling"]:
                assert math.isfinite(_cell_number(row[col])), (label, col, row[col])
            assert row["passes fwd+bwd + fwd"] in ("3 + 1", "1 + 0"), row
        else:
            assert row["status"].startswith("failed: ") and len(row["status"]) > len("failed: "), row

    data = json.loads(results.read_text())
    assert results.with_suffix(".csv").exists()
    assert data["benchmark"] == "train" and data["environment"]["torch"] == __import__("torch").__version__
    assert data["settings"]["batch"] == 16 and data["settings"]["image_size"] == 32
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == set(MUST_RUN + MAY_FAIL)
    for key in MUST_RUN:
        assert rows[key]["status"] == "ok", rows[key]
    for key, r in rows.items():
        if r["status"] == "ok":
            for col in NUMBERS:
                assert isinstance(r[col], float) and math.isfinite(r[col]), (key, col, r[col])
            assert r["steps"] == 2
    # the ceiling: supervised images/s over 3 forward+backward passes + 0.33 x 1 forward-only pass (MoCo + MixMask
    # + Un-Mix: three query branches and the key encoder)
    sup = rows["supervised"]["images_per_s"]
    assert rows["papers"]["passes_fwd_bwd"] == 3 and rows["papers"]["passes_fwd"] == 1
    assert math.isclose(rows["papers"]["ceiling_ips"], sup / 3.33, rel_tol=1e-9)
    assert rows["supervised"]["frac_ceiling"] == 1.0

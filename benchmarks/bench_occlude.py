"""Occlusion of a batch by N learned masks (ADIOS): `ops.occlude` against the per-mask loop
(`reference.occlude`, the specification) and against the memory limit.

`ops.occlude` reads x [B, C, H, W] and the masks [B, N, H, W] once and writes the N copies
[N, B, C, H, W]; its floor is (read + write bytes) moved at the machine's measured copy
bandwidth (`common.copy_timing` of the same byte count). A fused backend could only beat the
broadcast by writing less, which the N copies the encoder reads do not allow, so the op keeps
none; this script is what that claim rests on.

    python benchmarks/bench_occlude.py [--device cuda] [--results-file PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_output_args, copy_fn, environment, env_line, gbps, render_table,  # noqa: E402
                    save_requested_results, time_round_robin)

from mixfast import ops  # noqa: E402
from mixfast.ops import reference as ref  # noqa: E402

# (batch, masks, side, dtype, channels_last): the demo, the ADIOS 96-px rows, a 224-px ADIOS-s batch
SHAPES = [(64, 3, 32, torch.float32, False), (128, 4, 96, torch.float32, False),
          (128, 4, 96, torch.bfloat16, True), (64, 6, 224, torch.bfloat16, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=15)
    add_output_args(ap, "nothing (this benchmark has no README table)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows = []
    for b, n, side, dtype, cl in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, 3, side, side, generator=g).to(dev, dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        masks = torch.rand(b, n, side, side, generator=g).to(dev)
        moved = x.numel() * x.element_size() + masks.numel() * 4 + n * x.numel() * x.element_size()
        t = time_round_robin({"occlude": lambda: ops.occlude(x, masks, validate=False),
                              "reference loop": lambda: ref.occlude(x, masks),
                              "copy": copy_fn(moved, dev, allocate=True)}, device=dev, reps=args.reps)
        us = t["occlude"].median_us
        rows.append({"shape": f"B{b} N{n} {side}px {str(dtype).split('.')[-1]}{' cl' if cl else ''}",
                     "occlude_us": us, "reference_us": t["reference loop"].median_us,
                     "speedup_vs_reference": t["reference loop"].median_us / us,
                     "copy_us": t["copy"].median_us, "of_copy_speed": t["copy"].median_us / us,
                     "occlude_gbps": gbps(moved, us)})
    env = environment(dev)
    print(env_line(env))
    print(render_table(rows, [("shape", "shape"), ("occlude_us", "occlude µs"), ("reference_us", "per-mask loop µs"),
                              ("speedup_vs_reference", "× loop"), ("copy_us", "copy of the same bytes µs"),
                              ("of_copy_speed", "fraction of copy speed"), ("occlude_gbps", "GB/s")]))
    save_requested_results(args, "occlude", rows, env)


if __name__ == "__main__":
    main()

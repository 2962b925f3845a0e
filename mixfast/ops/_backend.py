"""Backend choice for every op: MIXFAST_BACKEND=auto|cuda|triton|cpu|torch.

`auto` (default) picks, per call, the fastest backend available for the tensor's device
and falls back quietly; a backend named explicitly must exist, or the call fails loudly
(DESIGN.md: "one the user asks for by name fails loudly if it is not there").
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


class BackendUnavailable(RuntimeError):
    pass


def requested_backend() -> str:
    name = os.environ.get("MIXFAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MIXFAST_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def choose(op: str, device_type: str, available: dict[str, Callable[[], bool]], preference: Iterable[str],
           requested: str | None = None) -> str:
    """Pick a backend for `op` on `device_type`.

    available: backend name -> zero-argument check (may be slow the first time, e.g. an
    import); preference: the order `auto` tries. 'torch' (the reference) always works.
    """
    requested = requested or requested_backend()
    if requested == "auto":
        for name in preference:
            if name == "torch" or (name in available and available[name]()):
                return name
        return "torch"
    if requested == "torch":
        return "torch"
    if requested not in available or not available[requested]():
        raise BackendUnavailable(
            f"MIXFAST_BACKEND={requested} was requested for {op} on a {device_type} tensor, but that backend is not "
            f"available here (available: {', '.join(n for n, ok in available.items() if ok()) or 'none'}, torch)")
    return requested

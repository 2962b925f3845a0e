"""Backend choice for every op family: MIXFAST_BACKEND=auto|cuda|triton|cpu|torch.

Each op family declares its backends once, as a :class:`Table` of rows (the implementation
object, a check of whether it runs on a call's inputs, the dtypes it takes) with a preference
order per device type; ``Table.choose`` is the one chooser. ``auto`` (default) picks, per
call, the first preferred backend that runs the call and falls back quietly (at the end,
``torch``, the reference, runs everything); a backend named explicitly must run the call or
the call fails loudly with BackendUnavailable: a user who asks for a kernel by name must not
silently get another one.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


class BackendUnavailable(RuntimeError):
    pass


def requested_backend() -> str:
    name = os.environ.get("MIXFAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MIXFAST_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=None)
def optional_module(name: str):
    """The module `name` once imported, or None when it cannot be imported (Triton kernels without Triton,
    FlexAttention in an older torch)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@dataclass(frozen=True)
class Row:
    """One backend of an op family: `impl` (has `.name`), `runs(*facts)` -> whether it can run a call with these
    facts about its inputs (e.g. the device type), `dtypes` it takes (None: any)."""

    impl: Any
    runs: Callable[..., bool]
    dtypes: Optional[tuple] = None


class Table:
    """The backends of one op family and the order `auto` tries them in per device type ("*": any other)."""

    def __init__(self, family: str, rows: Sequence[Row], preference: dict[str, tuple[str, ...]]):
        self.family, self.rows = family, {row.impl.name: row for row in rows}
        self.preference = preference
        unknown = {n for names in preference.values() for n in names} - set(self.rows)
        if unknown:
            raise ValueError(f"{family}: preference names backends without a row: {sorted(unknown)}")

    def choose(self, op: str, device_type: str, dtype, *facts, requested: Optional[str] = None):
        """The implementation that runs `op` on inputs of `dtype` on `device_type` (`facts` go to each row's
        `runs`), per MIXFAST_BACKEND (or `requested`)."""
        requested = requested or requested_backend()
        if requested == "auto":
            for name in self.preference.get(device_type, self.preference.get("*", ("torch",))):
                row = self.rows[name]
                if (row.dtypes is None or dtype in row.dtypes) and row.runs(*facts):
                    return row.impl
            return self.rows["torch"].impl
        row = self.rows.get(requested)
        if row is None or not row.runs(*facts):
            usable = [n for n, r in self.rows.items() if n != "torch" and r.runs(*facts)]
            raise BackendUnavailable(
                f"MIXFAST_BACKEND={requested} was requested for {op} on a {device_type} tensor, but that backend is "
                f"not available here (available: {', '.join(usable) or 'none'}, torch)")
        if row.dtypes is not None and dtype not in row.dtypes:
            raise BackendUnavailable(
                f"MIXFAST_BACKEND={requested} was requested for {op}, but the {requested} kernels support "
                f"{', '.join(str(d).replace('torch.', '') for d in row.dtypes)} only, got {dtype} "
                "(use MIXFAST_BACKEND=torch or auto)")
        return row.impl

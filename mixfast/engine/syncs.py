"""Counting the places where a piece of code makes the host wait for the device.

On a GPU, a value read back to Python (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``,
``.cpu()``), an op whose output shape depends on the data (``nonzero``, ``masked_select``,
``unique``, indexing with a boolean mask), ``torch.equal`` and a device-side assert each stall the host until the GPU has
finished all queued work; a training step with several of them leaves the GPU idle while
Python catches up. The same calls are visible on CPU tensors, so a CPU test can prove that a
step issues none of them:

    with SyncCounter() as syncs:
        trainer.train_step(batch)
    assert syncs.total == 0, syncs.report()

Aten ops are seen through a ``TorchDispatchMode``; ``.tolist()``, ``.cpu()`` and ``.numpy()``
do not dispatch an aten op on a CPU tensor, so the counter also wraps those methods while it is
active. Each read is recorded with the device of the tensor it reads and the innermost stack
frames outside torch. On a CPU machine every read looks alike; some read tensors that live on
the host on every machine (a CPU generator's draw, the step counters torch's optimizers keep on
the CPU): `unexpected(allowed)` leaves out the places a caller names, with its reason.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Aten ops that read a device value on the host or size their output from the data.
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "_assert_async", "nonzero", "masked_select",
    "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
})
# Tensor methods that copy to the host without an aten op on CPU tensors.
SYNC_METHODS = ("tolist", "cpu", "numpy")


def _caller() -> str:
    """`innermost frame [<- up to three frames outside torch]`, innermost first."""
    plumbing = ("syncs.py", "/_dynamo/", "/utils/_python_dispatch", "/_compile.py", "/utils/_contextlib")
    stack = [f for f in traceback.extract_stack()[:-3] if not any(p in f.filename for p in plumbing)]
    def name(f):
        return f"{'/'.join(f.filename.rsplit('/', 2)[-2:])}:{f.lineno} {f.name}"
    outside = [f for f in stack if "/torch/" not in f.filename][-3:]
    chain = [stack[-1]] + [f for f in reversed(outside) if f is not stack[-1]]
    return " <- ".join(name(f) for f in chain)


class SyncCounter(TorchDispatchMode):
    """Context manager: counts host syncs (see module docstring) by kind and place."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.places: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _record(self, kind: str, device) -> None:
        self.counts[kind] += 1
        self.places[f"{kind} ({device}) at {_caller()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("index", "index_put", "index_put_") and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            name = f"{name} with a boolean mask"  # t[mask]: the output size is the mask's count
            self._record(name, args[0].device)
        elif name in SYNC_OPS:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self._record(name, first.device if first is not None else "-")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(f"Tensor.{_name}", tensor.device)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def unexpected(self, allowed: dict[str, str] | None = None) -> dict[str, int]:
        """The recorded places (with counts) whose text contains none of the keys of `allowed`
        (a place -> why that read is of a host-resident tensor)."""
        allowed = allowed or {}
        return {place: n for place, n in self.places.items() if not any(key in place for key in allowed)}

    def report(self) -> str:
        return "\n".join(f"{n} x {place}" for place, n in self.places.most_common()) or "no host syncs"

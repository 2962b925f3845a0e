"""Labelled subsets for semi-supervised fine-tuning (1% / 10% / 100% of the labels).

A subset is chosen per class, so it is balanced the way the data set is: class c with n_c
images contributes ``max(1, round(p/100 · n_c))`` of them (at least one image per class),
drawn with a generator seeded by ``(seed, c)`` — the choice for one class does not depend on
the others, and the same seed gives the same subset on every machine.

Subset files hold one entry per line (lines starting with ``#`` are comments): an index into
the training split, or, for ImageFolder data, an image path relative to the split directory
(``n01440764/n01440764_10026.JPEG``). Reading also accepts absolute paths and bare file names,
the format of SimCLR's published ImageNet 1% / 10% lists.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np


def select_subset(labels: Sequence[int], percent: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced ``percent``% subset (0 < percent <= 100)."""
    if not isinstance(percent, (int, float)) or math.isnan(percent) or not 0 < percent <= 100:
        raise ValueError(f"label percentage must lie in (0, 100], got {percent!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if percent == 100:
        return np.arange(len(labels))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, int(math.floor(percent / 100.0 * len(members) + 0.5)))
        rng = np.random.default_rng([seed % 2**63, int(c)])
        chosen.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(chosen))


def _relative_paths(base) -> Optional[list[str]]:
    """Paths relative to the split root for ImageFolder-like data sets, else None."""
    samples, root = getattr(base, "samples", None), getattr(base, "root", None)
    if samples is None or root is None:
        return None
    return [os.path.relpath(path, root) for path, _ in samples]


def write_subset(path: str, indices: Sequence[int], base, header: str = "") -> str:
    rel = _relative_paths(base)
    with open(path, "w") as f:
        for line in header.splitlines():
            f.write(f"# {line}\n")
        for i in indices:
            f.write(f"{rel[int(i)] if rel is not None else int(i)}\n")
    return path


def read_subset(path: str, base) -> np.ndarray:
    """Sorted indices listed in a subset file; unknown entries, duplicates and bad indices raise
    with the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--subset-file {path}: no such file")
    rel = _relative_paths(base)
    lookup = None
    if rel is not None:
        root = getattr(base, "root")
        lookup = {}
        for i, r in enumerate(rel):
            lookup[r] = i
            lookup[os.path.join(root, r)] = i
            lookup.setdefault(os.path.basename(r), i)
    skipped = {}
    for p, why in getattr(base, "skipped", ()):
        skipped[p] = skipped[os.path.basename(p)] = why
        if rel is not None:
            skipped[os.path.relpath(p, getattr(base, "root"))] = why
    n = len(base)
    seen: dict[int, int] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.lstrip("-").isdigit():
                index = int(entry)
                if not 0 <= index < n:
                    raise ValueError(f"{path}:{lineno}: index {index} outside the training split (0..{n - 1})")
            elif lookup is not None and entry in lookup:
                index = lookup[entry]
            elif entry in skipped:
                raise ValueError(f"{path}:{lineno}: {entry!r} is an unreadable image, skipped by the start-up "
                                 f"check ({skipped[entry]})")
            else:
                raise ValueError(f"{path}:{lineno}: {entry!r} is neither an index nor an image of the training split")
            if index in seen:
                raise ValueError(f"{path}:{lineno}: {entry!r} repeats line {seen[index]}")
            seen[index] = lineno
    if not seen:
        raise ValueError(f"{path}: lists no images")
    return np.sort(np.fromiter(seen, dtype=np.int64))

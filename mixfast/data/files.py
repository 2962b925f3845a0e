"""File lists of the JPEG-tree data sets and a cheap integrity check of image files.

Both loaders (torch/PIL and DALI) read the same ``(path, label)`` lists built here:

- ``imagefolder``: ``root/<split>/<class>/*`` (ImageNet-1K and any class-folder tree).
- ``tinyimagenet``: ``root/train/<wnid>/images/*.JPEG`` and ``root/val/images/*.JPEG`` labelled
  by ``root/val/val_annotations.txt`` (``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``).
- ``imagenet100``: an ImageNet tree restricted to the wnids of a class-list file (one per
  line); classes are numbered in sorted-wnid order, like ImageFolder does.

``scan_images`` checks every file once (JPEG: SOI marker, a parsable frame header with
non-zero size, an EOI marker near the end; PNG: signature and IEND chunk) and caches the
verdict per ``(path, size, mtime)`` in this process. DALI's decoders abort the whole pipeline
on a bad file, so the DALI loader only ever sees files that passed; the torch loader keeps
its own per-item fallback (decode errors become skipped items) for corruption that the
check cannot see.
"""

from __future__ import annotations

import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
JPEG_TREES = ("imagefolder", "tinyimagenet", "imagenet100")

# How far from the end an EOI / IEND marker may lie (some writers pad files with zeros).
_TAIL_BYTES = 1024
_HEAD_BYTES = 1 << 16


@dataclass
class FileList:
    """``samples``: ``[(path, label)]``; ``classes``: class names, index = label."""

    samples: list[tuple[str, int]]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files dropped by scan_images


def require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data directory not found: {path}")


def require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def _images_in(folder: str) -> list[str]:
    """Image files below ``folder`` (recursively), sorted."""
    found = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        found += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def class_folders(root: str, classes: list[str] | None = None) -> FileList:
    """ImageFolder order: classes sorted, files sorted within each class."""
    require_dir(root)
    if classes is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders in {root}")
    samples = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"class folder not found: {folder}")
        samples += [(p, label) for p in _images_in(folder)]
    return FileList(samples, list(classes))


def read_class_list(path: str) -> list[str]:
    """One wnid per line (blank lines and '#' comments ignored), returned sorted, no duplicates."""
    require_file(path, "class-list file (data.class_list)")
    with open(path, encoding="utf-8") as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"class-list file {path} names no classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class-list file {path} repeats a class")
    return sorted(names)


def tinyimagenet(root: str, train: bool) -> FileList:
    """Tiny-ImageNet-200 as distributed (``tiny-imagenet-200/``)."""
    train_dir = os.path.join(root, "train")
    require_dir(train_dir)
    wnids = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if train:
        samples = []
        for label, wnid in enumerate(wnids):
            folder = os.path.join(train_dir, wnid, "images")
            require_dir(folder)
            samples += [(p, label) for p in _images_in(folder)]
        return FileList(samples, wnids)
    val_images = os.path.join(root, "val", "images")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    require_dir(val_images)
    require_file(annotations, "Tiny-ImageNet validation annotations")
    index = {w: i for i, w in enumerate(wnids)}
    samples = []
    with open(annotations, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1].strip() not in index:
                raise ValueError(f"{annotations}:{n}: expected 'file<TAB>wnid...' with a wnid of train/, got {line!r}")
            samples.append((os.path.join(val_images, parts[0].strip()), index[parts[1].strip()]))
    return FileList(sorted(samples), wnids)


def jpeg_tree(name: str, root: str, split: str, class_list: str | None = None, train: bool = True) -> FileList:
    """The file list of split ``split`` of a JPEG-tree data set (see the module docstring)."""
    require_dir(root)
    if name == "imagefolder":
        return class_folders(os.path.join(root, split))
    if name == "imagenet100":
        if not class_list:
            raise ValueError("data.name='imagenet100' needs data.class_list (a file with one wnid per line)")
        return class_folders(os.path.join(root, split), read_class_list(class_list))
    if name == "tinyimagenet":
        return tinyimagenet(root, train)
    raise ValueError(f"{name!r} is not a JPEG-tree data set ({', '.join(JPEG_TREES)})")


# ---------------------------------------------------------------------------------------
# integrity check
# ---------------------------------------------------------------------------------------

# SOF markers carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) share the range but do not.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_problem(head: bytes, tail: bytes, f) -> str | None:
    if tail.rfind(b"\xff\xd9") < 0:
        return "no JPEG end-of-image marker (truncated?)"
    pos = 2
    while True:
        while len(head) < pos + 4:
            more = f.read(_HEAD_BYTES)
            if not more:
                return "no JPEG frame header"
            head += more
        if head[pos] != 0xFF:
            return f"bad JPEG marker at byte {pos}"
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if length < 2:
            return f"bad JPEG segment length at byte {pos}"
        if marker in _SOF:
            while len(head) < pos + 9:
                more = f.read(_HEAD_BYTES)
                if not more:
                    return "truncated JPEG frame header"
                head += more
            height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return None if height > 0 and width > 0 else "JPEG frame of size 0"
        if marker == 0xDA:
            return "JPEG scan before any frame header"
        pos += 2 + length


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be an intact image, or None when it passes the cheap check."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
            if size > _HEAD_BYTES:
                f.seek(max(0, size - _TAIL_BYTES))
                tail = f.read()
                f.seek(len(head))
            else:
                tail = head[-_TAIL_BYTES:]
            if head[:3] == b"\xff\xd8\xff":
                return _jpeg_problem(head, tail, f)
            if head[:8] == b"\x89PNG\r\n\x1a\n":
                return None if b"IEND" in tail else "no PNG IEND chunk (truncated?)"
            return "neither a JPEG nor a PNG file"
    except OSError as err:
        return f"unreadable: {err}"


_VERDICTS: dict[tuple[str, int, int], str | None] = {}


def _verdict(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError as err:
        return f"unreadable: {err}"
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _VERDICTS:
        _VERDICTS[key] = image_problem(path)
    return _VERDICTS[key]


def image_problems(paths: list[str], threads: int = 16) -> list[str | None]:
    """``image_problem`` of every path (cached per process), read by a pool of threads."""
    with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O bound: threads overlap the reads
        return list(pool.map(_verdict, paths, chunksize=256))


def scan_images(files: FileList, threads: int = 16, warn: bool = True) -> FileList:
    """``files`` without the images that fail ``image_problem`` (named in one warning)."""
    paths = [p for p, _ in files.samples]
    problems = image_problems(paths, threads)
    good = [s for s, problem in zip(files.samples, problems) if problem is None]
    bad = [(p, problem) for p, problem in zip(paths, problems) if problem is not None]
    if bad and warn:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        warnings.warn(f"skipping {len(bad)} unreadable images: {shown}{more}", stacklevel=2)
    return FileList(good, files.classes, files.skipped + [p for p, _ in bad])

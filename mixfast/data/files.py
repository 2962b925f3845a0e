"""File lists of the image-folder data sets: which files are images, and which class each one is.

Both loaders (torch/PIL and DALI) and every evaluation command read the ``(path, label)``
lists built here, so they agree on what an image file is:

- an image file has one of ``IMAGE_EXTENSIONS`` (JPEG, PNG, BMP, TIFF, WebP, PPM/PGM), in any
  letter case (``.JPG``, ``.Png``);
- files and folders whose name starts with ``.`` are hidden and ignored: macOS's ``.DS_Store``
  and AppleDouble ``._name.jpg`` files (resource forks that carry an image extension but hold
  no image), editors' and tools' folders (``.ipynb_checkpoints``, mixfast's own ``.mixfast``
  cache); they and the files with other extensions are counted (``FileList.ignored``) and the
  counts are reported, never silently dropped;
- folders are walked recursively (nested folders inside a class are part of that class),
  following symbolic links, each real folder once (a link loop ends there);
- order: classes sorted by name, files sorted by path, as torchvision's ImageFolder.

Layouts:

- ``imagefolder``: ``root/<split>/<class>/*`` (ImageNet-1K and any class-folder tree).
- ``tinyimagenet``: ``root/train/<wnid>/images/*.JPEG`` and ``root/val/images/*.JPEG`` labelled
  by ``root/val/val_annotations.txt`` (``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``).
- ``imagenet100``: an ImageNet tree restricted to the wnids of a class-list file (one per
  line); classes are numbered in sorted-wnid order, like ImageFolder does.

Class indices come from the training split and only from it: every other split is labelled
with the training split's class-to-index map (``class_folders(..., classes=train.classes)``),
so label ``i`` means the same class in the kNN bank, the kNN queries, the linear probe and the
fine-tune. A class folder of another split that the training split lacks is an error naming
it (``unknown_classes="error"``) or its images are left out with a warning (``"exclude"``);
a training class with no folder in the other split is a warning. A class folder with no image
file in it, a missing split and a missing data set directory are ``DataError`` s: one line
naming the path (``mixfast.train`` and the evaluation commands print it as a config error).

Whether each listed file really decodes is ``mixfast.data.check``'s business.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from mixfast.config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
JPEG_TREES = ("imagefolder", "tinyimagenet", "imagenet100")
UNKNOWN_CLASS_CHOICES = ("error", "exclude")


class DataError(ConfigError):
    """A data set that cannot be read as configured; the message names the path (and the key)."""


@dataclass
class FileList:
    """``samples``: ``[(path, label)]``; ``classes``: class names, index = label.

    ``ignored``: files not listed, by reason ('hidden', 'not an image': a count each);
    ``skipped``: ``[(path, reason)]`` of listed files that the start-up check found unreadable
    and removed (``mixfast.data.check.check_files``)."""

    samples: list[tuple[str, int]]
    classes: list[str]
    ignored: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    """Hidden entries (``.DS_Store``, AppleDouble ``._*``, ``.git``, ``.mixfast``): never data."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def require_dir(path: str, key: str = "data.root") -> None:
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise DataError(f"{key}: {path} {what}")


def require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")


def images_in(folder: str) -> tuple[list[str], Counter]:
    """Image files below ``folder`` (recursively, links followed, each real folder once), sorted,
    and the count of the files ignored by reason."""
    found, ignored = [], Counter()
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a link back to a folder already walked
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        ignored["hidden"] += sum(1 for d in dirnames if is_hidden(d))  # hidden folders count as one entry
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for n in names:
            if is_hidden(n):
                ignored["hidden"] += 1
            elif n.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, n))
            else:
                ignored["not an image"] += 1
    return sorted(found), ignored


def _subfolders(root: str) -> tuple[list[str], Counter]:
    """Class folder names of a split (hidden ones left out), and the split-level entries ignored."""
    names, ignored = [], Counter()
    for entry in os.scandir(root):
        if is_hidden(entry.name):
            ignored["hidden"] += 1
        elif entry.is_dir():  # follows links, as the walk does
            names.append(entry.name)
        else:  # a file beside the class folders belongs to no class
            ignored["not in a class folder"] += 1
    return sorted(names), ignored


def class_folders(root: str, classes: Optional[list[str]] = None, *, key: str = "data.train_split",
                  required: Optional[list[str]] = None, unknown_classes: str = "error") -> FileList:
    """The split ``root`` in ImageFolder order, numbered by ``classes``.

    ``classes=None``: the split defines the classes (its sorted folders; the training split).
    Otherwise labels follow ``classes`` (the training split's): a folder of ``root`` not in it is
    an error or excluded with a warning (``unknown_classes`` 'error' / 'exclude'; 'ignore': left out
    silently, for ImageNet-100's selection from a full ImageNet tree), a class without a folder is a warning, unless it
    is in ``required`` (ImageNet-100's class list for its training split), then an error."""
    require_dir(root, key)
    present, ignored = _subfolders(root)
    if classes is None:
        if not present:
            raise DataError(f"{key}: {root} holds no class folders (expected {root}/<class>/<images>)")
        classes = present
    else:
        unknown = sorted(set(present) - set(classes))
        if unknown and unknown_classes == "error":
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise DataError(f"{key}: {root} has class folders that the training split lacks: {shown} (their labels "
                            f"would mean nothing to a model trained on the training classes; remove them or set "
                            f"data.unknown_val_classes=exclude to leave their images out)")
        if unknown and unknown_classes == "exclude":
            warnings.warn(f"{root}: leaving out the class folders the training split lacks "
                          f"(data.unknown_val_classes=exclude): {', '.join(unknown)}", stacklevel=2)
        missing = [c for c in classes if c not in present]
        if required and any(c in required for c in missing):
            first = next(c for c in missing if c in required)
            raise DataError(f"{key}: class folder not found: {os.path.join(root, first)}")
        if missing:
            warnings.warn(f"{root}: {len(missing)} of the {len(classes)} training classes have no folder here "
                          f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}); the other classes keep "
                          f"the training split's labels", stacklevel=2)
    samples = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue  # a training class missing here: warned above
        paths, skipped_here = images_in(folder)
        ignored.update(skipped_here)
        if not paths:
            extra = f" ({sum(skipped_here.values())} hidden or non-image files ignored)" if skipped_here else ""
            raise DataError(f"{key}: class folder {folder} holds no image file{extra}; remove the folder or add "
                            f"images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(p, label) for p in paths]
    return FileList(samples, list(classes), ignored)


def read_class_list(path: str) -> list[str]:
    """One wnid per line (blank lines and '#' comments ignored), returned sorted, no duplicates."""
    require_file(path, "class-list file (data.class_list)")
    with open(path, encoding="utf-8") as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"data.class_list: {path} names no classes")
    if len(set(names)) != len(names):
        raise DataError(f"data.class_list: {path} repeats a class")
    return sorted(names)


def tinyimagenet(root: str, train: bool, classes: Optional[list[str]] = None) -> FileList:
    """Tiny-ImageNet-200 as distributed (``tiny-imagenet-200/``); the val split is labelled with the
    training split's wnids (``classes``, default: read from ``train/``)."""
    train_dir = os.path.join(root, "train")
    require_dir(train_dir, "data.root (Tiny-ImageNet train/)")
    wnids = classes if classes is not None else _subfolders(train_dir)[0]
    if not wnids:
        raise DataError(f"data.root: {train_dir} holds no class folders")
    if train:
        samples, ignored = [], Counter()
        for label, wnid in enumerate(wnids):
            folder = os.path.join(train_dir, wnid, "images")
            require_dir(folder, "data.root (Tiny-ImageNet class images/)")
            paths, skipped_here = images_in(folder)
            ignored.update(skipped_here)
            if not paths:
                raise DataError(f"data.root: class folder {folder} holds no image file")
            samples += [(p, label) for p in paths]
        return FileList(samples, list(wnids), ignored)
    val_images = os.path.join(root, "val", "images")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    require_dir(val_images, "data.val_split (Tiny-ImageNet val/images)")
    require_file(annotations, "Tiny-ImageNet validation annotations")
    index = {w: i for i, w in enumerate(wnids)}
    samples = []
    with open(annotations, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1].strip() not in index:
                raise DataError(f"{annotations}:{n}: expected 'file<TAB>wnid...' with a wnid of train/, got {line!r}")
            samples.append((os.path.join(val_images, parts[0].strip()), index[parts[1].strip()]))
    missing = sorted(set(wnids) - {wnids[label] for _, label in samples})
    if missing:
        warnings.warn(f"{annotations}: {len(missing)} training classes have no validation image "
                      f"({', '.join(missing[:10])})", stacklevel=2)
    return FileList(sorted(samples), list(wnids))


def jpeg_tree(name: str, root: str, split: str, class_list: Optional[str] = None, train: bool = True,
              classes: Optional[list[str]] = None, unknown_classes: str = "error") -> FileList:
    """The file list of split ``split`` of an image-folder data set (see the module docstring).

    ``train=False`` splits are labelled with ``classes`` (the training split's ``FileList.classes``;
    read from the training split when not given)."""
    require_dir(root)
    key = "data.train_split" if train else "data.val_split"
    if name == "imagefolder":
        return class_folders(os.path.join(root, split), None if train else classes, key=key,
                             unknown_classes=unknown_classes)
    if name == "imagenet100":
        if not class_list:
            raise DataError("data.name='imagenet100' needs data.class_list (a file with one wnid per line)")
        listed = read_class_list(class_list)
        # The class list is the class map of every split; its classes must all exist in training.
        return class_folders(os.path.join(root, split), listed, key=key, required=listed if train else None,
                             unknown_classes="ignore")
    if name == "tinyimagenet":
        return tinyimagenet(root, train, classes)
    raise DataError(f"{name!r} is not an image-folder data set ({', '.join(JPEG_TREES)})")

"""What an image decodes to, the start-up check that every listed file decodes, and the record
of the files skipped.

**Decoded pixels** (``load_rgb``, the torch loader's and every evaluation command's decoder):
the file's first frame as 8-bit RGB, with its EXIF orientation applied (a photo shot in
portrait comes out upright). DALI's image decoders apply the orientation too, so both loaders
see the same pixels. Conversions to RGB: grey, palette and CMYK through Pillow (identical to
DALI's decoder on the CPU, tested per format); alpha is dropped, not composited (as DALI does:
the colour under a transparent pixel stays); 16-bit grey is scaled by ``round(v / 257)`` (as
DALI does; Pillow's own ``convert`` clips it to 255, which turns most of an image white).

**Routing.** DALI reads a file itself when its format and mode are among those its CPU decoder
was found to decode to exactly these pixels (``_dali_reads_directly``: 8-bit JPEG, PNG, BMP,
WebP, PNM and 8-bit L/RGB/RGBA TIFF). Every other valid file (16-bit RGB PNG, 1-bit,
palette, 16-bit, float or two-channel TIFF, ...) is decoded once by ``load_rgb`` and written as
an 8-bit RGB PNG in the cache directory, and DALI reads that copy: such files are trained on
with the same pixels, not dropped.

**The start-up check** (``check_files``) decodes every listed file with Pillow (JPEGs with DCT
scaling: every entropy-coded byte is still decoded, so damaged scan data still fails, but the
inverse DCT runs at 1/8 size) in a pool of threads (Pillow releases the GIL while decoding).
A file that does not decode is removed from the list and counted as skipped, on both loaders
alike. Verdicts are cached in a JSON file keyed by path, size and modification time (a changed
file is checked again), so a data set is checked once, not at every run; the cache also
records the Pillow version and this check's version, and a change of either re-checks
everything. Where the cache lives: ``cache_dir``.

PNG files DALI reads are also checked for what libpng refuses and Pillow lets pass (a critical
chunk with a wrong CRC, a stream that ends before IEND), so both loaders skip them.

What the check does not catch: a JPEG whose damage libjpeg-turbo recovers from (it warns
"Corrupt JPEG data" and fills the damaged blocks) decodes without error in Pillow and in DALI,
to the same pixels; it is trained on. A file that changes after its check without changing
size or modification time (bit rot on a disk, a copy that keeps times) keeps its cached
verdict; if DALI then cannot decode it, the DALI loader's run-time guard skips it
(``mixfast.data.dali``), and the torch loader skips it when it draws it.

**Skipped files** are named once (``SkipReport``): one warning shows the first few, and all of
them, with the reason, are listed in ``<run dir>/skipped_files.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from mixfast.engine.logging import info

CHECK_VERSION = 1  # bump when the check's verdicts or the routing change: old caches are then ignored
CACHE_SUBDIR = ".mixfast"  # hidden: the file lists never take it for a class folder
SKIPPED_FILES = "skipped_files.txt"
_SHOWN = 10  # names shown in one warning; the rest are in the skipped-files list

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
# (Pillow format, mode) pairs that DALI's CPU decoder turns into exactly load_rgb's pixels
# (tests/data/test_folders.py decodes one file of each on both loaders).
_DALI_DIRECT = {
    "JPEG": {"L", "RGB", "CMYK"},
    "MPO": {"L", "RGB", "CMYK"},  # JPEG with an appended image (phones' motion photos): the first image
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", *_SIXTEEN_BIT_GREY},
    "BMP": {"1", "L", "P", "RGB", "RGBA"},
    "WEBP": {"RGB", "RGBA"},
    "PPM": {"1", "L", "RGB"},
    "TIFF": {"L", "RGB", "RGBA"},  # 8 bits per sample only (checked below)
}


# ---------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image (see the module docstring)."""
    if image.mode in _SIXTEEN_BIT_GREY:
        grey = np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (a no-op without one)."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def load_rgb(path: str) -> Image.Image:
    """The decoded pixels both loaders train on: first frame, EXIF orientation applied, 8-bit RGB.
    Raises whatever Pillow raises on a file it cannot decode."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()  # decode fully, so that corruption surfaces here
        return to_rgb(upright(image))


def _dali_reads_directly(image: Image.Image) -> bool:
    modes = _DALI_DIRECT.get(image.format or "")
    if modes is None or image.mode not in modes:
        return False
    if image.format == "PNG" and image.mode not in _SIXTEEN_BIT_GREY and image.tile and \
            str(image.tile[0].args).endswith("16B"):
        return False  # 16-bit colour (RGB;16B, LA;16B...): Pillow keeps the high byte, DALI rounds v / 257
    if image.format == "TIFF":  # DALI's TIFF decoder matches Pillow on plain 8-bit layouts only
        bits = image.tag_v2.get(258)
        bits = (bits,) if isinstance(bits, int) else tuple(bits or ())
        return bool(bits) and all(b == 8 for b in bits)
    return True


# ---------------------------------------------------------------------------------------
# one file
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """``problem``: why the file cannot be used, or None; ``read``: the file the DALI loader reads
    (the file itself, or its converted PNG copy), None when unusable."""

    problem: Optional[str]
    read: Optional[str]
    transient: bool = False  # the file could not be opened (missing, no permission): not cached


def _converted_name(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha1(f"{os.path.abspath(path)}\0{size}\0{mtime_ns}".encode("utf-8", "surrogateescape")).hexdigest() + ".png"


def _write_atomically(image: Image.Image, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, "PNG", compress_level=1)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def inspect_file(path: str, convert_dir: str, stat: Optional[os.stat_result] = None) -> Verdict:
    """Decode ``path`` once; write its RGB copy to ``convert_dir`` when DALI cannot read it as it is."""
    try:
        st = stat or os.stat(path)
        f = open(path, "rb")
    except OSError as err:
        return Verdict(describe_error(err), None, transient=True)
    try:
        with f:
            image = Image.open(f)
            if _dali_reads_directly(image):
                if image.format == "PNG":
                    f.seek(0)
                    problem = png_structure_problem(f.read())
                    if problem:
                        return Verdict(problem, None)
                    f.seek(0)
                    image = Image.open(f)
                if image.format in ("JPEG", "MPO"):
                    # DCT scaling: the entropy decoder still reads every coefficient, so damaged
                    # scan data fails as it would at full size; the inverse DCT runs at 1/8.
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                to_rgb(upright(image))  # what load_rgb does after decoding (EXIF parsing can fail too)
                return Verdict(None, path)
            image.load()
            rgb = to_rgb(upright(image))
        target = os.path.join(convert_dir, _converted_name(path, st.st_size, st.st_mtime_ns))
        if not os.path.exists(target):
            _write_atomically(rgb, target)
        return Verdict(None, target)
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError...)
        return Verdict(describe_error(err), None)


def png_structure_problem(data: bytes) -> Optional[str]:
    """What libpng (DALI's PNG decoder) would refuse and Pillow lets pass: a critical chunk whose
    CRC does not match (Pillow does not check IDAT's), or a stream that ends before its IEND
    chunk. Bytes after IEND are fine (both decoders ignore them)."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            break
        if kind[:1].isupper():  # critical chunk (IHDR, PLTE, IDAT, IEND): libpng stops on a bad CRC
            (crc,) = struct.unpack(">I", data[end - 4 : end])
            if zlib.crc32(data[pos + 4 : end - 4]) != crc:
                return f"PNG {kind.decode('latin-1')} chunk at byte {pos} fails its CRC (damaged data)"
        if kind == b"IEND":
            return None
        pos = end
    return "PNG data ends before its IEND chunk (truncated?)"


def describe_error(err: BaseException) -> str:
    """A short reason (the path is shown beside it, so messages that repeat it are shortened)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can identify (empty, or another format under an image extension)"
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{type(err).__name__}: {err.strerror}"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------


def cache_dir(check_cache: str, data_root: str, run_dir: Optional[str]) -> Optional[str]:
    """Where verdicts and converted copies live: ``data.check_cache`` when it names a directory;
    'auto': ``<data.root>/.mixfast`` when the data directory is writable (every run on that data
    shares it), else ``<run dir>/.mixfast``, else a per-user temporary directory; 'off': no
    verdict cache (converted copies go to the run directory or a temporary directory)."""
    if check_cache not in ("auto", "off"):
        return check_cache
    candidates = [data_root] if check_cache == "auto" else []
    candidates += [run_dir] if run_dir else []
    for base in candidates:
        target = os.path.join(base, CACHE_SUBDIR)
        try:
            os.makedirs(target, exist_ok=True)
        except OSError:
            continue
        if os.access(target, os.W_OK):
            return target
    user = getattr(os, "getuid", lambda: "user")()
    key = hashlib.sha1(os.path.realpath(data_root).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    target = os.path.join(tempfile.gettempdir(), f"mixfast-{user}", key)
    os.makedirs(target, exist_ok=True)
    return target


def _cache_file(directory: str, data_root: str) -> str:
    key = hashlib.sha1(os.path.realpath(data_root).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(directory, f"file-check-{key}.json")


def _cache_header() -> dict:
    return {"format": "mixfast file check", "version": CHECK_VERSION, "decoder": f"Pillow {PIL.__version__}"}


def _load_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or {k: saved.get(k) for k in _cache_header()} != _cache_header():
        return {}  # another check version or decoder: its verdicts may not hold
    files = saved.get("files")
    return files if isinstance(files, dict) else {}


def _save_cache(path: str, entries: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**_cache_header(), "files": entries}, f, separators=(",", ":"))
        os.replace(tmp, path)  # several ranks or runs may write: each write is whole
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# Cached entry: [size, mtime_ns, verdict], verdict "ok" (DALI reads the file), "convert" (DALI
# reads the converted copy) or the reason the file cannot be used.
_OK, _CONVERT = "ok", "convert"


def _entry_verdict(entry, path: str, st: os.stat_result, convert_dir: str) -> Optional[Verdict]:
    if not (isinstance(entry, list) and len(entry) == 3 and entry[0] == st.st_size and entry[1] == st.st_mtime_ns):
        return None
    if entry[2] == _OK:
        return Verdict(None, path)
    if entry[2] == _CONVERT:
        target = os.path.join(convert_dir, _converted_name(path, st.st_size, st.st_mtime_ns))
        return Verdict(None, target) if os.path.exists(target) else None  # copy deleted: make it again
    return Verdict(str(entry[2]), None)


def _to_entry(verdict: Verdict, path: str, st: os.stat_result) -> list:
    kind = verdict.problem if verdict.problem else (_OK if verdict.read == path else _CONVERT)
    return [st.st_size, st.st_mtime_ns, kind]


# ---------------------------------------------------------------------------------------
# many files
# ---------------------------------------------------------------------------------------


def _check_uncached(paths: Sequence[str], stats: Sequence[Optional[os.stat_result]], convert_dir: str,
                    threads: int) -> list[Verdict]:
    def one(i: int) -> Verdict:
        if stats[i] is None:  # a broken link, a file deleted since it was listed
            try:
                os.stat(paths[i])
            except OSError as err:
                return Verdict(describe_error(err), None, transient=True)
        return inspect_file(paths[i], convert_dir, stats[i])

    return _in_threads(one, range(len(paths)), threads, 16)  # Pillow releases the GIL while it decodes


def _in_threads(fn, items: Sequence, threads: int, chunk: int) -> list:
    """``[fn(x) for x in items]`` in a pool of threads, ``chunk`` items per task (the executor's
    ``map`` ignores its chunksize for threads: one future per item costs more than a stat)."""
    items = list(items)
    if not items:
        return []
    if threads <= 1 or len(items) <= chunk:
        return [fn(x) for x in items]
    parts = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(threads) as pool:
        return [y for part in pool.map(lambda xs: [fn(x) for x in xs], parts) for y in part]


def _stat(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)  # follows links: a link's target is what gets read
    except OSError:
        return None


def _relative(path: str, root: str) -> str:
    prefix = root.rstrip(os.sep) + os.sep
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(os.path.abspath(path), os.path.abspath(root))


def check_files(paths: Sequence[str], data_root: str, directory: Optional[str], threads: Optional[int] = None,
                rank: int = 0, world_size: int = 1, use_cache: bool = True) -> list[Verdict]:
    """A ``Verdict`` per path, from the cache in ``directory`` where it holds one for the file's
    current size and mtime, else by decoding it. With a process group of ``world_size`` ranks,
    each rank decodes every ``world_size``-th uncached file and the verdicts are exchanged; each
    node's local rank 0 then writes the cache."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    directory = directory or cache_dir("off", data_root, None)
    convert_dir = os.path.join(directory, "converted")
    cache_path = _cache_file(directory, data_root)
    cached = _load_cache(cache_path) if use_cache else {}
    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        threads = max(1, (os.cpu_count() or 1) // max(1, local))
    keys = [_relative(p, data_root) for p in paths]
    stats = _in_threads(_stat, paths, threads, 1024)  # a network file system answers stat() slowly
    verdicts: list[Optional[Verdict]] = [
        _entry_verdict(cached.get(k), p, st, convert_dir) if st is not None else None
        for p, k, st in zip(paths, keys, stats)]
    todo = [i for i, v in enumerate(verdicts) if v is None]
    grouped = world_size > 1 and dist.is_available() and dist.is_initialized()
    if grouped:
        # Ranks can know different files already (each node its own cache): split the union, the same list on
        # every rank, so every file unknown to some rank is checked once and every rank gets its verdict.
        todos: list = [None] * world_size
        dist.all_gather_object(todos, todo)
        todo = sorted(set().union(*todos))
    mine = todo[rank::world_size] if grouped else todo
    if len(todo) > 1000 and rank == 0:
        info(f"checking that {len(todo)} image files decode ({len(paths) - len(todo)} known from {cache_path}), "
             f"{threads} threads{' per rank' if grouped else ''}")
    found = list(zip(mine, _check_uncached([paths[i] for i in mine], [stats[i] for i in mine], convert_dir, threads)))
    if grouped:
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, found)
        found = [item for part in everyone for item in part]
    for i, verdict in found:
        verdicts[i] = verdict
    # Converted copies are written where the rank that decoded the file runs; a rank on another
    # node with its own copy of the data (and cache) makes the ones it cannot see.
    missing = [i for i, v in enumerate(verdicts) if v.read and v.read != paths[i] and not os.path.exists(v.read)]
    for i, verdict in zip(missing, _check_uncached([paths[i] for i in missing], [stats[i] for i in missing],
                                                    convert_dir, threads)):
        verdicts[i] = verdict
    if use_cache and todo and int(os.environ.get("LOCAL_RANK", rank)) == 0:
        merged = dict(cached)
        for i in todo:
            if stats[i] is not None and not verdicts[i].transient:
                merged[keys[i]] = _to_entry(verdicts[i], paths[i], stats[i])
        try:
            _save_cache(cache_path, merged)
        except OSError as err:
            warnings.warn(f"cannot write the file-check cache {cache_path} ({err}); the files will be checked "
                          f"again next time (set data.check_cache to a writable directory)", stacklevel=2)
    if len(todo) > 1000 and rank == 0:
        info(f"file check done in {time.perf_counter() - t0:.1f} s")
    return verdicts  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# naming the skipped files
# ---------------------------------------------------------------------------------------


class SkipReport:
    """Names each unreadable file once per process: in a warning (the first few of a group) and,
    with its reason, as one line of ``<run dir>/skipped_files.txt`` (written by rank 0; a file
    found at run time by another rank is appended by that rank)."""

    def __init__(self, run_dir: Optional[str] = None, rank: int = 0):
        self.path = os.path.join(run_dir, SKIPPED_FILES) if run_dir else None
        self.rank = rank
        self.named: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path and os.path.isfile(self.path):  # a resumed run: those were named by the run before
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) >= 2:
                        self.named[parts[0]] = parts[1]

    def name(self, found: Sequence[tuple[str, str]], when: str, all_ranks_know: bool = True) -> list[tuple[str, str]]:
        """Report the files of ``found`` ([(path, reason)]) not reported before; ``when`` says where
        they were found ('by the start-up check of data.train_split', ...). Returns the new ones."""
        with self._lock:
            new = [(p, why) for p, why in found if p not in self.named]
            self.named.update(new)
        if not new or (all_ranks_know and self.rank != 0):
            return new
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.writelines(f"{p}\t{why}\t{when}\n" for p, why in new)
        shown = "; ".join(f"{p} ({why})" for p, why in new[:_SHOWN])
        rest = ""
        if len(new) > _SHOWN:
            rest = f" and {len(new) - _SHOWN} more" + (f", all listed in {self.path}" if self.path else "")
        elif self.path:
            rest = f" (listed in {self.path})"
        warnings.warn(f"skipping {len(new)} unreadable image file{'s' if len(new) != 1 else ''} found {when}: "
                      f"{shown}{rest}", stacklevel=3)
        return new

"""An image-folder tree with what real folders hold, written with real encoders (Pillow).

Every valid variant of ``VALID`` is one file, with the pixels it must decode to (``expected``);
every file of ``BAD`` must be skipped by both loaders; ``IGNORED`` entries are hidden or not
images and must not be listed at all. Damaged files are a few flipped bytes of valid ones.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 40, 56  # landscape, so a 90-degree EXIF rotation shows in the shape


def _pixels(seed: int) -> np.ndarray:
    """Smooth gradients (so lossy codecs stay close) plus a red top-left block (so a rotation or
    flip shows) plus a little noise (so compressed data is not trivially short)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.dstack([xx * 255 / W, yy * 255 / H, 128 + 60 * np.sin(xx / 5.0 + seed)])
    base = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    base[:8, :8] = [255, 0, 0]
    return base


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _save(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, **kw)
    return buf.getvalue()


def _png16(rgb16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one from an array)."""
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", rgb16.shape[1], rgb16.shape[0], 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _flip_until(good: bytes, start: int, refuses) -> bytes:
    """``good`` with a few bytes flipped in its data, at the first offset from ``start`` on where
    ``refuses(data)`` holds (a damaged file that a decoder refuses)."""
    for offset in range(start, len(good) - 16, 7):
        data = bytearray(good)
        for i in range(4):
            data[offset + i] ^= 0x5A
        if refuses(bytes(data)):
            return bytes(data)
    raise AssertionError("no damage found that the decoder refuses")


def _pil_refuses(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001
        return True
    return False


def variants() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """name -> (file bytes, expected decoded RGB pixels, mean absolute error allowed against them:
    the lossy codec's own loss, 0 for lossless files, which must decode exactly)."""
    px = _pixels(0)
    img = Image.fromarray(px)
    grey = np.asarray(img.convert("L"))
    grey3 = np.repeat(grey[..., None], 3, axis=2)
    rot90 = np.rot90(px, k=-1)  # EXIF orientation 6: rotate 90 degrees clockwise to view
    out: dict[str, tuple[bytes, np.ndarray, int]] = {
        "baseline.jpg": (_save(img, format="JPEG", quality=95), px, 8),
        "progressive.jpeg": (_save(img, format="JPEG", quality=95, progressive=True), px, 8),
        "upper_case.JPG": (_save(img, format="JPEG", quality=95), px, 8),
        "grey.jpg": (_save(img.convert("L"), format="JPEG", quality=95), grey3, 8),
        "cmyk.jpg": (_save(img.convert("CMYK"), format="JPEG", quality=95), px, 8),
        "exif_rotated.jpg": (_save(img, format="JPEG", quality=95, exif=_exif(6)), rot90, 8),
        "exif_upside_down.jpg": (_save(img, format="JPEG", quality=95, exif=_exif(3)), px[::-1, ::-1], 8),
        "café 名前.jpg": (_save(img, format="JPEG", quality=95), px, 8),
        "rgb.png": (_save(img, format="PNG"), px, 0),
        "rgba.png": (_save(Image.fromarray(np.dstack([px, np.full((H, W), 90, np.uint8)]), "RGBA"), format="PNG"),
                     px, 0),
        "grey_alpha.png": (_save(Image.fromarray(np.dstack([grey, grey[::-1]]), "LA"), format="PNG"), grey3, 0),
        "exif_rotated.png": (_save(img, format="PNG", exif=_exif(6)), rot90, 0),
        "image.bmp": (_save(img, format="BMP"), px, 0),
        "image.tiff": (_save(img, format="TIFF"), px, 0),
        "lzw.tif": (_save(img, format="TIFF", compression="tiff_lzw"), px, 0),
        "image.webp": (_save(img, format="WEBP", lossless=True), px, 0),
        "lossy.webp": (_save(img, format="WEBP", quality=90), px, 8),
        "image.ppm": (_save(img, format="PPM"), px, 0),
    }
    # 16-bit grey: must come out as round(v / 257), not clipped white.
    g16 = (np.linspace(0, 65535, W)[None, :] * np.ones((H, 1))).astype(np.uint16)
    g16[:8, :8] = 0
    g8 = np.rint(g16 / 257.0).astype(np.uint8)
    out["grey16.png"] = (_save(Image.fromarray(g16), format="PNG"), np.repeat(g8[..., None], 3, axis=2), 0)
    # 16-bit colour: Pillow keeps the high byte (the file goes to DALI as a converted copy).
    rgb16 = px.astype(np.uint16) * 257 + np.random.default_rng(1).integers(0, 256, px.shape).astype(np.uint16)
    out["rgb16.png"] = (_png16(rgb16), (rgb16 >> 8).astype(np.uint8), 0)
    # Palette images, with and without a transparent entry: the palette colours, alpha dropped.
    pal = img.quantize(64)
    pal_rgb = np.asarray(pal.convert("RGB"))
    out["palette.png"] = (_save(pal, format="PNG"), pal_rgb, 0)
    out["palette_transparent.png"] = (_save(pal, format="PNG", transparency=0), pal_rgb, 0)
    out["palette.bmp"] = (_save(pal, format="BMP"), pal_rgb, 0)
    # TIFF variants DALI's decoder gets wrong or refuses: read through converted copies.
    out["grey_alpha.tiff"] = (_save(Image.fromarray(np.dstack([grey, grey[::-1]]), "LA"), format="TIFF"), grey3, 0)
    bw = img.convert("1")
    out["bilevel.tif"] = (_save(bw, format="TIFF"), np.asarray(bw.convert("RGB")), 0)
    # Data after the end marker (phones' motion photos append a video; some tools pad).
    jpeg = out["baseline.jpg"][0]
    out["trailer.jpg"] = (jpeg + b"\x00\x00ftypmp42" + bytes(range(256)) * 40, px, 8)
    out["trailer.png"] = (out["rgb.png"][0] + b"trailing bytes" * 100, px, 0)
    return out


def bad_files() -> dict[str, bytes]:
    """name -> bytes of files that must be skipped (Pillow refuses them)."""
    img = Image.fromarray(_pixels(1))
    jpeg = _save(img, format="JPEG", quality=90)
    png = _save(img, format="PNG")
    sos = jpeg.find(b"\xff\xda")
    idat = png.find(b"IDAT")
    return {
        "damaged_scan.jpg": _flip_until(jpeg, sos + 40, _pil_refuses),  # Pillow: broken data stream
        "damaged_idat.png": _flip_until(png, idat + 40, _pil_refuses),  # libpng: invalid bit length / data error
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) - 40],
        "empty.jpg": b"",
        "not_an_image.png": b"<html><body>404 Not Found</body></html>\n" * 4,
        "idat_checksum.png": png_with_bad_idat_checksum(),  # Pillow decodes it, libpng (DALI) refuses it
    }


def png_with_bad_idat_checksum(seed: int = 2) -> bytes:
    """A PNG whose pixel data is intact but whose IDAT CRC is wrong: Pillow does not verify it and
    decodes the image, libpng (DALI's decoder) refuses it: a file that fails only inside DALI."""
    data = bytearray(_save(Image.fromarray(_pixels(seed)), format="PNG"))
    idat = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4 : idat])
    data[idat + 4 + length] ^= 0xFF  # first CRC byte
    return bytes(data)


def ignored_files() -> dict[str, bytes]:
    """Entries that are not images of the data set (hidden, AppleDouble, other extensions)."""
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64
    return {
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + b"\x00" * 64,
        "._baseline.jpg": apple_double,
        ".hidden.jpg": b"\xff\xd8\xff",
        "notes.txt": b"photos from the trip\n",
        ".ipynb_checkpoints/baseline-checkpoint.jpg": b"\xff\xd8\xff",
    }


def write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def write_tree(root: Path, per_class: int = 2) -> dict:
    """``root/train/{animals,plants,rocks}`` and ``root/val/{animals,rocks}`` (no 'plants': a train
    class missing from val). Class 'animals' holds every valid variant and every bad file, the
    others ``per_class`` plain JPEGs each, one of them in a nested folder, plus a link to a file
    outside the tree and a dangling link. The val images are byte copies of train images.
    Returns what each split must list, skip and ignore, by path."""
    valid, bad, ignored = variants(), bad_files(), ignored_files()
    train = root / "train"
    write(train / "animals", {n: v[0] for n, v in valid.items()})
    write(train / "animals", bad)
    write(train / "animals", ignored)
    plain = {}
    for c, name in enumerate(("plants", "rocks")):
        for i in range(per_class):
            rel = f"nested/deeper/{i}.jpg" if i == 0 else f"{i}.jpg"
            data = _save(Image.fromarray(_pixels(10 + 10 * c + i)), format="JPEG", quality=90)
            write(train / name, {rel: data})
            plain[f"{name}/{rel}"] = data
    outside = root / "elsewhere.jpg"
    outside.write_bytes(_save(Image.fromarray(_pixels(5)), format="JPEG", quality=90))
    os.symlink(outside, train / "rocks" / "link_to_outside.jpg")
    os.symlink(root / "no-such-file.jpg", train / "rocks" / "dangling_link.jpg")
    # val: copies of train files, so a model labels them as their train class
    val = root / "val"
    write(val / "animals", {"baseline.jpg": valid["baseline.jpg"][0], "damaged_scan.jpg": bad["damaged_scan.jpg"]})
    write(val / "rocks", {"1.jpg": plain["rocks/1.jpg"], "._1.jpg": ignored["._baseline.jpg"]})
    return {
        "classes": ["animals", "plants", "rocks"],
        "train_valid": sorted([str(train / "animals" / n) for n in valid] + [str(train / p) for p in plain]
                              + [str(train / "rocks" / "link_to_outside.jpg")]),
        "train_bad": sorted([str(train / "animals" / n) for n in bad] + [str(train / "rocks" / "dangling_link.jpg")]),
        "val_valid": {str(val / "animals" / "baseline.jpg"): 0, str(val / "rocks" / "1.jpg"): 2},
        "val_bad": [str(val / "animals" / "damaged_scan.jpg")],
    }

"""Per-image checks and the decoder the training loader uses.

A single unreadable image otherwise surfaces minutes into training as a
traceback from inside a DataLoader worker.  These functions turn every such
file into a short reason, cheaply enough to check a whole dataset at startup
(`quick_problem`) or thoroughly on request (`decode_problem`), and make the
loader itself fail with a one-line `DataError` (`load_rgb`).

Every path that turns a file into pixels (torch loader, predict, data check,
DALI's converted copies) goes through `load_rgb`, so they all see the same RGB
for every PIL mode. The mapping follows DALI 2.4's CPU decoder
(fn.decoders.image, output_type=RGB), measured per mode by
tests/test_image_modes.py:
- 1, L, P, RGB, YCbCr, LAB: PIL's convert("RGB"); a palette's transparency
  is ignored (each index keeps its colour).
- CMYK: (255 - C)(255 - K) / 255 rounded down, as DALI computes it (PIL's
  convert rounds to nearest).
- LA, RGBA, PA: alpha dropped, not composited over any background.
- I;16 (any byte order) and I (32-bit integer, read as 16-bit): v * 255 / 65535,
  rounded; PIL's own convert clips these to white.
- F (float): x * 255, rounded, for x in 0..1.
Refused with a one-line DataError: I outside 0..65535 and F outside 0..1 or
not finite (no white level to scale by; clipping would silently flatten the
image), and modes PIL cannot convert to RGB.
EXIF orientation is ignored, as ImageFolder ignores it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from fastft.errors import DataError

# Kept identical to torchvision.datasets.folder.IMG_EXTENSIONS so the scan
# sees exactly the files ImageFolder would load; a test pins the equality.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)

_JPEG_EXTS = (".jpg", ".jpeg")
_PNG_EXTS = (".png",)
_JPEG_END = b"\xff\xd9"
# Zero-length IEND chunk: length, type, CRC.  Every complete PNG ends with it.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_HEAD_BYTES = 16
_SHOWN_BYTES = 8

# (format name, predicate on the first bytes); first match wins.
_SIGNATURES: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("JPEG", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("PNG", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("GIF", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("WebP", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("TIFF", lambda h: h[:4] in (b"II*\x00", b"MM\x00*")),
    ("BMP", lambda h: h[:2] == b"BM"),
    ("PNM", lambda h: len(h) > 2 and h[0:1] == b"P" and h[1:2] in b"123456"
     and h[2:3].isspace()),
)


def _sniff(head: bytes) -> str | None:
    for name, matches in _SIGNATURES:
        if matches(head):
            return name
    return None


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` as it may appear inside a one-line message."""
    text = os.fspath(path)
    # A newline in a file name would split a one-line error in two.
    return text if text.isprintable() else repr(text)


def _unidentified(head: bytes) -> str:
    kind = _sniff(head)
    if kind is None:
        return f"not an image: starts with {head[:_SHOWN_BYTES]!r}"
    return f"corrupt {kind} header (PIL cannot identify the file)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # Exceptions from decoders may span lines; our messages must not.
    return text.splitlines()[0] if text else type(exc).__name__


def _read_problem(path: str | os.PathLike[str], exc: OSError) -> str:
    """Why a file cannot be read at all, in the words every check and loader uses."""
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, FileNotFoundError):
        return "broken symlink (its target does not exist)" if os.path.islink(path) else "no such file"
    return f"cannot read file ({exc.strerror or _first_line(exc)})"


def _extension(path: str | os.PathLike[str]) -> str:
    # os.path is several times cheaper than pathlib here, which matters when
    # the quick check runs on every file at startup.
    return os.path.splitext(os.fspath(path))[1].lower()


def _expected_format(ext: str) -> str | None:
    if ext in _JPEG_EXTS:
        return "JPEG"
    if ext in _PNG_EXTS:
        return "PNG"
    return None


def _magic_problem(ext: str, head: bytes) -> str | None:
    """Reason why `head` cannot be the start of a file with extension `ext`."""
    expected = _expected_format(ext)
    if expected is None:
        return None
    found = _sniff(head)
    if found == expected:
        return None
    if found is None:
        return f"not an image: starts with {head[:_SHOWN_BYTES]!r}"
    return f"{found} data in a {ext} file"


def _read_head_tail(path: str | os.PathLike[str]) -> tuple[int, bytes, bytes]:
    """File size, first bytes and last bytes, from one open()."""
    # Raw os calls: a buffered open() costs several times more than the reads.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEAD_BYTES, 0)
        tail_start = max(size - len(_PNG_END), 0)
        tail = os.pread(fd, size - tail_start, tail_start) if size > _HEAD_BYTES else head
    finally:
        os.close(fd)
    return size, head, tail


def _header_problem(path: Path) -> str | None:
    """PIL header parse only, for formats we have no cheap end check for."""
    try:
        with Image.open(path):
            return None
    except Image.UnidentifiedImageError:
        with open(path, "rb") as f:
            return _unidentified(f.read(_HEAD_BYTES))
    except Exception as exc:  # PIL plugins raise many types on bad headers
        return f"cannot read image header ({_first_line(exc)})"


def quick_problem(path: Path) -> str | None:
    """Cheap check: None if `path` looks like a complete image, else a reason.

    Reads only the first and last few bytes of JPEG/PNG files; a full decode is
    done only for a file whose end marker is missing, because some valid files
    carry trailing bytes after it.
    """
    ext = _extension(path)
    try:
        size, head, tail = _read_head_tail(path)
        if size == 0:
            return "empty file"
        problem = _magic_problem(ext, head)
        if problem is not None:
            return problem
        expected = _expected_format(ext)
        if expected is None:
            return _header_problem(path)
    except OSError as exc:
        return _read_problem(path, exc)
    end = _JPEG_END if expected == "JPEG" else _PNG_END
    if tail.endswith(end):
        return None
    return decode_problem(path)


def decode_problem(path: Path) -> str | None:
    """Thorough check: None if PIL fully decodes `path` and load_rgb can map it, else a reason.

    Leaves ImageFile.LOAD_TRUNCATED_IMAGES alone, so a truncated file is
    reported rather than silently padded with grey.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as exc:
        return _read_problem(path, exc)
    if not head:
        return "empty file"
    problem = _magic_problem(_extension(path), head)
    if problem is not None:
        return problem
    try:
        with Image.open(path) as img:
            img.load()
            # A file that decodes but has no RGB mapping would fail in the loader.
            return unmappable(img)
    except Image.UnidentifiedImageError:
        return _unidentified(head)
    except Image.DecompressionBombError as exc:
        return f"too large to decode ({_first_line(exc)})"
    except Exception as exc:  # corrupt data makes PIL raise nearly anything
        kind = _sniff(head) or "image"
        return f"truncated or corrupt {kind} ({_first_line(exc)})"


class UnmappableImage(ValueError):
    """A decoded image whose mode or values have no sensible 8-bit RGB mapping."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes PIL converts to RGB without fail (CMYK and a palette's transparency get to_rgb's own
# rules first); others are checked by to_rgb.
_PLAIN_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_WHITE_16 = 65535
_EXIF_ORIENTATION = 0x0112


def _scaled_16bit(a: np.ndarray) -> np.ndarray:
    """uint8 levels round(v * 255 / 65535) of integer samples v in 0..65535; UnmappableImage outside."""
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0 or hi > _WHITE_16:
        raise UnmappableImage(f"integer image with values {lo}..{hi}, outside the 16-bit range "
                              f"0..{_WHITE_16}; save it as 8- or 16-bit")
    # (v * 255 + 32767) // 65535 is v * 255 / 65535 rounded: 65535 is odd, so no ties.
    return ((a.astype(np.uint32) * 255 + _WHITE_16 // 2) // _WHITE_16).astype(np.uint8)


def _scaled_float(a: np.ndarray) -> np.ndarray:
    """uint8 levels round(x * 255) of float samples x in 0..1; UnmappableImage otherwise."""
    if not np.isfinite(a).all():
        raise UnmappableImage("float image with NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0 or hi > 1:
        raise UnmappableImage(f"float image with values {lo:g}..{hi:g}, outside 0..1; "
                              f"save it as 8- or 16-bit")
    return np.floor(a.astype(np.float64) * 255 + 0.5).astype(np.uint8)  # DALI rounds halves up


def _cmyk_levels(a: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of (H, W, 4) CMYK levels: floor((255 - C)(255 - K) / 255), DALI's
    formula exactly; PIL's convert rounds instead, one level apart on half the pixels."""
    ink = 255 - a.astype(np.uint16)
    return (ink[..., :3] * ink[..., 3:] // 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB by the module's table of modes.

    Raises UnmappableImage (one line) for an I or F image outside the range it can
    be scaled from, or a mode PIL cannot convert to RGB.
    """
    if img.mode == "P" and "transparency" in img.info:
        # Colours kept, transparency ignored, as DALI does; via RGBA, because PIL warns
        # on every direct P -> RGB conversion of a palette with an alpha table.
        return img.convert("RGBA").convert("RGB")
    if img.mode == "CMYK":
        return Image.fromarray(_cmyk_levels(np.asarray(img)))
    if img.mode in _PLAIN_MODES:
        return img.convert("RGB")
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        gray = _scaled_16bit(np.asarray(img))
    elif img.mode == "F":
        gray = _scaled_float(np.asarray(img))
    else:
        try:
            return img.convert("RGB")
        except ValueError as exc:
            raise UnmappableImage(f"image mode {img.mode} has no RGB mapping ({_first_line(exc)})") from exc
    return Image.fromarray(gray).convert("RGB")  # (H, W) uint8: mode L


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` as an 8-bit RGB PIL image, (H, W, 3) uint8 levels.

    Every mode maps as the module docstring's table says. Raises a one-line
    DataError naming the file for a file PIL cannot decode or a mode that has
    no sensible RGB mapping, with decode_problem's reason ("empty file", "not an
    image: starts with ...", "truncated or corrupt PNG (...)"), so the loaders,
    predict and `data check` name a bad file the same way.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except UnmappableImage as exc:
        raise DataError(f"{shown_path(path)}: cannot map image to RGB ({exc})") from exc
    except Exception as exc:  # any decode failure is the file's fault
        # The error path only: a second look at the file gives the reason the checks give.
        reason = decode_problem(Path(path)) or f"cannot decode image ({_first_line(exc)})"
        raise DataError(f"{shown_path(path)}: {reason}") from exc


def unmappable(img: Image.Image) -> str | None:
    """Why a decoded `img` has no RGB mapping, or None; cheap for the common modes."""
    if img.mode in _PLAIN_MODES:
        return None
    try:
        to_rgb(img)
    except UnmappableImage as exc:
        return f"cannot map image to RGB ({exc})"
    return None


def mode_note(img: Image.Image) -> str | None:
    """How load_rgb changes an opened `img` beyond a plain 8-bit RGB decode, for
    `fastft data check`'s report; None for 1/L/P/RGB without EXIF rotation."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        note = "16-bit grayscale, scaled by 255/65535"
    elif mode == "I":
        note = "integer grayscale, read as 16-bit (scaled by 255/65535)"
    elif mode == "F":
        note = "float grayscale, 0..1 scaled to 0..255"
    elif mode == "P" and "transparency" in img.info:
        note = "palette with transparency, transparency ignored"
    elif mode in ("LA", "RGBA", "PA"):
        note = f"{mode} with alpha, alpha dropped (not composited)"
    elif mode not in ("1", "L", "P", "RGB"):
        note = f"{mode}, converted to RGB"
    else:
        note = None
    orientation = img.getexif().get(_EXIF_ORIENTATION)
    if orientation not in (None, 0, 1):
        turned = f"EXIF orientation {orientation} ignored: read as stored, as ImageFolder does"
        note = f"{note}; {turned}" if note else turned
    return note


def image_note(path: Path) -> str | None:
    """mode_note of the file at `path` (header only), or None if it does not open."""
    try:
        with Image.open(path) as img:
            return mode_note(img)
    except Exception:  # a bad file is decode_problem's business
        return None


# (PIL format, mode) pairs whose DALI 2.4 CPU decode equals load_rgb within one
# level, measured by tests/test_image_modes.py. DALI gets every other file as an
# RGB PNG copy: it fails on 1-bit and 32-bit integer TIFFs, reads LA and LAB
# TIFFs wrongly, clips floats and ignores a PNM maxval other than 255/65535.
_DALI_AGREES = {
    "JPEG": frozenset({"L", "RGB", "CMYK"}),
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}),
    "BMP": frozenset({"1", "L", "P", "RGB"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
    "PPM": frozenset({"1", "L", "RGB", "I"}),
    "TIFF": frozenset({"L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B"}),
}


def dali_agrees(img: Image.Image) -> bool:
    """Whether DALI's decoder gives an opened `img` the pixels load_rgb gives it."""
    if img.mode not in _DALI_AGREES.get(img.format or "", ()):
        return False
    # PIL scales a PNM maxval other than 255 (65535) to full range, DALI does not;
    # PIL decodes only those with its "ppm" codec.
    return img.format != "PPM" or all(tile.codec_name == "raw" for tile in img.tile)


def needs_dali_copy(path: Path) -> bool:
    """True when DALI would decode `path` differently from load_rgb (header only).

    JPEG and PNG files are not opened: every mode Pillow opens them in is in
    _DALI_AGREES (16-bit PNG opens as I;16, or as RGB/RGBA for colour).
    """
    if _extension(path) in _JPEG_EXTS + _PNG_EXTS:
        return False
    try:
        with Image.open(path) as img:
            return not dali_agrees(img)
    except Exception:  # a bad file is the bad-file check's business
        return False


_COPY_VERSION = "1"  # bump when load_rgb's mapping changes, so old copies are not reused


def rgb_copy(path: Path, cache_dir: Path) -> Path:
    """An RGB PNG of load_rgb(path) under cache_dir/converted, made once per file version.

    Keyed by the absolute path, size and mtime, so an edited file gets a new copy.
    Written to a temporary name and renamed, so processes converting the same file
    at once never see half a PNG. Raises DataError as load_rgb does.
    """
    st = os.stat(path)
    key = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{_COPY_VERSION}"
    target = cache_dir / "converted" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.png"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.stem}.{os.getpid()}.tmp")
    load_rgb(path).save(partial, "PNG")
    os.replace(partial, target)
    return target

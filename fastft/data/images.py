"""Per-image checks and the decoder the training loader uses.

A single unreadable image otherwise surfaces minutes into training as a
traceback from inside a DataLoader worker.  These functions turn every such
file into a short reason, cheaply enough to check a whole dataset at startup
(`quick_problem`) or thoroughly on request (`decode_problem`), and make the
loader itself fail with a one-line `DataError` (`load_rgb`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
        return f"cannot read file ({exc.strerror or _first_line(exc)})"
    end = _JPEG_END if expected == "JPEG" else _PNG_END
    if tail.endswith(end):
        return None
    return decode_problem(path)


def decode_problem(path: Path) -> str | None:
    """Thorough check: None if PIL fully decodes `path`, else a reason.

    Leaves ImageFile.LOAD_TRUNCATED_IMAGES alone, so a truncated file is
    reported rather than silently padded with grey.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as exc:
        return f"cannot read file ({exc.strerror or _first_line(exc)})"
    if not head:
        return "empty file"
    problem = _magic_problem(_extension(path), head)
    if problem is not None:
        return problem
    try:
        with Image.open(path) as img:
            img.load()
    except Image.UnidentifiedImageError:
        return _unidentified(head)
    except Exception as exc:  # corrupt data makes PIL raise nearly anything
        kind = _sniff(head) or "image"
        return f"truncated or corrupt {kind} ({_first_line(exc)})"
    return None


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` as an RGB image, or raise a one-line DataError.

    Grayscale, palette and CMYK files are converted so every sample has the
    three channels the model expects.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # any decode failure is the file's fault
        raise DataError(f"{shown_path(path)}: cannot decode image ({_first_line(exc)})") from exc

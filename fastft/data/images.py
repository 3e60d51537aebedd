"""Per-image checks and the decoder the training loader uses.

A single unreadable image otherwise surfaces minutes into training as a
traceback from inside a DataLoader worker.  These functions turn every such
file into a short reason, cheaply enough to check a whole dataset at startup
(`quick_problem`) or thoroughly on request (`decode_problem`), and make the
loader itself fail with a one-line `DataError` (`load_rgb`).

Every path that turns a file into pixels (torch loader, cached loader, predict,
data check, DALI's converted copies) goes through `load_rgb`, so they all see the
same RGB for every mode (the table in rgb_modes.py), and refuse the same files
with the same words: a format, JPEG coding or size no loader reads is named from
its headers (formats.py) before anything decodes, and the content, not the name,
says what a file is (a PNG, AVIF or HEIC saved as .jpg is read as what it is).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fastft.data.decoders import missing_decoder, reader_of, torchcodec_image
from fastft.data.formats import HEAD_BYTES, JpegFrame, jpeg_frame, jpeg_refusal, png_size, size_problem, sniff
from fastft.data.jpeg_end import completed
from fastft.data.rgb_modes import UnmappableImage, mode_note, to_rgb, unmappable
from fastft.errors import DataError
from fastft.safe_write import shown as shown_path  # one rule for a name inside a one-line message

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
_SHOWN_BYTES = 8
_NAMED_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PNM", ".pgm": "PNM",
                  ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WebP"}
_FOREIGN = ("AVIF", "HEIC")  # formats Pillow may not read: decoders.reader_of says who does

# fastft's own pixel limit (formats.size_problem, checked below before any pixel decodes)
# replaces Pillow's process-wide one, which refuses at 2 x 89.5 megapixels and warns from
# 89.5: one rule for every loader, predict and `data check`, DALI included.
Image.MAX_IMAGE_PIXELS = None



def _unidentified(head: bytes) -> str:
    kind = sniff(head)
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


@dataclass(frozen=True)
class _Peek:
    """A file's size, first and last bytes, its format by content and, for a JPEG, its frame."""
    size: int
    head: bytes
    tail: bytes
    kind: str | None
    frame: JpegFrame | None


def _peek(path: str | os.PathLike[str]) -> _Peek:
    """One open(): raw os calls, several times cheaper than a buffered open() here."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_BYTES, 0)
        tail_start = max(size - len(_PNG_END), 0)
        tail = os.pread(fd, size - tail_start, tail_start)
        kind = sniff(head)
        frame = jpeg_frame(lambda n, at: os.pread(fd, n, at)) if kind == "JPEG" else None
    finally:
        os.close(fd)
    return _Peek(size, head, tail, kind, frame)


def _content_problem(path, peek: _Peek) -> str | None:
    """Why a file cannot be an image we read, from its first bytes and headers alone. The
    content decides the format, not the name: a PNG, AVIF or HEIC saved as .jpg is read as
    what it is (phones and web exports do this; DALI and Pillow sniff content too)."""
    if peek.size == 0:
        return "empty file"
    ext = _extension(path)
    if peek.kind is None:
        # No signature we know: under a JPEG or PNG name, not an image; under another name
        # (.tif, .bmp, ... with odd bytes) Pillow's header parse decides.
        known = ext in _JPEG_EXTS + _PNG_EXTS
        return f"not an image: starts with {peek.head[:_SHOWN_BYTES]!r}" if known else None
    if peek.kind in _FOREIGN and reader_of(peek.kind) is None:
        return missing_decoder(peek.kind)
    if peek.frame is not None:
        return jpeg_refusal(peek.frame) or size_problem(peek.frame.width, peek.frame.height)
    size = png_size(peek.head) if peek.kind == "PNG" else None
    return size_problem(*size) if size else None


def _header_problem(path: Path) -> str | None:
    """PIL header parse only, for formats we have no cheap end check for."""
    try:
        with Image.open(path) as img:
            return size_problem(*img.size)
    except Image.UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        if sniff(head) in _FOREIGN:  # read by torchcodec (_content_problem checked there is one)
            return None
        return _unidentified(head)
    except Exception as exc:  # PIL plugins raise many types on bad headers
        return f"cannot read image header ({_first_line(exc)})"


def quick_problem(path: Path) -> str | None:
    """Cheap check: None if `path` looks like a complete image, else a reason.

    Reads only the first and last few bytes (and a JPEG's segment headers up to its frame)
    of JPEG and PNG files; a full decode is done only for a file whose end marker is missing,
    because some valid files carry trailing bytes after it.
    """
    try:
        peek = _peek(path)
        problem = _content_problem(path, peek)
        if problem is not None or peek.kind not in ("JPEG", "PNG"):
            return problem or _header_problem(path)
    except OSError as exc:
        return _read_problem(path, exc)
    end = _JPEG_END if peek.kind == "JPEG" else _PNG_END
    if peek.tail.endswith(end):
        return None
    return decode_problem(path)


def decode_problem(path: Path) -> str | None:
    """Thorough check: None if `path` fully decodes and load_rgb can map it, else a reason.

    Leaves ImageFile.LOAD_TRUNCATED_IMAGES alone, so a truncated file is
    reported rather than silently padded with grey.
    """
    try:
        peek = _peek(path)
    except OSError as exc:
        return _read_problem(path, exc)
    problem = _content_problem(path, peek)
    if problem is not None:
        return problem
    try:
        with _opened(path, peek.kind) as img:
            problem = size_problem(*img.size)  # formats without a header check above
            if problem is None:
                img.load()
            # A file that decodes but has no RGB mapping would fail in the loader.
            return problem or unmappable(img)
    except Image.UnidentifiedImageError:
        return _unidentified(peek.head)
    except Exception as exc:  # corrupt data makes PIL raise nearly anything
        if _lacks_only_eoi(path, peek):  # load_rgb reads it whole (JPEG modes all map to RGB)
            return None
        return f"truncated or corrupt {peek.kind or 'image'} ({_first_line(exc)})"


def _lacks_only_eoi(path, peek: _Peek) -> bool:
    """Whether `path` is a JPEG that holds every pixel but lacks its end marker (jpeg_end.py)."""
    if peek.frame is None or peek.tail.endswith(_JPEG_END) or size_problem(peek.frame.width, peek.frame.height):
        return False  # not a JPEG, one with EOI, or one over the pixel limit (refused before decoding)
    return completed(path) is not None


def _opened(path, kind: str | None) -> Image.Image:
    """The file as a PIL image, header read, pixels not yet: Pillow's own, or for AVIF and HEIC
    Pillow after decoders.reader_of registered a plugin, else torchcodec's decode. Raises what
    Pillow raises (UnidentifiedImageError for a file it does not know) or torchcodec raises."""
    if kind in _FOREIGN:
        reader = reader_of(kind)
        if reader == "torchcodec":
            return torchcodec_image(path, kind)
        if reader is None:
            raise Image.UnidentifiedImageError(missing_decoder(kind))
    return Image.open(path)


def load_rgb(path: str | Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` as an 8-bit RGB PIL image, (H, W, 3) uint8 levels.

    `at_least` (width, height), for a caller that shrinks the image to that size anyway: a
    JPEG then decodes at the smallest of libjpeg's DCT scales, 1/8, 1/4, 1/2 or 1, that keeps
    both sides at least that large (Image.draft: ceil(side / scale) px), several times faster
    than a full decode and in a fraction of its memory; other formats decode in full.
    A JPEG that lacks only its end marker is read whole, as the complete file would be
    (jpeg_end.py). Every mode maps as the module docstring's table says. Raises a one-line
    DataError naming the file for a file PIL cannot decode or a mode that has
    no sensible RGB mapping, with decode_problem's reason ("empty file", "not an
    image: starts with ...", "truncated or corrupt PNG (...)"), so the loaders,
    predict and `data check` name a bad file the same way.
    """
    try:
        return _rgb(open_image(path), at_least)
    except UnmappableImage as exc:
        raise DataError(f"{shown_path(path)}: cannot map image to RGB ({exc})") from exc
    except Exception as exc:  # any decode failure is the file's fault
        # The error path only: a JPEG that lacks only its end marker is read with it appended
        # (jpeg_end.py); for any other file a second look gives the reason the checks give.
        whole = None if isinstance(exc, _OverLimit) else completed(path)
        if whole is None:
            reason = decode_problem(Path(path)) or f"cannot decode image ({_first_line(exc)})"
            raise DataError(f"{shown_path(path)}: {reason}") from exc
    return _rgb(Image.open(io.BytesIO(whole)), at_least)


class _OverLimit(ValueError):
    """An image over formats.size_problem's limit, found before its pixels decode."""


def _rgb(opened: Image.Image, at_least: tuple[int, int] | None) -> Image.Image:
    """load_rgb's decode of an opened image; closes it."""
    with opened as img:
        if size_problem(*img.size) is not None:  # decode_problem names it
            raise _OverLimit(img.size)
        if at_least is not None:
            img.draft(img.mode, at_least)  # JPEG only; a no-op for every other format
        img.load()
        return to_rgb(img)


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """`path` as a PIL image, its header read (its pixels too where torchcodec decodes it):
    Image.open, or for an AVIF or HEIC file Pillow does not know, _opened's readers. Raises
    what they raise; load_rgb and decode_problem turn that into the one-line reason."""
    try:
        return Image.open(path)
    except Image.UnidentifiedImageError:
        with open(path, "rb") as f:
            kind = sniff(f.read(HEAD_BYTES))
        if kind not in _FOREIGN:
            raise
        return _opened(path, kind)


def whole_jpeg_frame(path: str | os.PathLike[str]) -> JpegFrame | None:
    """The frame header of `path` if its content is a JPEG that ends with its end marker, else
    None: the JPEGs a batch decoder (nvJPEG) may take; load_rgb reads one that lacks EOI."""
    peek = _peek(path)
    return peek.frame if peek.tail.endswith(_JPEG_END) else None


def image_note(path: Path) -> str | None:
    """mode_note of the file at `path` (header only, but for AVIF/HEIC that torchcodec
    decodes), with its format where its name says another, and for a JPEG that lacks only its
    end marker, that; None if it does not open."""
    try:
        peek = _peek(path)
        with _opened(path, peek.kind) as img:
            note = mode_note(img)
        notes = [_renamed_note(path, peek.kind), note]
        if peek.kind == "JPEG" and _lacks_only_eoi(path, peek):
            notes.append("JPEG without its end marker (EOI), every pixel present: read whole")
    except Exception:  # a bad file is decode_problem's business
        return None
    return "; ".join(n for n in notes if n) or None


def _renamed_note(path: Path, kind: str | None) -> str | None:
    named = _NAMED_FORMATS.get(_extension(path))
    if kind is not None and named is not None and kind != named:
        return f"{kind} data behind a {_extension(path)} name, read as {kind}"
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
    """True when DALI would decode `path` differently from load_rgb, or not at all (headers only,
    but for a JPEG without EOI at its end).

    By content, whatever the name: a lossless JPEG (DALI 2.4 fails on the grey ones, and its
    GPU decoder takes no lossless JPEG), a JPEG that lacks only its end marker (DALI stops at it:
    "Premature end of JPEG data"), AVIF and HEIC get copies; other JPEGs and PNGs do not, and
    are not opened: every mode Pillow opens them in is in _DALI_AGREES (16-bit PNG opens as
    I;16, or as RGB/RGBA for colour).
    """
    try:
        peek = _peek(path)
        if peek.kind in ("JPEG", "PNG", *_FOREIGN):
            return peek.kind in _FOREIGN or (peek.frame is not None and peek.frame.lossless) or (
                _lacks_only_eoi(path, peek))
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
    # surrogateescape: a name that is not UTF-8 (its bytes decoded so by os.fsdecode) keys too.
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    target = cache_dir / "converted" / f"{digest}.png"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.stem}.{os.getpid()}.tmp")
    load_rgb(path).save(partial, "PNG")
    os.replace(partial, target)
    return target


def utf8_name(path: Path) -> bool:
    """Whether `path` is valid UTF-8. DALI's readers take file names as UTF-8 strings only, while a
    POSIX name is any bytes (Python carries the others as surrogate escapes, os.fsdecode)."""
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def utf8_link(path: Path, cache_dir: Path) -> Path:
    """A symbolic link under cache_dir/converted, named by a hash of `path`'s bytes, to `path`:
    DALI reads the original file's bytes through a UTF-8 name (pixels exactly as the file's own).

    Made once; a link made at the same time by another process is replaced by an equal one.
    Raises OSError where the folder cannot be written.
    """
    raw = os.fsencode(os.path.abspath(path))
    suffix = path.suffix.lower() if utf8_name(Path(path.suffix)) else ""
    link = cache_dir / "converted" / f"{hashlib.sha256(raw).hexdigest()[:32]}.link{suffix}"
    if link.is_symlink() and os.fsencode(os.readlink(link)) == raw:
        return link
    link.parent.mkdir(parents=True, exist_ok=True)
    partial = link.with_name(f"{link.name}.{os.getpid()}.tmp")
    os.symlink(raw, os.fsencode(partial))
    os.replace(partial, link)
    return link

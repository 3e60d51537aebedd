"""What an image file is, from its bytes alone: its format (whatever its name says), a JPEG's
coding and sample precision, an image's size from a PNG or JPEG header, and fastft's one limit
on pixels per image. Nothing here decodes pixels, so the scan at startup can ask every file.

Sources: JPEG markers and frame headers, ITU-T T.81 B.1 and table B.1; PNG IHDR, PNG spec 11.2.2;
ISO base media file format 'ftyp' brands (ISO/IEC 14496-12 4.3): AVIF 'avif'/'avis'
(AV1 Image File Format 1.1), HEIF/HEIC 'heic', 'heix', 'heim', 'heis', 'hevc', 'hevx', 'mif1',
'msf1' (ISO/IEC 23008-12), the brands torchcodec's decode_image also sniffs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

HEAD_BYTES = 64  # enough for every signature below, a PNG's IHDR and an 'ftyp' box's brands

_AVIF_BRANDS = (b"avif", b"avis")
_HEIC_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _isobmff(head: bytes, brands: tuple[bytes, ...]) -> bool:
    if head[4:8] != b"ftyp":
        return False
    size = int.from_bytes(head[:4], "big")
    listed = head[8: min(max(size, 16), len(head))]  # major brand, minor version, compatible brands
    return any(listed[i: i + 4] in brands for i in range(0, len(listed) - 3, 4))


# (format name, predicate on the first bytes); first match wins (AVIF before HEIF: an AVIF file
# may list the generic 'mif1' brand too).
_SIGNATURES: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("JPEG", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("PNG", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("GIF", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("WebP", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("TIFF", lambda h: h[:4] in (b"II*\x00", b"MM\x00*")),
    ("BMP", lambda h: h[:2] == b"BM"),
    ("PNM", lambda h: len(h) > 2 and h[0:1] == b"P" and h[1:2] in b"123456"
     and h[2:3].isspace()),
    ("AVIF", lambda h: _isobmff(h, _AVIF_BRANDS)),
    ("HEIC", lambda h: _isobmff(h, _HEIC_BRANDS)),
)


def sniff(head: bytes) -> str | None:
    """The format of a file starting with `head` (HEAD_BYTES of it): "JPEG", "PNG", "GIF",
    "WebP", "TIFF", "BMP", "PNM", "AVIF", "HEIC", or None for none of these."""
    for name, matches in _SIGNATURES:
        if matches(head):
            return name
    return None


# --- JPEG frames ---------------------------------------------------------------------------------

_SOF_CODINGS = {  # T.81 table B.1: SOF marker -> coding; the entropy coder follows
    0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless",
    0xC5: "hierarchical sequential", 0xC6: "hierarchical progressive", 0xC7: "hierarchical lossless",
    0xC9: "arithmetic-coded sequential", 0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless", 0xCD: "hierarchical arithmetic-coded sequential",
    0xCE: "hierarchical arithmetic-coded progressive", 0xCF: "hierarchical arithmetic-coded lossless",
}
# Markers without a length field (T.81 B.1.1.3): TEM, RSTn; SOI/EOI end the walk below.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG's frame header (its SOF segment)."""
    marker: int      # 0xC0..0xCF, less DHT (C4), JPG (C8) and DAC (CC)
    precision: int   # bits per sample: 8 or 12 for DCT codings, 2..16 for lossless
    height: int      # px; 0 = defined later by a DNL marker (T.81 B.2.5), which we refuse
    width: int       # px
    components: int  # 1 grey, 3 colour, 4 CMYK/YCCK

    @property
    def coding(self) -> str:
        return _SOF_CODINGS[self.marker]

    @property
    def lossless(self) -> bool:
        return self.marker in (0xC3, 0xC7, 0xCB, 0xCF)

    @property
    def name(self) -> str:
        """E.g. "12-bit extended sequential JPEG (SOF1)"."""
        return f"{self.precision}-bit {self.coding} JPEG (SOF{self.marker - 0xC0})"


def jpeg_frame(read: Callable[[int, int], bytes]) -> JpegFrame | None:
    """The frame header of the JPEG that read(size, offset) reads from, or None when its
    markers end or break before one. Walks the segments (a few small reads: the APPn segments
    before the frame, EXIF and ICC profiles, are skipped by their lengths, not read)."""
    offset = 2  # after SOI
    while True:
        marker = read(2, offset)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte (T.81 B.1.1.2)
            offset += 1
            continue
        if kind in _STANDALONE:
            offset += 2
            continue
        if kind in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or a scan before any frame
            return None
        length = read(2, offset + 2)
        if len(length) < 2:
            return None
        if kind in _SOF_CODINGS:
            body = read(6, offset + 4)
            if len(body) < 6:
                return None
            precision, height, width, components = struct.unpack(">BHHB", body)
            return JpegFrame(kind, precision, height, width, components)
        offset += 2 + int.from_bytes(length, "big")


def jpeg_refusal(frame: JpegFrame) -> str | None:
    """Why no loader reads a JPEG of this frame (libjpeg-turbo 3 in Pillow, torchvision,
    torchcodec and DALI all take 8-bit samples only), naming what it is; None if it is read."""
    if 0xC5 <= frame.marker <= 0xC7 or frame.marker >= 0xCD:
        return f"{frame.name}: hierarchical JPEG is not supported by Pillow, torchvision or DALI; " \
               f"convert it to an 8-bit JPEG or a PNG"
    if frame.precision != 8:
        return f"{frame.name}: fastft reads 8-bit JPEGs only (Pillow, torchvision and DALI decode no " \
               f"other precision); convert it to a 16-bit PNG or an 8-bit JPEG with a tool that reads it"
    if frame.components not in (1, 3, 4):
        return f"{frame.name} with {frame.components} colour components: only 1 (grey), 3 (colour) " \
               f"and 4 (CMYK) are images"
    if frame.height == 0:
        return f"{frame.name} with its height in a DNL marker, which Pillow does not read"
    return None


def png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk that starts every PNG, or None if it is not there."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


# --- the pixel limit -----------------------------------------------------------------------------

MAX_PIXELS_ENV = "FASTFT_MAX_IMAGE_PIXELS"
# 2^28 px, 268 megapixels: 805 MB once decoded to RGB, in each process that decodes it at once.
# Above every camera's images (200-megapixel phone sensors: 16,320 x 12,240), above Pillow's own
# limit (2 x 89.5 megapixels), which fastft replaces so that every loader, predict and
# `data check` keep one rule: DALI has no limit of its own.
DEFAULT_MAX_PIXELS = 2 ** 28


def max_pixels(env: Mapping[str, str] = os.environ) -> int | None:
    """Pixels one image may have: $FASTFT_MAX_IMAGE_PIXELS (an integer or a float such as 5e8;
    0 = no limit), else DEFAULT_MAX_PIXELS. Read on every call, so DataLoader workers and
    torchrun's processes see the value their parent was started with."""
    text = env.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = -1
    if value < 0:
        from fastft.errors import ConfigError
        raise ConfigError(f"{MAX_PIXELS_ENV}={text!r} is not a number of pixels (0 = no limit)")
    return value or None


def size_problem(width: int, height: int, env: Mapping[str, str] = os.environ) -> str | None:
    """Why an image of width x height px is not decoded (over max_pixels), or None."""
    limit, pixels = max_pixels(env), width * height
    if limit is None or pixels <= limit:
        return None
    size = f"{width}x{height} px" + (f" ({pixels / 1e6:.1f} megapixels)" if pixels >= 10 ** 5 else "")
    allowed = f"{limit / 1e6:.1f} megapixels" if limit >= 10 ** 5 else f"{limit} px"
    return (f"{size} is over fastft's limit of {allowed} per image, a guard against decompression "
            f"bombs; to read it, set {MAX_PIXELS_ENV}={pixels} (0 = no limit), or downscale the file")

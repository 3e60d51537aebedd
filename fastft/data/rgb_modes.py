"""How a decoded PIL image of any mode becomes 8-bit RGB, the same for every loader.

images.load_rgb applies it for every loader. The mapping follows DALI 2.4's CPU decoder
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

import numpy as np
from PIL import Image


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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

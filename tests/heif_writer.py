"""Real HEIC files for the tests, written by the system's libheif (its HEVC encoder, x265)
through ctypes, where there is one; Pillow cannot write HEIC and pillow-heif is not a test
dependency. API: libheif's heif.h (heif_context_*, heif_image_*), enum values from it."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import numpy as np

_HEVC, _RGB, _INTERLEAVED_RGB, _INTERLEAVED = 1, 1, 10, 10  # heif_compression_, colorspace_, chroma_, channel_


class _Error(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("subcode", ctypes.c_int), ("message", ctypes.c_char_p)]


def _library():
    name = ctypes.util.find_library("heif")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    for fn in ("heif_context_get_encoder_for_format", "heif_image_create", "heif_image_add_plane",
               "heif_context_encode_image", "heif_context_write_to_file", "heif_encoder_set_lossy_quality"):
        getattr(lib, fn).restype = _Error
    lib.heif_context_alloc.restype = ctypes.c_void_p
    lib.heif_image_get_plane.restype = ctypes.POINTER(ctypes.c_uint8)
    return lib


def _check(error: _Error) -> None:
    if error.code:
        raise OSError(f"libheif: {error.message.decode()}")


def write_heic(path: Path, rgb: np.ndarray) -> Path:
    """uint8 (H, W, 3) `rgb` as a lossy (quality 95) HEIC at `path`, whatever its name. Raises
    OSError where libheif or its HEVC encoder is missing."""
    lib = _library()
    if lib is None:
        raise OSError("libheif is not installed")
    if hasattr(lib, "heif_init"):  # libheif >= 1.13 loads its plugins here
        lib.heif_init(None)
    h, w, _ = rgb.shape
    ctx, enc, img = ctypes.c_void_p(lib.heif_context_alloc()), ctypes.c_void_p(), ctypes.c_void_p()
    try:
        _check(lib.heif_context_get_encoder_for_format(ctx, _HEVC, ctypes.byref(enc)))
        _check(lib.heif_encoder_set_lossy_quality(enc, 95))
        _check(lib.heif_image_create(w, h, _RGB, _INTERLEAVED_RGB, ctypes.byref(img)))
        _check(lib.heif_image_add_plane(img, _INTERLEAVED, w, h, 8))
        stride = ctypes.c_int()
        plane = ctypes.addressof(lib.heif_image_get_plane(img, _INTERLEAVED, ctypes.byref(stride)).contents)
        for y in range(h):
            ctypes.memmove(plane + y * stride.value, np.ascontiguousarray(rgb[y]).tobytes(), w * 3)
        _check(lib.heif_context_encode_image(ctx, img, enc, None, None))
        _check(lib.heif_context_write_to_file(ctx, str(path).encode()))
    finally:
        for release, handle in ((lib.heif_image_release, img), (lib.heif_encoder_release, enc),
                                (lib.heif_context_free, ctx)):
            if handle.value:
                release(handle)
    return path


def heic_writable(tmp: Path) -> bool:
    """Whether write_heic works here (libheif with an HEVC encoder)."""
    try:
        write_heic(tmp / "probe.heic", np.zeros((8, 8, 3), np.uint8))
    except OSError:
        return False
    return True

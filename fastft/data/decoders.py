"""Decoders beyond Pillow, each imported only when a file needs it.

- Batched JPEG decoding for the cached loader's first pass on CUDA (nvJPEG): torchcodec's
  decode_jpeg where torchcodec is installed (pip install 'fastft[torchcodec]'), else
  torchvision.io.decode_jpeg, whose image decoders torchvision 0.29 deprecates in torchcodec's
  favour; the GPU machine's torchvision 0.26 has no torchcodec, so that path stays.
- HEIC, which Pillow does not read: through pillow-heif's Pillow plugin when it is installed,
  then every path reads it as Pillow reads any image (the mode table of images.py applies).
  torchcodec's decode_heic needs libheif, which its wheel does not bundle: used when it loads.
  AVIF: Pillow 11.3+ reads it itself (features.check("avif")); torchcodec otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

# What to install for a format no installed decoder reads, said in the error.
INSTALL_HINTS = {"HEIC": "pip install pillow-heif", "AVIF": "pip install -U pillow (11.3 or later reads AVIF)"}


def torchcodec_decoders():
    """torchcodec.decoders, or None when torchcodec is not installed or does not load."""
    try:
        from torchcodec import decoders
    except Exception:  # ImportError, or the OSError/RuntimeError of a build for another torch
        return None
    return decoders


# --- batched JPEG decoding (the cached loader on CUDA) ------------------------------------------

@dataclass(frozen=True)
class JpegBatchDecoder:
    """decode(encoded, device): uint8 (3, H, W) RGB per 1-D uint8 CPU tensor of JPEG bytes, in
    one call; raises RuntimeError or ValueError when any of them fails."""
    name: str  # "torchcodec" or "torchvision", for the log
    decode: Callable


def jpeg_batch_decoder(torchcodec: bool = True) -> JpegBatchDecoder:
    """torchcodec's batched decode_jpeg where it loads (and `torchcodec`), else torchvision's."""
    tc = torchcodec_decoders() if torchcodec else None
    if tc is not None:
        return JpegBatchDecoder("torchcodec", lambda encoded, device: tc.decode_jpeg(
            list(encoded), mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg
    return JpegBatchDecoder("torchvision", lambda encoded, device: decode_jpeg(
        list(encoded), mode=ImageReadMode.RGB, device=device))


def decode_jpegs(paths: list, device, decoder: JpegBatchDecoder) -> list:
    """uint8 (3, H, W) per JPEG from one batched call; None where the decoder refuses a file
    (the batch is retried file by file to find which)."""
    import torch
    # bytearray: writable, so torch.frombuffer shares it without a warning.
    encoded = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    try:
        return list(decoder.decode(encoded, device))
    except (RuntimeError, ValueError):
        out = []
        for data in encoded:
            try:
                out.append(decoder.decode([data], device)[0])
            except (RuntimeError, ValueError):
                out.append(None)
        return out


# --- formats Pillow may not read ----------------------------------------------------------------

def _pillow_reads(kind: str) -> bool:
    """Whether Pillow reads `kind`: AVIF with its own plugin (Pillow 11.3+ built with libavif),
    HEIC once pillow-heif's opener is registered, which this does where pillow-heif is installed
    (registering again is harmless)."""
    if kind == "AVIF":
        return features.check("avif")
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _torchcodec_reads(kind: str) -> bool:
    tc = torchcodec_decoders()
    if tc is None:
        return False
    if kind == "AVIF":
        return True
    try:  # HEIC: torchcodec loads libheif from the system, if there is one
        from torchcodec._core.ops import get_decode_heic
        get_decode_heic()
    except Exception:  # no libheif: torchcodec raises at this point
        return False
    return True


def reader_of(kind: str) -> str | None:
    """Which installed decoder reads `kind` ("AVIF" or "HEIC"): "Pillow" (AVIF by its own
    plugin, HEIC through pillow-heif's, registered here), "torchcodec", or None."""
    if _pillow_reads(kind):
        return "Pillow"
    return "torchcodec" if _torchcodec_reads(kind) else None


def torchcodec_image(path, kind: str) -> Image.Image:
    """An AVIF or HEIC file decoded by torchcodec, as a PIL RGB image (its first frame)."""
    tc = torchcodec_decoders()
    decode = tc.decode_avif if kind == "AVIF" else tc.decode_heic
    chw = decode(os.fspath(path), mode="RGB")
    if chw.dim() == 4:  # an image sequence: the first frame, as Pillow opens it
        chw = chw[0]
    return Image.fromarray(np.ascontiguousarray(chw.permute(1, 2, 0).numpy()))


def missing_decoder(kind: str) -> str:
    """The reason given for a file in a format no installed decoder reads."""
    return f"{kind} image, which no installed decoder reads: {INSTALL_HINTS[kind]}"

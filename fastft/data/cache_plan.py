"""The cached loader's plan (`--loader cached`): every image's size from its header, before
any pixel decodes, against the memory budget, so a set that does not fit stops up front; and
which JPEGs its first pass on CUDA hands to nvJPEG. See cached_loader.py for the loader."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastft.data.decode_ahead import mem_available
from fastft.data.formats import size_problem
from fastft.data.images import decode_problem, open_image, shown_path, whole_jpeg_frame
from fastft.data.layout import DatasetLayout
from fastft.errors import ConfigError, DataError

CACHE_SHARE = 0.5        # of free device memory (CUDA) or of MemAvailable (CPU) for --cache-gb 0
MB, GB = 2 ** 20, 2 ** 30
_NVJPEG_MODES = ("RGB", "L")  # JPEG colour modes decode_jpeg(mode=RGB) converts as PIL does
# SOF0-2, 8-bit Huffman-coded: baseline, extended and progressive, what nvJPEG decodes; lossless,
# arithmetic-coded and hierarchical JPEGs go to load_rgb without a failed batch first.
_NVJPEG_CODINGS = (0xC0, 0xC1, 0xC2)


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding it."""
    height: int
    width: int
    nvjpeg: bool  # a JPEG in a mode nvJPEG decodes to PIL's RGB


def read_header(path: Path) -> Header:
    """Image size from the header only (PIL reads no pixels; torchcodec, for an AVIF or HEIC
    file Pillow does not read, decodes it). Raises DataError naming the file, for a file that
    does not open or is over the pixel limit (formats.size_problem), as data check does."""
    try:
        with open_image(path) as img:
            height, width, mode = img.height, img.width, img.mode
        too_big = size_problem(width, height)
        if too_big is not None:
            raise ValueError(too_big)
        frame = whole_jpeg_frame(path)  # a JPEG without EOI goes to load_rgb, which reads it
    except Exception as exc:  # PIL raises many types on a bad header
        # The reason `fastft data check` gives for the same file, so every path says it alike.
        reason = decode_problem(path) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{shown_path(path)}: {reason}") from exc
    return Header(height, width, frame is not None and frame.marker in _NVJPEG_CODINGS and mode in _NVJPEG_MODES)


def capped(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) with the longest side at most max_side px, aspect kept; max_side 0 = unchanged."""
    longest = max(height, width)
    if not max_side or longest <= max_side:
        return height, width
    return max(1, round(height * max_side / longest)), max(1, round(width * max_side / longest))


def _budget(device: torch.device, cache_gb: float, processes_here: int) -> tuple[int, str]:
    """(bytes, where the number comes from): --cache-gb, else CACHE_SHARE of what is free."""
    if cache_gb > 0:
        return int(cache_gb * GB), f"--cache-gb {cache_gb:g}"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return int(CACHE_SHARE * free), f"{CACHE_SHARE:.0%} of {free / MB:.0f} MB free on {device}"
    free = mem_available()
    share = f"{CACHE_SHARE:.0%} of {free / MB:.0f} MB MemAvailable"
    if processes_here > 1:  # processes on one machine share its RAM, each with a full copy
        return int(CACHE_SHARE * free / processes_here), f"{share} / {processes_here} processes"
    return int(CACHE_SHARE * free), share


@dataclass(frozen=True)
class CachePlan:
    """Sizes decided from headers, before any pixel is decoded."""
    train_headers: tuple[Header, ...]
    train_shapes: tuple[tuple[int, int], ...]  # (h, w) as stored, after --cache-max-side
    test_headers: tuple[Header, ...]           # this process's test shard
    train_bytes: int
    test_bytes: int
    budget_bytes: int
    budget_source: str

    @property
    def need_mb(self) -> float:
        return (self.train_bytes + self.test_bytes) / MB

    @property
    def fits(self) -> bool:
        return self.train_bytes + self.test_bytes <= self.budget_bytes

    def too_big(self, max_side: int) -> ConfigError:
        side = f"capped at {max_side} px" if max_side else "at full size"
        return ConfigError(
            f"--loader cached needs {self.need_mb:.0f} MB ({len(self.train_shapes)} train images {side} + "
            f"{len(self.test_headers)} test tensors) but its budget is {self.budget_bytes / MB:.0f} MB "
            f"({self.budget_source}); raise --cache-gb or lower --cache-max-side")


def plan_cache(layout: DatasetLayout, image_size: int, rt, cache_gb: float = 0.0,
               max_side: int = 0, processes_here: int = 1) -> CachePlan:
    """The cache's size from headers, against its budget (bytes: train uint8 HWC pixels plus the
    kept test tensors, 3 x size^2 in the AMP dtype each)."""
    train = tuple(read_header(p) for p, _ in layout.files["train"])
    test = tuple(read_header(p) for p, _ in layout.files["test"][rt.rank:: rt.world_size])
    shapes = tuple(capped(h.height, h.width, max_side) for h in train)
    item = torch.empty((), dtype=rt.amp_dtype or torch.float32).element_size()
    budget, source = _budget(rt.device, cache_gb, processes_here)
    return CachePlan(train, shapes, test, sum(3 * h * w for h, w in shapes),
                     len(test) * 3 * image_size ** 2 * item, budget, source)

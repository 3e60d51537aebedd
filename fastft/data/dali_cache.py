"""How much GPU memory DALI's mixed decoder may keep decoded images in (--decode-cache).

A small dataset fits in GPU memory once decoded; with the cache on, epochs
after the first copy decoded images instead of decoding JPEGs again. The CPU
decoder has no such cache. The sizes come from file sizes and a sampled
decoded/encoded ratio, and are checked against the free GPU memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from PIL import Image

_CACHE_SHARE = {"auto": 0.25, "on": 0.5}  # of free GPU memory the cache may take
_CACHE_HEADROOM = 1.2                      # x the decoded-size estimate, which samples 64 files
_MB = 2 ** 20


@dataclass(frozen=True)
class CachePlan:
    train_mb: int  # DALI cache_size of each decoder, MB; 0 = no cache
    test_mb: int
    reason: str


def _pixels(path) -> int:
    with Image.open(path) as img:  # header only
        return img.width * img.height


def decoded_mb(paths: list, sample: int = 64) -> float:
    """Decoded RGB size of `paths`, MB: total file bytes x the decoded/encoded ratio of a sample."""
    if not paths:
        return 0.0
    picked = paths[:: max(1, len(paths) // sample)][:sample]
    ratio = sum(3 * _pixels(p) for p in picked) / max(1, sum(os.path.getsize(p) for p in picked))
    return ratio * sum(os.path.getsize(p) for p in paths) / _MB


def _free_gpu_mb(device: torch.device) -> float:  # the one CUDA call, made only for a CUDA device
    return torch.cuda.mem_get_info(device)[0] / _MB


def plan_cache(mode: str, device: torch.device, train: list, test: list,
               free_mb: float | None = None) -> CachePlan:
    """Cache sizes for --decode-cache auto|on|off; `test` is this rank's test files.
    Train shuffles globally, so each rank's train cache must hold the whole train split."""
    if mode == "off":
        return CachePlan(0, 0, "off (--decode-cache off)")
    if device.type != "cuda":
        asked = " (--decode-cache on applies to GPU decoding only)" if mode == "on" else ""
        return CachePlan(0, 0, f"off: DALI's CPU decoder has no cache, every epoch decodes its JPEGs{asked}")
    free = _free_gpu_mb(device) if free_mb is None else free_mb
    train_mb, test_mb = decoded_mb(train), decoded_mb(test)
    need, budget = _CACHE_HEADROOM * (train_mb + test_mb), _CACHE_SHARE[mode] * free
    share = f"{_CACHE_SHARE[mode]:.0%} of {free:.0f} MB free GPU memory"
    if mode == "auto" and need > budget:
        return CachePlan(0, 0, f"off: ~{need:.0f} MB of decoded images would exceed {share}")
    scale = min(1.0, budget / max(need, 1e-9))
    capped = f", capped at {share}: part of each epoch still decodes" if scale < 1 else ""
    return CachePlan(math.ceil(_CACHE_HEADROOM * train_mb * scale), math.ceil(_CACHE_HEADROOM * test_mb * scale),
                     f"on ({mode}): ~{train_mb + test_mb:.0f} MB of decoded images kept in GPU memory "
                     f"after their first decode{capped}")

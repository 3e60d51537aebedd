"""How much GPU memory DALI's mixed decoder may keep decoded images in (--decode-cache).

A small dataset fits in GPU memory once decoded; with the cache on, epochs
after the first copy decoded images instead of decoding JPEGs again. The CPU
decoder has no such cache. The size comes from file sizes and a sampled
decoded/encoded ratio, and is checked against the free GPU memory.

One cache per process: DALI keeps a single decoder cache per device and process
(ImageCacheFactory), shared by every pipeline alive in it, and refuses a decoder
whose cache arguments differ from the first one's ("Cache for device N was
already initialized with other parameters"). So a plan holds ONE size, for the
train split plus this process's test shard, and every decoder gets the same
arguments (`decoder_args`). Caching in both pipelines rather than train only:
the cache is keyed by file name, so test images share it, and the per-epoch
evaluation then skips its JPEG decodes too. Several loaders in one process
(bench/loaders.py) plan once and pass the same plan to each.
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
    mb: int      # DALI cache_size of every decoder in this process, MB; 0 = no cache
    reason: str

    def decoder_args(self) -> dict:
        """fn.decoders.image's cache arguments, identical for every pipeline in the process."""
        if not self.mb:
            return {}
        return dict(cache_size=self.mb, cache_type="threshold", cache_threshold=0)


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
    """The process's one cache size for --decode-cache auto|on|off; `test` is this rank's
    test files, `free_mb` the free GPU memory (None: asked of CUDA, for a CUDA device only).
    Train shuffles globally, so each rank's cache must hold the whole train split. With
    `auto` the size depends on the files only (free memory just says whether it fits), so
    loaders planned at different times in one process still agree on it."""
    if mode == "off":
        return CachePlan(0, "off (--decode-cache off)")
    if device.type != "cuda":
        asked = " (--decode-cache on applies to GPU decoding only)" if mode == "on" else ""
        return CachePlan(0, f"off: DALI's CPU decoder has no cache, every epoch decodes its JPEGs{asked}")
    free = _free_gpu_mb(device) if free_mb is None else free_mb
    images_mb = decoded_mb(train) + decoded_mb(test)
    need, budget = _CACHE_HEADROOM * images_mb, _CACHE_SHARE[mode] * free
    share = f"{_CACHE_SHARE[mode]:.0%} of {free:.0f} MB free GPU memory"
    if mode == "auto" and need > budget:
        return CachePlan(0, f"off: ~{need:.0f} MB of decoded images would exceed {share}")
    capped = f", capped at {share}: part of each epoch still decodes" if need > budget else ""
    return CachePlan(math.ceil(min(need, budget)),
                     f"on ({mode}): one {math.ceil(min(need, budget))} MB cache for train and test, "
                     f"~{images_mb:.0f} MB of decoded images kept in GPU memory after their first "
                     f"decode{capped}")

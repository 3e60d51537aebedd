"""Random resized crop boxes and flips for a whole batch at once, drawn per image.

The rule is torchvision's `RandomResizedCrop.get_params` (torchvision 0.29,
transforms/transforms.py), the chapter's training crop: up to 10 tries of an
area in [0.08, 1] of the image and a log-uniform aspect ratio in [3/4, 4/3];
the first try that fits gives the box, placed uniformly; if none fits, the
centre crop of the whole image clamped to the aspect range. Flips are p = 0.5,
as `RandomHorizontalFlip`.

Every random number comes from a counter-based generator keyed by
(seed, epoch, image index) only, as the torch loader seeds each image
(torch_loader.sample_seed): a box does not depend on the batch it is drawn in,
on the number of processes, or on how many epochs ran before in this process,
so resume is exact. The generator is splitmix64 (Steele, Lea and Flood,
"Fast splittable pseudorandom number generators", OOPSLA 2014), computed in
vectorised numpy over the batch: no per-image generator object, no device.
"""

from __future__ import annotations

import math

import numpy as np

from fastft.data.torch_loader import sample_seed

SCALE = (0.08, 1.0)           # fraction of the image's area
RATIO = (3 / 4, 4 / 3)        # width / height
TRIES = 10                    # torchvision's attempts before the centre fallback
FLIP_P = 0.5

# Per try: area, aspect, top, left; then one number for the flip.
_DRAWS_PER_TRY = 4
_DRAWS = TRIES * _DRAWS_PER_TRY + 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2^64 / golden ratio, odd


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function: a bijection of uint64 that scatters every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices: np.ndarray, count: int) -> np.ndarray:
    """float64 (len(indices), count) in [0, 1): the first `count` numbers of each image's stream.

    Stream k of image i is splitmix64 seeded with mix(sample_seed(seed, epoch, i)).
    """
    # sample_seed(seed, epoch, i) == (sample_seed(seed, epoch, 0) + i) mod 2^63, vectorised.
    base = np.uint64(sample_seed(seed, epoch, 0))
    with np.errstate(over="ignore"):
        keys = (base + np.asarray(indices, dtype=np.uint64)) & np.uint64(2**63 - 1)
    counters = np.arange(1, count + 1, dtype=np.uint64) * _GAMMA
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2^64 by design
        bits = _mix(_mix(keys)[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # top 53 bits: exact doubles


def _fallback(heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) of get_params' central crop: the whole image clamped to the aspect range."""
    in_ratio = widths / heights
    narrow, wide = in_ratio < min(RATIO), in_ratio > max(RATIO)
    h = np.where(narrow, np.rint(widths / min(RATIO)), heights).astype(np.int64)
    w = np.where(wide, np.rint(heights * max(RATIO)), widths).astype(np.int64)
    return h, w


def draw_boxes(seed: int, epoch: int, indices, heights, widths) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes and flips of images `indices` (of sizes heights x widths px) in `epoch`.

    Returns boxes int64 (B, 4) = (top, left, height, width) in source px, the order of
    get_params and of torchvision's resized_crop, and flips bool (B,). Pure numpy on the
    host; the caller moves the result to the device in one copy.
    """
    indices = np.asarray(indices, dtype=np.int64)
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    u = uniforms(seed, epoch, indices, _DRAWS)
    tries = u[:, :-1].reshape(len(indices), TRIES, _DRAWS_PER_TRY)
    area = (H * W)[:, None] * (SCALE[0] + (SCALE[1] - SCALE[0]) * tries[..., 0])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    # Python's round() and np.rint both round half to even.
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = np.argmax(fits, axis=1)  # the first try that fits (0 when none does)
    rows = np.arange(len(indices))
    found = fits[rows, first]
    h, w = h[rows, first], w[rows, first]
    # randint(0, n) as floor(u * n): the bias is below n / 2^53.
    top = np.floor(tries[rows, first, 2] * (H - h + 1)).astype(np.int64)
    left = np.floor(tries[rows, first, 3] * (W - w + 1)).astype(np.int64)
    fh, fw = _fallback(H, W)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.where(found, top, (H - fh) // 2)
    left = np.where(found, left, (W - fw) // 2)
    return np.stack([top, left, h, w], axis=1), u[:, -1] < FLIP_P

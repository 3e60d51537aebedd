"""A built-in, hotdog-like two-class dataset written as real JPEG files.

The chapter's hotdog zip needs the network; tests, benchmarks and offline users
still need something that exercises the same decode path (web-like sizes,
mixed JPEG quality, the odd grayscale or progressive file) and that a
ResNet-18 can actually learn. Hotdogs are reddish-brown capsules on tan buns;
everything else avoids that colour, so colour and shape both carry the label.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fastft.data.staging import is_vacant, move_into_place
from fastft.errors import DataError

CLASS_NAMES = ("hotdog", "not-hotdog")

Colour = tuple[int, int, int]
Point = tuple[float, float]

# Split ids only seed the per-image RNG; changing them changes every image.
_SPLIT_IDS = {"train": 1, "test": 2}
# A fixed schedule rather than a coin flip, so that even a 10-image split holds
# one grayscale and one progressive file for the decode path to meet.
_GRAY_EVERY, _GRAY_AT = 33, 5
_PROGRESSIVE_EVERY, _PROGRESSIVE_AT = 20, 2


def _is_sausage_like(c: Colour) -> bool:
    """True for the reddish-brown band reserved for sausages, with a wide margin
    so that no background, clutter or other food comes near it."""
    r, g, b = c
    return r >= 90 and g <= 140 and b <= 120 and r - g >= 35 and r - b >= 50


def _random_colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> Colour:
    """A random colour outside the sausage band, so that band stays a hotdog cue."""
    while True:
        c = tuple(int(v) for v in rng.integers(lo, hi, size=3))
        if not _is_sausage_like(c):  # type: ignore[arg-type]
            return c  # type: ignore[return-value]


def _jitter(rng: np.random.Generator, c: Colour, amount: int) -> Colour:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)  # type: ignore[return-value]


def _capsule(cx: float, cy: float, length: float, thick: float, angle: float) -> list[Point]:
    """Outline of a rounded capsule (a sausage) rotated by `angle` radians."""
    r = thick / 2
    half = max(length / 2 - r, 0.0)
    pts: list[Point] = []
    for end, start_deg in ((half, -90), (-half, 90)):
        for k in range(13):
            t = math.radians(start_deg + 15 * k)
            pts.append((end + r * math.cos(t), r * math.sin(t)))
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[Point]:
    """An irregular roundish polygon: a lettuce leaf, a plum, a stain."""
    n = int(rng.integers(7, 14))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * rng.uniform(0.65, 1.15, n)
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(120, 501))
    long = int(round(short * rng.uniform(4 / 3, 16 / 9)))
    return (long, short) if rng.random() < 0.65 else (short, long)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Flat colour, a table edge, or a gradient, with soft uneven lighting."""
    w, h = size
    top, bottom = _random_colour(rng), _random_colour(rng)
    style = rng.integers(0, 3)
    if style == 0:
        bottom = _jitter(rng, top, 20)
    # Built on a coarse grid and upsampled by PIL: full-size numpy maths was
    # most of the generation time, and a background needs no fine detail.
    gh, gw = 32, 8
    ramp = np.linspace(0.0, 1.0, gh, dtype=np.float32)[:, None, None]
    if style == 1:  # a table meets a wall
        ramp = (ramp > rng.uniform(0.3, 0.8)).astype(np.float32)
    rows = (1 - ramp) * np.array(top, np.float32) + ramp * np.array(bottom, np.float32)
    light = Image.fromarray(rng.integers(0, 256, (4, 3), dtype=np.uint8)).resize((gw, gh), Image.BILINEAR)
    arr = rows + (np.asarray(light, np.float32)[:, :, None] - 128) * rng.uniform(0.05, 0.2)
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    # Smooth at quarter size, then blocky 4x: invisible under noise and JPEG,
    # and 5x cheaper than one smooth full-size upsample.
    return small.resize((max(1, w // 4), max(1, h // 4)), Image.BILINEAR).resize((w, h), Image.NEAREST)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
    """Small unrelated shapes, so the class cue is not 'anything on a plain field'."""
    w, h = size
    short = min(w, h)
    for _ in range(int(rng.integers(2, 10))):
        s = short * rng.uniform(0.03, 0.12)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        colour = _random_colour(rng)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x - s, y - s * rng.uniform(0.4, 1), x + s, y + s), fill=colour)
        elif kind == 1:
            draw.rectangle((x - s, y - s / 2, x + s, y + s / 2), fill=colour)
        else:
            dx, dy = rng.uniform(-3 * s, 3 * s, 2)
            draw.line((x, y, x + dx, y + dy), fill=colour, width=max(1, int(s / 4)))


def _draw_hotdog(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
    w, h = size
    length = w * rng.uniform(0.55, 0.9)
    thick = min(length * rng.uniform(0.2, 0.3), h * 0.4)
    angle = math.radians(rng.uniform(-30, 30))
    reach_x = abs(length / 2 * math.cos(angle)) + thick
    reach_y = abs(length / 2 * math.sin(angle)) + thick
    cx = rng.uniform(min(reach_x, w / 2), max(w - reach_x, w / 2))
    cy = rng.uniform(min(reach_y, h / 2), max(h - reach_y, h / 2))
    # The bun sits a little below the sausage, wider, a little shorter.
    off = thick * rng.uniform(0.0, 0.25)
    bx, by = cx - off * math.sin(angle), cy + off * math.cos(angle)
    bun = _jitter(rng, (225, 180, 125), 18)
    draw.polygon(_capsule(bx, by, length * rng.uniform(0.82, 0.97), thick * rng.uniform(1.7, 2.1), angle), fill=bun)
    sausage = (int(rng.integers(150, 201)), int(rng.integers(55, 96)), int(rng.integers(35, 66)))
    # A darker rim drawn as a slightly larger capsule underneath, not via
    # polygon(width=), which older Pillow lacks.
    rim = max(2.0, thick * 0.12)
    draw.polygon(_capsule(cx, cy, length + rim, thick + rim, angle), fill=tuple(v * 2 // 3 for v in sausage))
    draw.polygon(_capsule(cx, cy, length, thick, angle), fill=sausage)
    # A highlight stripe keeps the sausage from being a flat colour patch.
    hi = tuple(min(255, v + 30) for v in sausage)
    hx, hy = cx + thick * 0.2 * math.sin(angle), cy - thick * 0.2 * math.cos(angle)
    draw.polygon(_capsule(hx, hy, length * 0.8, thick * 0.2, angle), fill=hi)
    if rng.random() < 0.6:
        _draw_mustard(rng, draw, (cx, cy), length, thick, angle)


def _draw_mustard(rng: np.random.Generator, draw: ImageDraw.ImageDraw, centre: Point,
                  length: float, thick: float, angle: float) -> None:
    cx, cy = centre
    n = int(rng.integers(5, 12))
    ca, sa = math.cos(angle), math.sin(angle)
    pts = []
    for k in range(n + 1):
        x = (k / n - 0.5) * length * 0.75
        y = (thick * 0.3) * (1 if k % 2 else -1)
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    draw.line(pts, fill=_jitter(rng, (240, 205, 30), 15), width=max(2, int(thick * 0.12)), joint="curve")


def _draw_other(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
    """One not-hotdog subject: plate, pizza, salad, blob, box or a non-sausage capsule."""
    w, h = size
    r = min(w, h) * rng.uniform(0.2, 0.42)
    cx, cy = rng.uniform(r * 0.8, w - r * 0.8), rng.uniform(r * 0.8, h - r * 0.8)
    box = (cx - r, cy - r * rng.uniform(0.7, 1.0), cx + r, cy + r)
    kind = int(rng.integers(0, 6))
    if kind == 0:  # plate with food
        draw.ellipse(box, fill=_jitter(rng, (235, 235, 230), 15), outline=_jitter(rng, (190, 190, 195), 20),
                     width=max(2, int(r * 0.08)))
        draw.polygon(_blob(rng, cx, cy, r * 0.5), fill=_random_colour(rng))
    elif kind == 1:  # pizza: crust, cheese, dark toppings
        draw.ellipse(box, fill=_jitter(rng, (215, 165, 80), 12))
        inner = (box[0] + r * 0.1, box[1] + r * 0.1, box[2] - r * 0.1, box[3] - r * 0.1)
        draw.ellipse(inner, fill=_jitter(rng, (245, 205, 95), 10))
        for _ in range(int(rng.integers(4, 10))):
            a, d, s = rng.uniform(0, 2 * math.pi), rng.uniform(0, r * 0.65), r * rng.uniform(0.06, 0.12)
            x, y = cx + d * math.cos(a), cy + d * math.sin(a)
            draw.ellipse((x - s, y - s, x + s, y + s), fill=_jitter(rng, (50, 90, 40), 25))
    elif kind == 2:  # salad: a bowl of green leaves
        draw.ellipse(box, fill=_random_colour(rng, 150, 256))
        for _ in range(int(rng.integers(6, 14))):
            x, y = cx + rng.uniform(-0.55, 0.55) * r, cy + rng.uniform(-0.45, 0.45) * r
            green = (int(rng.integers(40, 130)), int(rng.integers(130, 220)), int(rng.integers(30, 110)))
            draw.polygon(_blob(rng, x, y, r * rng.uniform(0.2, 0.35)), fill=green)
    elif kind == 3:  # blue or purple blob
        colour = (int(rng.integers(40, 150)), int(rng.integers(20, 110)), int(rng.integers(140, 240)))
        draw.polygon(_blob(rng, cx, cy, r), fill=colour)
    elif kind == 4:  # box of any non-sausage colour
        half_w, half_h, a = r, r * rng.uniform(0.4, 0.9), rng.uniform(0, math.pi)
        corners = [(sx * half_w, sy * half_h) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        ca, sa = math.cos(a), math.sin(a)
        draw.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners], fill=_random_colour(rng))
    else:  # elongated but wrong colour (cucumber, banana): shape alone is not enough
        colour = (int(rng.integers(60, 240)), int(rng.integers(150, 230)), int(rng.integers(20, 90)))
        draw.polygon(_capsule(cx, cy, r * 2, r * rng.uniform(0.3, 0.5), math.radians(rng.uniform(-30, 30))),
                     fill=colour)


def _render(seed: int, split: str, index: int, hotdog: bool) -> tuple[Image.Image, int, bool]:
    """Draw one image; return it with its JPEG quality and progressive flag."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    size = _image_size(rng)
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _clutter(rng, draw, size)
    if hotdog:
        _draw_hotdog(rng, draw, size)
    else:
        for _ in range(int(rng.integers(1, 3))):
            _draw_other(rng, draw, size)
    # Sensor-like noise, blended in C: uniform bytes at a few percent give a
    # noise std of about 2-7 grey levels at a fraction of numpy's cost; 2x2
    # grain halves the random bytes needed.
    grain = ((size[0] + 1) // 2, (size[1] + 1) // 2)
    noise = Image.frombytes("RGB", grain, rng.bytes(grain[0] * grain[1] * 3)).resize(size, Image.NEAREST)
    img = Image.blend(img, noise, float(rng.uniform(0.03, 0.1)))
    if index % _GRAY_EVERY == _GRAY_AT:
        img = img.convert("L")
    quality = int(rng.integers(40, 96))
    return img, quality, index % _PROGRESSIVE_EVERY == _PROGRESSIVE_AT


def _write_split(tmp: Path, split: str, n: int, seed: int, bar: tqdm) -> None:
    n_hotdog = (n + 1) // 2  # an odd count gives hotdog the extra image
    for name in CLASS_NAMES:
        (tmp / split / name).mkdir(parents=True)
    for i in range(n):
        hotdog = i < n_hotdog
        img, quality, progressive = _render(seed, split, i, hotdog)
        path = tmp / split / CLASS_NAMES[0 if hotdog else 1] / f"{i:05d}.jpg"
        img.save(path, "JPEG", quality=quality, progressive=progressive)
        bar.update(1)


def write_synthetic(root: Path, n_train: int = 2000, n_test: int = 800, seed: int = 0,
                    progress: bool = True) -> Path:
    """Write the synthetic dataset to `root` (ImageFolder layout) and return `root`.

    The same arguments always give byte-identical files. The images are drawn in
    a sibling temp folder that is renamed into place at the end, so a `root`
    that exists is complete.
    """
    root = Path(root)
    if n_train < 2 or n_test < 2:
        raise DataError(f"synthetic dataset needs at least 2 train and 2 test images, got {n_train}/{n_test}")
    if seed < 0:
        raise DataError(f"synthetic dataset seed must be >= 0, got {seed}")
    if not is_vacant(root):
        raise DataError(f"refusing to write the synthetic dataset into {root}: it exists and is not empty")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    except OSError as e:
        raise DataError(f"cannot write the synthetic dataset to {root} ({e})") from e
    try:
        with tqdm(total=n_train + n_test, desc="synthetic", unit="img",
                  disable=None if progress else True) as bar:
            _write_split(tmp, "train", n_train, seed, bar)
            _write_split(tmp, "test", n_test, seed, bar)
        move_into_place(tmp, root)
    except OSError as e:
        raise DataError(f"cannot write the synthetic dataset to {root} ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def synthetic_root(cache_dir: Path, n_train: int = 2000, n_test: int = 800, seed: int = 0) -> Path:
    """Where cached_synthetic keeps that dataset (made or not)."""
    return Path(cache_dir) / f"synthetic-s{seed}-{n_train}-{n_test}"


def cached_synthetic(cache_dir: Path, n_train: int = 2000, n_test: int = 800, seed: int = 0) -> Path:
    """Return the synthetic dataset under `cache_dir`, generating it the first time."""
    root = synthetic_root(cache_dir, n_train, n_test, seed)
    if root.is_dir() and any(root.iterdir()):
        return root
    try:
        return write_synthetic(root, n_train, n_test, seed)
    except DataError:
        # Another process may have finished the same dataset first; its rename
        # was atomic, so a complete copy is now there.
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
        raise

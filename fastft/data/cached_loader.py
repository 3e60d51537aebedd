"""The cached data path (`--loader cached`): decode every image once, keep it on the device,
and make every batch after that with one fused crop-resize-flip-normalise call.

First pass (at construction, with a progress bar on the main process):
- train images are decoded once into one packed uint8 buffer on the device
  (fastft_kernels.PackedImages), optionally shrunk so their longest side is at
  most --cache-max-side px (aspect kept, antialiased; on the CPU a JPEG far
  larger decodes at a DCT scale still twice the cap, load_rgb's at_least);
- this process's test images go through the chapter's eval transform
  (Resize([r, r]), CenterCrop(size), normalise) once, and the resulting tensors
  are KEPT, in the AMP dtype and channels_last: evaluation is then a slice.
- On CUDA, 8-bit Huffman-coded RGB or grey JPEGs decode in batches with nvJPEG
  (decoders.jpeg_batch_decoder: torchcodec's decode_jpeg, else torchvision's);
  everything else (PNG, CMYK, lossless, other formats, a file nvJPEG refuses)
  decodes on the CPU with images.load_rgb, the decoder every loader uses, and the
  log says how many. On a CPU, load_rgb (PIL) runs in a thread pool, and the test
  transform is exactly the torch loader's (PIL resize).

Later epochs: the boxes and flips of a whole epoch are drawn on the host
(crops.draw_boxes: RandomResizedCrop's rule, per image from (seed, epoch, index))
and copied to the device once; each step is then one
fastft_kernels.resized_crop_normalize call (Triton on CUDA, torch on a CPU), with
no host-device sync.

Memory: the size is known from image headers before anything decodes, so a set
that does not fit the budget (--cache-gb, default a share of free device memory)
stops up front. Each process keeps EVERY train image, because one global shuffle
per epoch can hand any image to any process: fine for sets of a few thousand.

DDP and order: the train order is DistributedSampler's (the same permutation on
every rank from (seed, epoch), padded to a multiple of the world size, rank r
takes every world-th index), so one process with batch 32 sees the images that
4 processes with batch 8 see together, each with the same crop. The ragged last
batch is dropped when compiling (one shape per step) or when it holds fewer than
`min_batch` images (too few for BatchNorm, see data.MIN_BN_VALUES), kept otherwise. Evaluation
is a strided shard: every test image counted exactly once, no padding.

Resume: batches depend on (seed, epoch) only, so there is no loader state.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from tqdm import tqdm

# Imported from here by the loader's callers and tests: the plan is part of this loader's API.
from fastft.data.cache_plan import MB, CachePlan, Header, capped, plan_cache, read_header  # noqa: F401
from fastft.data.crops import draw_boxes
from fastft.data.decoders import decode_jpegs, jpeg_batch_decoder
from fastft.data.images import load_rgb, shown_path
from fastft.data.layout import DatasetLayout
from fastft.data.transforms import DEFAULT_PREPROCESSING, Preprocessing, eval_transform, interpolation_mode
from fastft.errors import DataError

_GPU_BATCH = 64          # files per batched nvJPEG call
# Resizes that are not PIL's (the torch loader's) to within a grey level, as bilinear is. Measured on
# the synthetic set (48 images, 224 px): train crops in the kernel's rule vs PIL on the same boxes.
_INEXACT = {"bicubic": "cached: bicubic by torch's rule, columns first; PIL (the torch loader) sometimes "
                       "resizes rows first: a few edge pixels up to 7 grey levels apart, mean as bilinear's",
            "nearest": "cached: nearest may take the neighbouring pixel where PIL's sample point falls on "
                       "a pixel edge"}


class _Batches:
    """One pass over a split: len() is batches on this process."""

    def __init__(self, make: Callable[[], Iterator], length: int):
        self.make, self.length = make, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.make()


class CachedLoaders:
    """Train and test batches made on rt.device from images decoded once; see the module doc."""

    name = "cached"
    # True: on a CPU, crop batch k+1 on a worker thread during step k (_one_ahead). Off by default:
    # the step's OpenMP team already uses every core, so the worker steals from it; on a shared
    # 2-core machine (load 3-5) no gain was measurable. bench/job_ceiling.py --crop-ahead compares.
    crop_ahead = False

    def __init__(self, layout: DatasetLayout, image_size: int, batch_per_rank: int, rt, seed: int, *,
                 plan: CachePlan, max_side: int = 0, drop_ragged: bool = False, progress: bool = False,
                 threads: int = 0, min_batch: int = 1, preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
                 ahead=None):
        """`plan`: from plan_cache, for the same layout and runtime. `preprocessing`: the model's
        resize, mean, std and interpolation (taken at image_size), ResNet-18's by default.
        `ahead`: a collected data.decode_ahead.DecodeAhead, whose full-size images are taken
        instead of decoding them again (on a CPU). Raises ConfigError when it does not fit,
        DataError naming a file that does not decode."""
        if not plan.fits:
            raise plan.too_big(max_side)
        self.classes: Sequence[str] = layout.classes
        self.rt, self.size, self.batch, self.seed, self.plan = rt, image_size, batch_per_rank, seed, plan
        self.prep = preprocessing.at_size(image_size)
        self.max_side, self.threads = max_side, threads or os.cpu_count() or 1
        self.train_size, self.test_size = len(layout.files["train"]), len(layout.files["test"])
        self.sampler = DistributedSampler(range(self.train_size), num_replicas=rt.world_size, rank=rt.rank,
                                          shuffle=True, seed=seed, drop_last=False)
        shard = len(self.sampler)
        ragged = shard % batch_per_rank
        self.ragged_reason = "one shape for torch.compile" if drop_ragged else \
            f"fewer than {min_batch} images: too few for BatchNorm's batch statistics at this image size"
        # Never drop the only batch.
        self.drop = (drop_ragged or 0 < ragged < min_batch) and shard >= batch_per_rank
        self.steps = shard // batch_per_rank if self.drop else math.ceil(shard / batch_per_rank)
        self.dtype = rt.amp_dtype or torch.float32
        self._jpeg_decoder = None
        self.ahead = ahead if rt.device.type == "cpu" else None  # CUDA decodes with nvJPEG
        self._decode_all(layout, progress)

    # --- the first pass ---------------------------------------------------------------------
    def _decode_all(self, layout: DatasetLayout, progress: bool) -> None:
        from fastft_kernels import PackedImages
        device, started = self.rt.device, time.perf_counter()
        train, test = layout.files["train"], layout.files["test"][self.rt.rank:: self.rt.world_size]
        shapes = self.plan.train_shapes
        sizes = np.array([3 * h * w for h, w in shapes], dtype=np.int64)
        offsets = np.cumsum(sizes) - sizes
        data = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=device)
        self.test_x = torch.empty(len(test), self.size, self.size, 3, dtype=self.dtype,
                                  device=device).permute(0, 3, 1, 2)  # channels_last
        self.cpu_decoded = 0

        headers = self.plan.train_headers

        def store(i: int, hwc: torch.Tensor) -> None:
            h, w = shapes[i]
            data[offsets[i]: offsets[i] + sizes[i]].view(h, w, 3).copy_(_fit(hwc, h, w, headers[i], train[i][0]))

        def draft(i: int) -> tuple[int, int] | None:
            """A capped JPEG decodes at a DCT scale still twice the cap, as Pillow's thumbnail
            does (reducing_gap 2), so the antialiased resize to the cap does the rest."""
            h, w = shapes[i]
            return (2 * w, 2 * h) if (h, w) != (headers[i].height, headers[i].width) else None

        with tqdm(total=len(train) + len(test), desc="decoding once", unit="img", leave=False,
                  disable=None if progress else True, dynamic_ncols=True) as bar:
            self._decode_split(train, headers, store, bar, draft)
            self._decode_test(test, lambda i, x: self.test_x[i].copy_(x), bar)
        self.images = PackedImages(data, torch.as_tensor(offsets, device=device),
                                   torch.tensor([h for h, _ in shapes], dtype=torch.int32, device=device),
                                   torch.tensor([w for _, w in shapes], dtype=torch.int32, device=device))
        self.labels = torch.tensor([label for _, label in train], dtype=torch.int64, device=device)
        self.test_y = torch.tensor([label for _, label in test], dtype=torch.int64, device=device)
        self._hw = np.array(shapes, dtype=np.int64).reshape(-1, 2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the decode time below is the decode's, not its launch's
        self.decode_s = time.perf_counter() - started

    def _nvjpeg(self) -> bool:
        """Whether JPEGs decode in batches with decode_jpeg on the device (nvJPEG on CUDA).
        One place to ask, so a CPU test can drive this path with the decoders' CPU decode."""
        return self.rt.device.type == "cuda"

    @property
    def jpeg_decoder(self):
        """decoders.jpeg_batch_decoder(): torchcodec's where it loads, else torchvision's; chosen
        on first use, so a CPU run never imports either."""
        if self._jpeg_decoder is None:
            self._jpeg_decoder = jpeg_batch_decoder()
        return self._jpeg_decoder

    def _decode_split(self, files, headers, store, bar, draft=lambda i: None) -> None:
        """Decode files[i] to uint8 (H, W, 3) on the device and hand it to store(i, image);
        on the CPU, at load_rgb's reduced JPEG size draft(i) (width, height) where not None."""
        on_gpu = self._nvjpeg()
        gpu = [i for i, h in enumerate(headers) if on_gpu and h.nvjpeg]
        for start in range(0, len(gpu), _GPU_BATCH):
            chunk = gpu[start: start + _GPU_BATCH]
            decoded = decode_jpegs([files[i][0] for i in chunk], self.rt.device, self.jpeg_decoder)
            for i, chw in zip(chunk, decoded):
                self.cpu_decoded += chw is None
                store(i, chw.permute(1, 2, 0) if chw is not None else self._cpu(files[i][0], draft(i)))
            bar.update(len(chunk))
        on_cpu = sorted(set(range(len(files))) - set(gpu))
        self.cpu_decoded += len(on_cpu) if on_gpu else 0  # a CPU fallback is counted on a GPU run only
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            for _ in pool.map(lambda i: store(i, self._cpu(files[i][0], draft(i))), on_cpu):
                bar.update(1)

    def _cpu(self, path: Path, at_least: tuple[int, int] | None = None) -> torch.Tensor:
        """load_rgb (PIL, the decoder every loader uses), as uint8 (H, W, 3) on the device; a full
        size image decoded ahead is taken as it is (store copies it into the cache)."""
        pixels = self.ahead.image(path) if self.ahead is not None and at_least is None else None
        if pixels is None:
            pixels = np.array(load_rgb(path, at_least))
        return torch.from_numpy(pixels).to(self.rt.device)

    def _pil(self, path: Path) -> Image.Image:
        """load_rgb(path), or the same pixels decoded ahead, for the eval transform."""
        pixels = self.ahead.image(path) if self.ahead is not None else None
        return load_rgb(path) if pixels is None else Image.fromarray(pixels)

    def _decode_test(self, files, keep, bar) -> None:
        """keep(i, fp32 (3, S, S)): the chapter's eval transform of this process's test image i."""
        if not self._nvjpeg():  # exactly the torch loader's: PIL resize, then crop
            transform = eval_transform(self.size, preprocessing=self.prep)
            # keep() runs on the pool too: its copy into the cache (fp32 CHW to the AMP dtype,
            # channels_last) took as long as the transform on the calling thread alone.
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                for _ in pool.map(lambda i: keep(i, transform(self._pil(files[i][0]))), range(len(files))):
                    bar.update(1)
            return
        headers = self.plan.test_headers
        self._decode_split(files, headers, lambda i, hwc: keep(i, _eval_on_device(hwc, self.prep)), bar)

    # --- the backend interface ----------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.steps

    def train_batch_sizes(self) -> set[int]:
        """Images per process in the train steps."""
        full, ragged = divmod(len(self.sampler), self.batch)
        return ({self.batch} if full else set()) | ({ragged} if ragged and not self.drop else set())

    def train_batches(self, epoch: int) -> _Batches:
        return _Batches(lambda: self._train_pass(epoch), self.steps)

    def test_batches(self) -> _Batches:
        n = len(self.test_y)
        return _Batches(lambda: ((self.test_x[s: s + self.batch], self.test_y[s: s + self.batch])
                                 for s in range(0, n, self.batch)), math.ceil(n / self.batch))

    def train_eval_batches(self) -> _Batches:
        """The train split through the TEST transform (Resize([r, r]), CenterCrop, normalise),
        made on the device from the kept pixels (no file is read again), in order, each image
        once over all processes (the test split's strided shard): what --strategy probe computes
        its kept features from, once per run. With --cache-max-side, from the capped pixels."""
        mine = list(range(self.rt.rank, self.train_size, self.rt.world_size))
        return _Batches(lambda: self._train_eval_pass(mine), math.ceil(len(mine) / self.batch))

    def _train_eval_pass(self, indices: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sizes = 3 * self._hw[:, 0] * self._hw[:, 1]
        offsets = np.cumsum(sizes) - sizes  # on the host: no device read per image
        layout = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        for start in range(0, len(indices), self.batch):
            chunk = indices[start: start + self.batch]
            pixels = [self.images.data[offsets[i]: offsets[i] + sizes[i]].view(*self._hw[i], 3) for i in chunk]
            with _one_cpu_thread(self.rt.device):  # small per-image ops, as the train pass (below)
                x = torch.stack([_eval_on_device(hwc, self.prep) for hwc in pixels])
            yield x.to(self.dtype).contiguous(memory_format=layout), self.labels[chunk]

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches are made on the device, in the training layout and dtype, already."""
        return x, y

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """int64 (steps x batch or fewer, 6) on the device: index, top, left, height, width, flip
        of every sample this process trains on in `epoch`, in order: one host-to-device copy."""
        self.sampler.set_epoch(epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        order = order[: self.steps * self.batch]
        boxes, flips = draw_boxes(self.seed, epoch, order, self._hw[order, 0], self._hw[order, 1])
        rows = np.concatenate([order[:, None], boxes, flips[:, None].astype(np.int64)], axis=1)
        return torch.from_numpy(rows).to(self.rt.device)

    def _train_pass(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.epoch_plan(epoch)
        steps = [rows[start: start + self.batch] for start in range(0, len(rows), self.batch)]
        if not self._crops_ahead():  # CUDA: the kernel runs async already
            yield from map(self._crop, steps)
            return
        yield from _one_ahead(self._crop, steps)

    def _crop(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One train batch from its epoch_plan rows (B, 6), with the model's mean, std and filter."""
        from fastft_kernels import resized_crop_normalize
        index, p = step[:, 0].contiguous(), self.prep
        with _one_cpu_thread(self.rt.device):
            x = resized_crop_normalize(self.images, index, step[:, 1:5].float(), step[:, 5].bool(),
                                       self.size, p.mean, p.std, self.dtype, interpolation=p.interpolation)
        return (x if self.rt.channels_last else x.contiguous()), self.labels[index]

    def describe(self) -> list[str]:
        p, s = self.plan, self.cache_stats()
        side = f"longest side capped at {self.max_side} px" if self.max_side else "full size"
        where = (f"{len(p.train_shapes) + len(p.test_headers) - self.cpu_decoded} with nvJPEG on "
                 f"{self.rt.device} ({self.jpeg_decoder.name}), {self.cpu_decoded} on the CPU (PNG, "
                 f"CMYK, lossless, other formats, refused)"
                 if self._nvjpeg() else f"PIL in {self.threads} threads" + self._ahead_note())
        lines = [f"cached: decoded once in {self.decode_s:.1f} s ({where}): {self.train_size} train images "
                 f"({side}, {s['cache_train_mb']:.0f} MB) + {len(p.test_headers)} test tensors "
                 f"({s['cache_test_mb']:.0f} MB) on {self.rt.device}, budget {p.budget_bytes / MB:.0f} MB "
                 f"({p.budget_source}); every process keeps every train image"]
        dropped = len(self.sampler) - self.steps * self.batch if self.drop else 0
        lines.append(f"cached train: {self.steps} steps of {self.batch} per process, "
                     + (f"dropping the ragged last {dropped} images per epoch ({self.ragged_reason})"
                        if dropped else "the ragged last batch kept" if len(self.sampler) % self.batch
                        else "no ragged batch")
                     + ("; each batch cropped during the step before, on a worker thread"
                        if self._crops_ahead() else ""))
        return lines + ([_INEXACT[self.prep.interpolation]] if self.prep.interpolation in _INEXACT else [])

    def _ahead_note(self) -> str:
        if self.ahead is None:
            return ""
        return (f"; {self.ahead.decoded} decoded before, by a child process while torch imported "
                f"({self.ahead.child_cpu_s:.1f} s of its CPU)")

    def _crops_ahead(self) -> bool:
        return self.rt.device.type == "cpu" and self.crop_ahead

    def cache_stats(self) -> dict:
        """For summary.json: the cache's size (MB) and the first pass's decode time (s)."""
        train_mb = self.images.nbytes / MB
        test_mb = (self.test_x.numel() * self.test_x.element_size()) / MB
        return {"cache_mb": round(train_mb + test_mb, 1), "cache_train_mb": round(train_mb, 1),
                "cache_test_mb": round(test_mb, 1), "cache_decode_s": round(self.decode_s, 2),
                "cache_cpu_decoded": self.cpu_decoded}

    def state_dict(self) -> None:
        """Nothing to keep: batches depend on (seed, epoch) only."""
        return None

    def load_state_dict(self, state) -> None:
        """Nothing to restore (a state saved by another loader is ignored: the streams are pure)."""


def _one_ahead(make: Callable, items: list) -> Iterator:
    """make(item) for each item, in order, the next one made on a worker thread while the caller
    works on the current one (a CPU train step: the crop of batch k+1 runs during step k). The same results as map(make, items); an error in make is raised
    where its result is due; a pass left early waits for the one make in flight."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastft-crop") as pool:
        pending = pool.submit(make, items[0])
        for item in items[1:]:
            done = pending.result()
            pending = pool.submit(make, item)
            yield done
        yield pending.result()


@contextmanager
def _one_cpu_thread(device: torch.device):
    """On a CPU, run the kernel's torch path on one intra-op thread. It is a loop of small
    per-image ops, each an OpenMP region: on a busy machine every region waits for a
    descheduled second thread (2 cores shared with other work: 0.4 batches/s at 224 px with
    2 threads, 9.8 with 1, bench/cached_loader.py). The step's own threads are restored after."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(hwc: torch.Tensor, height: int, width: int, header: Header, path: Path) -> torch.Tensor:
    """The decoded image at its planned stored size: resized (antialiased) when capped. A
    decoded size other than the header's, or a DCT scale of it (load_rgb's at_least: ceil of
    the side over 2, 4 or 8), is an error naming the file."""
    if tuple(hwc.shape) == (height, width, 3):
        return hwc
    from torchvision.transforms.v2.functional import resize
    h, w = hwc.shape[:2]
    if (h, w) not in {(-(-header.height // s), -(-header.width // s)) for s in (1, 2, 4, 8)}:
        raise DataError(f"{shown_path(path)}: decodes to {h}x{w} px, its header says "
                        f"{header.height}x{header.width}")
    return resize(hwc.permute(2, 0, 1), [height, width], antialias=True).permute(1, 2, 0)


def _eval_on_device(hwc: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """The chapter's eval transform, with preprocessing `p` (at the run's size), on a decoded uint8
    image already on the device: fp32 (3, S, S). Bicubic resizes the columns, then the rows, each
    rounded and clamped to uint8 as PIL does (torchvision on CUDA would clamp only the result)."""
    from torchvision.transforms.v2.functional import center_crop, resize
    chw, mode = hwc.permute(2, 0, 1), interpolation_mode(p.interpolation)
    if p.interpolation == "bicubic":
        chw = resize(chw, [chw.shape[1], p.resize], mode, antialias=True)
    resized = center_crop(resize(chw, [p.resize] * 2, mode, antialias=True), [p.image_size] * 2)
    mean = torch.tensor(p.mean, device=hwc.device).view(3, 1, 1)
    std = torch.tensor(p.std, device=hwc.device).view(3, 1, 1)
    return (resized.float() / 255 - mean) / std

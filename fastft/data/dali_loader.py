"""The DALI data path: decode, crop, flip and normalise in one NVIDIA DALI pipeline.

Batches come out in the training layout and dtype: DALI writes NHWC, which is
viewed as NCHW channels_last (no copy), in the AMP dtype (bf16 is cast by torch:
DALI has no bf16 type). On CUDA, JPEGs decode with device="mixed" (nvJPEG plus
the hardware decoder; a plain decode followed by a separate crop keeps that
decoder usable, where a fused ROI decode would not). Without a GPU the same
graph runs with CPU operators and device_id=None, and nothing touches CUDA.

Epochs and shards (shard_id=rank, num_shards=world_size):
- train: one global reshuffle per epoch (shuffle_after_epoch, the same seed on
  every rank). The file list is padded, as DistributedSampler pads, to a
  multiple of world_size so every shard has the same size; each rank then
  DROPS its ragged last batch. Every step has exactly batch_per_rank examples,
  so torch.compile never meets a new shape and every rank takes the same steps.
  A shard smaller than one batch (6 images at --batch-size 64) is one step of
  the whole shard: still one shape every step, each image once per epoch, as
  the torch loader's one partial batch; filling the batch with repeats would
  count and weight the repeated images twice (`train_shards`).
- test: no shuffle, each rank sticks to its shard, pad_last_batch + PARTIAL:
  every test image is seen exactly once across ranks, and no padded duplicate.

Buffers: DALI's iterator docs warn that outputs may be reused. With the
dynamic executor (DALI's default, used here) each batch is a DLPack view that
keeps its own DALI buffer alive, so a batch kept past a step stays intact
(a test checks this on CPU; the GPU path runs the same executor). The engine
keeps nothing past a step anyway, and CUDA-graph compile modes copy inputs
into their own static buffers.

Resume: the train pipeline is built once per run, so the GPU decoder cache
survives across epochs, and its shuffle and augmentation streams advance with
every batch. state_dict() returns DALI's pipeline checkpoint taken between
epochs; load_state_dict() rebuilds the pipeline from it, so a resumed run gets
the same next epoch as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from fastft.data import check_train_split
from fastft.data.dali_cache import CachePlan, plan_cache
from fastft.data.images import decode_problem, shown_path
from fastft.data.layout import DatasetLayout
from fastft.data.transforms import DEFAULT_PREPROCESSING, Preprocessing
from fastft.errors import DataError

READER = "reader"
_FAILED = re.compile(r"Failed to decode sample #\d+ : (.+)")
_DECODER = "fn.decoders.image"
_CODEC_FAILURE = "nvImageCodec failure"  # a decode that failed without naming its sample


@dataclass(frozen=True)
class DaliOptions:
    """Pipeline knobs; bench/loaders.py sweeps them. Defaults are DALI's own
    (prefetch 2, hw_decoder_load 0.65) until measurements on the target GPU say
    otherwise."""
    threads: int = 0                # CPU threads; 0 = default_threads()
    prefetch: int = 2               # batches DALI prepares ahead
    hw_decoder_load: float = 0.65   # fraction of JPEGs for the A100/H100 hardware decoder


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def _device_id(device: torch.device) -> int | None:
    """DALI's device_id: None keeps a CPU pipeline away from CUDA entirely."""
    if not _on_gpu(device):
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def default_threads(env: dict | None = None) -> int:
    """DALI CPU threads per process: the machine's cores split over the training processes on
    it. DALI's own default is every core for each pipeline, which oversubscribes the machine
    under torchrun; LOCAL_WORLD_SIZE is torchrun's count of processes on this machine (read
    here because Runtime carries no local world size)."""
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(env.get("LOCAL_WORLD_SIZE", "1"))))


def decoder_args(on_gpu: bool, cache: CachePlan, hw_load: float) -> dict:
    """fn.decoders.image's arguments: RGB, EXIF orientation ignored, as PIL/ImageFolder decode.
    The same for the train and test pipelines: DALI's one decoder cache per device and process
    accepts only one set of cache arguments (see dali_cache)."""
    args = dict(device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
    if on_gpu:
        # Fancy upsampling: the chroma upsampling libjpeg-turbo (and so PIL) uses.
        args.update(jpeg_fancy_upsampling=True, hw_decoder_load=hw_load, **cache.decoder_args())
    return args


# DALI's filter per Preprocessing.interpolation. Linear + antialias is PIL's bilinear within a grey
# level; the others are not PIL's, and describe() says so (measured: tests/test_preprocessing.py).
_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}
_INEXACT = {"bicubic": "dali: bicubic is DALI's cubic filter, not PIL's (the torch loader's): the same on "
                       "average (0.16 grey levels apart at 224 px, bilinear 0.15), up to 8 at a few edges",
            "nearest": "dali: nearest may take the neighbouring pixel where PIL's sample point falls on a "
                       "pixel edge (at 32 px: 0.07 grey levels apart on average)"}


def _normalize(images, dtype, channels_last: bool, prep: Preprocessing, **crop):
    """The model's mean/std in DALI's 0-255 units, straight into the output layout."""
    return fn.crop_mirror_normalize(
        images, dtype=dtype, output_layout="HWC" if channels_last else "CHW",
        mean=[255 * m for m in prep.mean], std=[255 * s for s in prep.std], **crop)


def _labels(labels, on_gpu: bool):
    return labels.gpu() if on_gpu else labels


@pipeline_def(enable_checkpointing=True)
def _train_pipeline(files, labels, size, shard, shards, shuffle_seed, on_gpu, decoder, dtype, channels_last, prep):
    encoded, label = fn.readers.file(files=files, labels=labels, name=READER, shard_id=shard,
                                     num_shards=shards, pad_last_batch=True, shuffle_after_epoch=True,
                                     shuffle_after_epoch_seed=shuffle_seed)
    images = fn.decoders.image(encoded, **decoder)
    # DALI's defaults are torchvision's: area 0.08-1, aspect 3/4-4/3, 10 tries.
    images = fn.random_resized_crop(images, size=[size, size], random_area=[0.08, 1.0],
                                    random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                    interp_type=_INTERP[prep.interpolation])
    flip = fn.random.coin_flip(probability=0.5)
    return _normalize(images, dtype, channels_last, prep, mirror=flip), _labels(label, on_gpu)


def _center_pos(resize: int, size: int) -> float:
    """crop_pos giving torchvision CenterCrop's offset, int(round(d / 2)) with Python's
    half-to-even rounding; DALI's own 0.5 rounds half away from zero (37 -> 32: 3, not 2)."""
    d = resize - size
    return int(round(d / 2)) / d if d else 0.5


@pipeline_def
def _test_pipeline(files, labels, size, shard, shards, on_gpu, decoder, dtype, channels_last, prep):
    encoded, label = fn.readers.file(files=files, labels=labels, name=READER, shard_id=shard,
                                     num_shards=shards, pad_last_batch=True, stick_to_shard=True)
    images = fn.decoders.image(encoded, **decoder)
    resize = prep.resize  # Resize([r, r]): square, not aspect-preserving
    images = fn.resize(images, resize_x=resize, resize_y=resize, interp_type=_INTERP[prep.interpolation],
                       antialias=True)
    pos = _center_pos(resize, size)
    return _normalize(images, dtype, channels_last, prep, crop=(size, size), crop_pos_x=pos,
                      crop_pos_y=pos), _labels(label, on_gpu)


def _first_bad(paths: list) -> tuple[str, str] | None:
    """(path, reason) of the first file PIL cannot fully decode, checked on a few threads."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for path, reason in zip(paths, pool.map(decode_problem, paths)):
            if reason is not None:
                return path, reason
    return None


def _as_data_error(err: RuntimeError, paths: list) -> DataError | None:
    """A decode failure as fastft's one-line DataError naming the file; None for any other
    error, which the caller re-raises as DALI wrote it.

    DALI names the file ('Failed to decode sample #N : PATH') for some failures
    and only a status for others ("nvImageCodec failure: '#3'"); then the
    split's files are decoded with PIL, once, to find it. Other errors of the
    decoder operator (its cache settings, memory, the device) are not about a
    file and stay as they are. The reason is decode_problem's, the words `data check` and the
    other loaders use for the same file; "(DALI decoder failed)" only where PIL decodes it.
    """
    text = str(err)
    found = _FAILED.search(text)
    if found is not None:
        path = found.group(1).strip()
        reason = decode_problem(path) or "cannot decode image (DALI decoder failed)"
        return DataError(f"{shown_path(path)}: {reason}")
    if _DECODER not in text or _CODEC_FAILURE not in text:
        return None
    bad = _first_bad(sorted(set(paths)))
    if bad is None:
        detail = next((line for line in text.splitlines() if "failure" in line), "decoder error")
        return DataError(f"DALI cannot decode an image that PIL decodes ({detail.strip()}); use --loader torch")
    return DataError(f"{shown_path(bad[0])}: {bad[1]}")


class _Batches:
    """One pass over the train or test split: len() is batches on this rank."""

    def __init__(self, passes: Callable[[], Iterator], length: int):
        self.passes, self.length = passes, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.passes()


def _dali_dtype(amp: torch.dtype | None):
    return types.FLOAT16 if amp == torch.float16 else types.FLOAT


@dataclass(frozen=True)
class TrainShards:
    """One process's share of the train split, the same on every process."""
    padded: int  # train files after DistributedSampler-style padding to a multiple of the processes
    shard: int   # files per process
    batch: int   # images per step: batch_per_rank, or the whole shard when it is smaller
    steps: int   # per epoch; each process drops its last shard % batch shuffled files

    @property
    def dropped(self) -> int:
        return self.shard - self.steps * self.batch


def train_shards(n_train: int, batch_per_rank: int, world_size: int) -> TrainShards:
    """Shards of the train split; ConfigError when some process would get no image of its own."""
    check_train_split(n_train, world_size)
    padded = math.ceil(n_train / world_size) * world_size
    shard = padded // world_size
    batch = min(batch_per_rank, shard)
    return TrainShards(padded, shard, batch, shard // batch)


def _shard_size(n: int, shard: int, shards: int) -> int:
    """Samples in DALI's shard `shard`: [floor(i n / k), floor((i + 1) n / k))."""
    return (shard + 1) * n // shards - shard * n // shards


def _pipeline_seed(seed: int, rank: int) -> int:
    """Augmentation seed: from (seed, rank), so ranks draw different crops."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)


class DaliLoaders:
    """Train and test batches from DALI pipelines, on rt.device, in the training layout."""

    name = "dali"

    def __init__(self, layout: DatasetLayout, image_size: int, batch_per_rank: int, rt, seed: int,
                 decode_cache: str = "auto", options: DaliOptions = DaliOptions(),
                 cache: CachePlan | None = None, preprocessing: Preprocessing = DEFAULT_PREPROCESSING):
        """`cache`: a plan made once for several loaders in one process; None plans it here
        from `decode_cache`. `preprocessing`: the model's resize, mean, std and interpolation
        (taken at image_size), ResNet-18's by default. Raises ConfigError when some process
        would get no train image."""
        self.classes = layout.classes
        self.rt, self.image_size, self.batch, self.seed = rt, image_size, batch_per_rank, seed
        self.prep = preprocessing.at_size(image_size)
        self.options = options
        self.threads = options.threads or default_threads()
        train, test = layout.dali_files("train"), layout.dali_files("test")
        self.train_size, self.test_size = len(train), len(test)
        # DistributedSampler-style padding: equal shards, so equal step counts on every rank.
        self.shards = train_shards(len(train), batch_per_rank, rt.world_size)
        self._train = [train[i % len(train)] for i in range(self.shards.padded)]
        self._test = list(test)
        self._test_shard = _shard_size(len(test), rt.rank, rt.world_size)
        self._train_eval = list(train)  # unpadded: each image once over all processes
        self.cache = cache or plan_cache(decode_cache, rt.device, [p for p, _ in train],
                                         [p for p, _ in test][rt.rank:: rt.world_size])
        self._iters: dict[str, DALIGenericIterator] = {}
        self._open: set[str] = set()  # passes a caller left before their end
        self._checkpoint: str | None = None
        self._epoch = 0  # the epoch the train pipeline produces next

    # --- the backend interface ------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.shards.steps

    def train_batch_sizes(self) -> set[int]:
        """Images per process in the train steps: one size, every step."""
        return {self.shards.batch}

    def train_batches(self, epoch: int) -> _Batches:
        if epoch != self._epoch:
            warnings.warn(f"DALI train pipeline is at epoch {self._epoch}, asked for {epoch}: its shuffle "
                          f"and crops will differ from an uninterrupted run (load_state_dict first)")
            self._epoch = epoch
        return _Batches(lambda: self._pass("train"), self.steps_per_epoch())

    def test_batches(self) -> _Batches:
        return _Batches(lambda: self._pass("test"), math.ceil(self._test_shard / self.batch))

    def train_eval_batches(self) -> _Batches:
        """The train split through the TEST pipeline (resize, centre crop: no augmentation), in
        order, each image once over all processes (sharded as the test split): what --strategy
        probe computes its kept features from, once per run. Its decoder takes the same
        arguments as the others (one decoder cache per process; see dali_cache)."""
        shard = _shard_size(len(self._train_eval), self.rt.rank, self.rt.world_size)
        return _Batches(lambda: self._pass("train_eval"), math.ceil(shard / self.batch))

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches already come out on the device, in the training layout and dtype."""
        return x, y

    def describe(self) -> list[str]:
        o, rt = self.options, self.rt
        where = f"mixed decode on {rt.device}" if _on_gpu(rt.device) else "CPU operators (device_id=None)"
        source = "set" if o.threads else "cores / processes on this machine"
        hw = f", hw_decoder_load {o.hw_decoder_load}" if _on_gpu(rt.device) else ""
        s = self.shards
        smaller = f" (the whole shard: less than --batch-size per process)" if s.batch < self.batch else ""
        return [
            f"dali: {where}, {self.threads} threads ({source}), prefetch {o.prefetch}{hw}",
            f"dali train: {s.steps} steps of {s.batch}{smaller} per process, each dropping the "
            f"last {s.dropped} of its {s.shard} shuffled images per epoch",
            f"dali decode cache: {self.cache.reason}",
        ] + ([_INEXACT[self.prep.interpolation]] if self.prep.interpolation in _INEXACT else [])

    # --- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The train pipeline's position; take it between epochs."""
        it = self._iters.get("train")
        checkpoint = it.checkpoints()[0] if it is not None else self._checkpoint
        return {"epoch": self._epoch, "dali": checkpoint, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:  # saved by the torch loader: nothing to restore, streams start fresh
            return
        self._epoch = state["epoch"]
        if state.get("fingerprint") != self._fingerprint():
            warnings.warn("DALI loader state is from another dataset, batch, seed or world size: "
                          "the train pipeline starts fresh shuffle and crop streams")
            return
        self._checkpoint = state["dali"]
        self._iters.pop("train", None)
        self._open.discard("train")

    def _fingerprint(self) -> list:
        return [len(self._train), self.shards.batch, self.seed, self.rt.rank, self.rt.world_size,
                self.image_size]

    # --- passes over the pipelines ----------------------------------------------------------
    def _pass(self, kind: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            it = self._iterator(kind)
            if kind in self._open:  # DALI cannot reset mid-epoch: finish the abandoned pass
                for _ in it:
                    pass
                it.reset()
            self._open.add(kind)
            for out in it:
                # Padding shards to one length can leave a shorter shard a last batch made only
                # of padding, which PARTIAL trims to nothing.
                if len(out[0]["y"]):
                    yield self._torch(out[0])
            it.reset()
        except RuntimeError as err:
            data_error = _as_data_error(err, self._files(kind))
            if data_error is None:
                raise
            raise data_error from err
        self._open.discard(kind)
        if kind == "train":
            self._epoch += 1

    def _files(self, kind: str) -> list:
        return [os.fspath(p) for p, _ in self._split(kind)]

    def _split(self, kind: str) -> list:
        """(path, label) pairs a pass of `kind` reads: train (padded), test or train_eval."""
        return {"train": self._train, "test": self._test, "train_eval": self._train_eval}[kind]

    def _torch(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = out["x"].permute(0, 3, 1, 2) if self.rt.channels_last else out["x"]
        want = self.rt.amp_dtype or torch.float32
        # .to keeps the channels_last strides; only bf16 (unknown to DALI) copies here.
        return (x if x.dtype == want else x.to(want)), out["y"].view(-1).long()

    def _iterator(self, kind: str) -> DALIGenericIterator:
        """The pipeline for `kind`, built on first use (building starts decoding a batch)."""
        if kind not in self._iters:
            if kind == "train":
                pipe = _train_pipeline(**self._common("train"), shuffle_seed=self.seed,
                                       seed=_pipeline_seed(self.seed, self.rt.rank), checkpoint=self._checkpoint)
            else:
                pipe = _test_pipeline(**self._common(kind), seed=self.seed)  # test, train_eval
            policy = LastBatchPolicy.DROP if kind == "train" else LastBatchPolicy.PARTIAL
            self._iters[kind] = DALIGenericIterator(pipe, ["x", "y"], reader_name=READER,
                                                    last_batch_policy=policy)
        return self._iters[kind]

    def _common(self, kind: str) -> dict:
        """The pipeline's arguments; the decoder's are the same for train and test."""
        rt, files = self.rt, self._split(kind)
        on_gpu = _on_gpu(rt.device)
        return dict(files=[os.fspath(p) for p, _ in files], labels=[label for _, label in files],
                    size=self.image_size, shard=rt.rank, shards=rt.world_size, on_gpu=on_gpu, prep=self.prep,
                    decoder=decoder_args(on_gpu, self.cache, self.options.hw_decoder_load),
                    dtype=_dali_dtype(rt.amp_dtype), channels_last=rt.channels_last,
                    batch_size=self.shards.batch if kind == "train" else self.batch,
                    num_threads=self.threads, device_id=_device_id(rt.device),
                    prefetch_queue_depth=self.options.prefetch)

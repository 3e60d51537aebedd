"""The reference data path: ImageFolder samples + PIL + torchvision transforms + DataLoader, as d2l.

Each process reads its own shard: training through a DistributedSampler (one
replica in a plain run), evaluation through a strided split that gives every
test image to exactly one process, with no padding.

A training image's random crop and flip depend on (seed, epoch, image index)
only, not on which process or worker loads it: 4 processes with batch 8 each
see exactly the batches of 1 process with batch 32, and a resumed run sees
exactly what an uninterrupted one would. The epoch travels with each index
(`EpochIndices`), so persistent workers, which keep the copy of the dataset
they started with, still draw each epoch's own crops.

Batches: with `uint8`, workers stop at uint8 pixels and `to_device` normalises
and casts on the device (see transforms.py); otherwise they ship the chapter's
fp32 batches. With `drop_ragged` (set when compiling) the last training batch,
smaller than the rest, is dropped, as the DALI path does, so every step has one
shape and torch.compile builds one graph: 2,000 images at batch 256 skip 208
per epoch (a different 208 each epoch, since the order is reshuffled). A train
shard smaller than one batch keeps its one partial batch. A ragged last batch
of fewer than `min_batch` images (too few values per channel for BatchNorm's
batch statistics at this image size, see data.MIN_BN_VALUES) is dropped too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fastft.data.images import load_rgb
from fastft.data.layout import DatasetLayout
from fastft.data.transforms import (DEFAULT_PREPROCESSING, DeviceNormalize, Preprocessing, eval_transform,
                                    train_transform)


class LabelledFiles(Dataset):
    """ImageFolder's samples, taken from the validated scan rather than a second walk."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, seed: int | None = None):
        self.samples = samples
        self.transform = transform
        self.seed = seed      # None: a deterministic transform that draws no random numbers
        self.epoch = 0        # for a plain index; the train loader passes (epoch, index) itself

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """`item`: an index, or (epoch, index) from EpochIndices."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label


class EpochIndices(Sampler[tuple[int, int]]):
    """A sampler's indices paired with the epoch: (epoch, index). The epoch is read in
    the main process, where set_epoch runs, so workers need no update between epochs."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per (run seed, epoch, image)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index & (2**63 - 1)


class StridedShard(Sampler[int]):
    """Indices rank, rank + world, ...: every index goes to exactly one rank."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TorchLoaders:
    """Train and test batches as CPU tensors (pinned when feeding a GPU); `to_device` puts a
    batch where training wants it: on the run's device, in its memory format and dtype.

    `rt` (a Runtime, or None: CPU, contiguous, fp32) is needed only by `to_device`.
    `preprocessing`: the model's resize, mean, std and interpolation (taken at image_size, see
    transforms.py); ResNet-18's by default. PIL does the resizing: this is the reference.
    """

    name = "torch"

    def __init__(self, layout: DatasetLayout, image_size: int, batch_per_rank: int, workers: int,
                 seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False, *,
                 rt=None, drop_ragged: bool = False, uint8: bool = False, min_batch: int = 1,
                 preprocessing: Preprocessing = DEFAULT_PREPROCESSING):
        self.uint8, self.rank, self.world_size = uint8, rank, world_size
        self.preprocessing = preprocessing.at_size(image_size)
        self.train_set = LabelledFiles(layout.files["train"], train_transform(image_size, uint8, preprocessing), seed)
        self.test_set = LabelledFiles(layout.files["test"], eval_transform(image_size, uint8, preprocessing))
        self.classes: Sequence[str] = layout.classes
        self.sampler = EpochIndices(DistributedSampler(self.train_set, num_replicas=world_size, rank=rank,
                                                       shuffle=True, seed=seed, drop_last=False))
        shard = len(self.sampler)
        # Never drop the only batch: a shard smaller than one batch keeps its partial batch.
        ragged = shard % batch_per_rank
        self.ragged_reason = "one shape per step for torch.compile" if drop_ragged else \
            f"fewer than {min_batch} images: too few for BatchNorm's batch statistics at this image size"
        drop = (drop_ragged or 0 < ragged < min_batch) and shard >= batch_per_rank
        self.skipped = world_size * ragged if drop else 0  # images per epoch, all ranks
        # Persistent workers start once per run, not once per epoch and per evaluation.
        common = dict(batch_size=batch_per_rank, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)
        # Own generators for the workers' base seeds (unused: crops are seeded per image), so the
        # process's torch stream does not depend on how often persistent iterators were created:
        # a resumed run creates them again, an uninterrupted one does not.
        self.train = DataLoader(self.train_set, sampler=self.sampler, drop_last=drop,
                                generator=torch.Generator().manual_seed(seed), **common)
        self.test = DataLoader(self.test_set, sampler=StridedShard(len(self.test_set), rank, world_size),
                               generator=torch.Generator().manual_seed(seed), **common)
        self.device = rt.device if rt is not None else torch.device("cpu")
        self.memory_format = rt.memory_format if rt is not None else torch.contiguous_format
        dtype = (rt.amp_dtype if rt is not None else None) or torch.float32
        self.normalize = DeviceNormalize(self.device, dtype, self.memory_format, preprocessing) if uint8 else None

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    @property
    def test_size(self) -> int:
        return len(self.test_set)

    def train_batches(self, epoch: int) -> DataLoader:
        # The shuffle order depends on (seed, epoch) only, so a resumed run sees the same order.
        self.sampler.set_epoch(epoch)
        return self.train

    def test_batches(self) -> DataLoader:
        return self.test

    def train_eval_batches(self) -> DataLoader:
        """The train split through the TEST transform (Resize, CenterCrop: no augmentation), in
        order, each image once over all processes (the test split's strided shard): what
        --strategy probe computes its kept features from, once per run. Its workers start and
        stop with the pass; its own generator keeps the process's random stream untouched."""
        files = LabelledFiles(self.train_set.samples, self.test_set.transform)
        return DataLoader(files, sampler=StridedShard(len(files), self.rank, self.world_size),
                          batch_size=self.test.batch_size, num_workers=self.test.num_workers,
                          pin_memory=self.test.pin_memory, generator=torch.Generator().manual_seed(0))

    def steps_per_epoch(self) -> int:
        return len(self.train)

    def train_batch_sizes(self) -> set[int]:
        """Images per process in the train steps: full batches, and the ragged rest unless dropped."""
        batch = self.train.batch_size
        full, ragged = divmod(len(self.sampler), batch)
        return ({batch} if full else set()) | ({ragged} if ragged and not self.train.drop_last else set())

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as training takes it: (N, 3, H, W) on the device in the memory format; uint8
        batches are normalised there and cast to the AMP dtype, float batches pass unchanged."""
        if self.normalize is not None and x.dtype == torch.uint8:
            x = self.normalize(x.to(self.device, non_blocking=True))  # lays out memory_format itself
        else:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def describe(self) -> list[str]:
        workers = self.train.num_workers
        lines = [f"torch loader: {workers} worker process(es)" + (", persistent" if workers else "") +
                 ("; uint8 batches, normalised on the device" if self.uint8
                  else "; fp32 batches normalised in the loader")]
        if self.skipped:
            lines.append(f"torch loader: the ragged last train batch is dropped ({self.ragged_reason}): "
                         f"{self.skipped} of {self.train_size} images skipped per epoch")
        return lines

    def state_dict(self) -> None:
        """Nothing to keep: batches depend on (seed, epoch) only."""
        return None

    def load_state_dict(self, state: None) -> None:
        pass

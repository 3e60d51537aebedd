"""The reference data path: ImageFolder samples + PIL + torchvision transforms + DataLoader, as d2l.

Each process reads its own shard: training through a DistributedSampler (one
replica in a plain run), evaluation through a strided split that gives every
test image to exactly one process, with no padding.

A training image's random crop and flip depend on (seed, epoch, image index)
only, not on which process or worker loads it: 4 processes with batch 8 each
see exactly the batches of 1 process with batch 32, and a resumed run sees
exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fastft.data.images import load_rgb
from fastft.data.layout import DatasetLayout
from fastft.data.transforms import eval_transform, train_transform


class LabelledFiles(Dataset):
    """ImageFolder's samples, taken from the validated scan rather than a second walk."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, seed: int | None = None):
        self.samples = samples
        self.transform = transform
        self.seed = seed      # None: a deterministic transform that draws no random numbers
        self.epoch = 0        # set before each epoch's iterator copies the dataset to workers

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image), label


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
    """Train and test batches as CPU tensors (pinned when feeding a GPU)."""

    name = "torch"

    def __init__(self, layout: DatasetLayout, image_size: int, batch_per_rank: int, workers: int,
                 seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        self.train_set = LabelledFiles(layout.files["train"], train_transform(image_size), seed)
        self.test_set = LabelledFiles(layout.files["test"], eval_transform(image_size))
        self.classes: Sequence[str] = layout.classes
        self.sampler = DistributedSampler(self.train_set, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        common = dict(batch_size=batch_per_rank, num_workers=workers, pin_memory=pin_memory)
        self.train = DataLoader(self.train_set, sampler=self.sampler, **common)
        self.test = DataLoader(self.test_set, sampler=StridedShard(len(self.test_set), rank, world_size),
                               **common)

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    @property
    def test_size(self) -> int:
        return len(self.test_set)

    def train_batches(self, epoch: int) -> DataLoader:
        # The shuffle order depends on (seed, epoch) only, so a resumed run sees the same order.
        self.sampler.set_epoch(epoch)
        self.train_set.epoch = epoch
        return self.train

    def test_batches(self) -> DataLoader:
        return self.test

    def steps_per_epoch(self) -> int:
        return len(self.train)

    def describe(self) -> list[str]:
        return [f"torch loader: {self.train.num_workers} worker process(es)"]

    def state_dict(self) -> None:
        """Nothing to keep: batches depend on (seed, epoch) only."""
        return None

    def load_state_dict(self, state: None) -> None:
        pass

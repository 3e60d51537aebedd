"""Checks shared by the file-format and preprocessing tests: the torch, cached and DALI loaders give
the same test pixels and labels, with ResNet-18's preprocessing or a model's own."""

from __future__ import annotations

import pytest
import torch

from fastft.data.cached_loader import CachedLoaders, plan_cache
from fastft.data.torch_loader import TorchLoaders
from fastft.data.transforms import DEFAULT_PREPROCESSING, Preprocessing
from fastft.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, channels_last=False, workers=1)


def levels(x: torch.Tensor, preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> torch.Tensor:
    """Normalised (N, 3, H, W) batches back in 8-bit grey levels (0-255)."""
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return x.float() * std * 255 + mean * 255


def torch_equals_cached(layout, size: int = 32, batch: int = 4,
                        preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> torch.Tensor:
    """The torch loader's test batches, concatenated (N, 3, size, size) fp32, after checking that the
    cached loader gives exactly the same tensor and labels and holds every train image."""
    torch_x, torch_y = map(torch.cat, zip(*TorchLoaders(layout, size, batch, workers=0, seed=0,
                                                        preprocessing=preprocessing).test_batches()))
    cached = CachedLoaders(layout, size, batch, CPU, seed=0, plan=plan_cache(layout, size, CPU),
                           preprocessing=preprocessing)
    assert cached.train_size == len(layout.files["train"])
    cached_x, cached_y = map(torch.cat, zip(*cached.test_batches()))
    assert torch.equal(cached_x, torch_x) and torch.equal(cached_y, torch_y)
    assert torch_y.tolist() == [label for _, label in layout.files["test"]]
    return torch_x


def dali_agrees(layout, torch_x: torch.Tensor, size: int = 32, batch: int = 4,
                preprocessing: Preprocessing = DEFAULT_PREPROCESSING, worst: float = 1.01) -> None:
    """DALI's test batches within test_cross_loader's tolerance of `torch_x`: at most 1 grey level
    (`worst`: more for filters DALI does not share with PIL), 0.3 on average; the test split's
    labels in order. Skips the test where DALI does not import."""
    pytest.importorskip("nvidia.dali")
    from fastft.data.dali_loader import DaliLoaders
    dali_x, dali_y = map(torch.cat, zip(*DaliLoaders(layout, size, batch, CPU, seed=0,
                                                     preprocessing=preprocessing).test_batches()))
    assert dali_y.tolist() == [label for _, label in layout.files["test"]]
    diff = (levels(dali_x, preprocessing) - levels(torch_x, preprocessing)).abs().flatten(1)
    assert diff.max() <= worst and diff.mean() <= 0.3, diff.max(1).values

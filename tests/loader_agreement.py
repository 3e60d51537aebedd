"""Checks for the file-format tests: the torch, cached and DALI loaders give the same test pixels."""

from __future__ import annotations

import pytest
import torch

from fastft.data.cached_loader import CachedLoaders, plan_cache
from fastft.data.torch_loader import TorchLoaders
from fastft.runtime import Runtime

STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, channels_last=False, workers=1)


def torch_equals_cached(layout, size: int = 32, batch: int = 4) -> torch.Tensor:
    """The torch loader's test batches, concatenated (N, 3, size, size) fp32, after checking that the
    cached loader gives exactly the same tensor and holds every train image."""
    torch_x = torch.cat([x for x, _ in TorchLoaders(layout, size, batch, workers=0, seed=0).test_batches()])
    cached = CachedLoaders(layout, size, batch, CPU, seed=0, plan=plan_cache(layout, size, CPU))
    assert cached.train_size == len(layout.files["train"])
    assert torch.equal(torch.cat([x for x, _ in cached.test_batches()]), torch_x)
    return torch_x


def dali_agrees(layout, torch_x: torch.Tensor, size: int = 32, batch: int = 4) -> None:
    """DALI's test batches within test_cross_loader's tolerance of `torch_x`: at most 1 grey level,
    0.3 on average. Skips the test where DALI does not import."""
    pytest.importorskip("nvidia.dali")
    from fastft.data.dali_loader import DaliLoaders
    dali_x = torch.cat([x for x, _ in DaliLoaders(layout, size, batch, CPU, seed=0).test_batches()])
    levels = ((dali_x - torch_x) * STD * 255).abs().flatten(1)
    assert levels.max() <= 1.01 and levels.mean() <= 0.3, levels.max(1).values

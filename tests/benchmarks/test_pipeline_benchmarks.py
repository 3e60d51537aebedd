"""pytest-benchmark: one training epoch of batches from each data backend, on the CPU.

The torch/PIL loader is the reference; DALI (CPU operators here) is timed against it in the same
test when nvidia.dali imports. `extra_info` carries images/sec and the ratio. 24 train images,
32 px, batch 8, no worker processes (conftest's make_cfg).
"""

from __future__ import annotations

import itertools
import time

import pytest

from fastft.data import build_loaders
from fastft.data.layout import scan_dataset
from fastft.runtime import resolve_runtime


def loaders_for(cfg):
    return build_loaders(cfg, scan_dataset(cfg.data), resolve_runtime(cfg))


def one_epoch(loaders, epochs: itertools.count) -> int:
    """Pull every train batch of the next epoch (DALI's pipeline only goes forward); images seen."""
    return sum(int(y.shape[0]) for _, y in loaders.train_batches(next(epochs)))


def images_per_sec(loaders, epochs: itertools.count) -> tuple[float, int]:
    one_epoch(loaders, epochs)  # warm-up: worker start, DALI pipeline build, file cache
    start = time.perf_counter()
    n = one_epoch(loaders, epochs)
    return n / (time.perf_counter() - start), n


def test_torch_loader_epoch(benchmark, make_cfg):
    loaders, epochs = loaders_for(make_cfg(loader="torch")), itertools.count()
    rate, n = images_per_sec(loaders, epochs)
    benchmark.extra_info.update(loader="torch", images_per_sec=rate, speedup_vs_reference=1.0)
    assert benchmark(one_epoch, loaders, epochs) == n == loaders.train_size


def test_dali_loader_epoch(benchmark, make_cfg):
    pytest.importorskip("nvidia.dali", reason="nvidia.dali does not import here (Linux wheels only)")
    dali = loaders_for(make_cfg(loader="dali"))
    reference = loaders_for(make_cfg(loader="torch"))
    assert type(dali).__name__ != type(reference).__name__, "--loader dali must build the DALI backend"
    epochs = itertools.count()
    rate, n = images_per_sec(dali, epochs)
    ref_rate, _ = images_per_sec(reference, itertools.count())
    benchmark.extra_info.update(loader="dali", images_per_sec=rate, reference_images_per_sec=ref_rate,
                                speedup_vs_reference=rate / ref_rate)
    # DALI drops the ragged last batch (fixed shapes for compile); 24 images at batch 8 have none.
    assert benchmark(one_epoch, dali, epochs) == n == dali.train_size

"""pytest-benchmark: one training epoch of batches from each data backend, on the CPU.

The torch/PIL loader is the reference; DALI (CPU operators here) is timed against it in the same
test, in interleaved epochs (see conftest.py), when nvidia.dali imports. `extra_info` carries
images/sec and the ratio, `speedup_vs_reference` (wall) and `speedup_vs_reference_cpu`,
which bench/compare.py gates on (`gate_key`). 24 train images, 32 px, batch 8, no worker
processes (conftest's make_cfg).
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


def test_dali_loader_epoch(benchmark, pair, make_cfg):
    pytest.importorskip("nvidia.dali", reason="nvidia.dali does not import here (Linux wheels only)")
    # One DALI thread against the reference's one process: each side on one core, so a neighbour
    # that takes a core slows both alike (with DALI's default of one thread per core, no-change
    # ratios moved by up to 15% between saves on a shared 2-core machine; bench/README.md).
    dali = loaders_for(make_cfg(loader="dali", workers=1))
    reference = loaders_for(make_cfg(loader="torch"))
    assert type(dali).__name__ != type(reference).__name__, "--loader dali must build the DALI backend"
    epochs = itertools.count()
    # The first epoch of each builds DALI's pipeline and fills the file cache: kept out of the rounds.
    n = one_epoch(dali, epochs)
    one_epoch(reference, itertools.count())
    epoch, pairs = pair(one_epoch, (dali, epochs), reference=(one_epoch, (reference, itertools.count())))
    measured = pairs["reference"]
    benchmark.extra_info.update(loader="dali", ratio_rounds=measured.rounds, gate_key="speedup_vs_reference_cpu",
                                images_per_sec=n / measured.measured_s,
                                reference_images_per_sec=n / measured.reference_s,
                                speedup_vs_reference=measured.speedup,
                                speedup_vs_reference_cpu=measured.speedup_cpu)
    # DALI drops the ragged last batch (fixed shapes for compile); 24 images at batch 8 have none.
    assert benchmark(epoch, dali, epochs) == n == dali.train_size

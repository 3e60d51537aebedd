"""The cached loader's CPU train pass with crop_ahead crops batch k+1 on a worker thread while step k
runs: the same batches in the same order, errors where their batch is due, an early stop that waits
for its worker."""

from __future__ import annotations

import threading

import pytest
import torch

from fastft.data.cached_loader import CachedLoaders, _one_ahead, plan_cache
from fastft.data.layout import scan_dataset
from fastft.runtime import Runtime


def test_one_ahead_gives_maps_results_in_order_making_the_next_while_the_caller_holds_one():
    made = {i: threading.Event() for i in range(5)}
    threads = set()

    def make(i):
        threads.add(threading.current_thread().name)
        made[i].set()
        return i * 10

    got = []
    for value in _one_ahead(make, list(range(5))):
        k = value // 10
        if k + 1 in made:  # made while the caller still holds item k; without the worker: a timeout
            assert made[k + 1].wait(10), f"item {k + 1} was not made while item {k} was held"
        got.append(value)
    assert got == [0, 10, 20, 30, 40]
    assert len(threads) == 1 and threads.pop().startswith("fastft-crop")
    assert list(_one_ahead(make, [])) == []


def test_an_error_is_raised_where_its_item_is_due():
    def make(i):
        if i == 2:
            raise ValueError("bad crop 2")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad crop 2"):
        for value in _one_ahead(make, list(range(4))):
            seen.append(value)
    assert seen == [0, 1]


def test_a_pass_left_early_waits_for_the_make_in_flight():
    gate, finished = threading.Event(), []

    def make(i):
        if i == 1:
            gate.wait(10)
        finished.append(i)
        return i

    passes = _one_ahead(make, list(range(3)))
    assert next(passes) == 0
    threading.Timer(0.2, gate.set).start()
    passes.close()  # the worker is making item 1: close returns once it is done
    assert finished == [0, 1]


def test_the_cached_train_pass_is_the_same_with_and_without_the_worker(tiny_data, monkeypatch):
    rt = Runtime(device=torch.device("cpu"), amp_dtype=torch.bfloat16, compile=False, channels_last=True,
                 workers=1)
    layout = scan_dataset(tiny_data)
    loaders = CachedLoaders(layout, 32, 5, rt, 0, plan=plan_cache(layout, 32, rt, 0.0, 0))
    threads = torch.get_num_threads()
    calls = []
    crop = loaders._crop
    monkeypatch.setattr(loaders, "_crop", lambda step: calls.append(threading.current_thread().name) or crop(step))
    assert not loaders.crop_ahead  # off by default (see CachedLoaders.crop_ahead)
    monkeypatch.setattr(loaders, "crop_ahead", True)
    ahead = list(loaders.train_batches(1))
    assert torch.get_num_threads() == threads  # the worker's one-thread crop leaves the step's count
    assert len(calls) == loaders.steps_per_epoch() == 5 and all(n.startswith("fastft-crop") for n in calls)
    monkeypatch.setattr(loaders, "crop_ahead", False)
    inline = list(loaders.train_batches(1))
    assert len(inline) == len(ahead) == 5 and len(calls) == 10 and not any(n.startswith("fastft-crop") for n in calls[5:])
    for (xa, ya), (xi, yi) in zip(ahead, inline):
        assert torch.equal(xa, xi) and torch.equal(ya, yi) and xa.dtype == torch.bfloat16

"""data.decode_ahead: a forked child decodes the data set while torch imports; the cached loader
takes its images where the files are unchanged and gives the same batches as without it."""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch

import fastft.data.cached_loader as cached_loader
from fastft.config import TrainConfig
from fastft.data import build_loaders, start_decode_ahead
from fastft.data.decode_ahead import DecodeAhead, _decode_into, supported
from fastft.data.images import load_rgb
from fastft.data.layout import scan_dataset
from fastft.errors import ConfigError
from fastft.runtime import Runtime
from fastft.threads import CpuSample

pytestmark = pytest.mark.skipif(not supported(), reason="needs os.fork and os.memfd_create (Linux)")


def _paths(root):
    layout = scan_dataset(root)
    return [path for split in ("train", "test") for path, _ in layout.files[split]]


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_every_image_decoded_ahead_is_load_rgbs_exactly_and_the_child_is_reaped(tiny_data):
    ahead = DecodeAhead.start(tiny_data).collect(stop=False)
    paths = _paths(tiny_data)
    assert ahead.decoded == len(paths) == 36
    for path in paths:
        np.testing.assert_array_equal(ahead.image(path), np.asarray(load_rgb(path)))
    assert ahead.image(tiny_data / "train" / "no-such.jpg") is None
    assert ahead.child_cpu_s > 0 and _reaped(ahead.pid)
    ahead.close()
    assert ahead.image(paths[0]) is None  # closed: nothing handed out from freed memory


def test_a_file_changed_after_its_decode_is_not_taken(tmp_path, tiny_data):
    root = shutil.copytree(tiny_data, tmp_path / "data")
    ahead = DecodeAhead.start(root).collect(stop=False)
    first, second = _paths(root)[:2]
    stat = os.stat(first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: maybe rewritten
    assert ahead.image(first) is None
    assert ahead.image(second) is not None
    ahead.close()


def test_the_child_stops_at_its_memory_cap_keeping_whole_images_in_order(tiny_data):
    paths = _paths(tiny_data)
    sizes = [np.asarray(load_rgb(p)).nbytes for p in paths[:4]]
    ahead = DecodeAhead.start(tiny_data, cap_bytes=sum(sizes) - 1).collect(stop=False)  # 4th: 1 byte over
    assert ahead.decoded == 3
    assert [ahead.image(p) is not None for p in paths[:4]] == [True, True, True, False]
    ahead.close()


def test_a_stop_asked_between_images_ends_the_pass_there(tiny_data):
    memfd = os.memfd_create("test-decode-ahead")
    asked = iter([False, False, False, True])
    try:
        rows = _decode_into(tiny_data, 1 << 30, memfd, lambda: next(asked))
    finally:
        os.close(memfd)
    assert [row[0] for row in rows] == [os.fspath(p) for p in _paths(tiny_data)[:3]]


def test_a_file_that_does_not_decode_is_left_to_the_loader(tmp_path, tiny_data):
    root = shutil.copytree(tiny_data, tmp_path / "data")
    bad = _paths(root)[1]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ahead = DecodeAhead.start(root).collect(stop=False)
    assert ahead.decoded == 35 and ahead.image(bad) is None
    ahead.close()


def _rt():
    return Runtime(device=torch.device("cpu"), amp_dtype=torch.bfloat16, compile=False, channels_last=True,
                   workers=1)


def _batches(loaders):
    return [b for epoch in (0, 1) for b in loaders.train_batches(epoch)] + list(loaders.test_batches())


def test_the_cached_loader_takes_the_images_and_gives_the_same_batches(tiny_data, monkeypatch):
    cfg = TrainConfig(data=str(tiny_data), loader="cached", image_size=32, batch_size=5, workers=1)
    layout = scan_dataset(tiny_data)
    without = _batches(build_loaders(cfg, layout, _rt()))
    decodes = []
    monkeypatch.setattr(cached_loader, "load_rgb", lambda *a: decodes.append(a) or load_rgb(*a))
    ahead = DecodeAhead.start(tiny_data).collect(stop=False)  # done before the loader asks, as in a run
    loaders = build_loaders(cfg, layout, _rt(), ahead=ahead)
    ahead.close()
    assert decodes == []  # every train and test image came from the child
    assert "36 decoded before, by a child process" in loaders.describe()[0]
    with_ahead = _batches(loaders)
    assert len(with_ahead) == len(without) == 2 * 5 + 3
    for (x, y), (x0, y0) in zip(with_ahead, without):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_decode_ahead_starts_only_where_this_process_decodes_on_a_cpu(tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = TrainConfig(data=str(tiny_data), device="cpu")
    assert start_decode_ahead(cfg) is None  # torch is imported here: no fork beside its threads
    with monkeypatch.context() as patched:  # as `fastft train` calls it: before torch is imported
        patched.delitem(sys.modules, "torch")
        started = start_decode_ahead(cfg)
        refused = [start_decode_ahead(c, cache_dir=tmp_path) for c in (
            TrainConfig(data=str(tiny_data), device="cpu", loader="torch"),
            TrainConfig(data=str(tiny_data), device="cuda"),
            TrainConfig(data=str(tiny_data), device="cpu", resume=True),
            TrainConfig(data=str(tmp_path / "missing"), device="cpu"),
            TrainConfig(data="synthetic", device="cpu", synth_train=7, synth_test=3))]  # not made yet
        patched.setenv("WORLD_SIZE", "2")  # torchrun: each process would fork its own
        refused.append(start_decode_ahead(cfg))
    assert isinstance(started, DecodeAhead)
    started.close()
    assert refused == [None] * 6


def test_a_run_that_fails_before_its_data_still_reaps_the_child(tiny_data, tmp_path):
    from fastft.engine import train
    ahead = DecodeAhead.start(tiny_data)
    cfg = TrainConfig(data=str(tiny_data), device="cpu", strategy="partial:9", out=str(tmp_path / "run"))
    with pytest.raises(ConfigError):
        train(cfg, ahead=ahead)
    assert ahead.entries is not None and _reaped(ahead.pid)


def test_a_reaped_childs_cpu_time_counts_as_this_processs_own():
    before = CpuSample.take()
    pid = os.fork()
    if pid == 0:  # burn ~50 ms of CPU, then go
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
        os._exit(0)
    _, _, usage = os.wait4(pid, 0)
    after = CpuSample.take()
    assert after.own - before.own >= usage.ru_utime + usage.ru_stime - 0.011  # os.times: 10 ms ticks


def test_no_child_where_the_system_refuses_the_memory_file_or_the_fork(tiny_data, monkeypatch):
    def refuse(*args):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(os, "memfd_create", refuse)  # a sandbox without memfd
    assert DecodeAhead.start(tiny_data) is None
    monkeypatch.undo()
    open_before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", refuse)  # no processes left
    assert DecodeAhead.start(tiny_data) is None
    assert len(os.listdir("/proc/self/fd")) == open_before  # its memory file and pipes are closed

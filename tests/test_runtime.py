"""Runtime choices made on CPU for a GPU host: the device made current, timing on its stream,
worker counts and cudnn.benchmark. torch.cuda is replaced by fakes that record what is asked."""

from __future__ import annotations

import pytest
import torch

from fastft import timing
from fastft.config import TrainConfig
from fastft.distributed import Launch
from fastft.errors import ConfigError
from fastft.runtime import cudnn_benchmark, default_workers, resolve_runtime


@pytest.fixture
def two_gpus(monkeypatch) -> list:
    """A process that sees 2 GPUs, GPU 0 current; returns the devices passed to set_device."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    return made_current


def cuda_cfg(device: str) -> TrainConfig:
    return TrainConfig(device=device, amp="off", compile=False, workers=2)


@pytest.mark.parametrize("typed, launch, expected", [
    ("cuda:1", Launch(), 1),               # the case that timed an idle GPU 0
    ("cuda", Launch(), 0),                 # "cuda" means the current GPU, named
    ("cuda", Launch(rank=3, local_rank=1, world_size=4, local_world_size=2, launched=True), 1),
])
def test_the_runs_gpu_becomes_current(two_gpus, typed, launch, expected):
    rt = resolve_runtime(cuda_cfg(typed), launch)
    assert rt.device == torch.device("cuda", expected)
    assert [torch.device(d).index for d in two_gpus] == [expected]


def test_a_gpu_index_past_the_visible_ones_is_a_one_line_error(two_gpus):
    with pytest.raises(ConfigError, match=r"--device cuda:2: only 2 CUDA device\(s\) are visible"):
        resolve_runtime(cuda_cfg("cuda:2"))
    assert two_gpus == []


def test_a_cpu_run_makes_no_cuda_call(two_gpus):
    assert resolve_runtime(cuda_cfg("cpu")).device == torch.device("cpu")
    assert two_gpus == []


class FakeStream:
    def __init__(self, device):
        self.device = torch.device(device)


class FakeEvent:
    made: list = []

    def __init__(self, enable_timing: bool):
        self.stream, self.synced = None, False
        FakeEvent.made.append(self)

    def record(self, stream=None):
        self.stream = stream  # None would mean: the current device's stream

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, end) -> float:
        return 5.0  # ms


def test_step_times_are_recorded_on_the_runs_gpu_and_synced_there(monkeypatch):
    synced = []
    FakeEvent.made = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    gpu1 = torch.device("cuda", 1)
    clock = timing.StepClock(gpu1)
    for _ in range(2):
        clock.start()
        clock.stop()
    assert clock.durations_s() == [0.005, 0.005]
    assert [e.stream.device for e in FakeEvent.made] == [gpu1] * 4
    assert [e.synced for e in FakeEvent.made] == [False, False, False, True]  # one wait per epoch
    timing.sync(gpu1)
    assert synced == [gpu1]


@pytest.mark.parametrize("device, processes, cores, expected", [
    ("cuda", 1, 16, 15),    # one GPU: every core but the training process's own
    ("cuda", 8, 16, 1),     # 8 GPUs share 16 cores
    ("cuda", 4, 64, 15),
    ("cuda", 1, 128, 16),   # capped
    ("cuda", 2, 2, 1),      # always at least one on CUDA
    ("cpu", 1, 16, 0),      # on a CPU, workers would steal the step's cores
])
def test_default_workers_follow_the_cores_and_processes(device, processes, cores, expected):
    assert default_workers(torch.device(device), processes, cores=cores) == expected


def test_typed_workers_are_kept():
    assert resolve_runtime(TrainConfig(device="cpu", workers=3)).workers == 3


@pytest.mark.parametrize("device, sizes, expected", [
    ("cuda", {256}, True),        # the ragged batch dropped (DALI; torch and cached when compiling)
    ("cuda", {256, 208}, False),  # 2,000 images at 256, eager torch loader: a ragged last step
    ("cuda", {24}, True),         # a train set smaller than one batch: one step
    ("cpu", {256}, False),        # no cuDNN on a CPU
])
def test_cudnn_benchmark_only_where_train_shapes_are_fixed(device, sizes, expected):
    assert cudnn_benchmark(torch.device(device), sizes) is expected

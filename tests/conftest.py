"""Shared fixtures: a tiny synthetic dataset, a fake ImageNet checkpoint, tiny configs.

Everything runs on the CPU in seconds: 32 px images, batch 8, no worker processes.
The suite runs on fastft's own thread policy (fastft.threads), decided once per session.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision

from fastft.config import TrainConfig
from fastft.data.synth import write_synthetic
from fastft.threads import ThreadChoice, decide

THREADS = pytest.StashKey[ThreadChoice]()


def pytest_configure(config):
    """torch's threads for the whole session, from fastft's policy: the cores this process may use,
    its quota and the other processes' load, read once here (0.25 s). Exported as OMP_NUM_THREADS,
    so each Trainer and each `fastft` subprocess a test starts takes the same count without reading
    the load again (which would differ from test to test on a shared machine). A value the user
    set is kept, as fastft keeps it."""
    import os
    choice = decide()
    config.stash[THREADS] = choice
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    torch.set_num_threads(choice.threads)


def pytest_report_header(config):
    return f"fastft {config.stash[THREADS].line()}"


# The slowest tests, by node id prefix under tests/ (durations measured on a busy 2-core machine,
# README "Run the tests"): whole training runs to convergence, torchrun jobs of several
# processes, cold compiles. Marked here, in one place; `pytest -m "not slow"` leaves them out.
SLOW = (
    "test_convergence.py::",
    "test_multinode.py::",
    "test_ddp.py::",
    "test_cached_loader.py::test_four_gloo_processes",
    "test_background_checkpoint.py::test_kill_9_during_a_background_write",
    "test_compile_graphs.py::test_each_piece_compiles",
    "test_compile_graphs.py::test_a_frame_past_the_recompile_limit",
    "test_speed_flags.py::test_a_speed_flag_takes_the_reference_step[compile]",
    "test_compile_cache.py::test_a_second_compile_comes_from_the_cache",
    "test_after_training_models.py::",
)


@pytest.fixture(scope="session")
def slow_prefixes() -> tuple[str, ...]:
    """SLOW, for the test that checks it (two conftest modules make `from conftest import` ambiguous)."""
    return SLOW


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.removeprefix("tests/").startswith(SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def kept_compile_cache():
    """One Inductor cache for every test session on this machine, as a user's runs share one.

    Each test gets its own XDG_CACHE_HOME (below), which would otherwise put fastft's compile
    cache there too and make every compiling test a cold compile of ResNet-18 (minutes on 2
    cores). A folder the user set is kept, so this is fastft's "user-set" case.
    """
    import os
    key, before = "TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ[key] = os.path.join(tempfile.gettempdir(), "fastft-tests-inductor")
    yield
    if before is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = before


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    """No test may touch the user's caches or the network's hub."""
    home = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """24 train and 12 test JPEGs, classes hotdog and not-hotdog."""
    return write_synthetic(tmp_path_factory.mktemp("data") / "tiny", n_train=24, n_test=12, seed=0,
                           progress=False)


@pytest.fixture(scope="session")
def imagenet_like(tmp_path_factory) -> Path:
    """A ResNet-18 state_dict with a 1000-way fc and non-trivial BN statistics, as ImageNet's has."""
    torch.manual_seed(123)
    model = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "imagenet_like.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def make_cfg(tiny_data, imagenet_like, tmp_path):
    """A TrainConfig small enough for a CPU test; keyword arguments override."""
    def make(**overrides) -> TrainConfig:
        values = dict(data=str(tiny_data), weights=str(imagenet_like), epochs=1, batch_size=8,
                      image_size=32, workers=0, device="cpu", amp="off", compile=False, loader="torch",
                      out=str(tmp_path / "run"), lr=1e-3)
        values.update(overrides)
        return TrainConfig(**values)
    return make


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str):
    """bench/NAME.py as a module: the bench scripts are run by path, not installed."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench_script():
    """load_bench_script, for the tests of the bench/ scripts."""
    return load_bench_script

"""DistributedDataParallel under torchrun on CPU (gloo): the same training as one process.

Each test launches real processes with `python -m torch.distributed.run`, so
these are the slowest tests here; they keep images at 32 px and runs to a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastft.data.synth import write_synthetic
from fastft.engine import train

N_TRAIN, N_TEST = 32, 13  # 13 test images: no split over 4 processes is even


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("ddp") / "data", n_train=N_TRAIN, n_test=N_TEST,
                           seed=1, progress=False)


def train_args(data: Path, weights: Path, out: Path, **options) -> list[str]:
    values = {"data": data, "weights": weights, "out": out, "strategy": "frozen", "epochs": 2,
              "batch-size": 16, "image-size": 32, "workers": 0, "device": "cpu", "amp": "off",
              "loader": "torch", "lr": 1e-3, **options}
    args = []
    for name, value in values.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None:
            args += [f"--{name}", str(value)]
    return args


def torchrun(nproc: int, args: list[str], timeout: float = 300, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastft", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def single_process_run(data: Path, weights: Path, out: Path, epochs: int = 2) -> dict:
    from fastft.config import TrainConfig
    cfg = TrainConfig(data=str(data), weights=str(weights), out=str(out), strategy="frozen", epochs=epochs,
                      batch_size=16, image_size=32, workers=0, device="cpu", amp="off", compile=False,
                      loader="torch", lr=1e-3)
    return train(cfg)


def test_four_processes_train_exactly_as_one(ddp_data, imagenet_like, tmp_path):
    rc, out, err = finish(torchrun(4, train_args(ddp_data, imagenet_like, tmp_path / "ddp")))
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 4
    assert summary["replicas_identical"] is True
    assert summary["test_examples"] == N_TEST
    assert out.count("epoch 2/2") == 1  # only rank 0 prints

    single_process_run(ddp_data, imagenet_like, tmp_path / "one")
    ddp, one = weights_of(tmp_path / "ddp"), weights_of(tmp_path / "one")
    start = torch.load(imagenet_like, weights_only=True)
    assert (ddp["fc.bias"] - one["fc.bias"]).abs().max() < 1e-5
    assert max_difference(ddp, one) < 1e-5
    assert (one["fc.weight"] - start["fc.weight"][:2]).abs().max() > 1e-3  # the head did train


def test_compiled_finetune_keeps_replicas_identical(ddp_data, imagenet_like, tmp_path):
    """BN in train mode, every parameter reduced, torch.compile over DDP (the DDP optimizer)."""
    args = train_args(ddp_data, imagenet_like, tmp_path / "run", strategy="finetune", compile=True)
    rc, _, err = finish(torchrun(2, args), timeout=600)
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["compile"] is True
    assert summary["replicas_identical"] is True
    assert summary["test_examples"] == N_TEST
    assert summary["recompiles"] == 0


def test_a_failing_rank_ends_the_job_with_its_error(imagenet_like, tmp_path):
    started = time.monotonic()
    rc, _, err = finish(torchrun(2, train_args(tmp_path / "missing", imagenet_like, tmp_path / "run")),
                        timeout=120)
    assert rc != 0
    assert "fastft: error: [rank " in err and "missing" in err
    assert time.monotonic() - started < 120


def worker_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of each worker process torchrun started."""
    pids = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
            if ranks:
                pids[int(ranks[0])] = int(pid)
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds worker processes through /proc")
def test_killed_rank_ends_the_job_and_resume_completes_it(ddp_data, imagenet_like, tmp_path):
    run = tmp_path / "run"
    epochs = 8
    proc = torchrun(4, train_args(ddp_data, imagenet_like, run, epochs=epochs))
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.pt").exists():  # let epoch 1 finish, then kill mid-run
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(worker_pids(proc.pid)[2], signal.SIGKILL)
    killed_at = time.monotonic()
    rc, _, _ = finish(proc, timeout=120)
    assert rc != 0
    assert time.monotonic() - killed_at < 60

    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 1 <= saved["epoch"] < epochs
    rc, _, err = finish(torchrun(4, train_args(ddp_data, imagenet_like, run, epochs=epochs, resume=True)))
    assert rc == 0, err[-3000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, epochs + 1))
    # The interrupted and resumed job ends where one uninterrupted process does.
    single_process_run(ddp_data, imagenet_like, tmp_path / "one", epochs=epochs)
    assert max_difference(weights_of(run), weights_of(tmp_path / "one")) < 1e-5


def test_ranks_with_different_numbers_of_test_batches_do_not_wait_on_each_other(ddp_data, imagenet_like,
                                                                                 tmp_path):
    """13 test images, 2 per batch: rank 0 runs 4 test batches, rank 1 runs 3. Evaluation must
    issue no per-batch collective (BN buffers stay unsynced under no_grad), or the job would hang."""
    args = train_args(ddp_data, imagenet_like, tmp_path / "run", strategy="finetune", epochs=1,
                      **{"batch-size": 4, "dist-timeout": 60})
    rc, _, err = finish(torchrun(2, args), timeout=240)
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_examples"] == N_TEST and summary["replicas_identical"] is True

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
import torchvision

from fastft.data.synth import write_synthetic
from fastft.distributed import broadcast_buffers
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


def test_compiled_training_keeps_replicas_identical(ddp_data, imagenet_like, tmp_path):
    """BN in train mode, every trainable parameter reduced, torch.compile over DDP (the DDP
    optimizer), the frozen prefix compiled on its own. partial:3 trains layer4 and the head: a
    cold Inductor compile of the whole network's backward in two processes on a 2-core CI
    machine takes over 10 minutes, and the mechanism is the same."""
    args = train_args(ddp_data, imagenet_like, tmp_path / "run", strategy="partial:3", compile=True)
    rc, _, err = finish(torchrun(2, args), timeout=900)
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["compile"] is True
    assert summary["replicas_identical"] is True
    assert summary["test_examples"] == N_TEST
    assert summary["recompiles"] == 0


def test_a_failing_rank_ends_the_job_with_its_error(imagenet_like, tmp_path):
    # A folder that exists but holds no split: the command line's early check passes it, and each
    # rank fails on it in its data setup (a missing folder is answered before torch loads, by rank 0).
    (tmp_path / "nosplits").mkdir()
    started = time.monotonic()
    rc, _, err = finish(torchrun(2, train_args(tmp_path / "nosplits", imagenet_like, tmp_path / "run")),
                        timeout=120)
    assert rc != 0
    assert "fastft: error: [rank " in err and "nosplits" in err
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
    issue no per-batch collective (it never runs through DDP), or the job would hang."""
    # 64 px: 2 images per process give the last stage's BatchNorm 2x2x2 values (32 px: too few).
    args = train_args(ddp_data, imagenet_like, tmp_path / "run", strategy="finetune", epochs=1,
                      **{"batch-size": 4, "dist-timeout": 60, "image-size": 64})
    rc, _, err = finish(torchrun(2, args), timeout=240)
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_examples"] == N_TEST and summary["replicas_identical"] is True


@pytest.fixture(scope="module")
def two_test_images(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("ddp-two") / "data", n_train=16, n_test=2, seed=2,
                           progress=False)


@pytest.mark.parametrize("strategy", ["finetune", "partial:2"])
def test_processes_without_a_test_batch_still_finish_evaluation(two_test_images, imagenet_like, tmp_path,
                                                                strategy):
    """2 test images over 4 processes: ranks 2 and 3 get no test batch. Evaluation must make the same
    collectives on every rank (DDP's first no-grad forward broadcasts BN buffers: a rank that skips
    it leaves the others waiting until --dist-timeout). finetune wraps the whole model in DDP,
    partial:2 the fast path's suffix; both hold BN buffers."""
    # Global batch 8: 2 per process; at 64 px layer4 is 2x2, so train-mode BN gets 8 values per
    # channel (fastft refuses fewer than 4: at 32 px that would need 4 images per process).
    args = train_args(two_test_images, imagenet_like, tmp_path / "run", strategy=strategy, epochs=1,
                      **{"batch-size": 8, "dist-timeout": 30, "image-size": 64})
    rc, _, err = finish(torchrun(4, args), timeout=150)
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["test_examples"] == 2
    assert summary["replicas_identical"] is True


def _take_rank0_buffers(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    with torch.no_grad():  # every rank's own statistics and parameters
        model[1].running_mean.fill_(rank + 1.0)
        model[1].running_var.fill_(rank + 2.0)
        model[1].num_batches_tracked.fill_(10 * rank + 5)
        model[1].weight.fill_(rank + 3.0)
    broadcast_buffers(model)
    torch.save(model.state_dict(), Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def test_broadcast_buffers_gives_every_rank_rank0s_buffers_and_leaves_parameters(tmp_path):
    """What evaluation relies on: the values DDP's own buffer broadcast would give, every dtype."""
    # fork: the children need nothing imported anew (spawn would re-import this module: ~20 s here)
    context = torch.multiprocessing.start_processes(_take_rank0_buffers, nprocs=2, join=False, start_method="fork",
                                                    args=(2, str(tmp_path / "init"), str(tmp_path)))
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the buffer broadcast did not finish in 60 s")
    states = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    for state in states:
        assert torch.equal(state["1.running_mean"], torch.full((4,), 1.0))
        assert torch.equal(state["1.running_var"], torch.full((4,), 2.0))
        assert state["1.num_batches_tracked"].item() == 5
    assert [state["1.weight"][0].item() for state in states] == [3.0, 4.0]  # parameters are DDP's job


def test_a_model_without_batch_norm_trains_under_ddp_exactly_as_one(ddp_data, tmp_path):
    """vit_b_16 (no BN, so per-process batch statistics cannot differ) with partial:2: the split
    fast path under DDP gives one process's weights; its frozen blocks stay as initialised."""
    options = {"model": "vit_b_16", "strategy": "partial:2", "epochs": 1}
    rc, _, err = finish(torchrun(2, train_args(ddp_data, "none", tmp_path / "ddp", **options)), timeout=600)
    assert rc == 0, err[-3000:]
    from fastft.config import TrainConfig
    train(TrainConfig(data=str(ddp_data), out=str(tmp_path / "one"), epochs=1, batch_size=16, image_size=32,
                      workers=0, device="cpu", amp="off", compile=False, loader="torch", lr=1e-3,
                      model="vit_b_16", strategy="partial:2", weights="none"))
    ddp, one = weights_of(tmp_path / "ddp"), weights_of(tmp_path / "one")
    assert max_difference(ddp, one) < 1e-5
    torch.manual_seed(0)  # as both runs, before they build the model
    start = torchvision.models.vit_b_16(num_classes=2, image_size=32).state_dict()
    frozen = [k for k in start if k.startswith(("conv_proj", "class_token", "encoder.pos_embedding",
                                                *(f"encoder.layers.encoder_layer_{i}." for i in range(6))))]
    assert frozen and all(torch.equal(one[k], start[k]) for k in frozen)
    assert not torch.equal(one["heads.head.weight"], start["heads.head.weight"])

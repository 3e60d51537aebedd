"""Two machines imitated on one: two torchrun agents, each a "node" of 2 CPU processes (gloo).

The agents meet through a c10d rendezvous on 127.0.0.1, as `--nnodes=2` agents on two hosts
meet at HOST:PORT. Each node gets its own cache folder (XDG_CACHE_HOME) and its own working
directory, as separate machines have: each node's local rank 0 must write its own copy of
the synthetic set, and a relative `--out` resolves against each node's own directory, so
any file written by a process other than global rank 0 would show up in the wrong place.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from test_ddp import finish, max_difference, single_process_run, train_args, weights_of, worker_pids

N_TRAIN, N_TEST = 16, 13  # 13 test images: 4, 3, 3, 3 over four processes
EPOCHS = 6  # epoch 1 saved, then the kill must land before the run ends
RUN = "run"  # relative on purpose: see the module docstring

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_listener(port: int, agent: subprocess.Popen, timeout: float = 60) -> None:
    """Until the first agent hosts the rendezvous store, so it (not the killed one) owns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert agent.poll() is None, agent.communicate()[1][-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"the first agent never listened on port {port}")


def agent(node: Path, port: int, args: list[str]) -> subprocess.Popen:
    """One node's torchrun agent, in its own cwd and cache, in its own process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fastft-multinode",
           "--rdzv-conf=join_timeout=90", "--max-restarts=0", "--monitor-interval=0.5",
           "-m", "fastft", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(node / "cache")}
    return subprocess.Popen(cmd, cwd=node / "cwd", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def two_nodes(nodes: list[Path], args: list[str]) -> tuple[subprocess.Popen, subprocess.Popen]:
    port = free_port()
    first = agent(nodes[0], port, args)
    wait_for_listener(port, first)
    return first, agent(nodes[1], port, args)


def lose_machine(agent: subprocess.Popen) -> None:
    """SIGKILL a node's agent and its workers (torchrun starts each worker in its own session)."""
    workers = worker_pids(agent.pid)
    assert len(workers) == 2, workers
    for pid in (*workers.values(), agent.pid):
        os.killpg(pid, signal.SIGKILL)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds worker processes through /proc")
def test_two_nodes_train_resume_after_a_lost_node_and_match_one_process(imagenet_like, tmp_path):
    nodes = [tmp_path / f"node{i}" for i in range(2)]
    for node in nodes:
        (node / "cwd").mkdir(parents=True)
    args = train_args("synthetic", imagenet_like, RUN, epochs=EPOCHS,
                      **{"dist-timeout": 30, "synth-train": N_TRAIN, "synth-test": N_TEST})

    first, second = two_nodes(nodes, args)
    runs = [node / "cwd" / RUN for node in nodes]
    deadline = time.monotonic() + 240
    while not any((run / "checkpoint.pt").exists() for run in runs):  # epoch 1 saved: kill mid-run
        assert first.poll() is None and second.poll() is None and time.monotonic() < deadline, \
            first.communicate()[1][-3000:]
        time.sleep(0.05)
    lose_machine(second)
    killed_at = time.monotonic()
    rc, _, err = finish(first, timeout=120)
    assert rc != 0, err[-3000:]
    assert time.monotonic() - killed_at < 90
    second.communicate()

    # Each node's local rank 0 wrote that node's own copy of the dataset.
    for node in nodes:
        data = node / "cache" / "fastft" / f"synthetic-s0-{N_TRAIN}-{N_TEST}"
        assert len(files_under(data / "train")) == N_TRAIN and len(files_under(data / "test")) == N_TEST
    # Only global rank 0 wrote run files: one node's relative --out holds them, the other's
    # working directory holds nothing at all.
    main = [i for i, run in enumerate(runs) if run.exists()]
    assert len(main) == 1, [files_under(node / "cwd") for node in nodes]
    assert files_under(nodes[1 - main[0]] / "cwd") == []
    assert {"checkpoint.pt", "config.json", "metrics.jsonl"} <= set(files_under(runs[main[0]]))
    saved = torch.load(runs[main[0]] / "checkpoint.pt", weights_only=True)
    assert 1 <= saved["epoch"] < EPOCHS and saved["world_size"] == 4

    # --resume needs --out on a shared file system: mount the run folder on the other node too.
    runs[1 - main[0]].symlink_to(runs[main[0]], target_is_directory=True)
    first, second = two_nodes(nodes, [*args, "--resume"])
    with ThreadPoolExecutor(2) as pool:  # drain both agents' pipes at once
        (rc0, _, err0), (rc1, _, err1) = pool.map(finish, (first, second))
    assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])

    run = runs[main[0]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["replicas_identical"] is True
    assert summary["test_examples"] == N_TEST
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))
    # The interrupted two-node job ends where one uninterrupted process does.
    data = nodes[0] / "cache" / "fastft" / f"synthetic-s0-{N_TRAIN}-{N_TEST}"
    single_process_run(data, imagenet_like, tmp_path / "one", epochs=EPOCHS)
    assert max_difference(weights_of(run), weights_of(tmp_path / "one")) < 1e-5

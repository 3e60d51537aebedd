"""Checkpoints are written in the background from a CPU copy, one at a time, and stay atomic.

The kill -9 test slows the checkpoint's file writes in a real `fastft train` process (a wrapper
script patches `open` in fastft.checkpoint only) so the kill lands while `checkpoint.pt.tmp` grows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fastft.checkpoint as ckpt
from fastft.checkpoint import CheckpointWriter, load_checkpoint
from fastft.cli import main
from fastft.engine import Trainer, train
from fastft import safe_write
from fastft.errors import WriteError


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tmp_files(run: Path) -> list[str]:
    return [name for name in os.listdir(run) if name.endswith(".tmp")]


def test_the_file_holds_the_state_at_save_time_and_save_returns_before_the_write(tmp_path, monkeypatch):
    real_save, mutated, waited = ckpt.save_atomic, threading.Event(), []

    def gated_save(state, path):  # the write starts only once training has changed the tensors
        waited.append(mutated.wait(timeout=60))
        real_save(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", gated_save)
    weight, momentum = torch.arange(6.0).reshape(2, 3), torch.ones(3)
    state = {"model": {"w": weight}, "optimizer": {"state": {0: {"momentum_buffer": momentum}}},
             "epoch": 1, "config": {}, "classes": ["a", "b"], "rng": {"torch": torch.get_rng_state()}}
    writer, path = CheckpointWriter(), tmp_path / "checkpoint.pt"
    writer.save(state, path)
    weight.add_(100)  # the next training steps, in place, while the write is pending
    momentum.mul_(7)
    state["epoch"] = 2
    mutated.set()
    writer.wait()
    assert waited == [True]  # save() returned before the write began: it runs on another thread
    saved = load_checkpoint(path)
    assert torch.equal(saved["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    assert saved["epoch"] == 1 and tmp_files(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_snapshot_is_pinned_and_holds_the_values_at_save_time():
    weight = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    expected = weight.cpu()
    snap = ckpt.cpu_snapshot({"w": weight, "views": [weight[:4]]})
    weight.add_(1)  # queued on the same stream right after the copies
    torch.cuda.synchronize()
    assert snap["w"].device.type == "cpu" and snap["w"].is_pinned()
    assert torch.equal(snap["w"], expected) and torch.equal(snap["views"][0], expected[:4])


def test_a_failed_background_write_keeps_the_last_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    writer, path = CheckpointWriter(), tmp_path / "checkpoint.pt"
    good = {"model": {"w": torch.zeros(4)}, "epoch": 1, "config": {}, "classes": ["a"]}
    writer.save(good, path)
    writer.wait()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safe_write.os, "fsync", full_disk)
    writer.save({**good, "epoch": 2}, path)
    with pytest.raises(WriteError, match=f"^{path}: disk full: the file needs about 64.0 KB and "):
        writer.wait()
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and tmp_files(tmp_path) == []
    writer.wait()  # the error was reported once; the writer is usable again


def test_save_every_2_then_a_crash_mid_write_resumes_exactly_from_epoch_2(make_cfg, tmp_path, monkeypatch):
    real_save, written, crashed = ckpt.save_atomic, [], threading.Event()

    def recording_save(state, path):
        if state["epoch"] == 2 and "split" in str(path):
            crashed.wait(timeout=60)  # still writing epoch 2 when epoch 3 fails
        real_save(state, path)
        written.append((path.parent.name, state["epoch"]))

    monkeypatch.setattr(ckpt, "save_atomic", recording_save)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(epochs=3, save_every=2, out=str(straight)))
    assert written == [("straight", 2), ("straight", 3)]  # no epoch-1 file; the last epoch always

    real_epoch = Trainer.train_epoch

    def failing_epoch(self, epoch):
        if epoch == 2:
            crashed.set()
            raise RuntimeError("epoch 3 fails")
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", failing_epoch)
    with pytest.raises(RuntimeError, match="epoch 3 fails"):
        train(make_cfg(epochs=3, save_every=2, out=str(split)))
    # The error path waited for the write in flight: epoch 2 is on disk, whole.
    assert load_checkpoint(split)["epoch"] == 2 and tmp_files(split) == []
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    train(make_cfg(epochs=3, save_every=2, out=str(split), resume=True))
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    strip = lambda rows: [{k: v for k, v in r.items() if "sec" not in k and k != "epoch_s"} for r in rows]
    assert strip(metrics(straight)) == strip(metrics(split))


# Runs `fastft train` with every write into checkpoint.pt.tmp slowed to ~2 s, and logs each
# opening of the .tmp, so the test knows which save is in flight when it kills the process.
SLOW_WRITER = '''
import sys, time
import fastft.safe_write as safe_write
from fastft.cli import main

LOG, CHUNK = sys.argv[1], 1 << 20

class SlowFile:
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            self.handle.write(view[start:start + CHUNK])
            self.handle.flush()  # on disk now: the test watches the file grow
            time.sleep(0.003)
        return len(view)
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()

def slow_open(path, mode="r", *args, **kwargs):
    handle = open(path, mode, *args, **kwargs)
    if str(path).endswith("checkpoint.pt.tmp"):  # safe_write writes every file of the run
        with open(LOG, "a") as log:
            log.write("open\\n")
        return SlowFile(handle)
    return handle

safe_write.open = slow_open
sys.exit(main(sys.argv[2:]))
'''


def test_kill_9_during_a_background_write_leaves_the_previous_checkpoint(tiny_data, imagenet_like, tmp_path):
    run, log, script = tmp_path / "killed", tmp_path / "opens.log", tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    args = ["train", "--data", str(tiny_data), "--weights", str(imagenet_like), "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--amp", "off", "--no-compile",
            "--loader", "torch", "--out", str(run)]
    stderr = tmp_path / "stderr.txt"  # a file, not a pipe nobody reads until the end
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(log), *args, "--epochs", "50"],
                                stdout=subprocess.DEVNULL, stderr=err)
    tmp, last_size, deadline = run / "checkpoint.pt.tmp", 0, time.monotonic() + 240
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            opens = log.read_text().count("open") if log.exists() else 0
            size = tmp.stat().st_size if tmp.exists() else 0
            lines = (run / "metrics.jsonl").read_text().count("\n") if (run / "metrics.jsonl").exists() else 0
            # Save 2 or later in flight, its file growing, and training already past that save.
            if opens >= 2 and 0 < last_size < size and lines >= opens:
                break
            last_size = size
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, stderr.read_text()
    in_flight = log.read_text().count("open")
    assert tmp.exists() and tmp.stat().st_size < (run / "checkpoint.pt").stat().st_size  # killed mid-write
    assert load_checkpoint(run)["epoch"] == in_flight - 1  # the previous epoch, whole
    assert main([*args, "--resume", "--epochs", str(in_flight + 1)]) == 0  # the stale .tmp is ignored
    assert [row["epoch"] for row in metrics(run)] == list(range(1, in_flight + 2))
    assert load_checkpoint(run)["epoch"] == in_flight + 1 and tmp_files(run) == []

"""Resume is exact: two epochs straight equal one epoch, a resume, and one more epoch."""

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

from fastft.checkpoint import load_checkpoint, restore_rng, rng_state
from fastft.cli import main
from fastft.engine import train
from fastft.errors import ConfigError


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loader,workers", [("torch", 0), ("torch", 2), ("dali", 1)])
def test_two_epochs_straight_equal_one_plus_resume_plus_one(make_cfg, tmp_path, loader, workers):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(epochs=2, out=str(straight), workers=workers, loader=loader))
    train(make_cfg(epochs=1, out=str(split), workers=workers, loader=loader))
    train(make_cfg(epochs=2, out=str(split), workers=workers, loader=loader, resume=True))
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    momentum_free = a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert momentum_free
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    strip = lambda rows: [{k: v for k, v in r.items() if "sec" not in k and k != "epoch_s"} for r in rows]
    assert strip(metrics(straight)) == strip(metrics(split))


def test_resume_keeps_the_runs_settings_and_warns_about_ignored_options(make_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    train(make_cfg(epochs=1, out=str(run)))
    cfg = make_cfg(epochs=2, out=str(run), resume=True, lr=0.5, weight_decay=0.25)
    train(cfg, typed=frozenset({"lr", "epochs", "out", "resume"}))
    err = capsys.readouterr().err
    assert "ignoring --lr 0.5" in err and "weight-decay" not in err  # only typed options warn
    assert load_checkpoint(run)["config"]["lr"] == 1e-3
    assert load_checkpoint(run)["epoch"] == 2


def test_a_new_run_never_overwrites_a_finished_one(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(out=str(run)))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make_cfg(out=str(run)))


def test_a_killed_run_leaves_a_loadable_checkpoint_and_resume_completes_it(tiny_data, imagenet_like, tmp_path):
    run = tmp_path / "killed"
    args = ["train", "--data", str(tiny_data), "--weights", str(imagenet_like), "--image-size", "64",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--amp", "off", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "fastft", *args, "--epochs", "50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch, so the kill lands mid-epoch or mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = load_checkpoint(run)["epoch"]
    assert done >= 1
    assert main([*args, "--resume", "--epochs", str(done + 1)]) == 0
    assert [row["epoch"] for row in metrics(run)] == list(range(1, done + 2))
    assert json.loads((run / "summary.json").read_text())["epochs"] == done + 1
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_resume_drops_metric_lines_the_checkpoint_does_not_hold(tmp_path):
    from fastft.report import Reporter
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epo')  # killed mid-write
    Reporter(tmp_path, enabled=True).keep_metrics_up_to(2)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_resume_on_a_dataset_with_other_classes_is_a_clear_error(make_cfg, tmp_path, tiny_data):
    import shutil
    from fastft.errors import CheckpointError
    run = tmp_path / "run"
    train(make_cfg(out=str(run)))
    other = Path(shutil.copytree(tiny_data, tmp_path / "other"))
    for split in ("train", "test"):
        (other / split / "not-hotdog").rename(other / split / "pizza")
    with pytest.raises(CheckpointError, match="trained on classes"):
        train(make_cfg(out=str(run), data=str(other), epochs=2, resume=True))


def test_a_bare_resume_continues_with_the_runs_own_epochs_and_data(make_cfg, tiny_data, tmp_path):
    from fastft.engine import Trainer
    run = tmp_path / "run"
    trainer = Trainer(make_cfg(epochs=2, out=str(run))).setup()
    trainer.train_epoch(0)
    trainer.save_checkpoint(1)  # as if killed during epoch 2
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert load_checkpoint(run)["epoch"] == 2  # the run's own --epochs 2, not the default 5
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["data_dir"] == str(tiny_data) and config["image_size"] == 32


class FakeCudaRng:
    """torch.cuda's RNG calls on a machine with `visible` GPUs; records the devices used."""

    def __init__(self, monkeypatch, visible: int):
        self.visible, self.read, self.written = visible, [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        for name in ("get_rng_state_all", "set_rng_state_all"):  # a call would be the old bug
            monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: pytest.fail(f"{name} touches every GPU"))

    def _index(self, device) -> int:
        index = torch.device(device).index
        assert index is not None and index < self.visible, f"{device} is not visible here"
        return index

    def get(self, device="cuda"):
        index = self._index(device)
        self.read.append(index)
        return torch.full((16,), 100 + index, dtype=torch.uint8)  # a state that names its GPU

    def set(self, state, device="cuda"):
        self.written.append((self._index(device), state[0].item()))


def test_rng_state_saved_on_cuda_1_restores_where_one_gpu_is_visible(monkeypatch):
    """Saved on cuda:1 of 2 GPUs; resumed where only 1 GPU is visible, as cuda:0.
    The state belongs to the run's device, not to an index: it lands on cuda:0."""
    saver = FakeCudaRng(monkeypatch, visible=2)
    state = rng_state(torch.device("cuda", 1))
    assert saver.read == [1] and state["cuda"][0].item() == 101  # that GPU alone
    resumer = FakeCudaRng(monkeypatch, visible=1)
    assert restore_rng(state, torch.device("cuda", 0)) is None
    assert resumer.written == [(0, 101)]


def test_a_cpu_runs_rng_state_has_no_cuda_entry(monkeypatch):
    fake = FakeCudaRng(monkeypatch, visible=2)
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch", "python"} and fake.read == []
    assert restore_rng(state, torch.device("cuda", 0)) is None and fake.written == []


def test_an_older_checkpoints_per_gpu_list_gives_this_devices_entry_or_a_warning(monkeypatch):
    fake = FakeCudaRng(monkeypatch, visible=1)
    old = {**rng_state(torch.device("cpu")), "cuda": [torch.full((16,), 100 + i, dtype=torch.uint8)
                                                      for i in range(2)]}
    assert restore_rng(old, torch.device("cuda", 0)) is None
    assert fake.written == [(0, 100)]
    note = restore_rng(old, torch.device("cuda", 3))
    assert "2 GPU(s), none for cuda:3" in note and fake.written == [(0, 100)]


def test_a_pickled_model_as_checkpoint_is_one_plain_line_and_runs_no_code(tmp_path):
    import torchvision
    from fastft.errors import CheckpointError
    path = tmp_path / "checkpoint.pt"
    torch.save(torchvision.models.resnet18(num_classes=2), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    line = err.value.one_line()
    assert line.startswith(f"{path}: holds a pickled model object (torchvision.models.resnet.ResNet)")
    assert "torch.save(model.state_dict(), PATH)" in line and "\x1b" not in line


@pytest.mark.parametrize("name", ["model.safetensors", "metrics.jsonl", "summary.json"])
def test_a_new_run_never_overwrites_a_finished_run_without_its_checkpoint(make_cfg, tmp_path, name):
    """A user deletes checkpoint.pt to free room: the folder still holds a run's results, and they stay."""
    from fastft.errors import ConfigError
    from fastft.rundir import choose_run_dir
    out = tmp_path / "done"
    out.mkdir()
    (out / name).write_bytes(b'{"epoch": 1}\n')
    with pytest.raises(ConfigError, match=f"already holds {name} of an earlier run"):
        choose_run_dir(make_cfg(out=str(out)))
    assert (out / name).read_bytes() == b'{"epoch": 1}\n'


def test_a_run_stopped_before_its_first_epoch_ended_can_start_again_in_its_folder(make_cfg, tmp_path):
    """config.json, an empty metrics.jsonl and a curves.png hold no result: the same --out starts again."""
    from fastft.rundir import choose_run_dir
    out = tmp_path / "stopped"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl", "curves.png"):
        (out / name).write_bytes(b"")
    (out / "config.json").write_text("{}")
    assert choose_run_dir(make_cfg(out=str(out))) == out

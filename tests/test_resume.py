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

from fastft.checkpoint import load_checkpoint
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

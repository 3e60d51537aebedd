"""--tensorboard: per-epoch scalars in RUN_DIR/tb, read back with tensorboard's own event reader."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from fastft.cli import main
from fastft.report import Reporter
from fastft.tensorboard_log import SCALARS, TensorBoardLog

TENSORBOARD_MODULES = ("tensorboard", "torch.utils.tensorboard")
needs_tensorboard = pytest.mark.skipif(find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed: pip install tensorboard")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) events, as TensorBoard shows them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def f32(value: float) -> float:
    """What an event file keeps of a float: float32."""
    return float(np.float32(value))


@pytest.fixture(scope="module")
def resumed(tiny_data, imagenet_like, tmp_path_factory) -> Path:
    """A 2-epoch --tensorboard run, then resumed for a third epoch."""
    run = tmp_path_factory.mktemp("tb") / "run"
    args = ["train", "--data", str(tiny_data), "--weights", str(imagenet_like), "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--amp", "off", "--no-compile",
            "--loader", "torch", "--strategy", "partial:3", "--out", str(run)]
    assert main([*args, "--epochs", "2", "--tensorboard"]) == 0
    assert main([*args, "--epochs", "3", "--resume"]) == 0  # the run's recorded --tensorboard holds
    return run


@needs_tensorboard
def test_event_files_hold_every_epochs_scalars_exactly(resumed):
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    logged = scalars(resumed / "tb")
    assert set(logged) == {*SCALARS.values(), "lr/group0", "lr/group1"}
    for key, tag in SCALARS.items():
        assert logged[tag] == [(r["epoch"], f32(r[key])) for r in records], tag
    lrs = json.loads((resumed / "config.json").read_text())["resolved"]["lr_per_group"]
    assert lrs == [5e-5, 5e-4]  # partial:3: layer4 at --lr, the head at 10x
    for index, lr in enumerate(lrs):
        assert logged[f"lr/group{index}"] == [(step, f32(lr)) for step in (1, 2, 3)]
    assert len(list((resumed / "tb").glob("events.out.tfevents.*"))) == 2  # one per process, steps continue


@needs_tensorboard
def test_a_resume_replaces_the_epochs_its_checkpoint_did_not_hold(tmp_path):
    first = TensorBoardLog(tmp_path)
    for epoch in (1, 2, 3):
        first.add_epoch({"epoch": epoch, "train_loss": float(epoch)}, [0.1])
    first.close()  # killed after epoch 3's line, with the checkpoint of epoch 1
    again = TensorBoardLog(tmp_path)
    for epoch in (2, 3):
        again.add_epoch({"epoch": epoch, "train_loss": 10.0 * epoch}, [0.1])
    again.close()
    assert scalars(tmp_path)["loss/train"] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_without_tensorboard_the_run_stops_before_any_data_work(tmp_path, monkeypatch, capsys):
    for name in TENSORBOARD_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import` of these now raises ImportError
    run = tmp_path / "run"
    # An empty --data folder would be the first error of any data work ("missing split folder").
    (tmp_path / "empty-data").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty-data"), "--device", "cpu", "--out", str(run),
                 "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard needs the tensorboard package" in err
    assert "pip install tensorboard" in err
    assert not run.exists()


def test_only_the_main_process_logs(tmp_path, monkeypatch):
    for name in TENSORBOARD_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    other_rank = Reporter(tmp_path, enabled=False, tensorboard=True)  # no import, so no error
    other_rank.append_metrics({"epoch": 1, "train_loss": 0.5, "train_acc": 0.5, "test_acc": 0.5})
    other_rank.close()
    assert list(tmp_path.iterdir()) == []

"""The command line as a user meets it: outputs, run files, predict, and one-line errors."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastft.cli import main
from fastft.data.images import decode_problem

SUMMARY_KEYS = {"strategy", "epochs", "train_loss", "train_acc", "test_acc", "test_examples",
                "examples_per_sec", "examples_per_sec_compute", "compile_s", "world_size", "device",
                "loader", "amp", "compile", "channels_last", "wall_s"}


def tiny_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--weights", str(weights), "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained_run(tiny_data, imagenet_like, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(tiny_args(tiny_data, imagenet_like, run, "--epochs", "2", "--amp", "off")) == 0
    return run


def test_train_writes_the_run_folder(trained_run, tiny_data):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["strategy"] == "finetune" and config["resolved"]["data_dir"] == str(tiny_data)
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(row["examples"] == 24 and row["test_examples"] == 12 for row in rows)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["test_examples"] == 12 and summary["world_size"] == 1 and summary["epochs"] == 2
    assert summary["examples_per_sec"] > 0 and summary["compile_s"] == 0.0


def test_train_prints_d2l_style_lines(tiny_data, imagenet_like, tmp_path, capsys):
    assert main(tiny_args(tiny_data, imagenet_like, tmp_path / "r", "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1: loss " in out and ", train acc " in out and ", test acc " in out
    assert "examples/sec on [cpu]" in out


def test_predict_prints_a_class_and_probability_per_image(trained_run, tiny_data, capsys):
    images = sorted((tiny_data / "test" / "hotdog").iterdir())[:2]
    assert main(["predict", "--checkpoint", str(trained_run), *map(str, images)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, images):
        path, label, prob = line.rsplit(" ", 2)
        assert path == f"{image}:" and label in ("hotdog", "not-hotdog") and 0.5 <= float(prob) <= 1.0


def test_predict_matches_the_models_own_evaluation(trained_run, tiny_data, capsys):
    """Predicted labels over the test split reproduce the run's final test accuracy."""
    images = sorted((tiny_data / "test").rglob("*.jpg"))
    assert main(["predict", "--checkpoint", str(trained_run), *map(str, images)]) == 0
    labels = [line.rsplit(" ", 2)[1] for line in capsys.readouterr().out.strip().splitlines()]
    correct = sum(label == image.parent.name for label, image in zip(labels, images))
    summary = json.loads((trained_run / "summary.json").read_text())
    assert correct / len(images) == pytest.approx(summary["test_acc"])


def test_module_entry_point_shows_help():
    result = subprocess.run([sys.executable, "-m", "fastft", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--strategy" in result.stdout and "--resume" in result.stdout


# --- bad input: exit status 2 and one line that names the problem ----------------------------

def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fastft: error: ") and "Traceback" not in err
    return err


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "copy"))


def first_jpeg(root: Path) -> Path:
    return sorted((root / "train" / "hotdog").iterdir())[0]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def twelve_bit_jpeg(path: Path) -> None:  # a PNG named .jpg is read as PNG: not a bad image
    import numpy as np
    from jpeg_codings import flat_block_jpeg
    path.write_bytes(flat_block_jpeg(np.array([[0, 4095]]), precision=12))


def text_named_jpg(path: Path) -> None:
    path.write_text("this is not an image\n")


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("spoil, expect", [(truncate, "truncated"), (twelve_bit_jpeg, "12-bit extended sequential JPEG"),
                                           (text_named_jpg, "not an image"), (empty, "empty file")])
def test_a_bad_image_is_named_in_one_line(capsys, data_copy, imagenet_like, tmp_path, spoil, expect):
    bad = first_jpeg(data_copy)
    spoil(bad)
    err = one_line_error(capsys, tiny_args(data_copy, imagenet_like, tmp_path / "r"))
    assert str(bad) in err and expect in err
    assert not (tmp_path / "r").exists(), "a run that never started leaves no folder behind"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_that_fails_mid_epoch_is_named_in_one_line(capsys, data_copy, imagenet_like, tmp_path, workers):
    """Header and end marker intact, so only a real decode finds it: inside a loader worker."""
    bad = first_jpeg(data_copy)
    body = bytearray(bad.read_bytes())
    noise = random.Random(0)
    for i in range(600, len(body) - 2):
        body[i] = noise.randrange(256)
    bad.write_bytes(bytes(body))
    err = one_line_error(capsys, tiny_args(data_copy, imagenet_like, tmp_path / "r", "--workers", workers,
                                           "--loader", "torch"))
    assert err == f"fastft: error: {bad}: {decode_problem(bad)}"  # the words data check uses for it


def test_an_empty_class_folder_is_named(capsys, data_copy, imagenet_like, tmp_path):
    shutil.rmtree(data_copy / "train" / "hotdog")
    (data_copy / "train" / "hotdog").mkdir()
    err = one_line_error(capsys, tiny_args(data_copy, imagenet_like, tmp_path / "r"))
    assert f"{data_copy / 'train' / 'hotdog'}: no images" in err


def test_a_missing_split_is_named(capsys, data_copy, imagenet_like, tmp_path):
    shutil.rmtree(data_copy / "test")
    err = one_line_error(capsys, tiny_args(data_copy, imagenet_like, tmp_path / "r"))
    assert "test: missing split folder" in err


def test_a_test_class_that_train_lacks_is_an_error(capsys, data_copy, imagenet_like, tmp_path):
    (data_copy / "test" / "not-hotdog").rename(data_copy / "test" / "pizza")
    err = one_line_error(capsys, tiny_args(data_copy, imagenet_like, tmp_path / "r"))
    assert f"{data_copy / 'test' / 'pizza'}: test class 'pizza' has no folder in" in err


def test_an_unreadable_checkpoint_is_an_error_for_resume_and_predict(capsys, trained_run, tmp_path, tiny_data,
                                                                     imagenet_like):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes((trained_run / "checkpoint.pt").read_bytes()[:1000])
    err = one_line_error(capsys, tiny_args(tiny_data, imagenet_like, broken, "--resume"))
    assert "unreadable checkpoint" in err and str(broken) in err
    image = first_jpeg(tiny_data)
    err = one_line_error(capsys, ["predict", "--checkpoint", str(broken), str(image)])
    assert "unreadable checkpoint" in err


def test_unreadable_weights_are_an_error(capsys, tiny_data, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"\x00" * 64)
    err = one_line_error(capsys, tiny_args(tiny_data, weights, tmp_path / "r"))
    assert str(weights) in err and "not a PyTorch weights file" in err


def test_bad_options_are_one_line_errors(capsys, tiny_data, imagenet_like, tmp_path):
    assert "unknown strategy" in one_line_error(
        capsys, tiny_args(tiny_data, imagenet_like, tmp_path / "a", "--strategy", "partial:9"))
    assert "--batch-size must be at least 1" in one_line_error(
        capsys, tiny_args(tiny_data, imagenet_like, tmp_path / "b", "--batch-size", "0"))
    assert "nothing to resume" in one_line_error(
        capsys, tiny_args(tiny_data, imagenet_like, tmp_path / "c", "--resume"))


def test_uint8_batches_flag_reaches_the_config():
    from fastft.cli import parser
    from fastft.config import TrainConfig
    assert TrainConfig().uint8_batches is True
    assert parser().parse_args(["train", "--no-uint8-batches"]).uint8_batches is False
    assert "uint8_batches" not in vars(parser().parse_args(["train"]))  # untyped: the config's default


def test_data_synth_then_check(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["data", "synth", str(root), "--train", "6", "--test", "4"]) == 0
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 6 images" in out and "test: 4 images" in out and "ok: all 10 images decode" in out


def test_data_check_lists_bad_files_and_fails(data_copy, capsys):
    truncate(first_jpeg(data_copy))
    assert main(["data", "check", str(data_copy)]) == 3  # the report lists problems (README, "Exit codes")
    assert f"BAD {first_jpeg(data_copy)}" in capsys.readouterr().out


def test_a_gpu_trained_checkpoint_predicts_on_a_cpu_only_machine(trained_run, tmp_path, tiny_data,
                                                                monkeypatch, capsys):
    """Save the run's checkpoint with every tensor tagged cuda:0, as a GPU run writes it."""
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    registry = list(torch.serialization._package_registry)
    tag_as_cuda = (0, lambda obj: "cuda:0", lambda obj, location: None)
    monkeypatch.setattr(torch.serialization, "_package_registry", [tag_as_cuda, *registry])
    gpu_run = tmp_path / "gpu_run"
    gpu_run.mkdir()
    torch.save(state, gpu_run / "checkpoint.pt")
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_run / "checkpoint.pt", weights_only=True)
    assert main(["predict", "--checkpoint", str(gpu_run), str(first_jpeg(tiny_data))]) == 0
    assert capsys.readouterr().out.startswith(f"{first_jpeg(tiny_data)}: ")

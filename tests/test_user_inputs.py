"""Inputs people bring that once went wrong in silence or with the wrong words: symlink loops,
one-class folders, NaN weights, foreign files as --weights, directories as images, and the
same bad file named the same way by the scan, every loader and predict."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastft.checkpoint import checkpoint_path, load_checkpoint
from fastft.cli import main
from fastft.data import dali_available
from fastft.data.images import decode_problem, load_rgb
from fastft.data.layout import check_report, scan_dataset
from fastft.engine import Trainer
from fastft.errors import CheckpointError, ConfigError, DataError, WeightsError
from fastft.model import build_resnet18, load_matching, read_weights


def small_set(root: Path, classes=("a", "b"), n_train: int = 2, n_test: int = 1) -> Path:
    """`n_train` and `n_test` 32 px PNGs per class, each a distinct solid colour."""
    level = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                level += 7
                Image.new("RGB", (32, 32), (level, 100, 50)).save(folder / f"{i}.png")
    return root


# --- the layout scan -----------------------------------------------------------------------------

def test_symlinked_folders_are_followed_once_and_never_round_a_loop(tmp_path):
    root = small_set(tmp_path / "d", n_train=2)
    (root / "train" / "a" / "loop").symlink_to("..")                  # back up to train/
    (root / "train" / "a" / "other").symlink_to(root / "train" / "b")  # into another class
    elsewhere = tmp_path / "elsewhere"                                 # a linked folder of new images
    small_set(elsewhere, classes=("x",), n_train=3, n_test=0)
    (root / "train" / "a" / "more").symlink_to(elsewhere / "train" / "x")
    (root / "train" / "a" / "again").symlink_to(elsewhere / "train" / "x")  # the same folder twice
    layout = scan_dataset(root)
    assert layout.counts("train") == {"a": 5, "b": 2}  # 2 own + 3 through `again`, each once
    assert sorted(p.parent.name for p, label in layout.files["train"] if label == 0) == ["a", "a"] + ["again"] * 3
    skipped = {line.split(":")[0].rsplit("/", 1)[-1] for line in layout.warnings}
    assert skipped == {"loop", "other", "more"}  # links in name order: `again` is read first
    assert all("symlink to" in line and "not followed" in line for line in layout.warnings)
    lines, ok = check_report(root)
    assert ok and "train: 7 images (a 5, b 2)" in lines and sum("not followed" in x for x in lines) == 3


def test_a_symlinked_class_folder_keeps_working(tmp_path):
    root = small_set(tmp_path / "d")
    outside = small_set(tmp_path / "out", classes=("c",), n_train=3, n_test=0) / "train" / "c"
    (root / "train" / "c").symlink_to(outside)
    layout = scan_dataset(root)
    assert layout.counts("train") == {"a": 2, "b": 2, "c": 3}
    assert not any("not followed" in line for line in layout.warnings)  # test/ lacking c is warned
    assert [p.parent for p, label in layout.files["train"] if label == 2] == [root / "train" / "c"] * 3


def test_one_class_is_a_one_line_error_for_training_and_data_check(tmp_path, make_cfg, capsys):
    root = small_set(tmp_path / "d", classes=("a",))
    expected = f"{root / 'train'}: only one class folder (a); a classifier needs at least 2 classes, one folder each"
    with pytest.raises(DataError) as caught:
        Trainer(make_cfg(data=str(root))).setup()
    assert str(caught.value) == expected and not (tmp_path / "run").exists()
    assert main(["data", "check", str(root)]) == 3  # listed with any other problem (README, "Exit codes")
    assert f"BAD {expected}" in capsys.readouterr().out.splitlines()


def test_split_folders_in_the_wrong_case_get_a_hint(tmp_path):
    root = small_set(tmp_path / "d")
    (root / "train").rename(root / "Train")
    with pytest.raises(DataError, match=r"missing split folder \(.*found Train/: rename it to train/\)$"):
        scan_dataset(root)


def test_data_check_says_why_each_entry_was_ignored(tmp_path):
    root = small_set(tmp_path / "d")
    Image.new("RGB", (32, 32)).save(root / "test" / "stray.jpg")
    (root / "train" / "a" / "notes.txt").write_text("x")
    (root / "train" / ".DS_Store").write_bytes(b"x")
    lines, ok = check_report(root)
    assert ok
    assert "ignored 1 entry (outside any class folder): test/stray.jpg" in lines
    assert "ignored 1 entry (hidden): train/.DS_Store" in lines
    assert any(x.startswith("ignored 1 entry (not .jpg/") and x.endswith("train/a/notes.txt") for x in lines)


# --- one bad file, one wording ---------------------------------------------------------------------

def bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.frombytes("RGB", (40, 30), np.random.default_rng(0).bytes(40 * 30 * 3)).save(buf, "PNG")
    files = {"empty": b"", "text": b"hello there", "truncated": buf.getvalue()[:-400]}
    for name, content in files.items():
        (folder / f"{name}.png").write_bytes(content)
    (folder / "dir.png").mkdir()
    return {name: folder / f"{name}.png" for name in [*files, "dir"]}


def test_load_rgb_names_a_bad_file_as_the_checks_do(tmp_path):
    files = bad_files(tmp_path / "bad")
    expected = {"empty": "empty file", "text": "not an image: starts with b'hello th'",
                "truncated": "truncated or corrupt PNG (", "dir": "is a directory, not an image file"}
    for name, path in files.items():
        assert decode_problem(path).startswith(expected[name]), name
        with pytest.raises(DataError) as caught:
            load_rgb(path)
        assert str(caught.value) == f"{path}: {decode_problem(path)}", name


@pytest.mark.skipif(not dali_available(), reason="no DALI")
def test_dali_names_a_file_with_the_checks_reason(tmp_path):
    from fastft.data.dali_loader import _as_data_error
    files = bad_files(tmp_path / "bad")
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    failed = "Error in CPU operator `nvidia.dali.fn.decoders.image`\nFailed to decode sample #0 : "
    named = _as_data_error(RuntimeError(failed + str(files["truncated"])), [])
    assert str(named) == f"{files['truncated']}: {decode_problem(files['truncated'])}"
    assert str(_as_data_error(RuntimeError(failed + str(good)), [])) == \
        f"{good}: cannot decode image (DALI decoder failed)"  # PIL reads it: DALI's own failure


def tiny_checkpoint(folder: Path, classes=("a", "b")) -> Path:
    folder.mkdir(parents=True)
    state = {"model": build_resnet18(len(classes)).state_dict(), "epoch": 1, "config": {"image_size": 32},
             "classes": list(classes)}
    torch.save(state, checkpoint_path(folder))
    return folder


def test_predict_checks_every_image_before_printing_any(tmp_path, capsys):
    run = tiny_checkpoint(tmp_path / "run")
    files = bad_files(tmp_path / "bad")
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good)
    assert main(["predict", "--checkpoint", str(run), str(good), str(files["dir"])]) == 2
    out, err = capsys.readouterr()
    # A folder is read for its images (issue 19): this one has none.
    assert out == "" and err.strip() == (f"fastft: error: {files['dir']}: no images (expected files ending in "
                                         f".jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)")
    assert main(["predict", "--checkpoint", str(run), str(good), str(files["empty"]), str(tmp_path / "no.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"fastft: error: {files['empty']}: empty file (and 1 more of the 3 images)"
    assert main(["predict", "--checkpoint", str(run), str(good)]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: ")


# --- weights and checkpoints -----------------------------------------------------------------------

def weights_error(path: Path) -> str:
    with pytest.raises(WeightsError) as caught:
        state, label = read_weights(path)
        load_matching(build_resnet18(2), state, label)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_non_finite_weights_are_refused_naming_the_tensor(imagenet_like, tmp_path):
    state = torch.load(imagenet_like)
    state["layer2.0.bn1.running_var"][3] = float("inf")
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    assert weights_error(tmp_path / "nan.pth") == (f"{tmp_path / 'nan.pth'}: tensor conv1.weight holds 1 NaN or "
                                                   f"infinite value(s) of 9408; the file comes from a run that "
                                                   f"diverged or is damaged")
    state["fc.weight"] = torch.full((1000, 512), float("nan"))  # the head: never loaded (2 classes)
    state["conv1.weight"][0, 0, 0, 0] = 0.0
    torch.save(state, tmp_path / "nan.pth")
    assert "layer2.0.bn1.running_var holds 1" in weights_error(tmp_path / "nan.pth")


def test_a_partial_file_lists_the_backbone_names_it_lacks(imagenet_like, tmp_path):
    state = torch.load(imagenet_like)
    torch.save(dict(list(state.items())[:20]), tmp_path / "part.pth")
    message = weights_error(tmp_path / "part.pth")
    assert "only 17 of resnet18's 100 backbone tensors match" in message and "(the head)" not in message
    assert message.endswith("missing 83: layer1.1.bn1.bias, layer1.1.bn1.running_mean, "
                            "layer1.1.bn1.running_var, layer1.1.conv2.weight, ...")


def test_files_that_are_not_weights_get_plain_reasons(imagenet_like, tmp_path):
    not_torch = "not a PyTorch weights file (torch.save zip or a .safetensors file expected)"
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"conv1.weight": np.zeros(3)}, f, protocol=4)
    (tmp_path / "text.txt").write_text("conv1.weight 0.1 0.2\n")
    torch.save({}, tmp_path / "empty.pth")
    (tmp_path / "trunc.pth").write_bytes(Path(imagenet_like).read_bytes()[:100_000])
    (tmp_path / "folder").mkdir()
    expected = {"plain.pkl": not_torch, "text.txt": not_torch, "empty.pth": "holds an empty dict, no tensors",
                "trunc.pth": "truncated or corrupt zip archive (failed finding central directory)",
                "folder": "is a directory; pass the weights file inside it"}
    with _no_warnings():
        for name, reason in expected.items():
            assert weights_error(tmp_path / name) == f"{tmp_path / name}: {reason}", name
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "plain.pkl")
    assert str(caught.value) == (f"{tmp_path / 'plain.pkl'}: unreadable checkpoint (not a PyTorch checkpoint "
                                 f"(a torch.save zip expected))")


class _no_warnings:
    """No warning may reach the user (torch warns about a pickle protocol it does not use)."""

    def __enter__(self):
        import warnings
        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
        assert not [str(w.message) for w in self.caught]


def test_safetensors_weights_load(imagenet_like, tmp_path):
    from safetensors.torch import save_file
    save_file(torch.load(imagenet_like), tmp_path / "model.safetensors")
    state, label = read_weights(tmp_path / "model.safetensors")
    assert len(load_matching(build_resnet18(2), state, label).loaded) == 120  # all but the 1000-way head


# --- the engine --------------------------------------------------------------------------------

def test_a_nan_epoch_loss_stops_before_its_checkpoint(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg(epochs=3, data=str(small_set(tmp_path / "d", n_train=4)), batch_size=4)
    real = Trainer.train_epoch

    def diverging(self, epoch):  # the real epoch runs; its loss reads NaN from the 2nd epoch on
        record = real(self, epoch)
        return {**record, "train_loss": float("nan")} if epoch >= 1 else record

    monkeypatch.setattr(Trainer, "train_epoch", diverging)
    with pytest.raises(ConfigError) as caught:
        Trainer(cfg).setup().fit()
    assert str(caught.value).startswith("epoch 2: train loss is nan; the last good checkpoint (epoch 1) is kept; "
                                        "lower --lr")
    saved = load_checkpoint(cfg.out)
    assert saved["epoch"] == 1 and all(torch.isfinite(t).all() for t in saved["model"].values()
                                       if t.is_floating_point())
    assert len((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()) == 1


def test_resuming_a_finished_run_says_so_before_any_data_work(make_cfg, tmp_path):
    run = tiny_checkpoint(tmp_path / "run")
    cfg = make_cfg(out=str(run), resume=True, epochs=1, data=str(tmp_path / "no-such-data"))
    with pytest.raises(ConfigError, match=r"already finished 1 epochs; pass a larger --epochs"):
        Trainer(cfg, typed=frozenset({"out", "resume", "epochs", "data"})).setup()

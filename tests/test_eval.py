"""`fastft eval`: exact numbers where the model's answers are forced, loaders that agree, files, errors.

The forced case: flat-colour PNGs whose red level encodes an image number, and a stand-in
model that reads that number back from the normalised pixels and returns logits chosen per
image. Every prediction and probability is then known, so the confusion matrix, the
per-class numbers and the order of the mistakes are checked exactly, through each backend.
"""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastft import evaluation
from fastft.cli import main
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastft.errors import CheckpointError, ConfigError, DataError
from fastft.model import build_resnet18

RUN_CLASSES = ["a", "b", "c", "d"]  # the run knows b; the data has no b folder
STEP = 20                           # red levels between image numbers
# Test images: (class folder, image number, predicted run class, its probability).
FORCED = [("a", 1, "a", 0.95), ("a", 2, "a", 0.55), ("a", 3, "b", 0.90), ("a", 4, "c", 0.60),
          ("c", 5, "c", 0.99), ("c", 6, "a", 0.80), ("c", 7, "c", 0.70),
          ("d", 8, "d", 0.65), ("d", 9, "b", 0.75)]
# Rows true a, b, c, d; columns predicted, counted by hand from FORCED.
CONFUSION = [[2, 1, 1, 0], [0, 0, 0, 0], [1, 0, 2, 0], [0, 1, 0, 1]]
# DALI's resize (linear, antialiased) rounds unlike PIL's bilinear by a level or so per pixel;
# on this set at 32 px, through real_run's x20 head, the largest difference measured 0.011.
DALI_PROB_ATOL = 0.02


def _logits(predicted: str, probability: float) -> list[float]:
    """Logits whose softmax gives `probability` to `predicted`, the rest shared by the others."""
    rest = math.log((1 - probability) / (len(RUN_CLASSES) - 1))
    return [math.log(probability) if c == predicted else rest for c in RUN_CLASSES]


class ColourCoded(torch.nn.Module):
    """Logits looked up by the image number its flat red level encodes (undoing the eval
    transform's normalisation)."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(256 // STEP + 1, len(RUN_CLASSES))
        for _, number, predicted, probability in FORCED:
            table[number] = torch.tensor(_logits(predicted, probability))
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = (x[:, 0].float().mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        return self.table[(red / STEP).round().long()]


def _png(path: Path, number: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (STEP * number, 90, 160)).save(path)


@pytest.fixture(scope="module")
def forced_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("forced")
    for folder, number, _, _ in FORCED:
        _png(root / "test" / folder / f"{folder}{number}.png", number)
    for folder in ("a", "c", "d"):
        _png(root / "train" / folder / "t.png", 0)
    return root


def _fake_run(folder: Path, data: Path, classes: list[str], model: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"image_size": 32, "data": str(data), "strategy": "frozen"}
    torch.save({"model": model or {}, "epoch": 1, "config": config, "classes": classes}, folder / "checkpoint.pt")
    return folder


@pytest.fixture
def forced_run(forced_data, tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(evaluation, "load_model", lambda state, device: ColourCoded().to(device))
    return _fake_run(tmp_path / "run", forced_data, RUN_CLASSES)


def _dali_imports() -> bool:
    from fastft.data import dali_available
    return dali_available()


LOADERS = ["torch", "cached", pytest.param("dali", marks=pytest.mark.skipif(
    not _dali_imports(), reason="nvidia.dali does not import here (pip install nvidia-dali-cuda120)"))]


@pytest.mark.parametrize("loader", LOADERS)
def test_forced_answers_give_the_exact_report(forced_run, forced_data, tmp_path, loader, capsys):
    """Confusion matrix, per-class numbers, macro averages and the mistakes' order, by hand."""
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(forced_run), "--top", "3", "--loader", loader,
                 "--batch-size", "4", "--out", str(out)]) == 0
    got = json.loads((out / "eval.json").read_text())
    assert got["confusion"] == CONFUSION and got["images"] == 9 and got["correct"] == 5
    assert got["accuracy"] == pytest.approx(5 / 9)
    rows = {row["class"]: row for row in got["per_class"]}
    expect = {"a": (2 / 3, 2 / 4, 4 / 7, 4), "b": (0.0, 0.0, 0.0, 0),  # b: recall 0/0 -> 0.0
              "c": (2 / 3, 2 / 3, 4 / 6, 3), "d": (1.0, 1 / 2, 2 / 3, 2)}
    for name, (p, r, f, n) in expect.items():
        assert (rows[name]["precision"], rows[name]["recall"], rows[name]["f1"]) == pytest.approx((p, r, f))
        assert rows[name]["support"] == n
    # b is predicted twice, so it counts in the macro average (as sklearn's report counts it).
    assert got["macro"]["classes"] == RUN_CLASSES
    assert got["macro"]["precision"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 1) / 4)
    assert got["macro"]["recall"] == pytest.approx((1 / 2 + 0 + 2 / 3 + 1 / 2) / 4)
    assert got["macro"]["f1"] == pytest.approx((4 / 7 + 0 + 2 / 3 + 2 / 3) / 4)
    test = forced_data / "test"
    assert [(m["path"], m["true"], m["predicted"]) for m in got["mistakes"]] == [
        (str(test / "a" / "a3.png"), "a", "b"), (str(test / "c" / "c6.png"), "c", "a"),
        (str(test / "d" / "d9.png"), "d", "b")]
    assert [m["probability"] for m in got["mistakes"]] == pytest.approx([0.90, 0.80, 0.75], abs=1e-6)
    by_path = {p["path"]: p for p in got["predictions"]}
    for folder, number, predicted, probability in FORCED:
        row = by_path[str(test / folder / f"{folder}{number}.png")]
        assert row["predicted"] == predicted and row["probability"] == pytest.approx(probability, abs=1e-6)
    captured = capsys.readouterr()
    assert "no images of the run's class 'b'" in captured.err
    assert "accuracy 0.556 (5 of 9)" in captured.out


def test_report_table_and_pngs(forced_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(forced_run / "checkpoint.pt"), "--top", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a              0.667   0.500  0.571        4" in text
    assert "macro avg      0.583   0.417  0.476        9" in text
    assert "a  2  1  1  0" in text and "d  0  1  0  1" in text
    assert "4 most confident mistakes" in text  # 4 wrong answers, fewer than --top 5
    assert f"wrote eval.json, confusion.png, mistakes.png to {out}" in text
    # confusion.png: (2.5 + 0.8 x 4 classes) inches square at 100 dpi; mistakes.png: 4 cells of 2 x 2.5 in.
    assert _png_size(out / "confusion.png") == (570, 570)
    assert _png_size(out / "mistakes.png") == (800, 250)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk; fails on anything else."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    with Image.open(path) as image:
        image.verify()
    return struct.unpack(">II", head[16:24])


def test_without_matplotlib_the_numbers_still_come(forced_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(forced_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count(evaluation.PLOT_HINT) == 1 and "confusion matrix" in text
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]


def test_top_zero_lists_and_draws_no_mistakes(forced_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(forced_run), "--top", "0", "--out", str(out)]) == 0
    assert "most confident mistakes" not in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "eval.json"]
    assert json.loads((out / "eval.json").read_text())["mistakes"] == []


def test_default_out_is_in_the_run_folder_and_train_split_reads_train(forced_run, forced_data, capsys):
    assert main(["eval", "--checkpoint", str(forced_run), "--split", "train"]) == 0
    got = json.loads((forced_run / "eval-train" / "eval.json").read_text())
    # Train images have number 0: logits all 0, so argmax (the first class, a) at probability 1/4.
    assert got["confusion"] == [[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert [p["probability"] for p in got["predictions"]] == pytest.approx([0.25] * 3)


def test_classes_are_matched_by_name(forced_data, tmp_path, monkeypatch):
    """Data folders a, c, d index 0, 1, 2 in the data; the run's indices (0, 2, 3) are used."""
    monkeypatch.setattr(evaluation, "load_model", lambda state, device: ColourCoded())
    run = _fake_run(tmp_path / "run", forced_data, RUN_CLASSES)
    ev = evaluation.evaluate(evaluation.EvalOptions(run, progress=False))
    assert ev.labels.tolist() == [0, 0, 0, 0, 2, 2, 2, 3, 3]
    assert ev.warnings == [f"{forced_data / 'test'}: no images of the run's class 'b'; its row stays empty"]


def test_scores_zero_division_and_macro_match_the_definitions():
    # A class never predicted and never true (2) stays out of the macro average.
    s = evaluation.scores(torch.tensor([[3, 1, 0], [2, 0, 0], [0, 0, 0]]))
    assert s.precision == pytest.approx([3 / 5, 0.0, 0.0]) and s.recall == pytest.approx([3 / 4, 0.0, 0.0])
    assert s.f1 == pytest.approx([2 * 3 / (2 * 3 + 2 + 1), 0.0, 0.0]) and s.support == [4, 2, 0]
    assert s.macro_classes == [0, 1] and s.macro["f1"] == pytest.approx((6 / 9) / 2)
    assert s.accuracy == pytest.approx(3 / 6)


@pytest.mark.parametrize("args, message", [
    (["--top", "-1"], "fastft: error: --top must be 0 or more, got -1"),
    (["--batch-size", "0"], "fastft: error: --batch-size must be at least 1, got 0"),
])
def test_bad_options_are_one_line(forced_run, args, message, capsys):
    assert main(["eval", "--checkpoint", str(forced_run), *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_missing_checkpoint_and_bad_data_are_one_line(forced_run, forced_data, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint here" in err[0]
    assert main(["eval", "--checkpoint", str(forced_run), "--data", str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset folder not found" in err[0]


def test_a_data_class_the_run_lacks_is_one_line(forced_data, tmp_path):
    run = _fake_run(tmp_path / "run", forced_data, ["a", "c"])  # no d
    with pytest.raises(DataError, match=r"test/d: class 'd' is not one of the run's classes \(a, c\)"):
        evaluation.evaluate(evaluation.EvalOptions(run, progress=False))


def test_dali_missing_is_one_line(forced_run, monkeypatch):
    monkeypatch.setattr("fastft.data.dali_available", lambda: False)
    with pytest.raises(ConfigError, match="--loader dali: nvidia.dali does not import here"):
        evaluation.evaluate(evaluation.EvalOptions(forced_run, loader="dali", progress=False))


@pytest.fixture(scope="module")
def real_run(tiny_data, tmp_path_factory) -> Path:
    """A real ResNet-18 checkpoint (random weights, fc scaled so answers are far from a tie)."""
    torch.manual_seed(0)
    model = build_resnet18(2)
    with torch.no_grad():
        model.fc.weight.mul_(20)
    return _fake_run(tmp_path_factory.mktemp("real") / "run", tiny_data, ["hotdog", "not-hotdog"],
                     model.state_dict())


def test_loaders_agree_on_a_real_model(real_run):
    """Same confusion matrix and paths; probabilities equal for cached (the same PIL transform on
    a CPU) and within DALI_PROB_ATOL for DALI, whose resize rounds differently."""
    runs = {kind: evaluation.evaluate(evaluation.EvalOptions(real_run, loader=kind, batch_size=5,
                                                             progress=False, top=4))
            for kind in (["torch", "cached"] + (["dali"] if _dali_imports() else []))}
    torch_ev = runs["torch"]
    assert sum(torch_ev.scores.support) == 12
    for kind, ev in runs.items():
        assert ev.paths == torch_ev.paths and ev.scores.confusion == torch_ev.scores.confusion, kind
        assert [m.path for m in ev.mistakes] == [m.path for m in torch_ev.mistakes], kind
    assert torch.equal(runs["cached"].probs, torch_ev.probs)
    if "dali" in runs:
        assert (runs["dali"].probs - torch_ev.probs).abs().max() <= DALI_PROB_ATOL



def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_new_eval_replaces_every_file_of_the_earlier_one(forced_run, forced_data, tmp_path, monkeypatch, capsys):
    """No earlier mistakes.png (or confusion.png) stays beside new numbers; other files stay."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["eval", "--checkpoint", str(forced_run), "--top", "100000", "--out", str(out)]) == 0
    first = json.loads((out / "eval.json").read_text())
    assert (first["checkpoint"], first["data"], first["split"], first["loader"], first["epoch"]) == (
        str(forced_run), str(forced_data), "test", "torch", 1)
    assert "replaced" not in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(forced_run), "--split", "train", "--top", "0", "--out", str(out)]) == 0
    assert f"replaced the earlier results in {out} ({first['header']}): eval.json, confusion.png, mistakes.png; " \
           f"mistakes.png removed, not written this time" in capsys.readouterr().out
    assert _names(out) == ["confusion.png", "eval.json", "notes.txt"]
    assert json.loads((out / "eval.json").read_text())["split"] == "train"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no PNGs this time: the earlier one goes too
    assert main(["eval", "--checkpoint", str(forced_run), "--out", str(out)]) == 0
    assert "confusion.png removed, not written this time" in capsys.readouterr().out
    assert _names(out) == ["eval.json", "notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("out, message", [
    ("checkpoint.pt", "--out {run}/checkpoint.pt is a file; eval writes eval.json, confusion.png, "
                      "mistakes.png into a folder"),
    ("checkpoint.pt/sub", "--out {run}/checkpoint.pt/sub is inside the file {run}/checkpoint.pt; eval writes "
                          "eval.json, confusion.png, mistakes.png into a folder"),
    ("taken", "--out {run}/taken: eval.json there is not a file, so eval cannot replace it"),
])
def test_an_out_that_cannot_hold_the_files_is_one_line(forced_run, out, message, capsys):
    (forced_run / "taken" / "eval.json").mkdir(parents=True)
    before = (forced_run / "checkpoint.pt").read_bytes()
    assert main(["eval", "--checkpoint", str(forced_run), "--out", str(forced_run / out)]) == 2
    assert capsys.readouterr().err == f"fastft: error: {message.format(run=forced_run)}\n"
    assert (forced_run / "checkpoint.pt").read_bytes() == before


def test_a_failed_write_is_one_line(forced_run, tmp_path, monkeypatch, capsys):
    def full_disk(path, obj):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr("fastft.report.write_json_atomic", full_disk)
    assert main(["eval", "--checkpoint", str(forced_run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    where = tmp_path / "out" / "eval.json"
    assert re.fullmatch(rf"fastft: error: {re.escape(str(where))}: disk full: {re.escape(str(where.parent))} "
                        rf"has [\d.]+ (KB|MB|GB) free; free space there", err[-1])


@pytest.fixture
def test_only(forced_data, tmp_path) -> Path:
    """A data folder with the test split alone."""
    shutil.copytree(forced_data / "test", tmp_path / "only" / "test")
    return tmp_path / "only"


def test_only_the_scored_split_is_read(forced_run, test_only, tmp_path):
    """DIR/test alone, with empty train class folders beside it, or DIR = the split's class folders."""
    def scored(data: Path, name: str) -> dict:
        assert main(["eval", "--checkpoint", str(forced_run), "--data", str(data), "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "eval.json").read_text())
    alone = scored(test_only, "alone")
    for name in ("a", "c", "d"):
        (test_only / "train" / name).mkdir(parents=True)
    beside_empty = scored(test_only, "beside-empty")
    itself = scored(test_only / "test", "itself")
    for got in (alone, beside_empty, itself):
        assert got["confusion"] == CONFUSION and len(got["predictions"]) == 9
    assert (alone["data"], alone["split"]) == (str(test_only), "test")
    assert (itself["data"], itself["split"]) == (str(test_only / "test"), None)
    assert [p["path"] for p in itself["predictions"]] == [p["path"] for p in alone["predictions"]]


def test_a_split_that_is_not_there_or_not_the_runs_is_one_line(forced_run, test_only, tmp_path):
    def message(data: Path) -> str:
        with pytest.raises(DataError) as caught:
            evaluation.evaluate(evaluation.EvalOptions(forced_run, data=str(data), progress=False))
        return str(caught.value)
    _png(test_only / "test" / "e" / "e1.png", 1)
    assert message(test_only) == (f"{test_only / 'test' / 'e'}: class 'e' is not one of the run's classes "
                                  f"(a, b, c, d), so the model cannot predict it")
    other = tmp_path / "other"
    _png(other / "train" / "a" / "a1.png", 1)  # a train split only, scored as test
    _png(other / "x" / "x1.png", 1)
    assert message(other) == (f"{other / 'test'}: missing split folder (expected {other / 'test' / 'CLASS'}/*.jpg, "
                              f"or --data naming one split's class folders)")


def test_a_runs_model_safetensors_is_a_model_source(forced_run, forced_data, tmp_path, capsys):
    from fastft.models.base import DEFAULT_PREPROCESSING
    from fastft.weights import model_card, write_model_file
    path = forced_run / "model.safetensors"
    # The stand-in model ignores the tensors; the metadata gives the classes, size and epoch.
    write_model_file(path, {"w": torch.zeros(1)}, model_card(RUN_CLASSES, 3, "resnet18", DEFAULT_PREPROCESSING.at_size(32)))
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert capsys.readouterr().err == (f"fastft: error: {path}: no readable config.json beside it to name the "
                                       f"run's data; pass --data DIR, or --checkpoint RUN_DIR\n")
    config = {"data": str(forced_data), "image_size": 224, "strategy": "frozen", "resolved": {}}
    (forced_run / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert got["confusion"] == CONFUSION and (got["checkpoint"], got["epoch"], got["image_size"]) == (str(path), 3, 32)


def test_weights_of_another_shape_are_one_line(forced_data, tmp_path):
    run = _fake_run(tmp_path / "run", forced_data, RUN_CLASSES, {"fc.weight": torch.zeros(2, 512)})
    with pytest.raises(CheckpointError, match=rf"^{run}: not a resnet18 of 4 classes \(.*fc\.weight.*\)$"):
        evaluation.evaluate(evaluation.EvalOptions(run, progress=False))


def test_a_closed_stdout_ends_eval_quietly(forced_run, tmp_path, capsys):
    """`fastft eval ... | head -3`: exit 141, no traceback, and stdout's fd left on devnull so a
    later flush (the interpreter's at exit) cannot raise again."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone, as head's after its lines
    stdout, saved = os.fdopen(write, "w"), sys.stdout
    sys.stdout = stdout
    try:
        assert main(["eval", "--checkpoint", str(forced_run), "--out", str(tmp_path / "out")]) == 141
        stdout.write("more")
        stdout.flush()
    finally:
        sys.stdout = saved
        stdout.close()
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "out" / "eval.json").is_file()  # the files are written before the report's last lines


def test_a_closed_stdout_ends_the_program_quietly(tiny_data):
    """Every command, through the interpreter's exit: no 'Exception ignored ... BrokenPipeError'."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "fastft", "data", "check", str(tiny_data)],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")

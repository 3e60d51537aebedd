"""`fastft eval`: exact numbers where the model's answers are forced, loaders that agree, files, errors.

The forced case: flat-colour PNGs whose red level encodes an image number, and a stand-in
model that reads that number back from the normalised pixels and returns logits chosen per
image. Every prediction and probability is then known, so the confusion matrix, the
per-class numbers and the order of the mistakes are checked exactly, through each backend.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastft import evaluation
from fastft.cli import main
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastft.errors import ConfigError, DataError
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


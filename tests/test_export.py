"""fastft export: ONNX and pt2 files that give PyTorch's logits at any batch size, and predict --model."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastft.checkpoint import checkpoint_path
from fastft.cli import main
from fastft.data.images import load_rgb
from fastft.data.transforms import eval_transform
from fastft.errors import CheckpointError, ConfigError
from fastft.export import TOLERANCE, ExportError, export_run
from fastft.model import build_resnet18
from fastft.models.base import DEFAULT_PREPROCESSING
from fastft.predict import exported_logits, predict, predict_exported, trained_model

CLASSES = ["hotdog", "not-hotdog"]


def make_run(folder: Path, data: Path | None) -> Path:
    """A run folder as training leaves it, built directly: a checkpoint of a ResNet-18 whose
    BatchNorm statistics are not the identity (a BN export fault would show), and a config.json
    naming the data folder as a synthetic run's does."""
    torch.manual_seed(5)
    model = build_resnet18(len(CLASSES))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    folder.mkdir(parents=True)
    state = {"model": model.state_dict(), "epoch": 3, "classes": CLASSES,
             "config": {"image_size": 32, "data": "synthetic"}}
    torch.save(state, checkpoint_path(folder))
    resolved = {"data_dir": str(data)} if data else {}
    (folder / "config.json").write_text(json.dumps({"image_size": 32, "data": "synthetic", "resolved": resolved}))
    return folder


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory) -> dict:
    """One run exported once to each format through the command line; the printed lines kept."""
    run = make_run(tmp_path_factory.mktemp("export") / "run", tiny_data)
    lines = {}
    for fmt in ("onnx", "pt2"):
        if fmt == "onnx" and not _onnx_ready():
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["export", "--checkpoint", str(run), "--format", fmt]) == 0
        lines[fmt] = printed.getvalue().splitlines()
    return {"run": run, "lines": lines}


def _onnx_ready() -> bool:
    try:
        import onnx, onnxruntime, onnxscript  # noqa: E401, F401
    except ImportError:
        return False
    return True


def image_batch(tiny_data: Path, n: int) -> torch.Tensor:
    paths = sorted((tiny_data / "test").glob("*/*.jpg"))[:n]
    return torch.stack([eval_transform(32)(load_rgb(p)) for p in paths])


def check_parity(exported: dict, fmt: str, tiny_data: Path) -> None:
    path = exported["run"] / f"model.{fmt}"
    model, _ = trained_model(exported["run"])
    run, _ = exported_logits(path, fmt)
    x = image_batch(tiny_data, 3)  # the export checked 1 and 8, traced 2: the batch axis is dynamic
    with torch.no_grad():
        want = model(x)
    got = run(x)
    assert got.shape == (3, 2)
    assert float((got - want).abs().max()) <= TOLERANCE * max(1.0, float(want.abs().max()))
    card = json.loads(path.with_name(path.name + ".json").read_text())
    assert (card["classes"], card["image_size"], card["resize"], card["format"]) == (CLASSES, 32, 37, fmt)
    assert card["mean"] == [0.485, 0.456, 0.406] and card["std"] == [0.229, 0.224, 0.225]
    checked = card["checked"]
    assert checked["batch_sizes"] == [1, 8] and checked["inputs"] == f"8 test images of {tiny_data}"
    assert checked["max_abs_diff"] <= checked["bound"] and checked["bound"] >= TOLERANCE
    lines = exported["lines"][fmt]
    assert lines[0].startswith(f"exported {path} ({fmt}, resnet18 input N x 3 x 32 x 32, N dynamic) in ")
    assert lines[1].startswith(f"checked with {checked['runtime']} on 8 test images of {tiny_data}, batches "
                               f"of 1 and 8: max abs logit difference ")
    assert lines[2] == f"preprocessing and classes: {path}.json"


def test_onnx_export_gives_pytorch_logits_at_any_batch_size(exported, tiny_data):
    pytest.importorskip("onnxruntime", reason="ONNX parity needs onnxruntime: pip install onnxruntime")
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript: pip install onnx onnxscript")
    import onnx
    check_parity(exported, "onnx", tiny_data)
    graph = onnx.load(str(exported["run"] / "model.onnx"), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 32, 32]
    assert not list(exported["run"].glob("*.data"))  # the weights are inside the one file


def test_pt2_export_gives_pytorch_logits_at_any_batch_size(exported, tiny_data):
    check_parity(exported, "pt2", tiny_data)


def test_predict_from_an_exported_file_answers_as_the_checkpoint(exported, tiny_data):
    images = sorted((tiny_data / "test").glob("*/*.jpg"))[::4]  # both classes
    want = list(predict(exported["run"], images))
    got = list(predict_exported(exported["run"] / "model.pt2", images))
    assert [(p, label) for p, label, _ in got] == [(p, label) for p, label, _ in want]
    assert max(abs(a[2] - b[2]) for a, b in zip(got, want)) <= 1e-5
    if "onnx" not in exported["lines"]:
        pytest.skip("predict --model PATH.onnx needs onnxruntime: pip install onnxruntime")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["predict", "--model", str(exported["run"] / "model.onnx"), *map(str, images)]) == 0
    lines = [line.rsplit(" ", 2) for line in printed.getvalue().splitlines()]
    assert [(path, label) for path, label, _ in lines] == [(f"{p}:", label) for p, label, _ in want]
    assert max(abs(float(prob) - w[2]) for (_, _, prob), w in zip(lines, want)) <= 5e-4 + 1e-5  # 3 decimals


def test_a_failed_check_keeps_no_file(tmp_path, monkeypatch):
    """The gate itself: an export whose logits are off by 1e-2 is refused and leaves nothing."""
    run = make_run(tmp_path / "run", tmp_path / "moved-away")
    model, _ = trained_model(run)
    monkeypatch.setattr("fastft.export._export", lambda model, sample, path, *_: path.write_bytes(b"x"))

    def off_by(path, fmt):
        return (lambda x: model(x).detach() + 1e-2), "a runtime"
    monkeypatch.setattr("fastft.export.exported_logits", off_by)
    with pytest.raises(ExportError) as caught:
        export_run(run, "pt2")
    assert caught.value.one_line().startswith("pt2 export differs from PyTorch by up to 1.00e-02 in the logits on "
                                              f"8 random inputs, not images (the run's data folder "
                                              f"{tmp_path / 'moved-away'} is not here; pass --images")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json"]


def test_missing_packages_are_one_line_with_the_install_command(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ConfigError) as caught:
        export_run(run, "onnx")
    assert str(caught.value) == ("checking the ONNX export needs ONNX Runtime: pip install onnxruntime (or pip "
                                 "install 'fastft[onnx]'); or pass --no-check to export without the check")
    (run / "model.onnx").write_bytes(b"x")
    (run / "model.onnx.json").write_text(json.dumps({"image_size": 32, "resize": 37, "classes": CLASSES,
                                                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    with pytest.raises(ConfigError) as caught:
        exported_logits(run / "model.onnx", "onnx")
    assert str(caught.value) == ("running model.onnx needs ONNX Runtime: pip install onnxruntime "
                                 "(or pip install 'fastft[onnx]')")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ConfigError) as caught:
        export_run(run, "onnx")
    assert str(caught.value) == ("--format onnx needs the onnxscript package: pip install onnx onnxscript "
                                 "(or pip install 'fastft[onnx]')")
    # A module that raises ImportError itself (a native library that does not load) names no module.
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "onnx.py").write_text("raise ImportError('libonnx.so: cannot open shared object file')\n")
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    with pytest.raises(ConfigError) as caught:
        export_run(run, "onnx")
    assert str(caught.value) == ("--format onnx needs the onnx and onnxscript packages (libonnx.so: cannot open "
                                 "shared object file): pip install onnx onnxscript (or pip install 'fastft[onnx]')")
    (run / "model.onnx.json").unlink()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    with pytest.raises(CheckpointError) as caught:
        list(predict_exported(run / "model.onnx", [tmp_path / "red.png"]))
    assert str(caught.value) == (f"{run / 'model.onnx.json'}: missing; `fastft export` writes it next to "
                                 f"model.onnx, with the classes and preprocessing predict needs")


RUN_FILES = {"model.safetensors": b"weights", "metrics.jsonl": b"{}\n", "summary.json": b"{}", "curves.png": b"png"}


def test_out_ends_in_the_format_suffix_and_never_names_a_run_file(tmp_path, capsys):
    run = make_run(tmp_path / "run", None)
    other = make_run(tmp_path / "other", None)
    for folder in (run, other):
        for name, data in RUN_FILES.items():
            (folder / name).write_bytes(data)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [("onnx", run / "model.safetensors", "--format onnx writes a .onnx file, so --out must end in .onnx"),
             ("onnx", run / "metrics.jsonl", "--format onnx writes a .onnx file, so --out must end in .onnx"),
             ("pt2", tmp_path / "x.onnx", "--format pt2 writes a .pt2 file, so --out must end in .pt2"),
             ("pt2", run / "checkpoint.pt", "--format pt2 writes a .pt2 file, so --out must end in .pt2"),
             ("safetensors", run / "summary.json", "--format safetensors writes a .safetensors file, so --out "
                                                   "must end in .safetensors"),
             ("safetensors", other / "model.safetensors", f"would overwrite the model.safetensors of the run "
                                                          f"in {other}; choose another name")]
    for fmt, out, why in cases:
        assert main(["export", "--checkpoint", str(run), "--format", fmt, "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"fastft: error: --out {out}: {why}\n")
    # --out a run folder: FOLDER/model.safetensors, that run's own file, refused too
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors", "--out", str(other)]) == 2
    assert capsys.readouterr().err == (f"fastft: error: --out {other / 'model.safetensors'}: would overwrite the "
                                       f"model.safetensors of the run in {other}; choose another name\n")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_predict_model_takes_only_model_files(tmp_path, tiny_data, capsys):
    run = make_run(tmp_path / "run", None)
    image = str(sorted((tiny_data / "test").glob("*/*.jpg"))[0])
    expected = {run / "config.json": "expected a .onnx, .pt2 or .safetensors file",
                run / "model.onnx.json": "expected a .onnx, .pt2 or .safetensors file",
                run / "checkpoint.pt": "expected a .onnx, .pt2 or .safetensors file (a run's checkpoint goes "
                                       "to --checkpoint)",
                run: "a folder; --model expects a .onnx, .pt2 or .safetensors file (a run folder goes to "
                     "--checkpoint)",
                run / "model.pt2": "no such model file"}
    for model, why in expected.items():
        assert main(["predict", "--model", str(model), image]) == 2
        assert capsys.readouterr().err == f"fastft: error: {model}: {why}\n"


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_sidecar_that_does_not_fit_the_model_is_one_line(exported, fmt, tiny_data, tmp_path, monkeypatch, capsys):
    if fmt not in exported["lines"]:
        pytest.skip("ONNX needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime")
    from fastft.predict import ModelRunError, check_fits, classify, load_exported
    model = tmp_path / f"model.{fmt}"
    model.symlink_to(exported["run"] / f"model.{fmt}")
    card = json.loads((exported["run"] / f"model.{fmt}.json").read_text())
    sidecar, image = tmp_path / f"model.{fmt}.json", sorted((tiny_data / "test").glob("*/*.jpg"))[0]
    bigger = {"image_size": 64, "resize": 73}
    sidecar.write_text(json.dumps({**card, **bigger}))  # the flat keys edited, not `preprocessing`
    assert main(["predict", "--model", str(model), str(image)]) == 2
    assert capsys.readouterr().err == (f"fastft: error: {sidecar}: its image_size, resize differ from its "
                                       f"`preprocessing`\n")
    sidecar.write_text(json.dumps({**card, **bigger, "preprocessing": {**card["preprocessing"], **bigger}}))
    assert main(["predict", "--model", str(model), str(image)]) == 2  # checked before any image is run
    assert capsys.readouterr().err == (f"fastft: error: {sidecar}: image_size 64, but model.{fmt} takes inputs "
                                       f"of N x 3 x 32 x 32 (a sidecar of another export?)\n")
    loaded = load_exported(model, fmt)
    other = "pt2" if fmt == "onnx" else "onnx"
    for change, why in (({"classes": ["a", "b", "c"]}, f"3 classes, but model.{fmt} gives logits of N x 2 "
                                                       f"(a sidecar of another export?)"),
                        ({"format": other}, f"says format {other}, but model.{fmt} is {fmt}")):
        with pytest.raises(CheckpointError) as caught:
            check_fits(model, fmt, {**card, **change}, loaded)
        assert str(caught.value) == f"{sidecar}: {why}"
    check_fits(model, fmt, card, loaded)  # the export's own sidecar fits
    # Where a model records no shapes, running it is the check: still one line, naming the model.
    with pytest.raises(ModelRunError) as caught:
        next(classify([image], loaded.run, CLASSES, DEFAULT_PREPROCESSING.at_size(64), model))
    want = ("Got: 64 Expected: 32" if fmt == "onnx" else "AssertionError: Guard failed: x.size()[2] == 32")
    assert caught.value.one_line().startswith(f"{model}: failed on {image} (") and want in str(caught.value)
    with pytest.raises(ModelRunError) as caught:
        next(classify([image], loaded.run, ["a", "b", "c"], DEFAULT_PREPROCESSING.at_size(32), model))
    assert str(caught.value) == f"{model}: gives logits of shape (1, 2) for one image, expected (1, 3) for its 3 classes"

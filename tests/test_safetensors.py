"""model.safetensors: fastft's weights in torchvision's names, and torchvision's weights into fastft."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from fastft.checkpoint import load_checkpoint
from fastft.cli import main
from fastft.errors import WeightsError
from fastft.model import build_resnet18, load_matching, read_weights
from fastft.predict import predict, predict_exported, trained_model
from fastft.models.base import DEFAULT_PREPROCESSING
from fastft.weights import MODEL_FILE, model_card, read_model_file, save_run_weights, write_model_file

safetensors_torch = pytest.importorskip("safetensors.torch", reason="pip install safetensors")


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory) -> Path:
    """4 train and 2 test 32 px PNGs per class: a run of one step of 8."""
    root = tmp_path_factory.mktemp("eight")
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(("hotdog", "not-hotdog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (40 * i, 200 * c, 90)).save(root / split / name / f"{i}.png")
    return root


def train_args(data: Path, weights: str, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--weights", weights, "--epochs", "1", "--batch-size", "8",
            "--image-size", "32", "--workers", "0", "--device", "cpu", "--amp", "off", "--no-compile",
            "--loader", "torch", "--out", str(out), "--lr", "1e-3"]


def test_weights_travel_both_ways_through_safetensors(eight_images, imagenet_like, tmp_path, capsys):
    # torchvision's state_dict as safetensors (DDP-prefixed, as a multi-GPU trainer saves it) -> --weights
    source = tmp_path / "torchvision.safetensors"
    imagenet = torch.load(imagenet_like)
    safetensors_torch.save_file({f"module.{k}": v for k, v in imagenet.items()}, source)
    run = tmp_path / "run"
    assert main(train_args(eight_images, str(source), run)) == 0  # channels_last on: strided weights saved
    out = capsys.readouterr().out.splitlines()
    assert f"weights {source} (key prefix 'module.' removed): loaded 120 tensors" in out
    # safetensors keeps its keys sorted, so the report lists them in that order
    assert "  skipped for a shape mismatch: fc.bias (1000 vs 2), fc.weight (1000x512 vs 2x512)" in out

    # model.safetensors -> a plain torchvision ResNet-18, strictly, with fastft's own logits
    tensors = safetensors_torch.load_file(run / MODEL_FILE)
    plain = torchvision.models.resnet18(num_classes=2)
    assert set(tensors) == set(plain.state_dict())  # torchvision's names, no `module.`/`_orig_mod.`
    plain.load_state_dict(tensors, strict=True)
    ours, state = trained_model(run)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), ours(x))
    assert all(torch.equal(tensors[k], v) for k, v in state["model"].items())
    assert tensors["bn1.num_batches_tracked"].dtype == torch.int64 and int(tensors["bn1.num_batches_tracked"]) == 1
    # the backbone trained: the file holds the run's weights, not the ones it started from
    assert not torch.equal(tensors["layer4.1.conv2.weight"], imagenet["layer4.1.conv2.weight"])
    card = read_model_file(run / MODEL_FILE)[1]
    assert card == {"format": "pt", **model_card(["hotdog", "not-hotdog"], 1, "resnet18", DEFAULT_PREPROCESSING.at_size(32))}
    assert (card["resize"], card["mean"], card["std"]) == (37, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    # The file alone is enough for predict: same answers as the checkpoint.
    images = sorted((eight_images / "test").glob("*/*.png"))
    assert list(predict_exported(run / MODEL_FILE, images)) == list(predict(run, images))


def test_without_safetensors_a_run_completes_and_says_so_once(eight_images, imagenet_like, monkeypatch, tmp_path,
                                                             capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    run = tmp_path / "run"
    assert main(train_args(eight_images, str(imagenet_like), run)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "safetensors" in line]
    assert warnings == [f"warning: no {MODEL_FILE} written: writing {MODEL_FILE} needs the safetensors "
                        f"package: pip install safetensors (or pip install 'fastft[safetensors]')"]
    assert load_checkpoint(run)["epoch"] == 1 and not (run / MODEL_FILE).exists()
    assert not list(run.glob("*.tmp"))


def test_metadata_round_trips_as_strings(tmp_path):
    card = model_card(["cat", "dog", "hot dog"], 7, "resnet18", DEFAULT_PREPROCESSING.at_size(48))
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(5, dtype=torch.int64)}
    write_model_file(tmp_path / "m.safetensors", state, card)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        raw = handle.metadata()
    assert all(isinstance(v, str) for v in raw.values())
    assert raw["classes"] == '["cat", "dog", "hot dog"]' and raw["image_size"] == "48" and raw["resize"] == "55"
    tensors, back = read_model_file(tmp_path / "m.safetensors")
    assert back == {"format": "pt", **card} and back["num_classes"] == 3 and back["epoch"] == 7
    assert torch.equal(tensors["w"], state["w"]) and tensors["n"].dtype == torch.int64


def test_the_run_file_has_no_wrapper_prefix_and_contiguous_tensors(tmp_path):
    model = build_resnet18(2).to(memory_format=torch.channels_last)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # --sync-bn keeps the names
    assert save_run_weights(tmp_path, model, ["a", "b"], 2, "resnet18", DEFAULT_PREPROCESSING.at_size(32)) is None
    state, label = read_weights(tmp_path / MODEL_FILE)
    assert label == str(tmp_path / MODEL_FILE)  # no container, no prefix removed
    report = load_matching(build_resnet18(2), state, label)
    assert (len(report.loaded), report.missing, report.mismatched, report.unexpected) == (122, [], [], [])


def test_a_bad_safetensors_file_is_one_line(tmp_path, imagenet_like):
    good = tmp_path / "good.safetensors"
    safetensors_torch.save_file(torch.load(imagenet_like), good)
    cases = {"empty.safetensors": b"", "text.safetensors": b"conv1.weight 0.1 0.2\n",
             "cut.safetensors": good.read_bytes()[:-1000]}
    expected = {"empty.safetensors": "empty file",
                "text.safetensors": "not a readable .safetensors file (Error while deserializing header: "
                                    "header too large)",
                "cut.safetensors": "not a readable .safetensors file (Error while deserializing header: "
                                   "incomplete metadata, file not fully covered)"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError) as caught:
            read_weights(tmp_path / name)
        assert caught.value.one_line() == f"{tmp_path / name}: {expected[name]}"
    # A safetensors file under another name is read as one (its first bytes say so).
    (tmp_path / "renamed.bin").write_bytes(good.read_bytes())
    assert len(read_weights(tmp_path / "renamed.bin")[0]) == 122


def test_export_writes_the_model_file_a_stopped_run_lacks(tiny_data, tmp_path, monkeypatch, capsys):
    """A run stopped before its last epoch has a checkpoint and no model.safetensors; export makes
    it, checked bit-exact in a fresh torchvision ResNet-18 (the model a run from before --model is), with the checkpoint's epoch."""
    from test_export import CLASSES, make_run
    run = make_run(tmp_path / "run", tiny_data)  # checkpoint.pt of epoch 3, config.json
    ours, _ = trained_model(run)
    # The gate: any difference at all is refused, and nothing is left.
    monkeypatch.setattr("fastft.export.exported_logits",
                        lambda path, fmt: ((lambda x: ours(x).detach() + 1e-6), "a runtime"))
    two = sorted((tiny_data / "test").glob("*/*.jpg"))[:2]
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors", "--images", *map(str, two)]) == 2
    assert re.fullmatch(r"fastft: error: safetensors export differs from PyTorch by up to 1\.0\de-06 in the logits "
                        r"on 2 images given with --images \(tolerance 0\.0e\+00\); the file was not kept\n",
                        capsys.readouterr().err)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json"]
    monkeypatch.undo()
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors", "--images", *map(str, two)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"exported {run / MODEL_FILE} (safetensors, resnet18 weights for "
                               f"inputs N x 3 x 32 x 32, N dynamic) in ")
    assert lines[1].startswith("checked with a fresh resnet18 (strict load_state_dict) on 2 images "
                               "given with --images, batches of 1 and 2: max abs logit difference 0.0e+00 from "
                               "PyTorch (tolerance 0.0e+00) in ")
    assert lines[2:] == ["preprocessing and classes: in its metadata (no sidecar)"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", MODEL_FILE]  # no sidecar
    tensors, card = read_model_file(run / MODEL_FILE)
    assert card == {"format": "pt", **model_card(CLASSES, 3, "resnet18", DEFAULT_PREPROCESSING.at_size(32))}  # the checkpoint's epoch
    plain = torchvision.models.resnet18(num_classes=2)
    plain.load_state_dict(tensors, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), ours(x))
    # What the run itself would have written with this checkpoint: the same tensors and metadata.
    assert save_run_weights(tmp_path, ours, CLASSES, 3, "resnet18", DEFAULT_PREPROCESSING.at_size(32)) is None
    run_tensors, run_card = read_model_file(tmp_path / MODEL_FILE)
    assert run_card == card and set(run_tensors) == set(tensors)
    assert all(torch.equal(run_tensors[k], v) and run_tensors[k].dtype == v.dtype for k, v in tensors.items())

"""After training, for every family: model.safetensors, the exports, predict and eval use the
run's --model and that model's preprocessing, never ResNet-18's or ImageNet's constants.

One run per model (1 epoch, 16 + 8 synthetic images at 32 px, random start), trained and
exported once (ONNX and pt2, each through its parity check) in a module-scoped fixture:
    efficientnet_b0  torchvision, BatchNorm, bicubic resize 256/224
    convnext_tiny    torchvision, LayerNorm, resize 236/224
    vit_b_16         torchvision, built for 32 px (image_size=32: 2 x 2 patches)
    timm:test_vit    timm, mean and std 0.5, bicubic, fixed input size (img_size=32)
Each answer is compared with an independent reference: the plain library model, loaded
strictly from model.safetensors and fed by torchvision transforms written out here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms as T

from fastft import engine, evaluation
from fastft.config import TrainConfig
from fastft.data.images import load_rgb
from fastft.data.synth import write_synthetic
from fastft.export import TOLERANCE, export_run
from fastft.models import ModelSpec, get_spec
from fastft.models.base import DEFAULT_PREPROCESSING, IMAGENET_MEAN, IMAGENET_STD
from fastft.predict import predict_top_k, trained_model
from fastft.weights import MODEL_FILE, read_model_file

pytest.importorskip("safetensors", reason="pip install safetensors")
MODELS = ["efficientnet_b0", "convnext_tiny", "vit_b_16", "timm:test_vit"]
SIZE = 32  # px
CLASSES = ["hotdog", "not-hotdog"]
# Each model's eval transform at 32 px, written out from its library's numbers (torchvision's
# Weights.transforms(), timm's pretrained_cfg: resize = round(32 x resize / crop)).
EXPECTED = {
    "efficientnet_b0": {"resize": 37, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "convnext_tiny": {"resize": 34, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "vit_b_16": {"resize": 37, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "timm:test_vit": {"resize": 34, "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3},
}
PROB_TOLERANCE = 1e-5  # softmax probabilities through the same fp32 PyTorch code: batching order only
# An export's runtime: ONNX Runtime's logits were within 5.2e-6 of PyTorch's for these four models
# (vit_b_16 the furthest), and a softmax moves no probability by more than the largest logit change.
EXPORT_PROB_TOLERANCE = 2e-5


@dataclass
class Run:
    name: str
    folder: Path
    data: Path
    images: list[Path]   # the test split, sorted
    sidecars: dict       # format -> the export's sidecar


def plain_model(name: str) -> torch.nn.Module:
    """The model as a script without fastft builds it, for 2 classes at 32 px."""
    if name.startswith("timm:"):
        import timm
        return timm.create_model(name[len("timm:"):], num_classes=2, img_size=SIZE)
    extra = {"image_size": SIZE} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, num_classes=2, **extra)


def reference_input(name: str, path: Path) -> torch.Tensor:
    """(1, 3, 32, 32): EXPECTED[name]'s transform on one image, with torchvision's transforms."""
    e = EXPECTED[name]
    mode = T.InterpolationMode(e["interpolation"])
    steps = T.Compose([T.Resize([e["resize"]] * 2, interpolation=mode), T.CenterCrop(SIZE), T.ToTensor(),
                       T.Normalize(e["mean"], e["std"])])
    return steps(load_rgb(path)).unsqueeze(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("data") / "synth", n_train=16, n_test=8, seed=0, progress=False)


@pytest.fixture(scope="module", params=MODELS)
def run(request, data, tmp_path_factory) -> Run:
    """One trained run of the model, exported to ONNX (where its packages are) and pt2; each
    export_run raises ExportError unless its file gives the run's logits within TOLERANCE."""
    name = request.param
    if name.startswith("timm:"):
        pytest.importorskip("timm", reason="pip install timm")
    folder = tmp_path_factory.mktemp(name.replace(":", "_")) / "run"
    start = calibrated_start(name, data)
    cfg = TrainConfig(model=name, data=str(data), weights="imagenet" if start else "none", epochs=1, batch_size=8,
                      image_size=SIZE, workers=0, device="cpu", amp="off", compile=False, loader="torch",
                      out=str(folder))
    with pytest.MonkeyPatch.context() as patch:  # the function-scoped cache isolation is not up yet
        home = tmp_path_factory.mktemp("cache")
        patch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
        patch.setenv("TORCH_HOME", str(home / "torch"))
        patch.setattr(ModelSpec, "imagenet_state_dict", lambda spec: start)  # no download: the calibrated start
        engine.train(cfg)
    sidecars = {}
    for fmt in ("onnx", "pt2") if _onnx_ready() else ("pt2",):
        exported = export_run(folder, fmt)
        sidecars[fmt] = json.loads(exported.sidecar.read_text())
    return Run(name, folder, data, sorted((data / "test").glob("*/*.jpg")), sidecars)


def calibrated_start(name: str, data: Path) -> dict | None:
    """The run's start weights: None (--weights none) where the model has no BatchNorm; else its
    random start with every BatchNorm's statistics measured on the train images, which the run
    takes as its "ImageNet" weights. At random init a deep BN network's eval-mode activations
    fade (efficientnet_b0's logits at 32 px: 1e-13, equal for every image), and a test comparing
    answers on different inputs could then not fail. Each variance is floored at its layer's mean:
    a channel nearly constant over 16 images (1 x 1 maps at 32 px) would otherwise be scaled by
    up to 1/sqrt(eps) and the rounding of fp32 with it (measured at 32 px on these images:
    logits 1200 and fp32 8e-5 of them off fp64, near the exports' 1e-4 tolerance; floored,
    logits 1.9 and 1.4e-6)."""
    with torch.random.fork_rng():  # the same start whatever ran before in the session
        torch.manual_seed(0)
        model = get_spec(name).build(len(CLASSES), SIZE)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: the statistics of exactly these batches
    model.train()
    with torch.no_grad():
        model(torch.cat([reference_input(name, path) for path in sorted((data / "train").glob("*/*.jpg"))]))
    for norm in norms:
        norm.running_var.clamp_(min=float(norm.running_var.mean()))
    return model.state_dict()


def _onnx_ready() -> bool:
    try:
        import onnx, onnxruntime, onnxscript  # noqa: E401, F401
    except ImportError:
        return False
    return True


def expected_preprocessing(name: str) -> dict:
    e = EXPECTED[name]
    return {"image_size": SIZE, "resize": e["resize"], "mean": list(e["mean"]), "std": list(e["std"]),
            "interpolation": e["interpolation"]}


def test_every_record_names_the_model_and_its_preprocessing(run):
    want = expected_preprocessing(run.name)
    assert get_spec(run.name).preprocessing().at_size(SIZE).to_dict() == want  # EXPECTED is the library's
    config = json.loads((run.folder / "config.json").read_text())
    summary = json.loads((run.folder / "summary.json").read_text())
    assert (config["model"], config["resolved"]["model"], summary["model"]) == (run.name,) * 3
    assert config["resolved"]["preprocessing"] == summary["preprocessing"] == want
    _, state = trained_model(run.folder)
    assert state["config"]["model"] == run.name
    card = read_model_file(run.folder / MODEL_FILE)[1]
    assert card["arch"] == run.name and {k: card[k] for k in want} == want
    for fmt, sidecar in run.sidecars.items():
        assert (sidecar["model"], sidecar["arch"], sidecar["preprocessing"]) == (run.name, run.name, want)


def test_model_safetensors_loads_strictly_into_the_plain_library_model(run):
    tensors = read_model_file(run.folder / MODEL_FILE)[0]
    plain = plain_model(run.name)
    assert set(tensors) == set(plain.state_dict())
    plain.load_state_dict(tensors, strict=True)
    ours, state = trained_model(run.folder)
    assert all(torch.equal(tensors[k], v) for k, v in state["model"].items())
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), ours(x))


def test_exports_pass_their_parity_checks(run):
    if "onnx" not in run.sidecars:
        pytest.skip("ONNX needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime")
    for fmt, sidecar in run.sidecars.items():
        checked = sidecar["checked"]
        assert checked["inputs"] == f"8 test images of {run.data}" and checked["batch_sizes"] == [1, 8]
        assert checked["max_abs_diff"] <= checked["bound"] and checked["bound"] >= TOLERANCE


def test_predict_from_the_run_and_every_export_applies_the_models_preprocessing(run):
    plain = plain_model(run.name)
    plain.load_state_dict(read_model_file(run.folder / MODEL_FILE)[0])
    plain.eval()
    with torch.no_grad():
        want = [torch.softmax(plain(reference_input(run.name, p)), dim=1)[0] for p in run.images]
    # One export suffices here: export_run's parity check ran the other through predict's own loader.
    export = "onnx" if "onnx" in run.sidecars else "pt2"
    sources = {"run": {"checkpoint": run.folder}, MODEL_FILE: {"model": run.folder / MODEL_FILE},
               export: {"model": run.folder / f"model.{export}"}}
    for label, source in sources.items():
        got = list(predict_top_k(run.images, 2, **source))
        assert [path for path, _ in got] == run.images, label
        bound = EXPORT_PROB_TOLERANCE if label == export else PROB_TOLERANCE
        for (_, ranked), probs in zip(got, want):
            p = dict(ranked)
            assert max(abs(p[c] - float(probs[i])) for i, c in enumerate(CLASSES)) <= bound, label
    # The comparisons above can tell: ResNet-18's transform (bilinear 37 px, ImageNet's numbers)
    # gives other answers wherever the model's own differs from it (all here but vit_b_16's); the
    # closest, efficientnet_b0's bicubic for bilinear, moved a probability by 2.7e-4.
    default = DEFAULT_PREPROCESSING.at_size(SIZE)
    if expected_preprocessing(run.name) != default.to_dict():
        steps = T.Compose([T.Resize([default.resize] * 2), T.CenterCrop(SIZE), T.ToTensor(),
                           T.Normalize(default.mean, default.std)])
        with torch.no_grad():
            other = [torch.softmax(plain(steps(load_rgb(p)).unsqueeze(0)), dim=1)[0] for p in run.images]
        assert max(float((a - b).abs().max()) for a, b in zip(other, want)) > 3 * EXPORT_PROB_TOLERANCE


def test_eval_from_the_run_and_its_model_file_agrees_with_predict(run, tmp_path):
    predicted = {path: dict(ranked) for path, ranked in predict_top_k(run.images, 2, checkpoint=run.folder)}
    for source in (run.folder, run.folder / MODEL_FILE):
        ev = evaluation.evaluate(evaluation.EvalOptions(source, data=str(run.data), progress=False))
        assert ev.meta["model"] == run.name and ev.meta["preprocessing"] == expected_preprocessing(run.name)
        assert sorted(ev.paths) == run.images and ev.classes == CLASSES
        for path, probs in zip(ev.paths, ev.probs):
            assert max(abs(predicted[path][c] - float(probs[i])) for i, c in enumerate(CLASSES)) <= PROB_TOLERANCE


def test_resume_takes_the_model_from_the_checkpoint(run, tmp_path):
    if run.name != "efficientnet_b0":
        pytest.skip("one model is enough: resume reads the name, whatever it is")
    folder = tmp_path / "run"
    shutil.copytree(run.folder, folder)
    cfg = TrainConfig(data=str(run.data), epochs=2, resume=True, workers=0, device="cpu", amp="off",
                      compile=False, loader="torch", out=str(folder))  # no --model: resnet18 by default
    summary = engine.train(cfg, typed=frozenset({"data", "epochs", "resume", "workers", "device", "amp",
                                                 "compile", "loader", "out"}))
    assert (summary["model"], summary["epochs"]) == (run.name, 2)
    assert read_model_file(folder / MODEL_FILE)[1]["arch"] == run.name


def test_a_run_from_before_model_predicts_as_resnet18_with_imagenet_numbers(data, tmp_path):
    """A checkpoint whose config has no `model`, and a model.safetensors whose card has no
    interpolation (both as fastft wrote them before --model): ResNet-18, Resize([37, 37])
    bilinear, CenterCrop(32), ImageNet's mean and std."""
    from test_export import make_run
    from fastft.errors import CheckpointError
    from fastft.weights import write_model_file
    run = make_run(tmp_path / "old", data)
    state = torch.load(run / "checkpoint.pt")
    assert "model" not in state["config"]
    plain = torchvision.models.resnet18(num_classes=2)
    plain.load_state_dict(state["model"])
    steps = T.Compose([T.Resize([37, 37]), T.CenterCrop(SIZE), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = sorted((data / "test").glob("*/*.jpg"))
    with torch.no_grad():
        want = [torch.softmax(plain.eval()(steps(load_rgb(p)).unsqueeze(0)), dim=1)[0] for p in images]
    old_card = {"arch": "resnet18", "num_classes": 2, "classes": CLASSES, "image_size": SIZE, "resize": 37,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "epoch": 3}
    write_model_file(run / MODEL_FILE, state["model"], old_card)
    for source in ({"checkpoint": run}, {"model": run / MODEL_FILE}):
        for (_, ranked), probs in zip(predict_top_k(images, 2, **source), want):
            assert max(abs(dict(ranked)[c] - float(probs[i])) for i, c in enumerate(CLASSES)) <= PROB_TOLERANCE
    # A card whose numbers describe no transform is one line, before any image is read.
    write_model_file(run / MODEL_FILE, state["model"], {**old_card, "interpolation": "lanczos"})
    with pytest.raises(CheckpointError) as caught:
        list(predict_top_k(images, 1, model=run / MODEL_FILE))
    assert str(caught.value) == (f"{run / MODEL_FILE}: records no usable preprocessing (ValueError: interpolation "
                                 f"'lanczos', not one of bilinear, bicubic, nearest)")

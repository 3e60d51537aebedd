"""Classify images with a trained run, or with a model `fastft export` wrote.

    fastft predict --checkpoint RUN_DIR IMAGE...              # PyTorch, from checkpoint.pt
    fastft predict --model RUN_DIR/model.onnx IMAGE...        # ONNX Runtime, no checkpoint needed
    fastft predict --model RUN_DIR/model.pt2 IMAGE...         # torch.export.load
    fastft predict --model RUN_DIR/model.safetensors IMAGE... # its metadata has the classes

Every path feeds the model the same tensor: load_rgb, then the run's eval transform
(Resize, CenterCrop, normalise; data/transforms.py). An exported model's classes and image size
come from its sidecar, PATH.json, which `fastft export` writes next to it. A GPU-trained
checkpoint works on a CPU-only machine.

A .pt2 file is read by torch.export.load, which falls back to full unpickling for objects it
cannot read otherwise: load only .pt2 files you made or trust. ONNX files hold no code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fastft.checkpoint import load_checkpoint
from fastft.data.images import load_rgb, quick_problem, shown_path
from fastft.data.transforms import eval_transform
from fastft.errors import CheckpointError, ConfigError, DataError
from fastft.model import ZIP_MAGIC, build_resnet18
from fastft.runtime import pick_device
from fastft.weights import preprocessing, read_model_file

ORT_HINT = "pip install onnxruntime"
EXPORT_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
Logits = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, S, S) fp32 CPU -> (N, classes) fp32 CPU


def check_images(images: list[Path]) -> None:
    """Raise a one-line DataError naming the first of `images` that is missing, a directory,
    empty, not an image or cut short (images.quick_problem: headers and end markers only),
    and how many more are bad; the reasons are those `fastft data check` gives."""
    bad = [(path, reason) for path in images if (reason := quick_problem(path)) is not None]
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(images)} images)" if len(bad) > 1 else ""
        raise DataError(f"{shown_path(path)}: {reason}{more}")


def trained_model(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """The run's ResNet-18 in fp32 on the CPU, in eval mode, and its checkpoint (any device's).
    Raises CheckpointError (one line) for a missing or unreadable checkpoint."""
    state = load_checkpoint(checkpoint)  # mapped to the CPU, whatever device trained it
    model = build_resnet18(len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def sidecar_path(model_path: Path) -> Path:
    """model.onnx -> model.onnx.json: the classes and preprocessing of an exported model."""
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: Path) -> dict:
    """The sidecar `fastft export` wrote next to `model_path`, checked by `check_card`;
    CheckpointError (one line) when the model or its sidecar is missing or unreadable."""
    path = sidecar_path(model_path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; `fastft export` writes it next to {model_path.name}, with "
                              f"the classes and preprocessing predict needs") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a fastft export sidecar ({type(exc).__name__}: {exc})") from exc
    return check_card(path, card)


def check_card(where: Path, card: dict) -> dict:
    """`card` (a sidecar, or model.safetensors' metadata) when it holds what predict needs: the
    class names, and the preprocessing fastft's eval transform makes at its image size, which
    predict applies. Else a one-line CheckpointError."""
    try:
        expected = preprocessing(int(card["image_size"]))
        classes = card["classes"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: records no image_size and classes ({type(exc).__name__}: {exc})") from exc
    if not isinstance(classes, list) or not classes:
        raise CheckpointError(f"{where}: `classes` is not a list of class names")
    differs = [key for key in ("resize", "mean", "std") if card.get(key) != expected[key]]
    if differs:
        raise CheckpointError(f"{where}: its {', '.join(differs)} differ from fastft's eval transform at "
                              f"{card['image_size']} px, which predict applies")
    return card


def export_format(model_path: Path, card: dict | None = None) -> str:
    """'onnx' or 'pt2', by the file's suffix, else by its sidecar's `format`."""
    fmt = EXPORT_FORMATS.get(model_path.suffix.lower()) or (card or {}).get("format")
    if fmt not in EXPORT_FORMATS.values():
        raise CheckpointError(f"{model_path}: not an exported model (.onnx or .pt2 expected)")
    return fmt


def exported_logits(model_path: Path, fmt: str, device: str = "cpu") -> tuple[Logits, str]:
    """(a function giving an exported model's logits, the runtime's name).

    ONNX runs through ONNX Runtime (its CUDA provider for a cuda device, where installed);
    pt2 through torch.export.load. Raises ConfigError when onnxruntime is missing and
    CheckpointError (one line) for a file the runtime cannot read.
    """
    if fmt == "onnx":
        return _onnx_logits(model_path, device), "ONNX Runtime"
    # Exported from an eval-mode model: BatchNorm's running statistics are in the graph.
    return _torch_logits(_load_program(model_path).module(), device), "the loaded torch.export program"


def _load_program(model_path: Path) -> torch.export.ExportedProgram:
    """torch.export.load, with torch's logged traceback for a bad file turned into one line."""
    with open(model_path, "rb") as handle:
        is_zip = handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if not is_zip:
        raise CheckpointError(f"{model_path}: not a torch.export program (a .pt2 zip expected)")
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(str(model_path))
    except Exception as exc:  # a zip that is not torch.export's, a cut-short file
        raise CheckpointError(f"{model_path}: not a readable torch.export program ({_first_line(exc)})") from exc
    finally:
        logger.setLevel(level)


def _onnx_logits(model_path: Path, device: str) -> Logits:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"running {model_path.name} needs ONNX Runtime: {ORT_HINT}") from exc
    providers = ["CPUExecutionProvider"]
    if pick_device(device).type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(str(model_path), providers=providers)
    except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, ...
        raise CheckpointError(f"{model_path}: not a readable ONNX model ({_first_line(exc)})") from exc
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def classify(images: list[Path], logits: Logits, classes: list[str], image_size: int
             ) -> Iterator[tuple[Path, str, float]]:
    """(image, predicted class, its probability) for each image, one at a time, in order."""
    transform = eval_transform(image_size)
    for path in images:
        x = transform(load_rgb(path)).unsqueeze(0)
        probs = torch.softmax(logits(x).float(), dim=1)[0]
        best = int(probs.argmax())
        yield path, classes[best], float(probs[best])


def predict(checkpoint: Path, images: list[Path], device: str = "cpu") -> Iterator[tuple[Path, str, float]]:
    """(image, predicted class, its probability) for each image, in order, from a run's checkpoint.

    Every image is checked before the first result, so a bad one among many stops the command
    before it prints anything (a file whose header and end marker look whole but whose middle is
    corrupt is found only when decoded: a DataError after the results before it).
    Raises DataError (a bad image) and CheckpointError (a bad checkpoint), one line each.
    """
    check_images(images)
    model, state = trained_model(checkpoint)
    logits = _torch_logits(model, device)
    yield from classify(images, logits, list(state["classes"]), int(state["config"]["image_size"]))


def predict_exported(model_path: Path, images: list[Path], device: str = "cpu"
                     ) -> Iterator[tuple[Path, str, float]]:
    """As `predict`, from one file: an exported .onnx or .pt2 with its sidecar, or a run's
    model.safetensors (its metadata holds the classes and preprocessing).
    Raises DataError, CheckpointError (model or sidecar), WeightsError (a bad safetensors file)
    and ConfigError (onnxruntime or safetensors missing), one line each."""
    check_images(images)
    if not model_path.is_file():
        raise CheckpointError(f"{model_path}: no such model file")
    if model_path.suffix == ".safetensors":
        logits, card = _safetensors_logits(model_path, device)
    else:
        card = read_sidecar(model_path)
        logits, _ = exported_logits(model_path, export_format(model_path, card), device)
    yield from classify(images, logits, card["classes"], int(card["image_size"]))


def _safetensors_logits(model_path: Path, device: str) -> tuple[Logits, dict]:
    tensors, card = read_model_file(model_path)
    check_card(model_path, card)
    model = build_resnet18(len(card["classes"]))
    try:
        model.load_state_dict(tensors)  # strict: a file of another network is refused here
    except RuntimeError as exc:
        raise CheckpointError(f"{model_path}: not a ResNet-18 of {len(card['classes'])} classes "
                              f"({_first_line(exc)})") from exc
    return _torch_logits(model.eval(), device), card


def _torch_logits(model: torch.nn.Module, device: str) -> Logits:
    target = pick_device(device)
    model = model.to(target)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(target)).float().cpu()
    return run

"""Classify images with a trained run, or with a model `fastft export` wrote.

    fastft predict --checkpoint RUN_DIR IMAGE...              # PyTorch, from checkpoint.pt
    fastft predict --model RUN_DIR/model.onnx IMAGE...        # ONNX Runtime, no checkpoint needed
    fastft predict --model RUN_DIR/model.pt2 IMAGE...         # torch.export.load
    fastft predict --model RUN_DIR/model.safetensors IMAGE... # its metadata has the classes

Every path feeds the model the same tensor: load_rgb, then the model's own eval transform
(Resize with its interpolation, CenterCrop, normalise with its mean and std: the Preprocessing
the run recorded, see model_transform). A run's model is the --model its checkpoint names
(ResNet-18 for a run from before --model). An exported model's name, classes and preprocessing
come from its sidecar, PATH.json, which `fastft export` writes next to it (model.safetensors
keeps them in its metadata); predict checks it against the model's own input and output shapes
before the first image, so a sidecar of another export is one line, not the runtime's
traceback. A GPU-trained checkpoint works on a CPU-only machine.

A .pt2 file is read by torch.export.load, which falls back to full unpickling for objects it
cannot read otherwise: load only .pt2 files you made or trust. ONNX files hold no code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms as T

from fastft.checkpoint import load_checkpoint
from fastft.data.images import load_rgb, quick_problem, shown_path
from fastft.errors import CheckpointError, ConfigError, DataError, FastftError
from fastft.model import ZIP_MAGIC
from fastft.models.base import Preprocessing
from fastft.runtime import pick_device
from fastft.weights import build_plain, card_model, model_of, read_model_file

ORT_HINT = "pip install onnxruntime (or pip install 'fastft[onnx]')"
MODEL_FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".safetensors": "safetensors"}  # predict --model
RUN_ERROR_CHARS = 300  # a runtime's message, flattened to one line, is cut here
Logits = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, S, S) fp32 CPU -> (N, classes) fp32 CPU
Shape = tuple  # a tensor's dims: ints where fixed, None where dynamic (the batch axis)


class ModelRunError(FastftError):
    """A model that loaded but fails on an input, or gives logits its class list does not fit."""


@dataclass
class Loaded:
    """A model ready to run, and what it says of its own shapes (None where it does not say)."""
    run: Logits
    runtime: str  # what runs it, for the export check's report
    input_shape: Shape | None  # e.g. (None, 3, 32, 32)
    output_shape: Shape | None  # e.g. (None, 2)


def check_images(images: list[Path]) -> None:
    """Raise a one-line DataError naming the first of `images` that is missing, a directory,
    empty, not an image or cut short (images.quick_problem: headers and end markers only),
    and how many more are bad; the reasons are those `fastft data check` gives."""
    bad = [(path, reason) for path in images if (reason := quick_problem(path)) is not None]
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(images)} images)" if len(bad) > 1 else ""
        raise DataError(f"{shown_path(path)}: {reason}{more}")


def model_transform(prep: Preprocessing) -> T.Compose:
    """PIL RGB image -> (3, S, S) fp32: Resize([resize, resize]) with prep's interpolation
    (antialiased on PIL images), CenterCrop(S), scale to 0..1, (x - mean) / std; S = prep.image_size.
    The same steps as the loaders' eval transform (data/transforms.py) given the same Preprocessing."""
    mode = T.InterpolationMode(prep.interpolation)  # PIL's own filters, NEAREST included
    return T.Compose([T.Resize([prep.resize, prep.resize], interpolation=mode), T.CenterCrop(prep.image_size),
                      T.ToTensor(), T.Normalize(prep.mean, prep.std)])


def trained_model(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """The run's model (the --model its checkpoint names) in fp32 on the CPU, in eval mode, and
    its checkpoint (any device's). Raises CheckpointError (one line) for a missing or unreadable
    checkpoint, or weights that do not fit the model it names."""
    state = load_checkpoint(checkpoint)  # mapped to the CPU, whatever device trained it
    return load_plain(state, checkpoint), state


def load_plain(state: dict, source: Path) -> torch.nn.Module:
    """The plain library model a checkpoint-like `state` names (model_of), its weights loaded
    strictly, in eval mode on the CPU; a one-line CheckpointError naming `source` otherwise."""
    name, prep = model_of(state)
    classes = len(state["classes"])
    model = build_plain(name, classes, prep.image_size)
    try:
        model.load_state_dict(state["model"])  # strict: every key and shape
    except RuntimeError as exc:
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{shown_path(source)}: not a {name} of {classes} classes "
                              f"({detail[-1][:200] if detail else type(exc).__name__})") from exc
    return model.eval()


def sidecar_path(model_path: Path) -> Path:
    """model.onnx -> model.onnx.json: the classes and preprocessing of an exported model."""
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: Path) -> dict:
    """The sidecar `fastft export` wrote next to `model_path` (checked by `check_card`);
    CheckpointError (one line) when the model or its sidecar is missing or unreadable."""
    path = sidecar_path(model_path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; `fastft export` writes it next to {model_path.name}, with "
                              f"the classes and preprocessing predict needs") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a fastft export sidecar ({type(exc).__name__}: {exc})") from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: not a fastft export sidecar (a JSON object expected)")
    return card


def check_card(where: Path, card: dict) -> tuple[str, Preprocessing]:
    """(model name, Preprocessing) of `card` (a sidecar, or model.safetensors' metadata) when it
    holds what predict needs: the class names, and the model's preprocessing (weights.card_model),
    which predict applies. Else a one-line CheckpointError."""
    classes = card.get("classes")
    if not isinstance(classes, list) or not classes:
        raise CheckpointError(f"{where}: records no `classes` list of class names")
    return card_model(where, card)


def model_format(model_path: Path) -> str:
    """'onnx', 'pt2' or 'safetensors', by `model_path`'s suffix (any case); else, or for a folder
    or a missing file, a one-line CheckpointError."""
    fmt = MODEL_FORMATS.get(model_path.suffix.lower())
    if model_path.is_dir():
        raise CheckpointError(f"{model_path}: a folder; --model expects a .onnx, .pt2 or .safetensors file "
                              f"(a run folder goes to --checkpoint)")
    if fmt is None:
        hint = " (a run's checkpoint goes to --checkpoint)" if model_path.suffix == ".pt" else ""
        raise CheckpointError(f"{model_path}: expected a .onnx, .pt2 or .safetensors file{hint}")
    if not model_path.is_file():
        raise CheckpointError(f"{model_path}: no such model file")
    return fmt


def check_fits(model_path: Path, fmt: str, card: dict, loaded: Loaded) -> None:
    """A one-line CheckpointError naming the sidecar when it does not describe the model beside it:
    another format, or an image size or class count other than the model's own input
    (N, 3, S, S) and output (N, classes) shapes (each dim compared where the model fixes it)."""
    where, name = sidecar_path(model_path), model_path.name
    size, n = check_card(where, card)[1].image_size, len(card["classes"])
    if card.get("format", fmt) != fmt:
        raise CheckpointError(f"{where}: says format {card['format']}, but {name} is {fmt}")
    problems = []
    if not _fits(loaded.input_shape, (None, 3, size, size)):
        problems.append(f"image_size {size}, but {name} takes inputs of {_shown(loaded.input_shape)}")
    if not _fits(loaded.output_shape, (None, n)):
        problems.append(f"{n} classes, but {name} gives logits of {_shown(loaded.output_shape)}")
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)} (a sidecar of another export?)")


def _fits(shape: Shape | None, want: Shape) -> bool:
    """True when `shape` is unknown, or has want's rank and every dim both fix is equal."""
    if shape is None:
        return True
    return len(shape) == len(want) and all(a is None or b is None or a == b for a, b in zip(shape, want))


def _shown(shape: Shape) -> str:
    return " x ".join("N" if d is None else str(d) for d in shape)


def exported_logits(model_path: Path, fmt: str, device: str = "cpu") -> tuple[Logits, str]:
    """(a function giving an exported model's logits, the runtime's name); see load_exported."""
    loaded = load_exported(model_path, fmt, device)
    return loaded.run, loaded.runtime


def load_exported(model_path: Path, fmt: str, device: str = "cpu") -> Loaded:
    """An exported model, ready to run, with its input and output shapes where it records them.

    ONNX runs through ONNX Runtime (its CUDA provider for a cuda device, where installed);
    pt2 through torch.export.load; safetensors in the fresh plain library model its metadata
    names (arch), of the classes it lists. Raises ConfigError when onnxruntime is missing, CheckpointError (one line) for
    a file the runtime cannot read, WeightsError for a bad safetensors file.
    """
    if fmt == "onnx":
        return _onnx_model(model_path, device)
    if fmt == "safetensors":
        return _safetensors_model(model_path, device)[0]
    program = _load_program(model_path)
    # Exported from an eval-mode model: BatchNorm's running statistics are in the graph.
    return Loaded(_torch_logits(program.module(), device), "the loaded torch.export program",
                  *_program_shapes(program))


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


def _program_shapes(program: torch.export.ExportedProgram) -> tuple[Shape | None, Shape | None]:
    """(input shape, output shape) of a program of one tensor in and one out, as its graph records
    them (a dynamic dim is a SymInt there: None here); (None, None) for any other program."""
    signature = program.graph_signature
    values = {node.name: node.meta.get("val") for node in program.graph.nodes}
    if len(signature.user_inputs) != 1 or len(signature.user_outputs) != 1:
        return None, None
    shapes = []
    for name in (signature.user_inputs[0], signature.user_outputs[0]):
        value = values.get(name)
        shapes.append(None if not isinstance(value, torch.Tensor) else
                      tuple(d if isinstance(d, int) else None for d in value.shape))
    return shapes[0], shapes[1]


def _onnx_model(model_path: Path, device: str) -> Loaded:
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
    inputs, outputs = session.get_inputs(), session.get_outputs()
    name = inputs[0].name

    def shape(args: list) -> Shape | None:  # ONNX Runtime names a dynamic dim by a string, or None
        return tuple(d if isinstance(d, int) else None for d in args[0].shape) if len(args) == 1 else None

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0])
    return Loaded(run, "ONNX Runtime", shape(inputs), shape(outputs))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def flat_reason(exc: BaseException) -> str:
    """A runtime's message in one line: ONNX Runtime puts the dims that differ on later lines."""
    text = " ".join(str(exc).split()) or "no message"
    text = text if len(text) <= RUN_ERROR_CHARS else text[:RUN_ERROR_CHARS] + "..."
    return f"{type(exc).__name__}: {text}"


def classify(images: list[Path], logits: Logits, classes: list[str], prep: Preprocessing, source: Path
             ) -> Iterator[tuple[Path, str, float]]:
    """(image, predicted class, its probability) for each image, one at a time, in order, each
    image through model_transform(prep). Raises ModelRunError (one line, naming `source`, the
    model) when the model fails on an image or gives other than one logit per class."""
    for path, ranked in classify_top_k(images, logits, classes, prep, source, 1):
        yield path, *ranked[0]


def classify_top_k(images: list[Path], logits: Logits, classes: list[str], prep: Preprocessing, source: Path,
                   k: int) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """(image, [(class, probability)] of its min(k, classes) most probable classes, most probable
    first; ties in class order) for each image, one at a time, in order. Errors as `classify`."""
    transform = model_transform(prep)
    for path in images:
        x = transform(load_rgb(path)).unsqueeze(0)
        try:
            out = logits(x).float()
        except Exception as exc:  # the runtime's own types (ONNX Runtime's, torch.export's guards)
            raise ModelRunError(f"{source}: failed on {shown_path(path)} ({flat_reason(exc)})") from exc
        if tuple(out.shape) != (1, len(classes)):
            raise ModelRunError(f"{source}: gives logits of shape {tuple(out.shape)} for one image, "
                                f"expected (1, {len(classes)}) for its {len(classes)} classes")
        probs = torch.softmax(out, dim=1)[0]
        # A stable sort: equal probabilities keep class order, as argmax picks the first.
        order = sorted(range(len(classes)), key=lambda i: -float(probs[i]))[:k]
        yield path, [(classes[i], float(probs[i])) for i in order]


def predict(checkpoint: Path, images: list[Path], device: str = "cpu") -> Iterator[tuple[Path, str, float]]:
    """(image, predicted class, its probability) for each image, in order, from a run's checkpoint.

    Every image is checked before the first result, so a bad one among many stops the command
    before it prints anything (a file whose header and end marker look whole but whose middle is
    corrupt is found only when decoded: a DataError after the results before it).
    Raises DataError (a bad image) and CheckpointError (a bad checkpoint), one line each.
    """
    check_images(images)
    yield from classify(images, *checkpoint_classifier(checkpoint, device))


def checkpoint_classifier(checkpoint: Path, device: str = "cpu") -> tuple[Logits, list[str], Preprocessing, Path]:
    """A run's model as (logits, classes, its Preprocessing, the source to name in errors)."""
    model, state = trained_model(checkpoint)
    return _torch_logits(model, device), list(state["classes"]), model_of(state)[1], checkpoint


def predict_top_k(images: list[Path], k: int, device: str = "cpu", checkpoint: Path | None = None,
                  model: Path | None = None) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """`fastft predict`: each image's k most probable classes (classify_top_k) from a run's
    `checkpoint` or an exported `model` file (one of the two). Errors as predict and
    predict_exported; every image is checked before the model loads."""
    check_images(images)
    source = checkpoint_classifier(checkpoint, device) if model is None else exported_classifier(model, device)
    yield from classify_top_k(images, *source, k)


def predict_exported(model_path: Path, images: list[Path], device: str = "cpu"
                     ) -> Iterator[tuple[Path, str, float]]:
    """As `predict`, from one file: an exported .onnx or .pt2 with its sidecar (checked against
    the model's shapes before any image), or a run's model.safetensors (its metadata holds the
    classes and preprocessing). Raises DataError, CheckpointError (another suffix, model or
    sidecar), WeightsError (a bad safetensors file), ModelRunError (the model fails on an image)
    and ConfigError (onnxruntime or safetensors missing), one line each."""
    model_format(model_path)
    check_images(images)
    yield from classify(images, *exported_classifier(model_path, device))


def exported_classifier(model_path: Path, device: str = "cpu") -> tuple[Logits, list[str], Preprocessing, Path]:
    """An exported .onnx/.pt2 (its sidecar checked against the model's shapes) or a run's
    model.safetensors, as (logits, classes, its Preprocessing, the source to name in errors)."""
    fmt = model_format(model_path)
    if fmt == "safetensors":
        loaded, card = _safetensors_model(model_path, device)
        where = model_path
    else:
        card = read_sidecar(model_path)
        where = sidecar_path(model_path)
        loaded = load_exported(model_path, fmt, device)
        check_fits(model_path, fmt, card, loaded)
    return loaded.run, card["classes"], check_card(where, card)[1], model_path


def _safetensors_model(model_path: Path, device: str) -> tuple[Loaded, dict]:
    """model.safetensors in a fresh plain torchvision or timm model of the name its metadata
    gives (weights.build_plain), as any script would load it, and its metadata; a strict load,
    so a file of another network or class count is refused."""
    tensors, card = read_model_file(model_path)
    name, prep = check_card(model_path, card)
    classes = len(card["classes"])
    model = build_plain(name, classes, prep.image_size)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{model_path}: not a {name} of {classes} classes ({_first_line(exc)})") from exc
    runtime = f"a fresh {name} (strict load_state_dict)"
    return Loaded(_torch_logits(model.eval(), device), runtime, None, (None, classes)), card


def _torch_logits(model: torch.nn.Module, device: str) -> Logits:
    target = pick_device(device)
    model = model.to(target)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(target)).float().cpu()
    return run

"""Weights other tools can read: RUN_DIR/model.safetensors, and what a run's model is.

Every run writes the trained model's state_dict under the library's own key names, so any
script loads it into the plain torchvision or timm model of the run's `--model` without fastft:

    from safetensors.torch import load_file
    model = torchvision.models.get_model("convnext_tiny", num_classes=2)  # ViT: image_size=S too
    model = timm.create_model("convnext_atto", num_classes=2)             # arch timm:convnext_atto
    model.load_state_dict(load_file("RUN_DIR/model.safetensors"))        # strict: every key matches

The file's metadata (safetensors keeps str -> str) says how to feed it: the class names in
label order, `arch` (the --model name; `timm:NAME` is timm's NAME) and the model's eval
preprocessing (resize with its interpolation, centre crop, mean and std: fastft.models'
Preprocessing), each non-string value JSON-encoded. safetensors holds only tensors and a JSON
header, so reading one runs no code. The package is optional (`pip install safetensors`).

A run from before `--model` existed records no model: it is ResNet-18 with torchvision's
preprocessing at its image size (model_of, card_model).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from fastft import __version__
from fastft.errors import CheckpointError, WeightsError
from fastft.models.base import DEFAULT_PREPROCESSING, INTERPOLATIONS, Preprocessing
from fastft.safe_write import write_bytes_atomic

MODEL_FILE = "model.safetensors"
LEGACY_MODEL = "resnet18"  # what a run, card or sidecar that names no model trained
INSTALL_HINT = "pip install safetensors (or pip install 'fastft[safetensors]')"
# The input every fastft model expects, in words, for the metadata and export sidecars.
INPUT_LAYOUT = "NCHW float32 RGB: pixels scaled to 0..1, then (x - mean) / std per channel"
# Metadata values stored as JSON (the others are plain strings).
JSON_KEYS = ("classes", "num_classes", "image_size", "resize", "mean", "std", "epoch")
HEADER_LEN_BYTES = 8  # a safetensors file starts with its JSON header's length, u64 little-endian


def import_safetensors(needed_for: str):
    """safetensors.torch, or a one-line WeightsError with the install command."""
    try:
        import safetensors.torch
    except ImportError as exc:
        raise WeightsError(f"{needed_for} needs the safetensors package: {INSTALL_HINT}") from exc
    return safetensors.torch


def preprocessing_card(prep: Preprocessing) -> dict:
    """What the model's eval transform does to an image, as numbers another tool can apply:
    Resize([resize, resize]) with `interpolation` (antialiased, as torchvision's on PIL images),
    CenterCrop(image_size), scale to 0..1, normalise with mean and std. Sizes in px. The keys
    are Preprocessing.to_dict()'s, plus the transform and input layout in words."""
    r = prep.resize
    return {**prep.to_dict(), "transform": f"Resize([{r}, {r}], {prep.interpolation}) then CenterCrop({prep.image_size})",
            "input": INPUT_LAYOUT}


def model_card(classes: list[str], epoch: int, model: str, prep: Preprocessing) -> dict:
    """Everything beyond the tensors that a user of the weights needs (JSON-able): `arch` is the
    --model name (`timm:NAME` for timm's NAME), then the classes and `prep`'s numbers."""
    return {"arch": model, "num_classes": len(classes), "classes": list(classes), **preprocessing_card(prep),
            "epoch": epoch, "fastft_version": __version__}


def model_of(state: dict) -> tuple[str, Preprocessing]:
    """(model name, eval Preprocessing) of a checkpoint (its `config` and `preprocessing` keys).
    A checkpoint that records no preprocessing gets its model's own at its image size; one that
    records no model (made before --model) is ResNet-18. Raises ConfigError for an unknown name."""
    config = state.get("config") or {}
    name = config.get("model") or LEGACY_MODEL
    if isinstance(state.get("preprocessing"), dict):
        return name, Preprocessing.from_dict(state["preprocessing"])
    size = int(config["image_size"])
    if name == LEGACY_MODEL:  # no lookup: the chapter's numbers, as every run before --model
        return name, DEFAULT_PREPROCESSING.at_size(size)
    from fastft.models import get_spec
    return name, get_spec(name).preprocessing().at_size(size)


def card_model(where: Path, card: dict) -> tuple[str, Preprocessing]:
    """(model name, eval Preprocessing) of a model card or export sidecar: `model` (sidecars) or
    `arch`, and `preprocessing` (a Preprocessing.to_dict()) or the card's own flat keys; a card
    from before --model names resnet18 and no interpolation (bilinear). A one-line
    CheckpointError naming `where` when the numbers are missing or malformed."""
    name = card.get("model") or card.get("arch") or LEGACY_MODEL
    nested = card.get("preprocessing") if isinstance(card.get("preprocessing"), dict) else None
    try:
        prep = Preprocessing.from_dict(nested or card)
        if len(prep.mean) != 3 or len(prep.std) != 3 or prep.image_size < 1 or prep.resize < prep.image_size:
            raise ValueError("mean and std of 3 channels, 1 <= image_size <= resize")
        if prep.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {prep.interpolation!r}, not one of {', '.join(INTERPOLATIONS)}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: records no usable preprocessing ({type(exc).__name__}: {exc})") from exc
    # A sidecar holds both forms; one edited without the other describes no single transform.
    differs = [key for key, value in (nested or {}).items() if key in card and card[key] != value]
    if differs:
        raise CheckpointError(f"{where}: its {', '.join(differs)} differ from its `preprocessing`")
    return str(name), replace(prep, mean=tuple(map(float, prep.mean)), std=tuple(map(float, prep.std)))


def build_plain(model: str, num_classes: int, image_size: int) -> torch.nn.Module:
    """The plain library model of `model` with random weights and a `num_classes`-way head, as a
    script would build it: torchvision.models.get_model(name, num_classes=n) (ViT with
    image_size=S at another size than its own), or timm.create_model(NAME, num_classes=n)
    (img_size=S for a model that fixes its input size). Raises ConfigError for an unknown name."""
    from fastft.models import get_spec
    return get_spec(model).build(num_classes, image_size)


def to_metadata(card: dict) -> dict[str, str]:
    """safetensors metadata: strings as they are, the JSON_KEYS as JSON. `format: pt` is what
    Hugging Face's loaders look for in a PyTorch safetensors file."""
    meta = {"format": "pt"}
    meta.update({key: json.dumps(value) if key in JSON_KEYS else str(value) for key, value in card.items()})
    return meta


def from_metadata(meta: dict[str, str] | None) -> dict:
    """The inverse of to_metadata; a key that is not valid JSON stays a string."""
    card = {}
    for key, value in (meta or {}).items():
        try:
            card[key] = json.loads(value) if key in JSON_KEYS else value
        except json.JSONDecodeError:
            card[key] = value
    return card


def exportable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() as CPU tensors in contiguous layout (safetensors stores no strides; a
    channels_last weight is copied to NCHW order, the layout torchvision's own weights have).
    Names are the module's own: the plain (or SyncBatchNorm-converted) torchvision or timm model,
    never a DDP or torch.compile wrapper, so no `module.` or `_orig_mod.` prefix."""
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}


def save_run_weights(run_dir: Path, model: torch.nn.Module, classes, epoch: int, name: str,
                     prep: Preprocessing) -> str | None:
    """Write RUN_DIR/model.safetensors (rank 0 calls it once, with the run's last checkpoint):
    `model`'s weights, and a card naming `name` (the --model) and its eval preprocessing `prep`.

    Returns a one-line warning instead when safetensors is not installed: the run's result stands
    without this file. Raises WriteError when the write itself fails (a full disk).
    """
    path = Path(run_dir) / MODEL_FILE
    try:
        import_safetensors(f"writing {MODEL_FILE}")
    except WeightsError as exc:
        return f"no {MODEL_FILE} written: {exc}"
    write_model_file(path, exportable_state(model), model_card(list(classes), epoch, name, prep))
    return None


def write_model_file(path: Path, state: dict[str, torch.Tensor], card: dict) -> None:
    """Write `state` and `card` to `path` via `path.tmp`, fsync and rename (the old file stays
    whole until the rename). Raises WeightsError when safetensors is missing, WriteError (one line)
    when the write fails (a full disk, a read-only folder)."""
    st = import_safetensors(f"writing {path.name}")
    # save() to bytes, written here: save_file would create the file as 0600, not by the umask.
    write_bytes_atomic(path, st.save(state, metadata=to_metadata(card)), durable=True)


def is_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte header length that fits in the file, then '{'."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_LEN_BYTES + 1)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) <= HEADER_LEN_BYTES:
        return False
    length = int.from_bytes(head[:HEADER_LEN_BYTES], "little")
    return head[HEADER_LEN_BYTES:] == b"{" and length <= size - HEADER_LEN_BYTES


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """({name: CPU tensor}, metadata as from_metadata gives it) of a safetensors file.

    Raises WeightsError (one line) when safetensors is missing or the file is not a readable
    safetensors file (empty, cut short, a header that is not safetensors' JSON).
    """
    path = Path(path)
    st = import_safetensors(f"reading {path.name}")
    from safetensors import safe_open
    if path.is_file() and path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        tensors = st.load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, a bad header's own error types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path}: not a readable .safetensors file ({reason})") from exc
    return tensors, from_metadata(meta)

"""Weights other tools can read: RUN_DIR/model.safetensors.

Every run writes the trained model's state_dict under torchvision's own key names, so any
script loads it into a plain torchvision ResNet-18 without fastft:

    from safetensors.torch import load_file
    model = torchvision.models.resnet18(num_classes=2)
    model.load_state_dict(load_file("RUN_DIR/model.safetensors"))   # strict: every key matches

The file's metadata (safetensors keeps str -> str) says how to feed it: the class names in
label order, the architecture and the eval preprocessing (resize, centre crop, mean and std),
each non-string value JSON-encoded. safetensors holds only tensors and a JSON header, so
reading one runs no code. The package is optional (`pip install safetensors`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastft import __version__
from fastft.config import eval_resize_px
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastft.errors import WeightsError
from fastft.safe_write import write_bytes_atomic

MODEL_FILE = "model.safetensors"
ARCH = "resnet18"
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


def preprocessing(image_size: int) -> dict:
    """What fastft's eval transform (data/transforms.py) does to an image, as numbers another tool
    can apply: Resize([resize, resize]) (bilinear, antialiased, as torchvision's on PIL images),
    CenterCrop(image_size), scale to 0..1, normalise. Sizes in px."""
    resize = eval_resize_px(image_size)
    return {"image_size": image_size, "resize": resize, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "transform": f"Resize([{resize}, {resize}]) then CenterCrop({image_size})", "input": INPUT_LAYOUT}


def model_card(classes: list[str], image_size: int, epoch: int) -> dict:
    """Everything beyond the tensors that a user of the weights needs (JSON-able)."""
    return {"arch": ARCH, "num_classes": len(classes), "classes": list(classes), **preprocessing(image_size),
            "epoch": epoch, "fastft_version": __version__}


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
    Names are the module's own: the plain (or SyncBatchNorm-converted) torchvision ResNet-18,
    never a DDP or torch.compile wrapper, so no `module.` or `_orig_mod.` prefix."""
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}


def save_run_weights(run_dir: Path, model: torch.nn.Module, classes, image_size: int, epoch: int) -> str | None:
    """Write RUN_DIR/model.safetensors (rank 0 calls it once, with the run's last checkpoint).

    Returns a one-line warning instead when safetensors is not installed: the run's result stands
    without this file. Raises WriteError when the write itself fails (a full disk).
    """
    path = Path(run_dir) / MODEL_FILE
    try:
        import_safetensors(f"writing {MODEL_FILE}")
    except WeightsError as exc:
        return f"no {MODEL_FILE} written: {exc}"
    write_model_file(path, exportable_state(model), model_card(list(classes), image_size, epoch))
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

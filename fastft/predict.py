"""Classify images with a trained run; a GPU-trained checkpoint works on a CPU-only machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from fastft.checkpoint import load_checkpoint
from fastft.data.images import load_rgb
from fastft.data.transforms import eval_transform
from fastft.errors import DataError
from fastft.model import build_resnet18
from fastft.runtime import pick_device


def predict(checkpoint: Path, images: list[Path], device: str = "cpu") -> Iterator[tuple[Path, str, float]]:
    """(image, predicted class, its probability) for each image, in order."""
    state = load_checkpoint(checkpoint)  # mapped to the CPU, whatever device trained it
    classes = list(state["classes"])
    model = build_resnet18(len(classes))
    model.load_state_dict(state["model"])
    target = pick_device(device)
    model = model.to(target).eval()
    transform = eval_transform(int(state["config"]["image_size"]))
    for path in images:
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
        x = transform(load_rgb(path)).unsqueeze(0).to(target)
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=1)[0]
        best = int(probs.argmax())
        yield path, classes[best], float(probs[best])

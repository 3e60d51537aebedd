"""Classify images with a trained run; a GPU-trained checkpoint works on a CPU-only machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from fastft.checkpoint import load_checkpoint
from fastft.data.images import load_rgb, quick_problem, shown_path
from fastft.data.transforms import eval_transform
from fastft.errors import DataError
from fastft.model import build_resnet18
from fastft.runtime import pick_device


def check_images(images: list[Path]) -> None:
    """Raise a one-line DataError naming the first of `images` that is missing, a directory,
    empty, not an image or cut short (images.quick_problem: headers and end markers only),
    and how many more are bad; the reasons are those `fastft data check` gives."""
    bad = [(path, reason) for path in images if (reason := quick_problem(path)) is not None]
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(images)} images)" if len(bad) > 1 else ""
        raise DataError(f"{shown_path(path)}: {reason}{more}")


def predict(checkpoint: Path, images: list[Path], device: str = "cpu") -> Iterator[tuple[Path, str, float]]:
    """(image, predicted class, its probability) for each image, in order.

    Every image is checked before the first result, so a bad one among many stops the command
    before it prints anything (a file whose header and end marker look whole but whose middle is
    corrupt is found only when decoded: a DataError after the results before it).
    Raises DataError (a bad image) and CheckpointError (a bad checkpoint), one line each.
    """
    check_images(images)
    state = load_checkpoint(checkpoint)  # mapped to the CPU, whatever device trained it
    classes = list(state["classes"])
    model = build_resnet18(len(classes))
    model.load_state_dict(state["model"])
    target = pick_device(device)
    model = model.to(target).eval()
    transform = eval_transform(int(state["config"]["image_size"]))
    for path in images:
        x = transform(load_rgb(path)).unsqueeze(0).to(target)
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=1)[0]
        best = int(probs.argmax())
        yield path, classes[best], float(probs[best])

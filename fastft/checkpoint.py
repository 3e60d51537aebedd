"""A run's checkpoint: written atomically, read without running code from the file.

`checkpoint.pt` holds the model, optimizer, grad scaler, completed epochs, RNG
states, config and class names. It is written to a temporary file and renamed
over the old one, so a run killed at any moment leaves the last complete
checkpoint loadable.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from fastft.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir)
    path = path if path.is_file() else checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (a run folder holds {CHECKPOINT_NAME})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a foreign pickle, random bytes...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from exc
    required = ("model", "epoch", "config", "classes")
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise CheckpointError(f"{path}: not a fastft checkpoint (expected keys {', '.join(required)})")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_random_state(saved) -> tuple:
    """random.setstate wants tuples; a round trip through torch.save may give lists."""
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)

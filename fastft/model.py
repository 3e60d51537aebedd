"""ResNet-18 and its starting weights: torchvision's ImageNet set, none, or a file.

An external file is matched tensor by tensor, by name and shape, and the user
is told what was loaded, what was skipped and what is missing, so a checkpoint
from another trainer (DDP or compiled, with `module.`/`_orig_mod.` prefixes)
can seed the backbone without surprises.
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastft.errors import WeightsError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def build_resnet18(num_classes: int) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 weights, through the torch hub cache ($TORCH_HOME)."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        file_name = weights.url.rsplit("/", 1)[-1]
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot get ImageNet weights from {weights.url} ({reason}); place {file_name} "
            f"in {cache} (set $TORCH_HOME to move it), or pass --weights PATH or --weights none"
        ) from exc


def strip_wrapper_prefixes(name: str) -> str:
    """DDP saves `module.x`, torch.compile saves `_orig_mod.x`; both mean `x`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state_dict without running any code from the file (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle or zip
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({reason})") from exc
    for key in ("model", "state_dict"):  # a fastft checkpoint, or a Lightning-style one
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise WeightsError(f"{path}: not a state_dict (expected a dict of tensors, got {type(obj).__name__})")
    return {strip_wrapper_prefixes(k): v for k, v in obj.items()}


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # "name (file shape vs model shape)"
    missing: list[str] = field(default_factory=list)      # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)   # in the file, not in the model

    def lines(self) -> list[str]:
        out = [f"weights {self.source}: loaded {len(self.loaded)} tensors"]
        if self.mismatched:
            out.append(f"  skipped for a shape mismatch: {', '.join(self.mismatched)}")
        if self.missing:
            out.append(f"  missing from the file (kept at init): {', '.join(self.missing)}")
        if self.unexpected:
            out.append(f"  in the file but not in the model: {len(self.unexpected)} tensors")
        return out


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy every tensor whose name and shape match; report the rest."""
    own = model.state_dict()
    report = LoadReport(source=source)
    matched = {}
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            report.mismatched.append(
                f"{name} ({'x'.join(map(str, tensor.shape))} vs {'x'.join(map(str, own[name].shape))})"
            )
        else:
            matched[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in own if name not in state]
    if not matched:
        sample = ", ".join(list(state)[:3])
        raise WeightsError(f"{source}: no tensor matches ResNet-18 by name and shape (the file has {sample}, ...)")
    model.load_state_dict(matched, strict=False)
    return report


def source_weights(spec: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The state_dict named by --weights (imagenet | none | PATH) and a label for it."""
    if spec == "none":
        return None, "none"
    if spec == "imagenet":
        return imagenet_state_dict(), "imagenet"
    return read_state_dict(spec), spec

"""A model's starting weights: its own ImageNet set, none, or a file.

An external file is read with weights_only=True, or by safetensors for a .safetensors file (no
code from it runs either way). Its state_dict is found and matched against the chosen model
(fastft.models.matching: containers, wrapper prefixes, backbone share), resized where the run's
input size differs from the file's (fastft.models.input_size: a ViT's position embedding), and
the user is told where the tensors were found, what was loaded, what was skipped and what is
missing. A file of another network is named (fastft.models.identify): "pass --model resnet50".
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastft.errors import WeightsError
from fastft.models.identify import MIN_BACKBONE_SHARE, identify
from fastft.models.input_size import fit_to_image_size
from fastft.models.matching import (  # noqa: F401  (LoadReport, load_matching: fastft.model's API)
    Found, LoadReport, Target, load_matching, locate_state_dict, model_target, reading_parts, shortfall)
from fastft.models.registry import DEFAULT_MODEL, ModelSpec, get_spec
from fastft.weights import is_safetensors, read_model_file

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch names the refused global as "GLOBAL a.b.C was not an allowed global" or
# "GLOBAL a.b whose module a is blocked".
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
# torch.save(_use_new_zipfile_serialization=False): a pickle (protocol 2) of torch's MAGIC_NUMBER first.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def build_resnet18(num_classes: int) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ResNet-18's IMAGENET1K_V1 weights through the torch hub cache ($TORCH_HOME); see
    ModelSpec.imagenet_state_dict for any other model. WeightsError (one line) offline."""
    return get_spec(DEFAULT_MODEL).imagenet_state_dict()


def source_weights(weights_spec: str, spec: ModelSpec | None = None,
                   image_size: int | None = None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The state_dict named by --weights (imagenet | none | PATH) for `spec` (default: resnet18)
    built for `image_size` px (None: its pretrained size), and a label for the load report.

    imagenet: the model's own pretrained weights (torchvision's weights enum, timm's pretrained
    config), a ViT's position embedding resized to `image_size` (said in the label). PATH: see
    read_weights. Raises WeightsError (one line): offline without the cached file (naming the
    file and where to put it), and every error of read_weights.
    """
    if weights_spec == "none":
        return None, "none"
    spec = spec or get_spec(DEFAULT_MODEL)
    if weights_spec != "imagenet":
        return read_weights(weights_spec, spec, image_size)
    state, notes = fit_to_image_size(spec.imagenet_state_dict(), model_target(spec, image_size),
                                     image_size or spec.preprocessing().image_size)
    return state, f"imagenet ({'; '.join(notes)})" if notes else "imagenet"


def read_state_dict(path: str | Path, spec: ModelSpec | None = None,
                    image_size: int | None = None) -> dict[str, torch.Tensor]:
    """The state_dict inside a weights file, keyed by the model's own names (default: resnet18).

    See `read_weights`, which also returns a label saying where in the file it was found.
    """
    return read_weights(path, spec, image_size)[0]


def read_weights(path: str | Path, spec: ModelSpec | None = None,
                 image_size: int | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state_dict for `spec` (default: resnet18) built for `image_size` px (None: its
    pretrained size) in a weights file, without running any code from it (weights_only).

    Returns {model name: CPU tensor} and a label naming the file and, where they apply, the
    container the tensors came from (e.g. ['state_dict']), the key prefixes removed (e.g.
    'model.') and the tensors resized to the input size (a ViT's position embedding). Raises
    WeightsError (one line) for a missing or unreadable file, a pickled object that weights_only
    refuses, no dict of tensors, or fewer than MIN_BACKBONE_SHARE of the backbone's tensors
    (all but the head's and BN's counters) matching by name and shape: then the line names the
    model the file is, where fastft knows one ("pass --model resnet50"), else what did not match.
    """
    path = Path(path)
    _check_is_file(path)
    spec = spec or get_spec(DEFAULT_MODEL)
    target = model_target(spec, image_size)
    obj = _load_weights_only(path)
    found = locate_state_dict(obj, target)
    if found is None:
        raise WeightsError(f"{path}: {_no_tensors(obj)}")
    if found.score < math.ceil(MIN_BACKBONE_SHARE * len(target.backbone)):
        raise WeightsError(too_few_message(path, obj, found, target))
    state, notes = fit_to_image_size(found.state(), target, image_size or spec.preprocessing().image_size)
    parts = reading_parts(found, target.shapes) + notes
    return state, f"{path} ({'; '.join(parts)})" if parts else str(path)


def too_few_message(path: Path, obj: object, found: Found, target: Target) -> str:
    """Refusing a file that would leave much of the backbone at random init (never a silent start):
    the model it is, where one fits (fastft.models.identify), else what did not match."""
    share = f"only {found.score} of {target.name}'s {len(target.backbone)} backbone tensors match"
    other = identify(obj, exclude=target.name, hint=str(path))
    if other is not None:
        return (f"{path}: {share}; this file is {_article(other.name)} {other.name} checkpoint "
                f"({other.counts()} tensors match): pass --model {other.name}")
    where = f" in {found.where()}" if found.container else ""
    needed = math.ceil(MIN_BACKBONE_SHARE * len(target.backbone))
    return (f"{path}: {share} by name and shape{where} (at least {needed} needed, else most of the network "
            f"would start at random); {shortfall(found, target)}")


def _article(name: str) -> str:
    return "an" if name[:1] in "aeiou" else "a"


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)[:3]
        found_here = f" (found: {', '.join(inside)})" if inside else ""
        raise WeightsError(f"{path}: is a directory; pass the weights file inside it{found_here}")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")


def _no_tensors(obj: object) -> str:
    if isinstance(obj, dict) and not obj:
        return "holds an empty dict, no tensors"
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:4]))
        return f"not a state_dict (a dict without tensors; keys: {keys}{', ...' if len(obj) > 4 else ''})"
    return f"not a state_dict (expected a dict of tensors, got {type(obj).__name__})"


def _load_weights_only(path: Path) -> object:
    if is_safetensors(path):  # read by safetensors itself, whatever torch.load does with the name
        return read_model_file(path)[0]
    try:
        return load_weights_only(path)
    except Exception as exc:  # torch raises many types for a bad pickle or zip
        raise WeightsError(load_failure(path, exc)) from exc


def load_weights_only(path: Path) -> object:
    """torch.load(path, CPU, weights_only=True), without torch's multi-line warning about the
    pickle protocol of a file that is not torch's (the failure that follows says more)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure(path: Path, exc: BaseException, what: str = "") -> str:
    """One plain line for a failed load_weights_only(path): a refused global (refused_global_message),
    else `PATH: REASON`, or `PATH: unreadable WHAT (REASON)` when `what` is given. REASON is what the
    first bytes say: an empty file, a truncated zip, a file torch.save did not write."""
    refused, reason = load_error_reason(exc)
    if refused:
        return refused_global_message(path, refused)
    reason = _unreadable_reason(path, reason, what or "weights file")
    return f"{path}: unreadable {what} ({reason})" if what else f"{path}: {reason}"


def _unreadable_reason(path: Path, reason: str, kind: str) -> str:
    """Why torch.load failed, judged by the file's first bytes; torch's own reason (its first
    sentence) only where the file is one of its formats."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    first = reason.split(". ")[0].rstrip(".")
    if path.suffix == ".safetensors":
        return f"not a readable .safetensors file ({first})"
    if not head:
        return "empty file"
    if head.startswith(ZIP_MAGIC):
        detail = first.split(": ", 1)[-1] if "zip archive" in first else first
        return f"truncated or corrupt zip archive ({detail})"
    if head.startswith(LEGACY_MAGIC):
        return f"truncated or corrupt PyTorch file ({first})"
    expected = "torch.save zip or a .safetensors file" if kind == "weights file" else "a torch.save zip"
    return f"not a PyTorch {kind} ({expected} expected)"


def load_error_reason(exc: BaseException) -> tuple[str | None, str]:
    """What a torch.load(weights_only=True) failure means, as plain text.

    Returns (the global weights_only refused, e.g. "torchvision.models.resnet.ResNet", or None;
    torch's reason as one line without terminal escape codes).
    """
    text = ANSI_ESCAPE.sub("", str(exc))
    refused = REFUSED_GLOBAL.search(text)
    # torch's first line is advice to turn weights_only off; the reason follows this marker.
    text = text.split("WeightsUnpickler error:", 1)[-1]
    reason = ([line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__])[0]
    return (refused.group(1) if refused else None), reason


def refused_global_message(path: str | Path, name: str) -> str:
    """One line for a file that names a Python global weights_only does not allow (e.g. a class).

    A whole pickled model (`torch.save(model, PATH)`) names its class first, so the message says
    so when `name` is an nn.Module subclass. Only modules already imported are looked at:
    importing one the file names could itself run code.
    """
    module_name, _, attr = name.rpartition(".")
    found = getattr(sys.modules.get(module_name), attr, None)
    if isinstance(found, type) and issubclass(found, nn.Module):
        what = f"a pickled model object ({name}), not a state_dict"
    else:
        what = f"a pickled reference to {name}, not only tensors"
    return (f"{path}: holds {what}; fastft reads weights with torch.load(weights_only=True) so that "
            f"no code from the file runs, and rebuilding that object would run it. Re-save the weights "
            f"on the machine that made it: torch.save(model.state_dict(), PATH)")

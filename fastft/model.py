"""ResNet-18 and its starting weights: torchvision's ImageNet set, none, or a file.

An external file is read with weights_only=True, or by safetensors for a .safetensors file (no
code from it runs either way). Its state_dict is
found wherever other trainers put it (top level, `state_dict`, `model`, `ema`, ... and nestings)
and under whatever key prefix they add (`module.`, `_orig_mod.`, `model.`, `backbone.`, ...):
each reading is scored by how many of ResNet-18's own names and shapes it matches, and the best
one is used. The load is then matched tensor by tensor, and the user is told where the tensors
were found, what was loaded, what was skipped and what is missing.
"""

from __future__ import annotations

import math
import re
import sys
import urllib.error
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastft.errors import WeightsError
from fastft.weights import is_safetensors, read_model_file

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
HEAD = "fc"
# A ResNet-18 file from any trainer matches all 100 backbone tensors, or all but the few it
# changed (a 3x3 CIFAR stem, a one-channel conv1). Another network matches far fewer, yet not
# none: ResNet-50 matches 77 of 100 (its BN vectors and 3x3 convs share ResNet-18's shapes),
# wide/ResNeXt-50 5. Below 90%, too much of the "pretrained" backbone would start at random.
MIN_BACKBONE_SHARE = 0.9
# Where trainers keep the state_dict, most wanted first when two readings match equally well.
# timm prefers the EMA copy (its load_state_dict(use_ema=True)), so fastft does too.
CONTAINER_PREFERENCE = ("", "state_dict_ema", "model_ema", "ema", "state_dict", "model",
                        "model_state_dict", "net", "network", "module", "weights", "params")
MAX_CONTAINER_DEPTH = 4      # {"model": {"state_dict": ...}} is depth 2
MAX_PREFIXES_TRIED = 3       # per dict, the most common ones
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
    """The ResNet-18 state_dict inside a weights file, keyed by the model's own names.

    See `read_weights`, which also returns a label saying where in the file it was found.
    """
    return read_weights(path)[0]


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state_dict in a weights file without running any code from it (weights_only).

    Returns {model name: CPU tensor} and a label naming the file, and, where they apply, the
    container the tensors came from (e.g. ['state_dict']) and the key prefixes removed (e.g.
    'model.'). Raises WeightsError (one line) for a missing or unreadable file, a pickled object
    that weights_only refuses, no dict of tensors, or fewer than MIN_BACKBONE_SHARE of the
    backbone's tensors matching by name and shape.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)[:3]
        found_here = f" (found: {', '.join(inside)})" if inside else ""
        raise WeightsError(f"{path}: is a directory; pass the weights file inside it{found_here}")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    obj = _load_weights_only(path)
    shapes = resnet18_shapes()
    found = locate_state_dict(obj, shapes)
    if found is None:
        raise WeightsError(f"{path}: {_no_tensors(obj)}")
    _check_backbone_share(path, found, shapes)
    state = {name: tensor for name, (_, tensor) in found.entries.items()}
    return state, _label(path, found, shapes)


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


def resnet18_shapes() -> dict[str, torch.Size]:
    """Name -> shape of every ResNet-18 state_dict entry (1000-way fc), built without memory."""
    with torch.device("meta"):
        return {name: t.shape for name, t in torchvision.models.resnet18().state_dict().items()}


def backbone_names(shapes: dict[str, torch.Size]) -> list[str]:
    """The tensors a pretrained start is about: not the head, not BN's `num_batches_tracked`
    (a step count that torchvision's own ImageNet file leaves out). 100 for ResNet-18."""
    return [n for n in shapes if not n.startswith(f"{HEAD}.") and not n.endswith("num_batches_tracked")]


@dataclass
class Found:
    """One reading of a file: where the tensors were, and each model name's (file key, tensor)."""
    container: tuple[str, ...]
    entries: dict[str, tuple[str, torch.Tensor]]
    score: int  # backbone tensors matching by name and shape


def tensor_dicts(obj: object, path: tuple[str, ...] = (), depth: int = 0):
    """Yield (keys leading to it, {str key: tensor}) for every dict in `obj` that holds tensors.

    Non-tensor entries (Lightning's `epoch`, a `_metadata` dict, an int `num_batches_tracked`)
    are left out rather than making the dict unusable.
    """
    if not isinstance(obj, dict) or depth > MAX_CONTAINER_DEPTH:
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        yield path, tensors
    for key, value in obj.items():
        yield from tensor_dicts(value, path + (str(key),), depth + 1)


def prefix_candidates(keys, shapes: dict[str, torch.Size]) -> list[str]:
    """Key prefixes worth trying: the part before a suffix that is one of the model's names."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = strip_wrapper_prefixes(key).split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in shapes:
                counts[".".join(parts[:i]) + "." if i else ""] += 1
                break
    return [prefix for prefix, _ in counts.most_common(MAX_PREFIXES_TRIED)]


def rename(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[str, torch.Tensor]]:
    """{name with DDP/compile wrappers and `prefix` removed: (file key, tensor)}.

    Keys outside `prefix` keep their own names (and show up as unexpected), but never
    replace a tensor that was under it.
    """
    inside, outside = {}, {}
    for key, tensor in tensors.items():
        name = strip_wrapper_prefixes(key)
        if name.startswith(prefix):
            inside[strip_wrapper_prefixes(name[len(prefix):])] = (key, tensor)
        else:
            outside[name] = (key, tensor)
    return {**outside, **inside}


def locate_state_dict(obj: object, shapes: dict[str, torch.Size]) -> Found | None:
    """The (container, prefix) reading of `obj` that matches most backbone tensors by name and shape.

    Ties go to the container earlier in CONTAINER_PREFERENCE, then to the shallower one.
    None when `obj` holds no dict of tensors.
    """
    backbone = backbone_names(shapes)
    best, best_key = None, None
    for container, tensors in tensor_dicts(obj):
        for prefix in prefix_candidates(tensors, shapes) or [""]:
            entries = rename(tensors, prefix)
            score = sum(1 for n in backbone if n in entries and entries[n][1].shape == shapes[n])
            last = container[-1] if container else ""
            rank = CONTAINER_PREFERENCE.index(last) if last in CONTAINER_PREFERENCE else len(CONTAINER_PREFERENCE)
            key = (score, -rank, -len(container))
            if best_key is None or key > best_key:
                best, best_key = Found(container, entries, score), key
    return best


def _where(found: Found) -> str:
    return "".join(f"[{key!r}]" for key in found.container)


def _label(path: Path, found: Found, shapes: dict[str, torch.Size]) -> str:
    """`PATH (state_dict at ['state_dict'], key prefix 'model.' removed)`; plain PATH if neither."""
    removed = sorted({key[: len(key) - len(name)] for name, (key, _) in found.entries.items()
                      if name in shapes and key != name})
    parts = [f"state_dict at {_where(found)}"] if found.container else []
    if removed:
        parts.append(f"key prefix {', '.join(map(repr, removed))} removed")
    return f"{path} ({'; '.join(parts)})" if parts else str(path)


def _check_backbone_share(path: Path, found: Found, shapes: dict[str, torch.Size]) -> None:
    """Refuse a file that would leave much of the backbone at random init (never a silent start)."""
    backbone = backbone_names(shapes)
    needed = math.ceil(MIN_BACKBONE_SHARE * len(backbone))
    if found.score >= needed:
        return
    unmatched = []
    for name, (key, tensor) in found.entries.items():
        if name.startswith(f"{HEAD}.") or (name in shapes and tensor.shape == shapes[name]):
            continue  # the head's shape depends on the class count, so it proves nothing here
        own = f" vs {_dims(shapes[name])}" if name in shapes else ", not in ResNet-18"
        unmatched.append(f"{key} ({_dims(tensor.shape)}{own})")
    # Backbone names the file lacks altogether (a cut-short or partial file matches all it has).
    missing = [name for name in backbone if name not in found.entries]
    parts = [f"{label}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
             for label, names in (("unmatched keys", unmatched), (f"missing {len(missing)}", missing)) if names]
    where = f" in {_where(found)}" if found.container else ""
    raise WeightsError(
        f"{path}: only {found.score} of ResNet-18's {len(backbone)} backbone tensors match by name and "
        f"shape{where} (at least {needed} needed, else most of the network would start at random); "
        f"{'; '.join(parts)}")


def _dims(shape: torch.Size) -> str:
    return "x".join(map(str, shape)) or "scalar"


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
        # BN step counters carry nothing learnt and older files (torchvision's own) omit them.
        counters = [name for name in self.missing if name.endswith("num_batches_tracked")]
        missing = [name for name in self.missing if name not in counters]
        if counters:
            missing.append(f"{len(counters)} BatchNorm num_batches_tracked counters")
        if missing:
            out.append(f"  missing from the file (kept at init): {', '.join(missing)}")
        if self.unexpected:
            out.append(f"  in the file but not in the model: {len(self.unexpected)} tensors")
        return out


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, head_path: str = HEAD) -> LoadReport:
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
    _check_finite(matched, source)
    model.load_state_dict(matched, strict=False)
    return report


def _check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite values in any tensor about to be loaded: one NaN weight makes every
    loss NaN from the first step, and the run would otherwise train on to the end in silence."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            if bad:
                raise WeightsError(f"{source}: tensor {name} holds {bad} NaN or infinite value(s) of "
                                   f"{tensor.numel()}; the file comes from a run that diverged or is damaged")


def source_weights(spec: str, model_spec=None, image_size: int = 224) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The state_dict named by --weights (imagenet | none | PATH) and a label for it."""
    if spec == "none":
        return None, "none"
    if spec == "imagenet":
        return (model_spec.imagenet_state_dict() if model_spec else imagenet_state_dict()), "imagenet"
    return read_weights(spec)

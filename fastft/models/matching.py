"""A state_dict matched against one model: where in a file it is, how much of it fits, what loads.

A file's tensors are found wherever other trainers put them (top level, `state_dict`, `model`,
`ema`, ... and nestings) and under whatever key prefix they add (`module.`, `_orig_mod.`,
`model.`, `backbone.`, ...): each reading is scored by how many of the model's backbone tensors
(every tensor but the head's and BatchNorm's step counters) it matches by name and shape, and
the best one is used. The model is described by a `Target`: its names and shapes, built on the
meta device (no memory), and its head's path.
"""

from __future__ import annotations

import functools
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fastft.errors import WeightsError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where trainers keep the state_dict, most wanted first when two readings match equally well.
# timm prefers the EMA copy (its load_state_dict(use_ema=True)), so fastft does too.
CONTAINER_PREFERENCE = ("", "state_dict_ema", "model_ema", "ema", "state_dict", "model",
                        "model_state_dict", "net", "network", "module", "weights", "params")
MAX_CONTAINER_DEPTH = 4      # {"model": {"state_dict": ...}} is depth 2
MAX_PREFIXES_TRIED = 3       # per dict, the most common ones


@dataclass(frozen=True, eq=False)
class Target:
    """What a file is matched against: one model's state_dict names and shapes, and its head."""
    name: str                              # as --model takes it: "resnet18", "timm:resnet18d"
    shapes: dict[str, torch.Size]          # every state_dict entry, the pretrained head's class count
    head_path: str                         # dotted module path of the head, e.g. "fc", "heads.head"
    model: nn.Module                       # the meta-device model the shapes come from (never loaded)

    def is_head(self, name: str) -> bool:
        return name.startswith(f"{self.head_path}.")

    @functools.cached_property
    def backbone(self) -> list[str]:
        """The tensors a pretrained start is about: not the head, not BN's `num_batches_tracked`
        (a step count that torchvision's own ImageNet files leave out). 100 for ResNet-18."""
        return [n for n in self.shapes if not self.is_head(n) and not n.endswith("num_batches_tracked")]


@functools.lru_cache(maxsize=None)
def model_target(spec, image_size: int | None = None) -> Target:
    """The Target of `spec` (a fastft.models.ModelSpec) built for `image_size` px (None: the size of
    its pretrained weights), cached per process: a meta-device build costs 10-270 ms.
    Raises what spec.build and spec.structure raise (ConfigError for a head that is no Linear)."""
    model = meta_model(lambda: spec.build(spec.imagenet_classes(), image_size))
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    return Target(spec.name, shapes, spec.structure(model).head_path, model)


def meta_model(build) -> nn.Module:
    """`build()` with every parameter on the meta device. Builders that compute with tensors
    before making layers (RegNet's widths: torch.pow(...).tolist()) fail under torch.device("meta");
    for them each parameter moves to meta as it is registered (CPU memory: one tensor at a time)."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        with _parameters_on_meta():
            return build()


@contextmanager
def _parameters_on_meta():
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def strip_wrapper_prefixes(name: str) -> str:
    """DDP saves `module.x`, torch.compile saves `_orig_mod.x`; both mean `x`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


@dataclass
class Found:
    """One reading of a file: where the tensors were, and each model name's (file key, tensor)."""
    container: tuple[str, ...]
    entries: dict[str, tuple[str, torch.Tensor]]
    score: int  # backbone tensors matching by name and shape

    def where(self) -> str:
        return "".join(f"[{key!r}]" for key in self.container)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, (_, tensor) in self.entries.items()}


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


def locate_state_dict(obj: object, target: Target) -> Found | None:
    """The (container, prefix) reading of `obj` that matches most of `target`'s backbone tensors
    by name and shape. Ties go to the container earlier in CONTAINER_PREFERENCE, then to the
    shallower one. None when `obj` holds no dict of tensors."""
    shapes = target.shapes
    best, best_key = None, None
    for container, tensors in tensor_dicts(obj):
        for prefix in prefix_candidates(tensors, shapes) or [""]:
            entries = rename(tensors, prefix)
            score = sum(1 for n in target.backbone if n in entries and entries[n][1].shape == shapes[n])
            last = container[-1] if container else ""
            rank = CONTAINER_PREFERENCE.index(last) if last in CONTAINER_PREFERENCE else len(CONTAINER_PREFERENCE)
            key = (score, -rank, -len(container))
            if best_key is None or key > best_key:
                best, best_key = Found(container, entries, score), key
    return best


def reading_parts(found: Found, shapes: dict[str, torch.Size]) -> list[str]:
    """["state_dict at ['state_dict']", "key prefix 'model.' removed"], each where it applies."""
    removed = sorted({key[: len(key) - len(name)] for name, (key, _) in found.entries.items()
                      if name in shapes and key != name})
    parts = [f"state_dict at {found.where()}"] if found.container else []
    if removed:
        parts.append(f"key prefix {', '.join(map(repr, removed))} removed")
    return parts


def shortfall(found: Found, target: Target) -> str:
    """What keeps `found` from matching `target`: its unmatched keys and the backbone names it lacks."""
    unmatched = []
    for name, (key, tensor) in found.entries.items():
        if target.is_head(name) or (name in target.shapes and tensor.shape == target.shapes[name]):
            continue  # the head's shape depends on the class count, so it proves nothing here
        own = f" vs {dims(target.shapes[name])}" if name in target.shapes else f", not in {target.name}"
        unmatched.append(f"{key} ({dims(tensor.shape)}{own})")
    # Backbone names the file lacks altogether (a cut-short or partial file matches all it has).
    missing = [name for name in target.backbone if name not in found.entries]
    return "; ".join(f"{label}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                     for label, names in (("unmatched keys", unmatched), (f"missing {len(missing)}", missing))
                     if names)


def dims(shape: torch.Size) -> str:
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


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                  head_path: str = "fc") -> LoadReport:
    """Copy every tensor of `state` whose name and shape match `model`'s; report the rest.

    `head_path` is the head's dotted module path (Structure.head_path): a file whose only match
    is a head proves nothing, so WeightsError (one line, naming the model's class) is raised when
    no tensor outside the head matches, and when a tensor about to load holds NaN or infinity.
    """
    own = model.state_dict()
    report = LoadReport(source=source)
    matched = {}
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            report.mismatched.append(f"{name} ({dims(tensor.shape)} vs {dims(own[name].shape)})")
        else:
            matched[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in own if name not in state]
    if not any(not name.startswith(f"{head_path}.") for name in matched):
        sample = ", ".join(list(state)[:3])
        raise WeightsError(f"{source}: no tensor matches the {type(model).__name__} model by name and shape "
                           f"(the file has {sample}, ...)")
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

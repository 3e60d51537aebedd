"""Which model a weights file is, when it is not the one chosen: "this file is a resnet50
checkpoint (all 265 tensors match): pass --model resnet50".

Candidates, each matched as the chosen model is (fastft.models.matching.locate_state_dict):
- torchvision's classifiers, grouped by the module that defines them (resnet, efficientnet, ...).
  One model per group is built first (meta device) and its names, digits blanked
  (`layer#.#.conv#.weight`), are looked up in the file: only groups whose names the file holds
  are searched further. That keeps a search to a few groups instead of all 80 models.
- timm's models whose pretrained config names a first conv (`pretrained_cfg["first_conv"]`)
  that the file holds; names the file's path contains first (a Hugging Face cache path holds
  `models--timm--NAME`), then the names nearest the chosen model's, then those whose classifier
  the file also holds, then the shorter: at most MAX_TIMM_CANDIDATES are built. A timm file at a
  path that does not name it, of a model unlike the chosen one, may go unnamed.
The best fit wins: backbone tensors matched / (the candidate's backbone + the file's tensors it
does not use), so ResNet-50's file names resnet50, not resnet101 (which holds all its names).
Targets are cached per process (fastft.models.matching.model_target).
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
import warnings
from dataclasses import dataclass

from fastft.models.matching import Found, Target, locate_state_dict, model_target, strip_wrapper_prefixes, tensor_dicts
from fastft.models.registry import get_spec, torchvision_classifiers

# A file of the same network matches all its backbone tensors, or all but the few a trainer
# changed (a 3x3 CIFAR stem, a one-channel conv1). Another network matches far fewer, yet not
# none: ResNet-50 matches 77 of ResNet-18's 100 (its BN vectors and 3x3 convs share shapes).
# Below 90%, too much of the "pretrained" backbone would start at random.
MIN_BACKBONE_SHARE = 0.9
MIN_GROUP_OVERLAP = 0.5      # share of a torchvision group's blanked names the file must hold
MAX_TIMM_CANDIDATES = 8      # timm builds per search: 10-500 ms each on the meta device
DIGITS = re.compile(r"\d+")


@dataclass
class Match:
    """How well one reading of a file fits one candidate model."""
    name: str            # --model value
    matched: int         # backbone tensors matching by name and shape
    backbone: int        # the candidate's backbone tensors
    extra: int           # the file's tensors the candidate has no use for (head and BN counters aside)

    @property
    def fit(self) -> float:
        return self.matched / (self.backbone + self.extra)

    @property
    def convincing(self) -> bool:
        return self.matched >= math.ceil(MIN_BACKBONE_SHARE * self.backbone) and self.fit >= MIN_BACKBONE_SHARE

    def counts(self) -> str:
        return f"all {self.backbone}" if self.matched == self.backbone else f"{self.matched} of {self.backbone}"


def match(obj: object, target: Target) -> Match:
    """Match of `obj`'s best reading for `target` (an empty match when it holds no tensors)."""
    found = locate_state_dict(obj, target)
    if found is None:
        return Match(target.name, 0, len(target.backbone), 0)
    return Match(target.name, found.score, len(target.backbone), _unused(found, target))


def _unused(found: Found, target: Target) -> int:
    return sum(1 for name, (_, t) in found.entries.items()
               if not target.is_head(name) and not name.endswith("num_batches_tracked")
               and (name not in target.shapes or t.shape != target.shapes[name]))


def identify(obj: object, exclude: str, hint: str = "") -> Match | None:
    """The known model `obj` (a loaded weights file) is a checkpoint of, other than `exclude`
    (the --model that did not fit); None when none fits convincingly (MIN_BACKBONE_SHARE of its
    backbone, and of the file's tensors). `hint`: the file's path, whose text may name a timm
    model. A search stops at the first candidate that every tensor fits. Never raises for a
    candidate that cannot be built: it is skipped."""
    keys = [strip_wrapper_prefixes(k) for _, tensors in tensor_dicts(obj) for k in tensors]
    best = None
    # timm's list is read (and timm imported, ~1 s) only if no torchvision model fits every tensor.
    timm_side = _lazy(_timm_candidates, keys, hint.lower(), exclude.removeprefix("timm:"))
    for name in itertools.chain(_torchvision_candidates(keys), timm_side):
        target = None if name == exclude else _target(name)
        if target is None:
            continue
        found = match(obj, target)
        if found.convincing and (best is None or found.fit > best.fit):
            best = found
            if found.matched == found.backbone and found.extra == 0:
                break
    return best


def _lazy(make, *args):
    yield from make(*args)


def _target(name: str) -> Target | None:
    try:
        with warnings.catch_warnings():  # GoogLeNet's and Inception's FutureWarning about init
            warnings.simplefilter("ignore")
            return model_target(get_spec(name))
    except Exception:  # a model fastft cannot build or train (SqueezeNet: no Linear head) is no answer
        return None


def _suffixes(keys: list[str], blank: bool) -> set[str]:
    """Every dotted tail of every key (`a.b.c` -> a.b.c, b.c, c), digits blanked to # if `blank`."""
    out = set()
    for key in keys:
        parts = (DIGITS.sub("#", key) if blank else key).split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return out


def _torchvision_candidates(keys: list[str]) -> list[str]:
    """torchvision's classifiers in the groups whose blanked names the file holds, best group first."""
    import torchvision

    groups: dict[str, list[str]] = {}
    # Shortest names first: the small members (resnet18 before resnet101) are built fastest.
    for name in sorted(torchvision_classifiers(), key=lambda n: (len(n), n)):
        groups.setdefault(torchvision.models.get_model_builder(name).__module__, []).append(name)
    held = _suffixes(keys, blank=True)
    ranked = []
    for names in groups.values():
        sample = next((t for t in map(_target, names) if t is not None), None)
        if sample is None:
            continue
        patterns = {DIGITS.sub("#", n) for n in sample.backbone}
        overlap = len(patterns & held) / len(patterns)
        if overlap >= MIN_GROUP_OVERLAP:
            ranked.append((-overlap, names))
    return [name for _, names in sorted(ranked) for name in names]


def _timm_candidates(keys: list[str], hint: str, chosen: str) -> list[str]:
    """`timm:NAME` for up to MAX_TIMM_CANDIDATES timm models whose first conv the file holds: those
    the path names (the longest name first: "resnet18d" over "resnet18"), then those nearest the
    chosen model's name (a sibling: resnet18d for resnet18), those whose head the file holds, the shorter."""
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError:  # timm is optional: without it, only torchvision's models are named
        return []
    held = _suffixes(keys, blank=False)
    ranked = []
    for name in timm.list_models():
        cfg = get_pretrained_cfg(name)
        first = _first(cfg.first_conv) if cfg else None
        if not first or f"{first}.weight" not in held:
            continue
        if name in hint:
            ranked.append(((0, -len(name)), name))
        else:
            near = difflib.SequenceMatcher(None, name, chosen).ratio()
            ranked.append(((1, -round(near, 2), f"{_first(cfg.classifier)}.weight" not in held, len(name)), name))
    return [f"timm:{name}" for _, name in sorted(ranked)[:MAX_TIMM_CANDIDATES]]


def _first(names) -> str | None:
    """timm's cfg names one module, or a tuple of them (a stem of two convs, two heads)."""
    return names[0] if isinstance(names, (list, tuple)) and names else names or None

"""timm's models, as `timm:NAME` (timm is an optional extra: pip install 'fastft[timm]').

timm describes its own models, so this family reads those descriptions instead of knowing them:
- the head: `pretrained_cfg["classifier"]`, the module timm's `reset_classifier` replaces;
- the stages: `group_matcher(coarse=True)`, the parameter groups timm's layer-wise lr decay
  uses (timm/models/_manipulate.py, `group_parameters`): group 0 is the stem, the last group
  holds the head (with any head norm or final conv, which become the tail);
- the preprocessing: `pretrained_cfg`'s input_size, crop_pct, mean, std and interpolation
  (the eval resize is floor(size / crop_pct), as timm's transforms_factory computes it).

The forward is not described as a sequence, so partial:K runs the whole model (its frozen
groups record no graph); a wholly frozen backbone runs as a copy with the head replaced.
"""

from __future__ import annotations

import math

from torch import nn

from fastft.errors import ConfigError
from fastft.models.base import Family, Preprocessing, Structure, Unit

PREFIX = "timm:"
INSTALL_HINT = "pip install timm (or pip install 'fastft[timm]')"


def import_timm(needed_for: str):
    """The timm module, or a one-line ConfigError with the install command."""
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"{needed_for} needs timm: {INSTALL_HINT}") from exc
    return timm


def pretrained_cfg(name: str) -> dict:
    """timm's pretrained config of model `name` (its default tag) as a dict; ConfigError if unknown."""
    timm = import_timm(f"--model {PREFIX}{name}")
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(near)}" if near else ""
        raise ConfigError(f"--model {PREFIX}{name}: timm has no such model{hint}")
    return dict(timm.models.get_pretrained_cfg(name).to_dict())


def timm_preprocessing(cfg: dict) -> Preprocessing:
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interp = cfg.get("interpolation") or "bilinear"
    return Preprocessing(size, math.floor(size / crop_pct), tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                         tuple(cfg.get("std", (0.229, 0.224, 0.225))), interp if interp in
                         ("bilinear", "bicubic", "nearest") else "bilinear")


def head_path(model: nn.Module) -> str:
    classifier = model.pretrained_cfg.get("classifier", "fc")
    return classifier[0] if isinstance(classifier, (list, tuple)) else classifier


class TimmFamily(Family):
    name = "timm"
    full_fast_paths = False

    def matches(self, builder_name: str) -> bool:
        return builder_name.startswith(PREFIX)

    def structure(self, model: nn.Module) -> Structure:
        from timm.models import group_modules, group_parameters
        path = head_path(model)
        head = model.get_submodule(path)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"timm model {type(model).__name__}: its classifier {path} is a "
                              f"{type(head).__name__}, not a Linear; fastft's strategies need a Linear head")
        matcher = model.group_matcher(coarse=True)
        params, modules = dict(model.named_parameters()), dict(model.named_modules())
        by_params = group_parameters(model, matcher)      # {group: [parameter names]}, stem first
        by_modules = group_modules(model, matcher)        # {group: [leaf module names]}
        groups = list(by_params)
        units = [Unit("stem" if i == 0 else f"group {i}", [modules[n] for n in by_modules.get(g, [])],
                      [params[n] for n in by_params[g]]) for i, g in enumerate(groups[:-1])]
        head_ids = {id(p) for p in head.parameters()}
        # The last group holds the head and whatever timm puts beside it (a head norm, a final conv).
        tail = [modules[n] for n in by_modules.get(groups[-1], [])
                if not any(id(p) in head_ids for p in modules[n].parameters())]
        return Structure(units, tail, path, head, None)


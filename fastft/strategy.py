"""Freezing strategies as small declarative objects, kept in one registry.

A strategy says which parameters train, at which lr multiplier, and in which
mode; the engine asks it and never branches on a strategy's name.

What "frozen" means here: the frozen modules have `requires_grad=False` AND stay
in eval mode, so BatchNorm uses and keeps its ImageNet running statistics, which
are bit-identical after training. This differs from the chapter's exercise
(which sets `requires_grad=False` but leaves BN in train mode, so running
statistics still drift). Since nothing before the first trainable layer needs a
gradient, autograd records nothing there: the frozen part runs without a graph.

"probe" is a linear probe: the backbone frozen as in "frozen", but the training
images take the test transform (Resize, CenterCrop; no random crop, no flip), so
each image's features are the same every epoch. They are computed once, in the
first epoch (one forward pass over the train split), and kept on the device;
every epoch then trains the head alone on them in shuffled batches. It trades
augmentation away for epochs that cost almost nothing: right when the backbone's
features already separate the classes and many epochs (or many lr / weight
decay tries) are wanted; `frozen` sees a new crop of each image every epoch,
which a small set needs more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastft.config import strategy_problem
from fastft.errors import ConfigError, WeightsError
from fastft.models.base import Structure

ALL = -1  # frozen_stages: every unit (the stem and all stages) and the tail, i.e. all but the head
IMAGENET_CLASSES = 1000
IMAGENET_HOTDOG_ROW = 934  # "hotdog, hot dog, red hot" in ImageNet-1k


@dataclass(frozen=True)
class Strategy:
    """What trains, at which lr, in which mode; read off the model's Structure (fastft.models), so
    one definition serves every model. Units are the stem, then the stages (ResNet: stem, layer1..4)."""
    name: str
    frozen_stages: int = 0          # units frozen from the input side (stem = 1); ALL = the whole backbone
    head_init: str = "xavier"       # xavier | hotdog | default (the library's Linear init)
    lr_mult: float = 1.0            # x --lr for every parameter
    head_group: bool = True         # head in its own group at --head-lr-mult; False = one group
    default_weights: str = "imagenet"
    # True (needs every unit frozen): train images through the test transform, their features
    # computed once and kept on the device, and each epoch trains the head on those (the engine's
    # kept-features path; backends give such batches with train_eval_batches()).
    keep_train_features: bool = False

    def __post_init__(self) -> None:
        if self.keep_train_features and self.frozen_stages != ALL:
            raise ValueError(f"{self.name}: keep_train_features needs the whole backbone frozen")

    def frozen_units(self, structure: Structure) -> int:
        """How many of structure.units are frozen; ConfigError when partial:K asks for more stages
        than the model has."""
        units = len(structure.units)
        if self.frozen_stages == ALL:
            return units
        if self.frozen_stages > units:
            raise ConfigError(f"--strategy {self.name}: the model has {structure.stages} stage(s) after the stem "
                              f"({', '.join(u.name for u in structure.units[1:]) or 'none described'}); "
                              f"use partial:0..{structure.stages}, or frozen")
        return self.frozen_stages

    def whole_backbone(self, structure: Structure) -> bool:
        """True when all but the head is frozen (the tail too): the features are then fixed."""
        return self.frozen_units(structure) == len(structure.units)

    def frozen_modules(self, model: nn.Module, structure: Structure | None = None) -> list[nn.Module]:
        structure = structure or structure_of(model)
        k = self.frozen_units(structure)
        modules = [m for unit in structure.units[:k] for m in unit.modules]
        return modules + (list(structure.tail) if k == len(structure.units) else [])

    def frozen_parameters(self, model: nn.Module, structure: Structure | None = None) -> list[nn.Parameter]:
        structure = structure or structure_of(model)
        k = self.frozen_units(structure)
        params = [p for unit in structure.units[:k] for p in unit.parameters()]
        if k == len(structure.units):
            params += [p for m in structure.tail for p in m.parameters()]
        return params

    def bn_downsample(self, structure: Structure) -> int:
        """px of input per last-stage position where a BatchNorm trains (the smallest batch a
        step may hold depends on it: fastft.data.min_train_batch); 0 where none trains (every
        unit frozen, or a model without BatchNorm)."""
        k = self.frozen_units(structure)
        trains = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                     for unit in structure.units[k:] for top in unit.modules for m in top.modules())
        return structure.downsample if trains else 0

    def freeze(self, model: nn.Module, structure: Structure | None = None) -> None:
        for p in self.frozen_parameters(model, structure):
            p.requires_grad_(False)

    def set_train_mode(self, model: nn.Module, structure: Structure | None = None) -> None:
        """Train mode everywhere except the frozen modules, whose BN must not update (and whose
        dropout and stochastic depth stay off, so the fast path's prefix computes the same)."""
        structure = structure or structure_of(model)
        if self.frozen_stages == ALL:  # every module but the head: a family need not list its dropouts
            model.eval()
            structure.head.train()
            return
        model.train()
        for module in self.frozen_modules(model, structure):
            module.eval()

    def param_groups(self, model: nn.Module, lr: float, head_lr_mult: float,
                     structure: Structure | None = None) -> list[dict]:
        structure = structure or structure_of(model)
        lr = lr * self.lr_mult
        head_ids = {id(p) for p in structure.head.parameters()}
        head = [p for p in structure.head.parameters() if p.requires_grad]
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        if not self.head_group:
            return [{"params": body + head, "lr": lr}]
        groups = [{"params": body, "lr": lr}] if body else []
        return groups + [{"params": head, "lr": lr * head_lr_mult}]

    def init_head(self, model: nn.Module, source: dict | None, class_names: list[str],
                  structure: Structure | None = None) -> str | None:
        """Initialise the new head in place; returns a line for the log where the head does not
        start as the load report suggests (hotdog's head comes from the file's 1000-way head, which
        the report lists as skipped for its shape)."""
        structure = structure or structure_of(model)
        head, path = structure.head, structure.head_path
        if self.head_init == "xavier":
            nn.init.xavier_uniform_(head.weight)  # the chapter's init for the new layer
        elif self.head_init == "hotdog":
            seed_head_from_imagenet_hotdog(head, source, class_names, path)
            return (f"  {path} seeded from the file's 1000-way {path}: 'hotdog' takes ImageNet row "
                    f"{IMAGENET_HOTDOG_ROW}, every other class the mean of the other 999 rows")
        return None


def structure_of(model: nn.Module) -> Structure:
    """The Structure of a built model, its family found from its class (fastft.models.describe)."""
    from fastft.models import describe
    return describe(model)


def hotdog_class_problem(class_names: list[str]) -> str:
    """The one line for --strategy hotdog on a dataset without a class folder named exactly
    `hotdog`: the folder to rename where one is close, and the strategy that needs no such class."""
    # Only a spelling of the same words (Hot_Dog, hot dog, hotdogs), never a near name like not-hotdog.
    near = [name for name in class_names if "".join(filter(str.isalnum, name.lower())) in ("hotdog", "hotdogs")]
    rename = f"rename {near[0]!r} to 'hotdog', or " if near else ""
    return (f"--strategy hotdog seeds the head's 'hotdog' row from ImageNet's hotdog class, so it needs a class named "
            f"'hotdog' (a class folder of that name); the dataset has {class_names}: {rename}use --strategy "
            f"finetune (the same training, its head Xavier-initialised)")


def seed_head_from_imagenet_hotdog(head: nn.Linear, source: dict | None, class_names: list[str],
                                   path: str = "fc") -> None:
    """The `hotdog` row takes ImageNet's hotdog row; every other row the mean of the other 999.
    `path`: the head's name in `source` (fc for ResNet, classifier.1 for EfficientNet, ...).
    Raises ConfigError without a `hotdog` class, WeightsError without a 1000-way head in `source`."""
    if "hotdog" not in class_names:
        raise ConfigError(hotdog_class_problem(class_names))
    weight = None if source is None else source.get(f"{path}.weight")
    bias = None if source is None else source.get(f"{path}.bias")
    if weight is None or bias is None or weight.shape != (IMAGENET_CLASSES, head.in_features):
        found = "no weights" if source is None else f"{path}.weight {None if weight is None else tuple(weight.shape)}"
        raise WeightsError(f"--strategy hotdog needs a 1000-way ImageNet head ({path}, "
                           f"{IMAGENET_CLASSES}x{head.in_features}); got {found}")
    others = torch.ones(IMAGENET_CLASSES, dtype=torch.bool)
    others[IMAGENET_HOTDOG_ROW] = False
    with torch.no_grad():
        for row, name in enumerate(class_names):
            if name == "hotdog":
                head.weight[row] = weight[IMAGENET_HOTDOG_ROW]
                head.bias[row] = bias[IMAGENET_HOTDOG_ROW]
            else:
                head.weight[row] = weight[others].mean(dim=0)
                head.bias[row] = bias[others].mean()


REGISTRY = {
    "finetune": Strategy("finetune"),
    "frozen": Strategy("frozen", frozen_stages=ALL),
    "probe": Strategy("probe", frozen_stages=ALL, keep_train_features=True),
    "hotdog": Strategy("hotdog", head_init="hotdog"),
    "scratch": Strategy("scratch", head_init="default", lr_mult=10.0, head_group=False,
                        default_weights="none"),
}


def get_strategy(spec: str) -> Strategy:
    """A registered name, or `partial:K`: the stem and the first K stages frozen (K is checked
    against the model by Strategy.frozen_units; partial:K with K = all stages equals frozen
    except that the tail still trains)."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    name, _, k = spec.partition(":")
    if name == "partial" and k.isdigit():
        return Strategy(spec, frozen_stages=1 + int(k))
    raise ConfigError(strategy_problem(spec))

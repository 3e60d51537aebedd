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

# ResNet-18's backbone in forward order; "stem" is conv1 + bn1 (relu/maxpool hold no state).
STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
HEAD = "fc"
IMAGENET_CLASSES = 1000
IMAGENET_HOTDOG_ROW = 934  # "hotdog, hot dog, red hot" in ImageNet-1k


@dataclass(frozen=True)
class Strategy:
    name: str
    frozen_stages: int = 0          # how many of STAGES are frozen, from the input side
    head_init: str = "xavier"       # xavier | hotdog | default (torchvision's Linear init)
    lr_mult: float = 1.0            # x --lr for every parameter
    head_group: bool = True         # head in its own group at --head-lr-mult; False = one group
    default_weights: str = "imagenet"
    # True (needs every stage frozen): train images through the test transform, their features
    # computed once and kept on the device, and each epoch trains the head on those (the engine's
    # kept-features path; backends give such batches with train_eval_batches()).
    keep_train_features: bool = False

    def __post_init__(self) -> None:
        if self.keep_train_features and self.frozen_stages != len(STAGES):
            raise ValueError(f"{self.name}: keep_train_features needs all {len(STAGES)} stages frozen")

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        names = [name for stage in STAGES[: self.frozen_stages] for name in stage]
        return [getattr(model, name) for name in names]

    def freeze(self, model: nn.Module) -> None:
        for module in self.frozen_modules(model):
            module.requires_grad_(False)

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode everywhere except the frozen modules, whose BN must not update."""
        model.train()
        for module in self.frozen_modules(model):
            module.eval()

    def param_groups(self, model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
        lr = lr * self.lr_mult
        head = [p for p in getattr(model, HEAD).parameters() if p.requires_grad]
        body = [p for name, p in model.named_parameters()
                if p.requires_grad and not name.startswith(HEAD + ".")]
        if not self.head_group:
            return [{"params": body + head, "lr": lr}]
        groups = [{"params": body, "lr": lr}] if body else []
        return groups + [{"params": head, "lr": lr * head_lr_mult}]

    def init_head(self, model: nn.Module, source: dict | None, class_names: list[str]) -> str | None:
        """Initialise the new head in place; returns a line for the log where the head does not
        start as the load report suggests (hotdog's head comes from the file's 1000-way fc, which
        the report lists as skipped for its shape)."""
        head = getattr(model, HEAD)
        if self.head_init == "xavier":
            nn.init.xavier_uniform_(head.weight)  # the chapter's init for the new layer
        elif self.head_init == "hotdog":
            seed_head_from_imagenet_hotdog(head, source, class_names)
            return (f"  {HEAD} seeded from the file's 1000-way {HEAD}: 'hotdog' takes ImageNet row "
                    f"{IMAGENET_HOTDOG_ROW}, every other class the mean of the other 999 rows")
        return None


def hotdog_class_problem(class_names: list[str]) -> str:
    """The one line for --strategy hotdog on a dataset without a class folder named exactly
    `hotdog`: the folder to rename where one is close, and the strategy that needs no such class."""
    # Only a spelling of the same words (Hot_Dog, hot dog, hotdogs), never a near name like not-hotdog.
    near = [name for name in class_names if "".join(filter(str.isalnum, name.lower())) in ("hotdog", "hotdogs")]
    rename = f"rename {near[0]!r} to 'hotdog', or " if near else ""
    return (f"--strategy hotdog seeds the head's 'hotdog' row from ImageNet's hotdog class, so it needs a class named "
            f"'hotdog' (a class folder of that name); the dataset has {class_names}: {rename}use --strategy "
            f"finetune (the same training, its head Xavier-initialised)")


def seed_head_from_imagenet_hotdog(head: nn.Linear, source: dict | None, class_names: list[str]) -> None:
    """The `hotdog` row takes ImageNet's hotdog row; every other row the mean of the other 999."""
    if "hotdog" not in class_names:
        raise ConfigError(hotdog_class_problem(class_names))
    weight = None if source is None else source.get(f"{HEAD}.weight")
    bias = None if source is None else source.get(f"{HEAD}.bias")
    if weight is None or bias is None or weight.shape != (IMAGENET_CLASSES, head.in_features):
        found = "no weights" if source is None else f"fc.weight {None if weight is None else tuple(weight.shape)}"
        raise WeightsError(
            f"--strategy hotdog needs a 1000-way ImageNet fc ({IMAGENET_CLASSES}x{head.in_features}); got {found}"
        )
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
    "frozen": Strategy("frozen", frozen_stages=len(STAGES)),
    "probe": Strategy("probe", frozen_stages=len(STAGES), keep_train_features=True),
    "hotdog": Strategy("hotdog", head_init="hotdog"),
    "scratch": Strategy("scratch", head_init="default", lr_mult=10.0, head_group=False,
                        default_weights="none"),
}


def get_strategy(spec: str) -> Strategy:
    """A registered name, or `partial:K`: the stem and the first K residual stages frozen."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    name, _, k = spec.partition(":")
    if name == "partial" and k.isdigit() and 0 <= int(k) <= len(STAGES) - 1:
        return Strategy(spec, frozen_stages=1 + int(k))
    raise ConfigError(strategy_problem(spec))

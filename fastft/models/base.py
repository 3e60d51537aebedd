"""What fastft knows about a network, in three small records shared by every family.

    Preprocessing  the input the pretrained weights expect: crop size, resize, mean/std, interpolation
    Structure      where one built model's stem, stages, tail and head are, and its forward as a sequence
    Family         one per network family (resnet.py, vit.py, ...): builds the Structure of a model

The engine, the strategies and the fast path read only these records; none of them
branches on a model's name. A new family is one file in this folder plus a line in
registry.py (see README, "Adding a model family").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """The eval transform a model's weights were made with: Resize([resize, resize]) with
    `interpolation`, CenterCrop(image_size), scale to 0..1, (x - mean) / std per RGB channel.

    Sources: torchvision's `Weights.transforms()` (crop_size, resize_size, mean, std, interpolation)
    and timm's `pretrained_cfg` (input_size, crop_pct, mean, std, interpolation). Sizes in px.
    The train transform takes image_size and interpolation (RandomResizedCrop) and the same mean/std.
    """
    image_size: int = 224                                  # px, side of the square crop
    resize: int = 256                                      # px, side before the centre crop (eval)
    mean: tuple[float, float, float] = IMAGENET_MEAN      # of 0..1 RGB
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"                        # bilinear | bicubic | nearest

    def at_size(self, image_size: int) -> "Preprocessing":
        """The same transform at another crop size (--image-size): the resize keeps its ratio to
        the crop, as the chapter's 256/224 does."""
        if image_size == self.image_size:
            return self
        return replace(self, image_size=image_size, resize=round(image_size * self.resize / self.image_size))

    def to_dict(self) -> dict:
        """JSON-able, for config.json, the model card and export sidecars."""
        return {"image_size": self.image_size, "resize": self.resize, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return cls(int(values["image_size"]), int(values["resize"]), tuple(values["mean"]),
                   tuple(values["std"]), values.get("interpolation", "bilinear"))


# The chapter's ResNet-18 preprocessing: torchvision's IMAGENET1K_V1 transforms.
DEFAULT_PREPROCESSING = Preprocessing()


@dataclass
class Unit:
    """One freezable piece: the stem (unit 0) or one stage. `params` may hold parameters that sit
    on no module of `modules` (ViT's class token and position embedding)."""
    name: str                                   # e.g. "stem", "layer3", "blocks 6-8"
    modules: list[nn.Module]
    extra_params: list[nn.Parameter] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for p in [q for m in self.modules for q in m.parameters()] + self.extra_params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out


@dataclass
class Structure:
    """Where things are in one built model.

    units: the stem then the stages, in forward order; partial:K freezes units[0 .. K].
    tail: modules after the last stage and before the head (pooling, a final norm): trained
        unless every unit is frozen, then frozen with them.
    head: the final nn.Linear, at `head_path` (a dotted module path).
    sequence: the forward as (unit index, module) pairs, run in order: units are 0..len(units)-1,
        the tail len(units), the head len(units)+1. model(x) equals the sequence's result with the
        model in eval mode. None where the family does not describe it: then a partly frozen model
        runs whole (its frozen units still record no graph), and a wholly frozen one runs as a copy
        whose head is nn.Identity.
    feature_dim: the head's input width (features per image).
    """
    units: list[Unit]
    tail: list[nn.Module]
    head_path: str
    head: nn.Linear
    sequence: list[tuple[int, nn.Module]] | None = None
    downsample: int = 32         # px of input per position of the last stage (ResNet: 2^5)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def stages(self) -> int:
        """Stages after the stem: the largest K of partial:K."""
        return len(self.units) - 1



def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at dotted `path` (a Sequential index is a path part too)."""
    parent, _, last = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, new)


def meta_shapes(build) -> dict[str, torch.Size]:
    """{state_dict name: shape} of the model `build()` makes, built on the meta device (no memory;
    matching.meta_model also serves builders that compute with tensors, as RegNet's does)."""
    from fastft.models.matching import meta_model
    return {name: t.shape for name, t in meta_model(build).state_dict().items()}


class Family:
    """One network family. Subclasses set `name`, `full_fast_paths` and implement `matches` and
    `structure`; `preprocess_note` may name what a loader cannot reproduce."""
    name = "generic"
    # True: every fast path applies (BN folded into convolutions where pairs exist, the split
    # prefix for partial:K). False: the frozen prefix only for a wholly frozen backbone.
    full_fast_paths = False

    def matches(self, builder_name: str) -> bool:
        raise NotImplementedError

    def structure(self, model: nn.Module) -> Structure:
        raise NotImplementedError

    def build_kwargs(self, image_size: int, pretrained_size: int, *details: int) -> dict:
        """Extra builder arguments for a crop of `image_size` px (ViT fixes its input size)."""
        return {}

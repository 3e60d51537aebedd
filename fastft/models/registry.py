"""Model names -> ModelSpec: torchvision's classifiers by builder name, timm's as `timm:NAME`.

    spec = get_spec("resnet50")            # or "timm:convnext_atto"
    model = spec.build(num_classes=2, image_size=224)
    structure = spec.structure(model)      # stem, stages, tail, head: what strategies freeze
    spec.preprocessing()                   # crop, resize, mean/std, interpolation of its weights

A family is chosen by the first entry of FAMILIES whose `matches` accepts the name; the last,
GenericFamily, accepts any torchvision classifier (head known, stages not).
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastft.config import did_you_mean
from fastft.errors import ConfigError, WeightsError
from fastft.models.base import Family, Preprocessing, Structure, meta_shapes
from fastft.models.convnet import ConvNeXtFamily, FeaturesFamily
from fastft.models.generic import GenericFamily
from fastft.models.resnet import RegNetFamily, ResNetFamily
from fastft.models.timm_models import PREFIX, TimmFamily, import_timm, pretrained_cfg, timm_preprocessing
from fastft.models.vit import ViTFamily

DEFAULT_MODEL = "resnet18"
FAMILIES: tuple[Family, ...] = (TimmFamily(), ResNetFamily(), RegNetFamily(), FeaturesFamily(),
                                ConvNeXtFamily(), ViTFamily(), GenericFamily())


def torchvision_classifiers() -> list[str]:
    """Builder names of torchvision's ImageNet classifiers (torchvision.models.list_models), sorted."""
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class ModelSpec:
    """One named model: how to build it, describe it, and get its ImageNet weights."""
    name: str          # as the user types it: "resnet18", "timm:convnext_atto"
    family: Family

    @property
    def is_timm(self) -> bool:
        return self.name.startswith(PREFIX)

    @property
    def builder_name(self) -> str:
        return self.name[len(PREFIX):] if self.is_timm else self.name

    def preprocessing(self) -> Preprocessing:
        """The eval transform of the model's default ImageNet weights (see Preprocessing)."""
        if self.is_timm:
            return timm_preprocessing(pretrained_cfg(self.builder_name))
        t = self._weights().transforms()
        return Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std),
                             t.interpolation.value)

    def build(self, num_classes: int, image_size: int | None = None) -> nn.Module:
        """The model with random weights and a `num_classes`-way head, for `image_size` px inputs
        (only models that fix their input size, ViT, use it)."""
        size = image_size or self.preprocessing().image_size
        if self.is_timm:
            timm = import_timm(f"--model {self.name}")
            cfg = pretrained_cfg(self.builder_name)
            fixed = cfg.get("fixed_input_size") and size != cfg["input_size"][-1]
            return timm.create_model(self.builder_name, pretrained=False, num_classes=num_classes,
                                     **({"img_size": size} if fixed else {}))
        import torchvision
        extra = self.family.build_kwargs(size, self.preprocessing().image_size, *_patch(self.builder_name))
        return torchvision.models.get_model(self.builder_name, weights=None, num_classes=num_classes, **extra)

    def structure(self, model: nn.Module) -> Structure:
        return self.family.structure(model)

    def imagenet_classes(self) -> int:
        """Classes of the pretrained head (1000 for ImageNet-1k)."""
        if self.is_timm:
            return int(pretrained_cfg(self.builder_name).get("num_classes") or 1000)
        return len(self._weights().meta["categories"])

    def shapes(self, num_classes: int | None = None, image_size: int | None = None) -> dict[str, torch.Size]:
        """{state_dict name: shape}, built on the meta device: the pretrained head's class count by default."""
        return meta_shapes(lambda: self.build(num_classes or self.imagenet_classes(), image_size))

    def imagenet_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's default pretrained weights, downloaded once into torch's hub cache
        ($TORCH_HOME) or timm's Hugging Face cache ($HF_HOME). Raises WeightsError (one line,
        naming the file and where to put it) when the download fails."""
        if self.is_timm:
            return _timm_state_dict(self.builder_name)
        weights = self._weights()
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            file_name = weights.url.rsplit("/", 1)[-1]
            raise WeightsError(
                f"cannot get ImageNet weights from {weights.url} ({_first_line(exc)}); place {file_name} "
                f"in {cache} (set $TORCH_HOME to move it), or pass --weights PATH or --weights none") from exc

    def _weights(self):
        import torchvision
        return torchvision.models.get_model_weights(self.builder_name).DEFAULT


def _patch(builder_name: str) -> tuple[int, ...]:
    """(patch side,) for a ViT builder name (vit_b_16 -> 16, vit_h_14 -> 14); () for others."""
    tail = builder_name.rsplit("_", 1)[-1]
    return (int(tail),) if builder_name.startswith("vit_") and tail.isdigit() else ()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    timm = import_timm(f"--model {PREFIX}{name} --weights imagenet")
    cfg = pretrained_cfg(name)
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as exc:  # huggingface_hub and urllib raise many types offline
        repo = cfg.get("hf_hub_id") or cfg.get("url") or "timm's hub"
        raise WeightsError(
            f"cannot get ImageNet weights for {PREFIX}{name} from {repo} ({_first_line(exc)}); download "
            f"its model.safetensors on a connected machine and pass --weights PATH, or pass --weights none"
        ) from exc


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec for `name`; ConfigError (one line, with a near name) when it names no model."""
    if name.startswith(PREFIX):
        pretrained_cfg(name[len(PREFIX):])  # a missing timm or an unknown name fails here, in one line
        return ModelSpec(name, FAMILIES[0])
    known = torchvision_classifiers()
    if name not in known:
        hint = did_you_mean(name, known) or "; `fastft models` lists them"
        raise ConfigError(f"--model {name}: not a torchvision classifier{hint} (timm's as timm:NAME)")
    return ModelSpec(name, next(f for f in FAMILIES[1:] if f.matches(name)))


# torchvision's model classes -> the family that describes them (describe(), for a model built elsewhere).
CLASS_FAMILIES = {"ResNet": ResNetFamily, "RegNet": RegNetFamily, "EfficientNet": FeaturesFamily,
                  "MobileNetV2": FeaturesFamily, "MobileNetV3": FeaturesFamily, "ConvNeXt": ConvNeXtFamily,
                  "VisionTransformer": ViTFamily}


def describe(model: nn.Module) -> Structure:
    """The Structure of an already built model: a timm model (it carries `pretrained_cfg`), a
    torchvision class in CLASS_FAMILIES, else the generic description (head only)."""
    if hasattr(model, "pretrained_cfg") and hasattr(model, "group_matcher"):
        return TimmFamily().structure(model)
    family = CLASS_FAMILIES.get(type(model).__name__, GenericFamily)
    return family().structure(model)

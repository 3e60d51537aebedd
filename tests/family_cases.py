"""The model families test_model_families.py proves the fast paths on, and their non-trivial weights.

One Case per family at the smallest input it takes here (32 px; torchvision's ViT-B/16 is built
for 32 px: 2 x 2 patches and the class token). Weights are random (--weights none) but never
trivial: every BatchNorm gets running statistics AND affine parameters away from (0, 1), every
LayerNorm an affine map, ConvNeXt's layer scale 0.1..0.3 instead of 1e-6 (else every block is
nearly the identity), ViT's class token a random vector, and every head random weights
(torchvision's ViT head starts at zero: every logit 0, and any split would "equal" the model).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fastft.models import get_spec
from fastft.models.base import Structure


# px of the random images fastft.fastpath.checked_fold checks a fold on (_probe_input: 64 px
# for a CNN, whatever --image-size is); the statistics must suit them too, or the check refuses.
PROBE_SIDE = 64


@dataclass(frozen=True)
class Case:
    name: str                        # --model NAME
    folds: bool                      # plain conv + BatchNorm2d pairs, which the frozen prefix folds
    ks: tuple[int, ...] | None = None  # frozen units split at; None = every K in 0..len(units)
    size: int = 32                   # px

    @property
    def id(self) -> str:
        return self.name.replace("timm:", "timm-")

    @property
    def marks(self) -> list:
        """timm is optional (not in fastft's `test` extra): its cases skip without it."""
        if self.name.startswith("timm:") and importlib.util.find_spec("timm") is None:
            return [pytest.mark.skip(reason="needs timm: pip install timm")]
        return []

    def units(self) -> int:
        """len(Structure.units), built on the meta device (no memory); 0 when the case skips."""
        if self.marks:
            return 0
        spec = get_spec(self.name)
        with torch.device("meta"):
            return len(spec.structure(spec.build(2, self.size)).units)


RESNET18 = Case("resnet18", folds=True)
RESNET50 = Case("resnet50", folds=True, ks=(1, 3, 5))
EFFICIENTNET = Case("efficientnet_b0", folds=True)
MOBILENET = Case("mobilenet_v3_large", folds=True)
CONVNEXT = Case("convnext_tiny", folds=False, ks=(0, 1, 3, 5))
VIT = Case("vit_b_16", folds=False, ks=(0, 1, 3, 5))
# timm's BN is BatchNormAct2d (BN and its activation in one module): fold_all_bn leaves it alone.
TIMM_BN = Case("timm:test_efficientnet", folds=False)
TIMM_VIT = Case("timm:test_vit", folds=False)

CASES = (RESNET18, RESNET50, EFFICIENTNET, MOBILENET, CONVNEXT, VIT, TIMM_BN, TIMM_VIT)
# The families the training and CLI tests run: resnet18 stands for ResNet (resnet50's own
# Structure and split are checked, its training would cost seconds per step on two cores).
TRAINED = (RESNET18, EFFICIENTNET, MOBILENET, CONVNEXT, VIT, TIMM_BN, TIMM_VIT)
WITH_BN = (RESNET18, EFFICIENTNET, MOBILENET, TIMM_BN)


def params(cases: tuple[Case, ...]) -> list:
    """`cases` for pytest.mark.parametrize, with their ids and marks."""
    return [pytest.param(case, marks=case.marks, id=case.id) for case in cases]


def randomise(model: nn.Module, structure: Structure, seed: int, size: int,
              probe_side: int | None = PROBE_SIDE) -> nn.Module:
    """Non-trivial weights in place (see the module docstring); returns the model in eval mode.

    BN statistics are first measured on random images (as ImageNet's were measured on its
    images), 64 at `size` and 64 at `probe_side` (None: `size` only), then moved off by up to 10%. Arbitrary statistics make a deep random network either
    lose the image (MobileNet V3 gave the same logits for every image, and any split would
    "equal" it) or amplify rounding chaotically (EfficientNet-B0's fp32 logits were 13% off its
    own fp64 ones, so no fp32 comparison could tell a fold's error from the model's).
    Measured at 32 px: fp32 vs fp64 logits within 5e-6 relative for every case here."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and module.weight is not None:
                module.weight.uniform_(0.8, 1.2, generator=g)
                module.bias.uniform_(-0.2, 0.2, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.1, 0.3, generator=g)
            elif name.endswith(("class_token", "cls_token")):
                p.normal_(0.0, 1.0, generator=g)
        head = structure.head
        head.weight.normal_(0.0, head.in_features ** -0.5, generator=g)
        head.bias.uniform_(-0.1, 0.1, generator=g)
        if bns:
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batch
            model.train()
            for side in {size, probe_side or size}:  # cumulative: the statistics of both sizes' batches
                model(torch.randn(64, 3, side, side, generator=g))
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
                std = m.running_var.sqrt()
                m.running_mean.add_(std * torch.empty_like(std).uniform_(-0.1, 0.1, generator=g))
                m.running_var.mul_(torch.empty_like(std).uniform_(0.9, 1.1, generator=g))
    return model.eval()


def build(case: Case, num_classes: int = 2, seed: int = 0, probe_side: int | None = PROBE_SIDE
          ) -> tuple[nn.Module, Structure]:
    """(model in eval mode with non-trivial weights, its Structure); see randomise."""
    spec = get_spec(case.name)
    torch.manual_seed(seed)
    model = spec.build(num_classes, case.size)
    structure = spec.structure(model)
    return randomise(model, structure, seed, case.size, probe_side), structure


def plain_bn_count(modules: list[nn.Module]) -> int:
    """Plain BatchNorm2d modules (what fold_all_bn folds) in `modules` and their children."""
    return sum(type(m) is nn.BatchNorm2d for top in modules for m in top.modules())


def state_names(model: nn.Module, modules: list[nn.Module], params: list[nn.Parameter]) -> set[str]:
    """state_dict names of `params` and of every parameter and buffer of `modules` (and children)."""
    ids = {id(m) for top in modules for m in top.modules()}
    names = {f"{prefix}.{n}".lstrip(".") for prefix, m in model.named_modules() if id(m) in ids
             for n, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
    wanted = {id(p) for p in params}
    return names | {n for n, p in model.named_parameters() if id(p) in wanted}

"""torchvision's EfficientNet (B0-B7, V2), MobileNet V2/V3 and ConvNeXt: `features` then a
`classifier` Sequential whose last entry is the Linear head.

    EfficientNet   features[0] = stem | features[1..7] = stages | features[8] (1x1 conv) with the last stage
    MobileNet      features[0] = stem | blocks grouped into stages by output width | the last 1x1 conv with
                   the last stage (the grouping timm's MobileNet stages have)
    ConvNeXt       features[0] = stem | features[1], then (downsample, stage) pairs | LayerNorm2d in the tail

The tail is avgpool, flatten and the classifier's entries before the head (Dropout; MobileNetV3's
Linear 960->1280 + Hardswish; ConvNeXt's LayerNorm2d and Flatten, which come before the flatten).
"""

from __future__ import annotations

from torch import nn

from fastft.models.base import Family, Structure, Unit
from fastft.models.resnet import _sequence


def _out_width(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _width_groups(blocks: list[nn.Module]) -> list[list[nn.Module]]:
    """Consecutive blocks grouped by their output width: a stage of inverted residuals keeps it."""
    groups: list[list[nn.Module]] = []
    for block in blocks:
        if groups and _out_width(groups[-1][-1]) == _out_width(block):
            groups[-1].append(block)
        else:
            groups.append([block])
    return groups


def _head_and_tail(model: nn.Module, pool_first: bool) -> tuple[list[nn.Module], nn.Linear, str]:
    classifier = list(model.classifier)
    # MobileNetV2 pools in its forward (F.adaptive_avg_pool2d): the same, as a module.
    pool = getattr(model, "avgpool", None) or nn.AdaptiveAvgPool2d(1)
    head_index = len(classifier) - 1
    before = classifier[:head_index]
    if pool_first:  # ConvNeXt: LayerNorm2d, Flatten come in the classifier itself
        tail = [pool, *before]
    else:
        tail = [pool, nn.Flatten(1), *before]
    return tail, classifier[head_index], f"classifier.{head_index}"


class FeaturesFamily(Family):
    """EfficientNet and MobileNet: BN follows every conv inside Conv2dNormActivation."""
    name = "efficientnet/mobilenet"
    full_fast_paths = True

    def matches(self, builder_name: str) -> bool:
        return builder_name.startswith(("efficientnet_", "mobilenet_v2", "mobilenet_v3"))

    def structure(self, model: nn.Module) -> Structure:
        features = list(model.features)
        stem, body, last = features[0], features[1:-1], features[-1]
        if all(isinstance(m, nn.Sequential) for m in body):   # EfficientNet: one Sequential per stage
            stages = [[m] for m in body]
        else:                                                  # MobileNet: a flat list of blocks
            stages = _width_groups(body)
        stages[-1] = stages[-1] + [last]
        units = [Unit("stem", [stem])] + [Unit(f"stage {i}", group) for i, group in enumerate(stages, 1)]
        tail, head, path = _head_and_tail(model, pool_first=False)
        return Structure(units, tail, path, head, _sequence(units, tail, head))


class ConvNeXtFamily(Family):
    """ConvNeXt: LayerNorm, no BN, so nothing folds; the prefix still runs without autograd."""
    name = "convnext"
    full_fast_paths = True

    def matches(self, builder_name: str) -> bool:
        return builder_name.startswith("convnext_")

    def structure(self, model: nn.Module) -> Structure:
        features = list(model.features)
        units = [Unit("stem", [features[0]]), Unit("stage 1", [features[1]])]
        for i in range(2, len(features), 2):
            units.append(Unit(f"stage {i // 2 + 1}", features[i:i + 2]))
        tail, head, path = _head_and_tail(model, pool_first=True)
        return Structure(units, tail, path, head, _sequence(units, tail, head))

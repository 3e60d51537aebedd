"""torchvision's ResNet, ResNeXt and Wide ResNet (resnet18 ... wide_resnet101_2), and RegNet.

    conv1 bn1 relu maxpool | layer1 | layer2 | layer3 | layer4 | avgpool flatten | fc
    stem                     stage 1  ...                        tail              head

RegNet: stem | trunk_output.block1..block4 | avgpool flatten | fc. Every 3x3 and 1x1 conv is
followed by its BatchNorm (bnN after convN, or the next entry of a Sequential), so all of them fold.
"""

from __future__ import annotations

from torch import nn

from fastft.models.base import Family, Structure, Unit


def _sequence(units: list[Unit], tail: list[nn.Module], head: nn.Module) -> list[tuple[int, nn.Module]]:
    seq = [(i, m) for i, unit in enumerate(units) for m in unit.modules]
    return seq + [(len(units), m) for m in tail] + [(len(units) + 1, head)]


class ResNetFamily(Family):
    name = "resnet"
    full_fast_paths = True

    def matches(self, builder_name: str) -> bool:
        return builder_name.startswith(("resnet", "resnext", "wide_resnet"))

    def structure(self, model: nn.Module) -> Structure:
        stem = Unit("stem", [model.conv1, model.bn1, model.relu, model.maxpool])
        units = [stem] + [Unit(f"layer{i}", [getattr(model, f"layer{i}")]) for i in range(1, 5)]
        tail = [model.avgpool, nn.Flatten(1)]
        return Structure(units, tail, "fc", model.fc, _sequence(units, tail, model.fc))


class RegNetFamily(Family):
    name = "regnet"
    full_fast_paths = True

    def matches(self, builder_name: str) -> bool:
        return builder_name.startswith("regnet_")

    def structure(self, model: nn.Module) -> Structure:
        blocks = list(model.trunk_output.named_children())
        units = [Unit("stem", [model.stem])] + [Unit(name, [block]) for name, block in blocks]
        tail = [model.avgpool, nn.Flatten(1)]
        return Structure(units, tail, "fc", model.fc, _sequence(units, tail, model.fc))

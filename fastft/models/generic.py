"""Any other torchvision classifier (DenseNet, Swin, MaxViT, VGG, RegNet's kin, ...): the head is
found, the stages are not described.

The head is the last nn.Linear whose output is the class count. Without a described forward,
only two things are known: what the head is, and that all else is the backbone. So `frozen` and
`probe` work (the frozen backbone runs as a copy whose head is nn.Identity, BN folded where a
conv/BN pair is found, and its features can be kept), `partial:K` does not (no stages).
"""

from __future__ import annotations

from torch import nn

from fastft.errors import ConfigError
from fastft.models.base import Family, Structure, Unit


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(dotted path, module) of the model's last nn.Linear in registration order, the classifier
    head in every torchvision classifier; ConfigError (one line) when it has none."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(f"{type(model).__name__}: no nn.Linear layer; fastft fine-tunes classifiers "
                          f"whose last layer is a Linear")
    return found[-1]


class GenericFamily(Family):
    name = "generic"
    full_fast_paths = False

    def matches(self, builder_name: str) -> bool:
        return True

    def structure(self, model: nn.Module) -> Structure:
        path, head = last_linear(model)
        # Leaves, so that a container holding the head (VGG's classifier) still has its other layers frozen.
        leaves = [m for m in model.modules() if not list(m.children()) and m is not head]
        head_ids = {id(p) for p in head.parameters()}
        loose = [p for p in model.parameters() if id(p) not in head_ids]
        return Structure([Unit("backbone", leaves, loose)], [], path, head, None)

"""torchvision's Vision Transformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14).

    conv_proj + class token + position embedding | encoder.layers in 4 groups | encoder.ln, token 0 | heads.head
    stem                                           stages                      tail                 head

The encoder's blocks are grouped in fours' worth (12 blocks: 3 per stage), so partial:K means
the same share of the network as ResNet's 4 stages. No BatchNorm: nothing folds, but a frozen
prefix still runs without autograd and its features can be kept. The input size is fixed when
the model is built (the position embedding has one entry per patch): `build_kwargs` passes it.
"""

from __future__ import annotations

import torch
from torch import nn

from fastft.errors import ConfigError
from fastft.models.base import Family, Structure, Unit
from fastft.models.resnet import _sequence

STAGES = 4


class ViTStem(nn.Module):
    """Patches, class token and position embedding: VisionTransformer.forward up to its encoder's
    layers, with the model's own modules and parameters (the same objects, not copies)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv_proj = model.conv_proj
        self.class_token = model.class_token
        self.pos_embedding = model.encoder.pos_embedding
        self.dropout = model.encoder.dropout
        self.hidden_dim = model.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)  # (N, patches, D)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTTail(nn.Module):
    """The encoder's final LayerNorm, then the class token's row: (N, tokens, D) -> (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ln = model.encoder.ln
        self.pre_logits = nn.Sequential(*list(model.heads)[:-1])  # empty unless representation_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(self.ln(x)[:, 0])


def _groups(n: int, parts: int) -> list[range]:
    """n blocks in `parts` consecutive groups, the larger groups first (12 -> 3, 3, 3, 3)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return [r for r in out if len(r)]


class ViTFamily(Family):
    name = "vit"
    full_fast_paths = True

    def matches(self, builder_name: str) -> bool:
        return builder_name.startswith("vit_")

    def structure(self, model: nn.Module) -> Structure:
        stem = ViTStem(model)
        layers = list(model.encoder.layers)
        units = [Unit("stem", [stem], [model.class_token, model.encoder.pos_embedding])]
        for group in _groups(len(layers), STAGES):
            units.append(Unit(f"blocks {group.start}-{group.stop - 1}", layers[group.start:group.stop]))
        tail = [ViTTail(model)]
        head_index = len(model.heads) - 1
        head = model.heads[head_index]
        return Structure(units, tail, f"heads.{list(model.heads._modules)[head_index]}", head,
                         _sequence(units, tail, head),
                         downsample=model.patch_size)

    def build_kwargs(self, image_size: int, pretrained_size: int, patch: int = 16) -> dict:
        """torchvision's builders take image_size; it must be a whole number of patches (the
        patch side is in the name: vit_b_16 -> 16). Raises ConfigError (one line) otherwise."""
        if image_size % patch:
            near = max(patch, image_size - image_size % patch)
            raise ConfigError(f"--image-size {image_size}: a ViT with {patch} px patches takes multiples of "
                              f"{patch} px; use --image-size {near} or {near + patch}")
        return {"image_size": image_size}

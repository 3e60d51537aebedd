"""Weights made at one input size, for a model built at another: a Vision Transformer's position
embedding has one entry per patch, so it is resized to the run's grid, by the libraries' own tools.

    torchvision   torchvision.models.vision_transformer.interpolate_embeddings (bicubic, the class
                  token's entry kept), what torchvision's own fine-tuning references use
    timm          the model module's `checkpoint_filter_fn`, what timm.create_model(pretrained=True,
                  img_size=...) runs (vision_transformer's calls timm.layers.resample_abs_pos_embed)

Every other model takes any input size with the same tensors, and passes through untouched.
"""

from __future__ import annotations

import sys

import torch

from fastft.errors import WeightsError
from fastft.models.matching import Target, dims

TORCHVISION_POS = "encoder.pos_embedding"    # torchvision.models.VisionTransformer, (1, 1 + patches, D)


def fit_to_image_size(state: dict[str, torch.Tensor], target: Target,
                      image_size: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` with its position embeddings resized to `target`'s shapes (the model built for
    `image_size` px), and one note per resized tensor ("encoder.pos_embedding resized 1x197x768
    -> 1x5x768 for 32 px"); `state` itself is not changed. Tensors whose shapes already match, and
    models without a position embedding, come back as they were. Raises WeightsError (one line)
    when torchvision's resize refuses the file's embedding (not a square grid)."""
    differs = [n for n, t in state.items() if n in target.shapes and not target.is_head(n)
               and t.shape != target.shapes[n]]
    if not differs:
        return state, []
    if TORCHVISION_POS in differs and "conv_proj.weight" in target.shapes:
        resized = _torchvision_vit(state, target, image_size)
    else:
        resized = _timm_filter(state, target)
    notes = [f"{name} resized {dims(state[name].shape)} -> {dims(resized[name].shape)} for {image_size} px"
             for name in differs if name in resized and resized[name].shape != state[name].shape]
    return resized, notes


def _torchvision_vit(state: dict[str, torch.Tensor], target: Target, image_size: int) -> dict[str, torch.Tensor]:
    from torchvision.models.vision_transformer import interpolate_embeddings
    patch = int(target.shapes["conv_proj.weight"][-1])   # conv_proj: (D, 3, patch, patch)
    try:
        return interpolate_embeddings(image_size, patch, dict(state))  # it writes into the dict it gets
    except ValueError as exc:
        raise WeightsError(f"cannot resize {TORCHVISION_POS} {dims(state[TORCHVISION_POS].shape)} to "
                           f"{image_size} px: {exc}") from exc


def _timm_filter(state: dict[str, torch.Tensor], target: Target) -> dict[str, torch.Tensor]:
    """timm's own conversion for the model's module, where it has one; else `state` unchanged (the
    load report then lists what did not fit). The filter reads only shapes and attributes of the
    meta-device model, and writes a new dict."""
    module = sys.modules.get(type(target.model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None) if module and module.__name__.startswith("timm.") else None
    if convert is None:
        return state
    try:
        return dict(convert(dict(state), target.model))
    except Exception:  # a filter written for another checkpoint layout: the report says what is skipped
        return state

"""The frozen fast path: the frozen prefix of ResNet-18 as a BN-folded inference module.

A strategy freezes the first K of STAGES (the stem, then layer1..layer4). Nothing
before the first trainable layer needs a gradient, so that prefix can run as pure
inference: BatchNorm folded into the convolutions (eval-mode BN is an affine map),
no autograd graph, compiled on its own. Only the suffix, made of the model's own
modules, records a graph and does backward.

    split = split_for_training(model, strategy.frozen_stages)   # after weights are final
    with torch.no_grad():                                         # not inference_mode: see below
        features = split.prefix(x)
    logits = split.suffix(features)                               # == model(x), with grads

The prefix is a snapshot: build it after loading or resuming the weights. It runs
under `torch.no_grad()` rather than `torch.inference_mode()` because the head's
Linear saves its input for backward, and an inference tensor cannot be saved.

For the frozen backbone (K = 5) the test transform is deterministic, so the test
features are the same every epoch: `FeatureCache` computes them once, and later
evaluations run the head alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fastft.strategy import HEAD, STAGES

STEM_TAIL = ("relu", "maxpool")   # stateless; they follow the stem in torchvision's forward
POOL = "avgpool"


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to bn(conv(x)) with `bn` in eval mode (running statistics)."""
    with torch.no_grad():
        # Fold in at least fp32 whatever the stored dtype, so the folded weight is no worse than the pair.
        dtype = torch.promote_types(conv.weight.dtype, torch.float32)
        weight = conv.weight.to(dtype)
        mean = bn.running_mean.to(dtype)
        std = torch.sqrt(bn.running_var.to(dtype) + bn.eps)
        gamma = bn.weight.to(dtype) if bn.affine else torch.ones_like(mean)
        beta = bn.bias.to(dtype) if bn.affine else torch.zeros_like(mean)
        bias = conv.bias.to(dtype) if conv.bias is not None else torch.zeros_like(mean)
        scale = gamma / std
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        # Elementwise maths keeps the input's layout, so a channels_last weight stays channels_last.
        new_weight = (weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
        new_bias = ((bias - mean) * scale + beta).to(conv.weight.dtype)
        folded.weight = nn.Parameter(new_weight, requires_grad=conv.weight.requires_grad)
        folded.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    return folded


def fold_all_bn(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows its conv; returns how many.

    torchvision's ResNet pairs them two ways: siblings `convN`/`bnN` inside a block,
    and consecutive entries of a Sequential (`downsample = Sequential(conv, bn)`).
    """
    count = 0
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        pairs = list(zip(list(children)[:-1], list(children)[1:]))
    else:
        pairs = [("conv" + name[2:], name) for name in children if name.startswith("bn")]
    for conv_name, bn_name in pairs:
        conv, bn = children.get(conv_name), children.get(bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            setattr(module, conv_name, fold_bn(conv, bn))
            setattr(module, bn_name, nn.Identity())
            count += 1
    for child in module.children():
        count += fold_all_bn(child)
    return count


@dataclass
class SplitForward:
    """prefix (frozen, folded, no grad; None when nothing is frozen) then suffix (the model's own modules)."""
    prefix: nn.Module | None
    suffix: nn.Module
    frozen_stages: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The whole forward; the prefix under no_grad. The engine may call the parts itself."""
        if self.prefix is not None:
            with torch.no_grad():
                x = self.prefix(x)
        return self.suffix(x)

    def to(self, device: torch.device | str, memory_format: torch.memory_format = torch.contiguous_format
           ) -> "SplitForward":
        """Move the prefix copy like the model (the suffix is the model's and moves with it)."""
        if self.prefix is not None:
            self.prefix.to(device, memory_format=memory_format)
        return self


def _prefix_names(frozen_stages: int) -> list[str]:
    names = [name for stage in STAGES[:frozen_stages] for name in stage]
    names[2:2] = list(STEM_TAIL)  # after conv1, bn1
    return names


def _suffix_names(frozen_stages: int) -> list[str]:
    rest = [name for stage in STAGES[frozen_stages:] for name in stage]
    if frozen_stages == 0:
        rest[2:2] = list(STEM_TAIL)
    return rest


def split_for_training(model: nn.Module, frozen_stages: int, fold: bool = True) -> SplitForward:
    """Split torchvision's ResNet forward after the last frozen stage.

    prefix: deep copies of the frozen modules (and relu/maxpool after the stem; for
    K = 5 also avgpool + flatten, so it returns the (N, 512) features), BN folded when
    `fold`, eval mode, requires_grad False; on the model's device and layout.
    suffix: nn.Sequential of the model's OWN remaining modules, so the optimizer, the
    checkpoint and DDP keep seeing the same parameters. suffix(prefix(x)) == model(x)
    with the frozen modules in eval mode.
    """
    if not 0 <= frozen_stages <= len(STAGES):
        raise ValueError(f"frozen_stages must be in 0..{len(STAGES)}, got {frozen_stages}")
    tail = [getattr(model, POOL), nn.Flatten(1)]
    suffix_modules = [getattr(model, name) for name in _suffix_names(frozen_stages)]
    if frozen_stages < len(STAGES):
        suffix_modules += tail
    suffix = nn.Sequential(*suffix_modules, getattr(model, HEAD))
    if frozen_stages == 0:
        return SplitForward(None, suffix, 0)
    prefix_modules = [copy.deepcopy(getattr(model, name)) for name in _prefix_names(frozen_stages)]
    if frozen_stages == len(STAGES):
        prefix_modules += [copy.deepcopy(m) for m in tail]
    prefix = nn.Sequential(*prefix_modules)
    if fold:
        fold_all_bn(prefix)
    prefix.eval().requires_grad_(False)
    return SplitForward(prefix, suffix, frozen_stages)


def caches_features(frozen_stages: int) -> bool:
    """Test features can be kept only when the whole backbone is frozen (small: N x 512)."""
    return frozen_stages == len(STAGES)


class FeatureCache:
    """The frozen backbone's test-set features, computed once and kept on the device.

    Valid while the prefix and the test batches do not change: the frozen weights
    never train and the test transform is deterministic.
    """

    def __init__(self) -> None:
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def ready(self) -> bool:
        return self._batches is not None

    def fill(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             prefix_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run `prefix_fn` over (x, y) batches already on the device (and under the caller's autocast)."""
        kept = []
        with torch.no_grad():
            for x, y in batches:
                kept.append((prefix_fn(x).detach(), y))
        self._batches = kept

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._batches is None:
            raise RuntimeError("FeatureCache.batches() before fill()")
        return self._batches

    def clear(self) -> None:
        self._batches = None

    @property
    def examples(self) -> int:
        return sum(y.shape[0] for _, y in self._batches or [])


def cached_accuracy(cache: FeatureCache, head_fn: Callable[[torch.Tensor], torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, count) as device tensors over the cached features: no host sync here."""
    batches = cache.batches()
    device = batches[0][1].device if batches else torch.device("cpu")
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for features, y in batches:
            correct += (head_fn(features).argmax(dim=1) == y).sum()
            count += y.shape[0]
    return correct, count

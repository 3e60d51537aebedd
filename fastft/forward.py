"""How the model's forward runs: the frozen fast path, the DDP wrapper, torch.compile.

    x --[frozen prefix: BN folded, no autograd, compiled on its own]--> features
      --[trainable suffix: the model's own modules, DDP-wrapped, compiled]--> logits

With `--no-fast-frozen` (the reference) the whole model runs as one module, its
frozen layers in eval mode with requires_grad False. With the fast path, a
frozen backbone's test features are computed once and kept (see FeatureCache).
"""

from __future__ import annotations

import torch
from torch import nn

from fastft.fastpath import FeatureCache, caches_features, cached_accuracy, split_for_training
from fastft.runtime import Runtime


class Forward:
    def __init__(self, model: nn.Module, frozen_stages: int, fast_frozen: bool, rt: Runtime,
                 compile_mode: str = "default"):
        self.prefix, trainable = None, model
        if fast_frozen and frozen_stages > 0:
            split = split_for_training(model, frozen_stages).to(rt.device, memory_format=rt.memory_format)
            self.prefix, trainable = split.prefix, split.suffix
        if rt.distributed:
            # DDP reduces only parameters that require grad: a frozen backbone costs no traffic.
            device_ids = [rt.device.index] if rt.device.type == "cuda" else None
            trainable = nn.parallel.DistributedDataParallel(trainable, device_ids=device_ids)
        self.trainable = self._compiled(trainable, rt, compile_mode)
        self.frozen = self._compiled(self.prefix, rt, compile_mode) if self.prefix is not None else None
        self.cache = FeatureCache() if self.prefix is not None and caches_features(frozen_stages) else None

    @staticmethod
    def _compiled(module: nn.Module, rt: Runtime, mode: str):
        if not rt.compile:
            return module
        return torch.compile(module, mode=None if mode == "default" else mode)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output (no graph), or x itself when nothing runs apart."""
        if self.frozen is None:
            return x
        with torch.no_grad():
            return self.frozen(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainable(self.features(x))

    def cached_accuracy(self, batches, autocast) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(correct, count) on the device from kept test features; None when not kept.

        The first call computes the features from `batches` (x, y already on the device).
        """
        if self.cache is None:
            return None
        with autocast():
            if not self.cache.ready:
                self.cache.fill(batches, self.features)
            return cached_accuracy(self.cache, self.trainable)

"""How the model's forward runs: the frozen fast path, the DDP wrapper, torch.compile.

    x --[frozen prefix: BN folded, no autograd, compiled on its own]--> features
      --[trainable suffix: the model's own modules, DDP-wrapped, compiled]--> logits

With `--no-fast-frozen` (the reference) the whole model runs as one module, its
frozen layers in eval mode with requires_grad False. With the fast path, a
frozen backbone's test features are computed once and kept (see FeatureCache).

Compile: each piece is its own class (FrozenPrefix, TrainableSuffix, or the
model), so its own forward code object: Dynamo keeps graphs, guards and the
recompile limit per code object. Shapes are fixed (dynamic=False): a training
run meets one train shape and at most two test shapes, and a graph made for
symbolic sizes would serve them all more slowly.

Evaluation never runs through DDP. DDP's first forward after a training step
broadcasts BN buffers from rank 0, a collective: a process with no test batch
would never join it and the others would wait until --dist-timeout. Instead
every process takes rank 0's buffers in one explicit broadcast (the same
values DDP would give), then evaluates the unwrapped module.
"""

from __future__ import annotations

import torch
from torch import nn

from fastft import distributed
from fastft.fastpath import FeatureCache, caches_features, cached_accuracy, split_for_training
from fastft.models.base import Structure
from fastft.runtime import Runtime


class Forward:
    """The run's forward: `forward(x)` for a training step, `evaluate(x)` for test batches."""

    def __init__(self, model: nn.Module, frozen_stages: int, fast_frozen: bool, rt: Runtime,
                 compile_mode: str = "default", structure: Structure | None = None):
        self.prefix, local, self.folded = None, model, 0
        if structure is None:
            from fastft.strategy import structure_of
            structure = structure_of(model)
        split = split_for_training(model, frozen_stages, structure=structure) if fast_frozen and frozen_stages else None
        if split is not None:
            split.to(rt.device, memory_format=rt.memory_format)
            self.prefix, local, self.folded = split.prefix, split.suffix, split.folded
        self.local = local  # the trained piece without DDP: its buffers are what DDP would broadcast
        wrapped = local
        if rt.distributed:
            # DDP reduces only parameters that require grad: a frozen backbone costs no traffic.
            device_ids = [rt.device.index] if rt.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(local, device_ids=device_ids)
        self.trainable = _compiled(wrapped, rt, compile_mode)
        self.evaluating = _compiled(local, rt, compile_mode) if rt.distributed else self.trainable
        self.frozen = _compiled(self.prefix, rt, compile_mode) if self.prefix is not None else None
        units = len(structure.units)
        self.cache = FeatureCache() if self.prefix is not None and caches_features(frozen_stages, units) else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output (no graph), or x itself when nothing runs apart."""
        if self.frozen is None:
            return x
        with torch.no_grad():
            return self.frozen(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Training: logits through the DDP wrapper (when distributed), with grads for the suffix."""
        return self.trainable(self.features(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Training logits from features the prefix made earlier (kept train features): the
        suffix alone, through the DDP wrapper; equal to `self(x)` for the x they came from."""
        return self.trainable(features)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Test logits, never through DDP: no collective per batch. Call `sync_for_evaluation` first."""
        return self.evaluating(self.features(x))

    def sync_for_evaluation(self) -> None:
        """Every process takes rank 0's buffers (BN running statistics): all evaluate one model.

        A collective: every process calls it once per evaluation, with or without test batches.
        """
        distributed.broadcast_buffers(self.local)

    def full_accuracy(self, batches, autocast, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(correct, count) as device tensors over test batches (x, y on the device), the whole
        forward per batch (evaluate): no host sync here."""
        correct = torch.zeros((), dtype=torch.int64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        for x, y in batches:
            with autocast():
                logits = self.evaluate(x)
            correct += (logits.argmax(dim=1) == y).sum()
            count += y.shape[0]
        return correct, count

    def cached_accuracy(self, batches, autocast) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(correct, count) on the device from kept test features; None when not kept.

        The first call computes the features from `batches` (x, y already on the device).
        """
        if self.cache is None:
            return None
        with autocast():
            if not self.cache.ready:
                self.cache.fill(batches, self.features)
            return cached_accuracy(self.cache, self.evaluating)


def fast_path_line(model_name: str, structure: Structure, frozen: int, forward: Forward) -> str | None:
    """The log's line on which fast paths apply to `frozen` frozen units; None when none is frozen."""
    if frozen == 0:
        return None
    names = ", ".join(unit.name for unit in structure.units[:frozen])
    if forward.prefix is None:
        return (f"fast path: {model_name}'s frozen {names} run inside the model without autograd (no split: "
                f"the family describes no forward sequence, so no BatchNorm folding)")
    left = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in forward.prefix.modules())
    folded = (f"{forward.folded} BatchNorm(s) folded into their convolutions" if forward.folded else
              "its BatchNorms left unfolded (no plain conv + BatchNorm2d pair, or the fold check refused)"
              if left else "no BatchNorm to fold")
    kept = "; test features computed once and kept" if forward.cache is not None else ""
    return f"fast path: frozen {names} run apart in inference mode without autograd, {folded}{kept}"


def _compiled(module: nn.Module, rt: Runtime, mode: str):
    if not rt.compile:
        return module
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)


# The graph-break type torch._dynamo gives a refused recompile (torch/_dynamo/convert_frame.py).
RECOMPILE_LIMIT_HIT = "Dynamo recompile limit exceeded"


def compile_fallbacks() -> int:
    """Frames Dynamo refused to recompile in this process so far; they then run eagerly.

    A code object that reaches torch._dynamo.config.recompile_limit (8) runs eagerly
    from then on, with a warning and no new graph, so a graph count alone reads as
    "no recompiles". Only this reason counts: under DDP, Dynamo declines some of
    DDP's own frames (a generator, functions it skips) on every run, by design.
    """
    from torch._dynamo.utils import counters
    return sum(n for reason, n in counters["unimplemented"].items() if reason.startswith(RECOMPILE_LIMIT_HIT))

"""The frozen fast path: a model's frozen prefix as a BN-folded inference module.

A strategy freezes the first K units of the model's Structure (fastft.models: the
stem, then the stages; ResNet's layer1..layer4, ViT's block groups). Nothing before
the first trainable layer needs a gradient, so that prefix can run as pure
inference: BatchNorm folded into the convolutions before it (eval-mode BN is an
affine map) wherever such pairs exist, no autograd graph, compiled on its own. Only
the suffix, made of the model's own modules, records a graph and does backward.
A family that describes its forward as a sequence gets the split for every K; any
other model gets it for the whole backbone only (a copy whose head is nn.Identity).

    split = split_for_training(model, k, structure=structure)    # after weights are final
    with torch.no_grad():                                         # not inference_mode: see below
        features = split.prefix(x)
    logits = split.suffix(features)                               # == model(x), with grads

The prefix is a snapshot: build it after loading or resuming the weights. It runs
under `torch.no_grad()` rather than `torch.inference_mode()` because the head's
Linear saves its input for backward, and an inference tensor cannot be saved.

For the frozen backbone (K = all units) the test transform is deterministic, so the test
features are the same every epoch: `FeatureCache` computes them once, and later
evaluations run the head alone. `--strategy probe` keeps the train features too
(`TrainFeatures`): its train images take the test transform.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastft.models.base import Structure, set_submodule

# In fp64 a folded prefix equals the unfolded one to ~1e-12 of the output's scale; more means a
# pair was not what its names said, and the prefix stays unfolded.
FOLD_CHECK_RTOL = 1e-6


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to bn(conv(x)) with `bn` in eval mode (running statistics).

    Its weight and bias are new Parameters on conv's device, in conv's dtype and memory layout,
    with conv.weight's requires_grad; every other setting is conv's. Draws no random numbers.
    """
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
        # Built on the meta device: no storage and no kaiming init (which took most of the fold's
        # time and drew from the global RNG) for a weight and bias replaced just below.
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                           device="meta")
        # Elementwise maths keeps the input's layout, so a channels_last weight stays channels_last.
        new_weight = (weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
        new_bias = ((bias - mean) * scale + beta).to(conv.weight.dtype)
        folded.weight = nn.Parameter(new_weight, requires_grad=conv.weight.requires_grad)
        folded.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    return folded


def fold_all_bn(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows its conv; returns how many.

    torchvision pairs them two ways: siblings `convN`/`bnN` inside a block (ResNet), and
    consecutive entries of a Sequential (ResNet's downsample, Conv2dNormActivation in
    EfficientNet, MobileNet and RegNet). Only plain BatchNorm2d folds: a subclass may do more
    (timm's BatchNormAct2d applies its activation too). `checked_fold` verifies the result.
    """
    count = 0
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        pairs = list(zip(list(children)[:-1], list(children)[1:]))
    else:
        pairs = [("conv" + name[2:], name) for name in children if name.startswith("bn")]
    for conv_name, bn_name in pairs:
        conv, bn = children.get(conv_name), children.get(bn_name)
        if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
            setattr(module, conv_name, fold_bn(conv, bn))
            setattr(module, bn_name, nn.Identity())
            count += 1
    for child in module.children():
        count += fold_all_bn(child)
    return count


class FrozenPrefix(nn.Sequential):
    """The frozen prefix. Its own class with its own `forward`, so its own code object:
    Dynamo keeps graphs, guards and the recompile limit per code object, and every
    plain nn.Sequential shares nn.Sequential.forward's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            x = module(x)
        return x


class TrainableSuffix(nn.Sequential):
    """The trainable suffix (the model's own modules); its own `forward` for the same reason."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            x = module(x)
        return x


@dataclass
class SplitForward:
    """prefix (frozen, folded, no grad; None when nothing is frozen) then suffix (the model's own modules)."""
    prefix: nn.Module | None
    suffix: nn.Module
    frozen_stages: int
    folded: int = 0              # BatchNorms folded into the convolution before them

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


def _prefix_and_suffix(model: nn.Module, structure: Structure, k: int) -> tuple[list, list]:
    """(modules of the frozen prefix, the model's own modules after it) for k frozen units."""
    whole = k == len(structure.units)
    if structure.sequence is not None:
        cut = len(structure.units) + 1 if whole else k  # a wholly frozen backbone takes the tail too
        prefix = [copy.deepcopy(m) for unit, m in structure.sequence if unit < cut]
        return prefix, [m for unit, m in structure.sequence if unit >= cut]
    if not whole:
        return [], []
    body = copy.deepcopy(model)  # the forward is not described: the whole model, its head an identity
    set_submodule(body, structure.head_path, nn.Identity())
    return [body], [structure.head]


def split_for_training(model: nn.Module, frozen_stages: int, fold: bool = True,
                       structure: Structure | None = None) -> SplitForward | None:
    """Split the model's forward after its last frozen unit (fastft.models.Structure).

    prefix: FrozenPrefix of deep copies of the frozen modules (for the whole backbone also the
    tail, so it returns the (N, feature_dim) features), BN folded when `fold` (checked_fold),
    eval mode, requires_grad False; on the model's device and layout.
    suffix: TrainableSuffix of the model's OWN remaining modules, so the optimizer, the
    checkpoint and DDP keep seeing the same parameters. suffix(prefix(x)) == model(x) with the
    frozen modules in eval mode. None when the family describes no sequence and only part of
    the backbone is frozen (the model then runs whole; its frozen units record no graph anyway).
    """
    if structure is None:
        from fastft.strategy import structure_of
        structure = structure_of(model)
    if not 0 <= frozen_stages <= len(structure.units):
        raise ValueError(f"frozen_stages must be in 0..{len(structure.units)}, got {frozen_stages}")
    if frozen_stages == 0:
        return SplitForward(None, model, 0)
    prefix_modules, suffix_modules = _prefix_and_suffix(model, structure, frozen_stages)
    if not prefix_modules:
        return None
    prefix = FrozenPrefix(*prefix_modules).eval()
    folded = checked_fold(prefix, _probe_input(model, structure)) if fold else 0
    prefix.eval().requires_grad_(False)
    return SplitForward(prefix, TrainableSuffix(*suffix_modules), frozen_stages, folded)


def _probe_input(model: nn.Module, structure: Structure) -> torch.Tensor:
    """Two random images at the smallest size the model surely takes (its downsampling x 2)."""
    first = next(iter(model.parameters()))
    side = max(64, 2 * structure.downsample)
    size = getattr(model, "image_size", side)  # torchvision's ViT fixes its input size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=generator).to(first.device, first.dtype)


def checked_fold(prefix: nn.Module, x: torch.Tensor) -> int:
    """fold_all_bn on a copy of `prefix`, adopted only if the fold is the same function: an fp64
    copy folded the same way gives the fp64 unfolded output on `x` to FOLD_CHECK_RTOL of its scale
    (fp64, so a model that amplifies fp32 rounding cannot make an exact fold look wrong; a fold
    that paired the wrong modules is off by far more). Returns the BatchNorms folded (0: left as
    is, also when the prefix does not take `x`). `prefix` must be in eval mode."""
    if not any(type(m) is nn.BatchNorm2d for m in prefix.modules()):
        return 0
    exact, x = _fp64_copy(prefix), x.double()
    reference = _output_or_none(exact, x)
    count = fold_all_bn(exact) if reference is not None else 0  # its unfolded output is kept: fold in place
    out = _output_or_none(exact.eval(), x) if count else None
    if out is None or (out - reference).abs().max() > FOLD_CHECK_RTOL * reference.abs().max().clamp(min=1):
        return 0
    # A fresh copy folded, not the prefix in place: the in-place fold ran the job's frozen forward
    # ~8% slower (median 248 vs 268 img/s, 5 processes each, bf16 ResNet-18 on 2 cores), though
    # the weights' values, dtype and strides are the same; where each weight lands in memory differs.
    folded = copy.deepcopy(prefix)
    fold_all_bn(folded)  # in the prefix's own dtype, from its own weights
    for name, child in folded.named_children():
        setattr(prefix, name, child.eval())
    return count


def _fp64_copy(module: nn.Module) -> nn.Module:
    """copy.deepcopy(module).double() without the copy at the stored precision in between:
    deepcopy's memo maps each floating-point parameter and buffer straight to a new fp64 tensor."""
    memo = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point() and id(tensor) not in memo:
            double = tensor.detach().to(torch.float64, copy=True)
            memo[id(tensor)] = nn.Parameter(double, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else double
    return copy.deepcopy(module, memo)


def _output_or_none(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """module(x) without autograd, or None when the module refuses x (an input size it cannot take)."""
    try:
        with torch.no_grad():
            return module(x)
    except (RuntimeError, ValueError, AssertionError):
        return None


def caches_features(frozen_stages: int, units: int = 5) -> bool:
    """Test features can be kept only when the whole backbone is frozen (small: N x feature_dim).
    `units`: the model's (5 for ResNet: the stem and 4 stages)."""
    return frozen_stages == units


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
        """Run `prefix_fn` over (x, y) batches already on the device (and under the caller's autocast).

        Each output is copied before it is kept: a compiled prefix under CUDA graphs
        (--compile-mode reduce-overhead or max-autotune) returns a buffer that its next
        replay overwrites, so keeping the output itself would keep the last batch N times.
        """
        kept = []
        with torch.no_grad():
            for x, y in batches:
                kept.append((prefix_fn(x).detach().clone(), y.clone()))
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


class TrainFeatures:
    """This process's train features (N, 512) and labels (N,), computed once and kept on the
    device; each epoch serves them in a fresh shuffled order (`--strategy probe`).

    Valid for the same reasons as FeatureCache: the frozen weights never train, and the train
    images come through the test transform (the backend's `train_eval_batches()`), which is
    deterministic. Under DDP each process keeps the shard it computed and shuffles it alone:
    the features never move, and DDP all-reduces the head's gradients as in any step.

    Equal steps everywhere: DDP's all-reduce runs in every step, so a process with one step
    fewer would leave the others waiting until --dist-timeout. Each process serves
    ceil(N / world) rows per epoch (the largest shard): a smaller shard repeats the first rows
    of its own shuffled order, as DistributedSampler pads the loaders' shards, and those rows
    count twice in the loss and the metrics, as there. Batches are `batch` rows; the ragged
    last one is dropped with `drop_ragged` (set when compiling: one shape per step), unless it
    is the only one.
    """

    def __init__(self, train_size: int, batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_ragged: bool = False):
        self.rows = math.ceil(train_size / world_size)  # served per epoch by every process
        self.batch, self.seed, self.rank = batch, seed, rank
        drop = drop_ragged and self.rows >= batch
        self.steps = self.rows // batch if drop else math.ceil(self.rows / batch)
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.features is not None

    def fill(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             prefix_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run `prefix_fn` over (x, y) batches already on the device (under the caller's autocast)
        and keep the outputs, in their dtype. Raises RuntimeError when the batches hold more
        images than this process's share or none at all."""
        cache = FeatureCache()  # copies each output: see FeatureCache.fill
        cache.fill(batches, prefix_fn)
        kept = cache.batches()
        if not 0 < cache.examples <= self.rows:
            raise RuntimeError(f"train features: {cache.examples} images for a share of 1..{self.rows}")
        self.features = torch.cat([f for f, _ in kept])
        self.labels = torch.cat([y for _, y in kept])

    def order(self, epoch: int) -> torch.Tensor:
        """int64 (steps x batch or fewer,) row indices for `epoch`, on the CPU: a permutation of
        this shard from (seed, epoch, rank) only, so a resumed run draws the same, padded to
        `rows` with its own first entries and cut to the steps taken."""
        generator = torch.Generator().manual_seed(feature_order_seed(self.seed, epoch, self.rank))
        n = self.labels.shape[0]
        perm = torch.randperm(n, generator=generator)
        return perm.repeat(math.ceil(self.rows / n))[: min(self.rows, self.steps * self.batch)]

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`steps` (features, labels) batches on the device; one host-to-device copy per epoch."""
        if self.features is None:
            raise RuntimeError("TrainFeatures.epoch_batches() before fill()")
        order = self.order(epoch).to(self.features.device, non_blocking=True)
        for start in range(0, order.shape[0], self.batch):
            rows = order[start: start + self.batch]
            yield self.features[rows], self.labels[rows]


def feature_order_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed per (run seed, epoch, process) for the kept features' order (numpy's
    SeedSequence mixes the three, so no two triples share a stream by arithmetic accident)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)

"""The model a training run starts from: built, its starting weights loaded, its head set, frozen.

    model, structure = build_run_model(spec, strategy, cfg, rt, classes, say, fresh=True)

One place for the order that matters: the structure is read before any download (so a bad
partial:K fails first), the head is initialised after the weights load (hotdog seeds it from the
file's ImageNet head), and the structure is read again after SyncBatchNorm replaces modules.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fastft.models.base import Structure
from fastft.models.registry import ModelSpec


def build_run_model(spec: ModelSpec, strategy, cfg, rt, classes: list[str], say: Callable[[str], None],
                    fresh: bool) -> tuple[nn.Module, Structure]:
    """(model on rt.device in rt.memory_format, its Structure). `fresh`: load --weights (or the
    strategy's default) and initialise the head; False for a resumed run, whose checkpoint holds
    every tensor. Raises ConfigError (partial:K beyond the model's stages) before any download,
    WeightsError for a weights file that does not fit."""
    model = spec.build(len(classes), cfg.image_size)
    structure = spec.structure(model)
    strategy.frozen_units(structure)
    if fresh:
        _load_start_weights(model, structure, spec, strategy, cfg, classes, say)
    strategy.freeze(model, structure)
    if cfg.sync_bn and rt.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rt.device, memory_format=rt.memory_format)
    return model, spec.structure(model)  # SyncBatchNorm replaced modules: describe anew


def _load_start_weights(model, structure, spec, strategy, cfg, classes, say) -> None:
    from fastft.model import load_matching, source_weights
    source, label = source_weights(cfg.weights or strategy.default_weights, spec, cfg.image_size)
    if source is not None:
        for line in load_matching(model, source, label, structure.head_path).lines():
            say(line)
    note = strategy.init_head(model, source, classes, structure)
    if note:
        say(note)

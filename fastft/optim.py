"""The optimizer: torch SGD (fused on CUDA, foreach on a CPU) or NVIDIA apex's FusedSGD.

Both take the chapter's update, lr * (grad + weight_decay * param), with optional
momentum, so `--optimizer` changes the kernels and never the training. apex is
imported only when asked for: it is not on PyPI and most machines lack it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fastft.config import TrainConfig
from fastft.errors import ConfigError

APEX_BUILD = ('git clone https://github.com/NVIDIA/apex && cd apex && pip install -v --no-build-isolation '
              '--config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" ./')


def build_optimizer(groups: Iterable, cfg: TrainConfig, device: torch.device | str) -> torch.optim.Optimizer:
    """`cfg.optimizer` over `groups` (parameter groups, each may carry its own lr)."""
    device = torch.device(device)
    hyper = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "apex-sgd":
        return apex_sgd(groups, device, **hyper)
    if cfg.optimizer != "sgd":
        raise ConfigError(f"--optimizer must be sgd or apex-sgd, got {cfg.optimizer!r}")
    # One fused kernel for all parameters on CUDA; on a CPU foreach batches the per-tensor ops.
    fused = device.type == "cuda"
    return torch.optim.SGD(groups, **hyper, fused=fused or None, foreach=None if fused else True)


def apex_sgd(groups: Iterable, device: torch.device, **hyper) -> torch.optim.Optimizer:
    try:
        from apex.optimizers import FusedSGD
    except ImportError as exc:
        raise ConfigError(f"--optimizer apex-sgd needs NVIDIA apex, which is not on PyPI ({exc}); build it "
                          f"with: {APEX_BUILD}; or use --optimizer sgd") from exc
    if device.type != "cuda":
        raise ConfigError(f"--optimizer apex-sgd runs on CUDA only (apex FusedSGD needs CUDA tensors), "
                          f"the device is {device}; use --optimizer sgd")
    try:
        return FusedSGD(groups, **hyper)
    except RuntimeError as exc:  # apex installed without its CUDA extensions (amp_C)
        raise ConfigError(f"apex is installed without its CUDA extensions ({str(exc).splitlines()[0]}); "
                          f"rebuild it with: {APEX_BUILD}") from exc

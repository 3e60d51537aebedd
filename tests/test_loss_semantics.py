"""Why `reduction="none"` + sum differs from mean: the same step needs lr x batch and wd / batch."""

from __future__ import annotations

import pytest
import torch

from fastft.engine import Trainer

BATCH = 8


def params_after_one_step(make_cfg, x, y, **overrides) -> list[torch.Tensor]:
    trainer = Trainer(make_cfg(strategy="finetune", **overrides)).setup()
    trainer.model.eval()  # the same BN behaviour in every run: only the loss semantics differ
    trainer.train_step(x, y)
    return [p.detach().clone() for p in trainer.model.parameters()]


def a_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    return x, torch.tensor([0, 1] * (BATCH // 2))


def test_sum_at_lr_equals_mean_at_lr_times_batch(make_cfg):
    x, y = a_batch()
    lr, wd = 1e-3, 1e-3
    summed = params_after_one_step(make_cfg, x, y, loss_reduction="sum", lr=lr, weight_decay=wd)
    meaned = params_after_one_step(make_cfg, x, y, loss_reduction="mean", lr=lr * BATCH,
                                   weight_decay=wd / BATCH)
    for a, b in zip(summed, meaned):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mean_at_the_same_lr_takes_a_batch_times_smaller_step(make_cfg):
    x, y = a_batch()
    start = params_after_one_step(make_cfg, x, y, lr=1e-30, weight_decay=0.0)
    summed = params_after_one_step(make_cfg, x, y, loss_reduction="sum", lr=1e-3, weight_decay=0.0)
    meaned = params_after_one_step(make_cfg, x, y, loss_reduction="mean", lr=1e-3, weight_decay=0.0)
    for p0, ps, pm in zip(start, summed, meaned):
        # Compare whole-tensor step sizes: float32 rounding blurs single tiny elements.
        ratio = torch.linalg.vector_norm(ps - p0) / torch.linalg.vector_norm(pm - p0)
        assert ratio.item() == pytest.approx(BATCH, rel=1e-2)

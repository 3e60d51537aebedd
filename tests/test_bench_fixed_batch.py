"""fastft.bench.fixed_batch feeds the step what the loader feeds it: same shape, dtype, strides, device.

A compiled step guards on dtype and strides, so a fixed batch of another dtype or layout than the
loader's would time a second, cold graph (an fp32 batch where the loaders feed bf16 did).
"""

from __future__ import annotations

import pytest
import torch

from fastft.bench import fixed_batch
from fastft.engine import Trainer


def loader_batch(trainer):
    """The first batch train_epoch(0) hands to the step."""
    return next(iter(trainer._train_source(0)[0]))


@pytest.mark.parametrize("flags", [
    dict(loader="torch", amp="bf16", channels_last=True),                        # uint8 batches, cast on the device
    dict(loader="torch", amp="bf16", channels_last=True, uint8_batches=False),   # fp32 from the workers
    dict(loader="cached", amp="bf16", channels_last=True),
    dict(loader="cached", amp="off", channels_last=False),
], ids=["torch-bf16", "torch-fp32-workers", "cached-bf16", "cached-fp32-nchw"])
def test_fixed_batch_has_the_loaders_dtype_layout_and_shape(make_cfg, tmp_path, flags):
    trainer = Trainer(make_cfg(strategy="finetune", out=str(tmp_path / "run"), **flags)).setup()
    x, y = fixed_batch(trainer)
    real_x, real_y = loader_batch(trainer)
    assert (x.dtype, x.shape, x.stride(), x.device) == (real_x.dtype, real_x.shape, real_x.stride(), real_x.device)
    assert (y.dtype, y.shape, y.device) == (real_y.dtype, real_y.shape, real_y.device)
    want = torch.bfloat16 if flags["amp"] == "bf16" and flags.get("uint8_batches", True) else torch.float32
    assert x.dtype == want and x.shape == (8, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last if flags["channels_last"] else torch.contiguous_format)
    again_x, again_y = fixed_batch(trainer)  # seeded: the same batch each call
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert int(y.min()) >= 0 and int(y.max()) < len(trainer.data.classes)

"""The torch loader: uint8 batches normalised on the device, persistent workers, the dropped ragged batch."""

from __future__ import annotations

import pytest
import torch

from fastft.data import build_loaders
from fastft.data.layout import scan_dataset
from fastft.data.torch_loader import TorchLoaders
from fastft.runtime import Runtime, resolve_runtime


def runtime(amp: torch.dtype | None = None) -> Runtime:
    return Runtime(device=torch.device("cpu"), amp_dtype=amp, compile=False, channels_last=True, workers=0)


def batches(loaders: TorchLoaders, split: str, epoch: int = 0) -> list:
    source = loaders.train_batches(epoch) if split == "train" else loaders.test_batches()
    return [loaders.to_device(x, y) for x, y in source]


@pytest.mark.parametrize("split", ["train", "test"])
def test_uint8_batches_normalised_on_the_device_equal_the_workers_fp32_batches(tiny_data, split):
    layout = scan_dataset(tiny_data)
    fp32 = TorchLoaders(layout, 32, 10, 0, seed=0, rt=runtime())
    uint8 = TorchLoaders(layout, 32, 10, 0, seed=0, rt=runtime(), uint8=True)
    assert next(iter(uint8.test_batches()))[0].dtype == torch.uint8  # what workers ship
    reference, fast = batches(fp32, split, epoch=1), batches(uint8, split, epoch=1)
    assert len(reference) == len(fast) == (3 if split == "train" else 2)
    for (xr, yr), (xf, yf) in zip(reference, fast):
        assert xf.dtype == torch.float32 and xf.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yr, yf)
        torch.testing.assert_close(xf, xr, rtol=0, atol=1e-6)  # same crops: seeded per image


def test_uint8_batches_come_out_in_the_amp_dtype_one_rounding_from_fp32(tiny_data):
    layout = scan_dataset(tiny_data)
    fp32 = TorchLoaders(layout, 32, 12, 0, seed=0, rt=runtime())
    bf16 = TorchLoaders(layout, 32, 12, 0, seed=0, rt=runtime(torch.bfloat16), uint8=True)
    (xr, _), = batches(fp32, "test")
    (xb, _), = batches(bf16, "test")
    assert xb.dtype == torch.bfloat16 and xb.is_contiguous(memory_format=torch.channels_last)
    # bf16 keeps 8 significant bits: one rounding is within 2^-8 of the value.
    assert ((xb.float() - xr).abs() <= xr.abs() * 2**-8 + 1e-6).all()
    # A float batch (already normalised elsewhere) passes through unchanged but for the move.
    x, _ = bf16.to_device(xr, torch.zeros(12, dtype=torch.int64))
    assert torch.equal(x, xr)


def test_persistent_workers_draw_each_epochs_crops(tiny_data):
    """One worker process serves both epochs; its crops still follow the epoch, as 0 workers' do."""
    layout = scan_dataset(tiny_data)
    inline = TorchLoaders(layout, 32, 8, 0, seed=0, uint8=True)
    worker = TorchLoaders(layout, 32, 8, 1, seed=0, uint8=True)
    assert worker.train.persistent_workers and worker.test.persistent_workers
    assert not inline.train.persistent_workers  # DataLoader refuses persistence without workers
    first = list(worker.train_batches(0))
    pids = [w.pid for w in worker.train._iterator._workers]
    second = list(worker.train_batches(1))
    assert [w.pid for w in worker.train._iterator._workers] == pids  # not re-forked
    for epoch, got in ((0, first), (1, second)):
        for (xw, yw), (xi, yi) in zip(got, inline.train_batches(epoch)):
            assert torch.equal(xw, xi) and torch.equal(yw, yi), f"epoch {epoch}"
    assert not torch.equal(first[0][0], second[0][0])
    assert "1 worker process(es), persistent; uint8 batches" in worker.describe()[0]


@pytest.mark.parametrize("compile_, batch, steps, sizes, skipped", [
    (True, 10, 2, [10, 10], 4),       # 24 images: the ragged 4 are dropped
    (False, 10, 3, [10, 10, 4], 0),   # eager: every image, two shapes
    (True, 32, 1, [24], 0),           # smaller than one batch: its one partial batch stays
], ids=["compile", "eager", "one-partial-batch"])
def test_compiling_drops_the_ragged_last_train_batch_and_says_so(make_cfg, compile_, batch, steps, sizes,
                                                                 skipped):
    cfg = make_cfg(compile=compile_, batch_size=batch)
    loaders = build_loaders(cfg, scan_dataset(cfg.data), resolve_runtime(cfg))
    assert loaders.steps_per_epoch() == steps
    assert [y.shape[0] for _, y in loaders.train_batches(0)] == sizes
    assert loaders.train_batch_sizes() == set(sizes)  # cudnn.benchmark's and BatchNorm's checks read this
    assert sum(y.shape[0] for _, y in loaders.test_batches()) == 12  # evaluation keeps every image
    lines = loaders.describe()
    assert any(f"{skipped} of 24 images skipped per epoch" in line for line in lines) == bool(skipped)

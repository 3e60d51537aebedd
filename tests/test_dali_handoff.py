"""bench/dali_handoff.py: the check that DALI never rewrites a batch torch still holds.

The checker itself is tested against a loader that does reuse one buffer, so a zero from DALI
means something; DALI then runs on CPU operators over the tiny set.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastft.data import dali_available


@pytest.fixture(scope="module")
def handoff(bench_script):
    return bench_script("dali_handoff")


def batches(n: int, reuse: bool):
    """n distinct (name, x, y); with `reuse`, every x is written into one buffer, as a
    recycling loader would."""
    gen = torch.Generator().manual_seed(0)
    buffer = torch.empty(4, 3, 8, 8).to(memory_format=torch.channels_last)
    for i in range(n):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        yield f"b{i}", (buffer.copy_(x) if reuse else x), torch.randint(0, 2, (4,), generator=gen)


def test_the_checker_finds_a_reused_buffer_and_passes_fresh_ones(handoff):
    reused = handoff.handoff_check(batches(7, reuse=True), hold=2)
    # Every batch but the last is overwritten by a later one before its second checksum.
    assert reused["batches"] == 7 and reused["rewritten"] == 6
    assert reused["rewritten_batches"] == [f"b{i}" for i in range(6)]
    fresh = handoff.handoff_check(batches(7, reuse=False), hold=2)
    assert fresh["rewritten"] == 0 and fresh["distinct_checksums"] == 7


def test_a_flipped_batch_changes_the_checksum(handoff):
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    assert not torch.equal(handoff.checksum(x, y, {}), handoff.checksum(x.flip(-1), y, {}))


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import here")
def test_dali_never_rewrites_a_held_batch(handoff, tiny_data, tmp_path):
    out = tmp_path / "handoff.json"
    rc = handoff.main(["--data", str(tiny_data), "--device", "cpu", "--image-size", "32", "--batch-size", "4",
                       "--epochs", "2", "--hold", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0
    # 24 train images: 6 batches of 4 per epoch, 2 epochs; 12 test images: 3 batches.
    assert result["batches"] == 15 and result["rewritten"] == 0
    assert result["distinct_checksums"] == 15

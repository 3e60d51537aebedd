"""pytest-benchmark: the engine's training step per strategy, against the reference step in the same test.

CI runs these once with --benchmark-disable (pytest.ini), so they cannot rot and never gate on
absolute times; bench/README.md shows how to save a baseline and compare against it.
Device: CPU, 32 px, batch 8 (conftest's make_cfg). `extra_info` carries examples/sec of both steps
(median of a few steps each, measured the same way) and their ratio.
"""

from __future__ import annotations

import pytest

from fastft.bench import REFERENCE, STRATEGIES, fixed_batch, ready_step, seconds_per_step
from fastft.engine import Trainer

# fastft's own defaults; the loader takes no part in a step, so both variants build the cheap one.
FASTFT = dict(amp="auto", channels_last=True, compile=None, fast_frozen=True, loader="torch")
REFERENCE_STEP = {**REFERENCE, "loader": "torch"}


def trainer_for(make_cfg, tmp_path, name: str, strategy: str, flags: dict):
    return Trainer(make_cfg(strategy=strategy, out=str(tmp_path / name), **flags)).setup()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_step(benchmark, make_cfg, tmp_path, strategy):
    fast = trainer_for(make_cfg, tmp_path, "fastft", strategy, FASTFT)
    ref = trainer_for(make_cfg, tmp_path, "reference", strategy, REFERENCE_STEP)
    x, y = fixed_batch(fast)
    ref_x, ref_y = fixed_batch(ref)
    # CI (disabled) only needs the numbers to exist: one step each, no warm-up, keeps it short.
    steps, warmup = (1, 0) if benchmark.disabled else (5, 1)
    fast_s = seconds_per_step(ready_step(fast), x, y, steps, warmup)
    ref_s = seconds_per_step(ready_step(ref), ref_x, ref_y, steps, warmup)
    batch = y.shape[0]
    benchmark.extra_info.update(
        strategy=strategy, batch=batch, image_size=fast.cfg.image_size, device=str(fast.rt.device),
        examples_per_sec=batch / fast_s, reference_examples_per_sec=batch / ref_s, speedup_vs_reference=ref_s / fast_s)

    before = [p.detach().clone() for p in fast.model.parameters() if p.requires_grad]
    loss, correct = benchmark(ready_step(fast), x, y)
    after = [p.detach() for p in fast.model.parameters() if p.requires_grad]
    # The timed call is a real step: finite loss, a count in range, and the trainable weights moved.
    assert loss.isfinite() and 0 <= int(correct) <= batch
    assert any(not (a == b).all() for a, b in zip(after, before))
    assert fast_s > 0 and ref_s > 0

"""pytest-benchmark: the engine's training step per strategy, against the reference step in the same test.

CI runs these once with --benchmark-disable (pytest.ini), so they cannot rot and never gate on
absolute times; bench/README.md shows how to save a baseline and compare against it.
Device: CPU, one torch thread, 32 px, batch 8 (conftest's make_cfg). `extra_info` carries
examples/sec of both steps (medians over interleaved rounds, see conftest.py) and their ratio,
`speedup_vs_reference`, which bench/compare.py gates on.
"""

from __future__ import annotations

import pytest
import torch

from fastft.bench import REFERENCE, STRATEGIES, fixed_batch, ready_step
from fastft.engine import Trainer

# fastft's own defaults; the loader takes no part in a step, so both variants build the cheap one.
FASTFT = dict(amp="auto", channels_last=True, compile=None, fast_frozen=True, loader="torch")
REFERENCE_STEP = {**REFERENCE, "loader": "torch"}


def trainer_for(make_cfg, tmp_path, name: str, strategy: str, flags: dict):
    return Trainer(make_cfg(strategy=strategy, out=str(tmp_path / name), **flags)).setup()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_step(benchmark, pair, make_cfg, tmp_path, strategy):
    fast = trainer_for(make_cfg, tmp_path, "fastft", strategy, FASTFT)
    ref = trainer_for(make_cfg, tmp_path, "reference", strategy, REFERENCE_STEP)
    x, y = fixed_batch(fast)
    ref_x, ref_y = fixed_batch(ref)
    step, measured = pair(ready_step(fast), ready_step(ref), (x, y), (ref_x, ref_y))
    batch = y.shape[0]
    benchmark.extra_info.update(
        strategy=strategy, batch=batch, image_size=fast.cfg.image_size, device=str(fast.rt.device),
        threads=torch.get_num_threads(), ratio_rounds=measured.rounds,
        examples_per_sec=batch / measured.measured_s, reference_examples_per_sec=batch / measured.reference_s,
        speedup_vs_reference=measured.speedup,
        speedup_vs_reference_cpu=measured.speedup_cpu)

    before = [p.detach().clone() for p in fast.model.parameters() if p.requires_grad]
    loss, correct = benchmark(step, x, y)
    after = [p.detach() for p in fast.model.parameters() if p.requires_grad]
    # The timed call is a real step: finite loss, a count in range, and the trainable weights moved.
    assert loss.isfinite() and 0 <= int(correct) <= batch
    assert any(not (a == b).all() for a, b in zip(after, before))
    assert measured.measured_s > 0 and measured.reference_s > 0

"""The frozen fast path inside the engine: same training, same accuracy as the plain model."""

from __future__ import annotations

import pytest
import torch

from fastft.engine import Trainer
from fastft.fastpath import FeatureCache
from fastft.forward import Forward
from test_fastpath import OneBuffer  # stands in for a replayed CUDA graph's output buffer


def trained(make_cfg, strategy: str, fast_frozen: bool, epochs: int = 1) -> Trainer:
    trainer = Trainer(make_cfg(strategy=strategy, fast_frozen=fast_frozen, epochs=epochs, lr=1e-4,
                               out=f"{make_cfg().out}-{strategy}-{fast_frozen}")).setup()
    trainer.fit()
    return trainer


@pytest.mark.parametrize("strategy", ["frozen", "partial:2"])
def test_fast_path_trains_like_the_plain_model(make_cfg, strategy):
    fast = trained(make_cfg, strategy, fast_frozen=True)
    plain = trained(make_cfg, strategy, fast_frozen=False)
    assert fast.forward.prefix is not None and plain.forward.prefix is None
    start = Trainer(make_cfg(strategy=strategy, out=make_cfg().out + "-0")).setup().model.state_dict()
    fast_state, plain_state = fast.model.state_dict(), plain.model.state_dict()
    trained_names = [n for n, p in fast.model.named_parameters() if p.requires_grad]
    for name in trained_names:
        # Folding BN reorders fp32 arithmetic (~1e-7 relative on the features), and train-mode BN
        # after the prefix amplifies it a little: compare the two runs' difference with the update.
        update = (plain_state[name] - start[name]).norm()
        assert update > 0, name  # the layer did train, so the comparison means something
        assert (fast_state[name] - plain_state[name]).norm() <= 1e-3 * update, name


def test_frozen_evaluation_reuses_kept_features_and_matches_a_full_evaluation(make_cfg):
    trainer = trained(make_cfg, "frozen", fast_frozen=True, epochs=2)
    assert trainer.forward.cache is not None and trainer.forward.cache.ready
    assert trainer.forward.cache.examples == trainer.data.test_size

    calls = []
    real = trainer.data.test_batches
    trainer.data.test_batches = lambda: calls.append(1) or real()
    cached = trainer.evaluate()
    assert calls == []  # the kept features served it: no image was loaded

    # Kept anew from a prefix that returns one buffer every call, as a CUDA graph replay does
    # (12 test images at batch 8: the second batch overwrites the first's rows).
    trainer.forward.cache, trainer.forward.frozen = FeatureCache(), OneBuffer(trainer.forward.prefix)
    aliased = trainer.evaluate()

    trainer.forward.cache = None  # the fast path without kept features
    recomputed = trainer.evaluate()
    trainer.forward = Forward(trainer.model, 5, fast_frozen=False, rt=trainer.rt)  # the plain model
    plain = trainer.evaluate()
    assert cached == aliased == recomputed == plain
    assert cached[1] == trainer.data.test_size

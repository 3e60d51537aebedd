"""pytest-benchmark: the engine's training step per strategy, against two steps timed in the same test.

- the reference: the d2l way through the same engine (fp32, NCHW, no fast path), the figure users
  compare with (`speedup_vs_reference`, `speedup_vs_reference_cpu`);
- the bare step: the same strategy's step written in plain PyTorch (a copy of the model with the
  same trainable tensors, the same AMP dtype and memory layout, torch SGD, summed cross-entropy),
  with no fastft code in its loop (`speedup_vs_bare`, `speedup_vs_bare_cpu`).

bench/compare.py gates on `gate_key` = `speedup_vs_bare_cpu`: a bare step in the same dtype and
layout runs the same oneDNN kernels, so a busy machine slows both sides alike, while the
bf16-against-fp32 reference ratio moved by up to 33% between no-change saves (bench/README.md).
And a regression in the engine's step code slows the measured step only, where the reference,
which runs through the same engine, would hide it.

CI runs these once with --benchmark-disable (pytest.ini), so they cannot rot and never gate on
absolute times. Device: CPU, one torch thread, 32 px, batch 8 (conftest's make_cfg).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastft.bench import REFERENCE, STRATEGIES, fixed_batch, ready_step
from fastft.engine import Trainer

# fastft's own defaults; the loader takes no part in a step, so both variants build the cheap one.
FASTFT = dict(amp="auto", channels_last=True, compile=None, fast_frozen=True, loader="torch")
REFERENCE_STEP = {**REFERENCE, "loader": "torch"}


def trainer_for(make_cfg, tmp_path, name: str, strategy: str, flags: dict):
    return Trainer(make_cfg(strategy=strategy, out=str(tmp_path / name), **flags)).setup()


def bare_step(trainer):
    """`trainer`'s step in plain PyTorch: (x, y) -> (summed loss, correct count), on a copy of its
    model (`step.model`; the strategy's frozen tensors stay frozen, its BN modes and its lr groups
    stay), its AMP dtype, torch SGD."""
    model = copy.deepcopy(trainer.model)
    cfg, dtype = trainer.cfg, trainer.rt.amp_dtype
    trainer.strategy.set_train_mode(model)  # set-up only: nothing of fastft runs in the step
    groups = trainer.strategy.param_groups(model, cfg.lr, cfg.head_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def step(x, y):
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), (logits.detach().argmax(dim=1) == y).sum()
    step.model = model
    return step


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_step(benchmark, pair, make_cfg, tmp_path, strategy):
    fast = trainer_for(make_cfg, tmp_path, "fastft", strategy, FASTFT)
    ref = trainer_for(make_cfg, tmp_path, "reference", strategy, REFERENCE_STEP)
    x, y = fixed_batch(fast)
    ref_x, ref_y = fixed_batch(ref)
    bare = bare_step(fast)
    step, pairs = pair(ready_step(fast), (x, y), reference=(ready_step(ref), (ref_x, ref_y)),
                       bare=(bare, (x, y)))
    reference, same_precision = pairs["reference"], pairs["bare"]
    batch = y.shape[0]
    benchmark.extra_info.update(
        strategy=strategy, batch=batch, image_size=fast.cfg.image_size, device=str(fast.rt.device),
        amp=fast.rt.amp_name, threads=torch.get_num_threads(), ratio_rounds=reference.rounds,
        examples_per_sec=batch / reference.measured_s, reference_examples_per_sec=batch / reference.reference_s,
        bare_examples_per_sec=batch / same_precision.reference_s,
        speedup_vs_reference=reference.speedup, speedup_vs_reference_cpu=reference.speedup_cpu,
        speedup_vs_bare=same_precision.speedup, speedup_vs_bare_cpu=same_precision.speedup_cpu,
        gate_key="speedup_vs_bare_cpu")

    before = [p.detach().clone() for p in fast.model.parameters() if p.requires_grad]
    loss, correct = benchmark(step, x, y)
    after = [p.detach() for p in fast.model.parameters() if p.requires_grad]
    # The timed call is a real step: finite loss, a count in range, and the trainable weights moved.
    assert loss.isfinite() and 0 <= int(correct) <= batch
    assert any(not (a == b).all() for a, b in zip(after, before))
    assert reference.measured_s > 0 and reference.reference_s > 0 and same_precision.reference_s > 0


def test_bare_step_is_the_engines_step(make_cfg, tmp_path):
    """The gate's bare step does the engine's work: from equal weights, one step of each on the
    same batch gives the same loss and the same updated weights (fp32, no fast path, so equal
    kernels; the engine's summed loss x world size 1 is the bare summed loss)."""
    fast = trainer_for(make_cfg, tmp_path, "fastft", "partial:2",
                       dict(FASTFT, amp="off", fast_frozen=False, compile=False))
    x, y = fixed_batch(fast)
    bare = bare_step(fast)
    start = {name: p.detach().clone() for name, p in fast.model.named_parameters()}
    loss_bare, correct_bare = bare(x, y)
    loss_fast, correct_fast = ready_step(fast)(x, y)
    torch.testing.assert_close(loss_bare, loss_fast)
    assert int(correct_bare) == int(correct_fast)
    moved = 0
    for (name, p_fast), p_bare in zip(fast.model.named_parameters(), bare.model.parameters()):
        torch.testing.assert_close(p_bare, p_fast, msg=name)
        moved += not torch.equal(p_fast, start[name])
    # Every trainable tensor moved, and moved alike; the frozen ones stayed.
    assert moved == sum(p.requires_grad for p in fast.model.parameters()) > 0

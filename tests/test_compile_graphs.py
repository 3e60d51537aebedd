"""torch.compile's graphs, counted: each compiled piece compiles on its own, with fixed shapes,
and the summary's graph and recompile counts are the true ones.

torch.compile is replaced by one that keeps the engine's arguments but compiles with a
backend that records every graph Dynamo hands over (and then runs it eagerly): Dynamo's
tracing, guards, caches and limits are the real ones, and no Inductor compile is paid.
"""

from __future__ import annotations

import collections

import pytest
import torch

from fastft import bench, engine
from fastft.config import TrainConfig
from fastft.engine import Trainer
from fastft.fastpath import TrainableSuffix


@pytest.fixture
def graphs(monkeypatch):
    """piece class name -> [the batch size of each graph compiled for it]; Dynamo fresh before and after."""
    torch._dynamo.reset()
    real_compile = torch.compile
    recorded = collections.defaultdict(list)
    backends = {}  # one per piece class, as "inductor" is one backend: Dynamo's caches match on it

    def recording_backend(name: str):
        def backend(gm: torch.fx.GraphModule, example_inputs):
            inputs = {n.name: n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"}
            sizes = [d for v in inputs.values() if isinstance(v, torch.Tensor) for d in v.shape]
            assert all(isinstance(d, int) for d in sizes), f"{name}: a symbolic shape {sizes}"
            recorded[name].append(inputs["l_x_"].shape[0])  # forward's argument x, after the parameters
            return gm.forward
        return backend

    def recording_compile(module, *, mode=None, dynamic=None, **kwargs):
        assert dynamic is False and mode is None and not kwargs  # what the engine asks for, on CPU
        name = type(module).__name__
        backend = backends.setdefault(name, recording_backend(name))
        return real_compile(module, backend=backend, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", recording_compile)
    yield recorded
    torch._dynamo.reset()  # leave no recording graph cached for a later test


def test_each_piece_compiles_one_fixed_shape_graph_per_mode_and_batch_size(make_cfg, graphs):
    """partial:2: 2 epochs of 3 steps at batch 8, each followed by an evaluation of 12 images
    (batches of 8 and 4). The prefix always runs in one mode (eval, no grad): one graph per batch
    size. The suffix trains (8) and evaluates (8 and 4). Nothing compiles after epoch 1."""
    summary = Trainer(make_cfg(strategy="partial:2", compile=True, epochs=2)).setup().fit()
    assert sorted(graphs["FrozenPrefix"]) == [4, 8]
    assert sorted(graphs["TrainableSuffix"]) == [4, 8, 8]
    assert set(graphs) == {"FrozenPrefix", "TrainableSuffix"}
    assert summary["compiled_graphs"] == 5
    assert summary["recompiles"] == 0 and summary["eager_fallbacks"] == 0


def test_a_frame_past_the_recompile_limit_counts_as_a_recompile(make_cfg, graphs):
    """With the limit at 1, each piece's second graph (the test batch of 4 for the prefix, eval mode
    for the head) is refused and runs eagerly, adding no graph: recompiles must not read 0."""
    with torch._dynamo.config.patch(recompile_limit=1):
        summary = Trainer(make_cfg(strategy="frozen", compile=True)).setup().fit()
    assert graphs["FrozenPrefix"] == [8] and graphs["TrainableSuffix"] == [8]
    assert summary["compiled_graphs"] == 2
    assert summary["eager_fallbacks"] == 2  # one frame per piece; Dynamo then leaves it eager
    assert summary["recompiles"] == 2


def test_bench_resets_dynamo_so_each_run_compiles_its_own_graphs(graphs, monkeypatch):
    """Two runs of one configuration in one process: without a reset the second would reuse the
    first's graph (instances of one class share it), and its compile time and count would read 0."""
    class OneGraphRun:  # the engine's part, shrunk: compile one piece and run it
        def __init__(self, cfg):
            pass

        def setup(self):
            return self

        def fit(self) -> dict:
            piece = torch.compile(TrainableSuffix(torch.nn.Linear(4, 2)), dynamic=False)
            piece(torch.randn(8, 4))
            return {}

    monkeypatch.setattr(engine, "Trainer", OneGraphRun)
    for _ in range(2):
        bench.run_once(TrainConfig(), quiet_run=False)
    assert graphs["TrainableSuffix"] == [8, 8]

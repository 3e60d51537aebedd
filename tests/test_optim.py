"""build_optimizer: the chapter's SGD update, and apex FusedSGD taking the same one or saying how to get it."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fastft.config import TrainConfig
from fastft.errors import ConfigError
from fastft.optim import APEX_BUILD, build_optimizer

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.01)


def two_groups() -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    body = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    head = torch.nn.Parameter(torch.tensor([0.5]))
    return [{"params": [body], "lr": 0.1}, {"params": [head], "lr": 1.0}], body, head


def test_sgd_on_cpu_takes_the_expected_momentum_and_weight_decay_steps():
    groups, body, head = two_groups()
    optimizer = build_optimizer(groups, TrainConfig(optimizer="sgd", **HYPER), "cpu")
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    expected, buffers = [body.detach().clone(), head.detach().clone()], [None, None]
    for grads in ([torch.tensor([0.3, 0.4]), torch.tensor([-1.0])], [torch.tensor([0.1, -0.2]), torch.tensor([2.0])]):
        body.grad, head.grad = grads[0].clone(), grads[1].clone()
        optimizer.step()
        for i, (grad, lr) in enumerate(zip(grads, (0.1, 1.0))):
            d = grad + HYPER["weight_decay"] * expected[i]            # L2 added to the gradient
            buffers[i] = d if buffers[i] is None else HYPER["momentum"] * buffers[i] + d
            expected[i] = expected[i] - lr * buffers[i]               # each group at its own lr
    torch.testing.assert_close(body.detach(), expected[0])
    torch.testing.assert_close(head.detach(), expected[1])


def test_sgd_for_cuda_asks_for_the_fused_kernel():
    if not torch.cuda.is_available():
        # Only the flag choice is under test; CPU parameters accept fused=True in recent torch.
        try:
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
        except RuntimeError as exc:
            pytest.skip(f"this torch has no fused SGD for CPU tensors, and no CUDA is here: {exc}")
    groups, _, _ = two_groups()
    optimizer = build_optimizer(groups, TrainConfig(optimizer="sgd", **HYPER), torch.device("cuda"))
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]


@pytest.fixture
def no_apex(monkeypatch):
    """apex unimportable, even where it happens to be installed."""
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)


def test_missing_apex_says_in_one_line_that_it_is_not_on_pypi_and_how_to_build_it(no_apex):
    groups, _, _ = two_groups()
    with pytest.raises(ConfigError) as info:
        build_optimizer(groups, TrainConfig(optimizer="apex-sgd"), "cuda")
    message = info.value.one_line()
    assert message == str(info.value) and "\n" not in message
    assert "not on PyPI" in message and APEX_BUILD in message and "--optimizer sgd" in message


def fake_apex(monkeypatch, fused_sgd) -> None:
    apex, optimizers = types.ModuleType("apex"), types.ModuleType("apex.optimizers")
    optimizers.FusedSGD = fused_sgd
    apex.optimizers = optimizers
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)


def test_apex_sgd_on_a_cpu_is_refused_clearly(monkeypatch):
    fake_apex(monkeypatch, lambda *a, **k: pytest.fail("FusedSGD must not be built for CPU tensors"))
    groups, _, _ = two_groups()
    with pytest.raises(ConfigError, match="CUDA only.*use --optimizer sgd"):
        build_optimizer(groups, TrainConfig(optimizer="apex-sgd"), "cpu")


def test_apex_without_its_cuda_extensions_says_how_to_rebuild(monkeypatch):
    def fused_sgd(*args, **kwargs):
        raise RuntimeError("apex.optimizers.FusedSGD requires cuda extensions")
    fake_apex(monkeypatch, fused_sgd)
    groups, _, _ = two_groups()
    with pytest.raises(ConfigError, match="without its CUDA extensions") as info:
        build_optimizer(groups, TrainConfig(optimizer="apex-sgd"), "cuda")
    assert APEX_BUILD in str(info.value)


def test_apex_sgd_passes_the_configs_hyperparameters(monkeypatch):
    seen = {}
    fake_apex(monkeypatch, lambda groups, **hyper: seen.update(hyper) or "fused-sgd")
    groups, _, _ = two_groups()
    assert build_optimizer(groups, TrainConfig(optimizer="apex-sgd", **HYPER), "cuda") == "fused-sgd"
    assert seen == HYPER


def test_apex_sgd_takes_the_same_update_as_torch_sgd():
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        pytest.skip("NVIDIA apex is not installed (it is not on PyPI); the apex-vs-torch update runs where it is")
    if not torch.cuda.is_available():
        pytest.skip("apex FusedSGD needs CUDA tensors and no CUDA device is here")
    torch.manual_seed(0)
    start = torch.randn(1000, device="cuda")
    grads = [torch.randn(1000, device="cuda") for _ in range(3)]
    results = []
    for name in ("sgd", "apex-sgd"):
        param = torch.nn.Parameter(start.clone())
        optimizer = build_optimizer([{"params": [param]}], TrainConfig(optimizer=name, **HYPER), "cuda")
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)

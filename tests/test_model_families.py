"""Every model family's Structure and fast paths are exact, as test_fastpath.py proves for ResNet-18.

Per family (tests/family_cases.py: ResNet, EfficientNet, MobileNet V3, ConvNeXt, ViT, two timm
models), with non-trivial random weights at 32 px:
  1. the Structure covers every parameter once, and its sequence computes model(x);
  2. split_for_training at each K: suffix(prefix(x)) == model(x), the prefix a grad-free copy,
     the suffix the model's own modules, BN folded wherever plain conv + BN pairs are;
  3. one SGD step through the fast path equals the reference step (frozen, partial:1, probe);
  4. a few steps leave every frozen BatchNorm's statistics bit-identical;
  5. `fastft train` runs every strategy for each family end to end (see the CLI section).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from family_cases import (CASES, CONVNEXT, EFFICIENTNET, RESNET18, TIMM_BN, TRAINED, VIT, WITH_BN, Case, build, params,
                          plain_bn_count, state_names)
from fastft.checkpoint import load_checkpoint
from fastft.cli import main
from fastft.data import dali_available
from fastft.fastpath import split_for_training
from fastft.forward import Forward, fast_path_line
from fastft.models import get_spec
from fastft.runtime import Runtime
from fastft.strategy import ALL, Strategy, get_strategy

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, channels_last=False, workers=0)


@pytest.fixture(scope="module")
def zoo():
    """build(case), once per module: every test that changes a model deep-copies it first."""
    built: dict[str, tuple[nn.Module, object]] = {}

    def get(case: Case):
        if case.name not in built:
            built[case.name] = build(case)
        return built[case.name]
    yield get
    built.clear()


def images(case: Case, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, case.size, case.size, generator=torch.Generator().manual_seed(seed))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# --- 1. the Structure -----------------------------------------------------------------------

@pytest.mark.parametrize("case", params(CASES))
def test_structure_covers_every_parameter_once_and_its_sequence_is_the_forward(zoo, case):
    model, structure = zoo(case)
    seen = Counter(id(p) for unit in structure.units for p in unit.parameters())
    seen.update(id(p) for m in structure.tail for p in m.parameters())
    seen.update(id(p) for p in structure.head.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(seen) == set(names), "parameters outside the model, or the model's outside the Structure"
    assert [names[i] for i, count in seen.items() if count > 1] == []
    assert structure.head is model.get_submodule(structure.head_path)
    if structure.sequence is None:
        assert case.name.startswith("timm:")  # timm's forward is not described (TimmFamily)
        return
    order = [unit for unit, _ in structure.sequence]
    assert order == sorted(order) and set(order) == set(range(len(structure.units) + 2))
    x = images(case)
    with torch.no_grad():
        expected, got = model(x), x
        for _, module in structure.sequence:
            got = module(got)
    # Logits that do not depend on the image (a zero head, a dead signal) would make any sequence "equal".
    assert (expected[0] - expected[1]).abs().max() > 1e-2 * expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


# --- 2. the split at every K ----------------------------------------------------------------

def split_cells():
    for case in CASES:
        for k in case.ks or range(case.units() + 1):
            yield pytest.param(case, k, marks=case.marks, id=f"{case.id}-K{k}")


# Folding reorders fp32 rounding, which a deep network amplifies: against its own fp64 logits the
# unsplit fp32 model of family_cases is off by up to 4.5e-5 relative (resnet50), 3e-6 (resnet18).
# A fold that lost a BN term is off by percents.
SPLIT_TOL = 3e-4


@pytest.mark.parametrize("case, k", list(split_cells()))
def test_split_equals_the_model_and_keeps_its_own_trainable_modules(zoo, case, k):
    model, structure = zoo(case)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    split = split_for_training(model, k, structure=structure)
    whole = k == len(structure.units)
    if structure.sequence is None and 0 < k < len(structure.units):
        assert split is None  # no described forward: a part frozen runs inside the whole model
        return
    frozen = {id(p) for u in structure.units[:k] for p in u.parameters()}
    frozen |= {id(p) for m in structure.tail for p in m.parameters()} if whole else set()
    own = {id(p) for p in model.parameters()}
    assert {id(p) for p in split.suffix.parameters()} == own - frozen  # the model's own objects
    x = images(case)
    with torch.no_grad():
        expected, got = model(x), split(x)
    assert (got - expected).abs().max() <= SPLIT_TOL * expected.abs().max(), rel_error(got, expected)
    if k == 0:
        assert split.prefix is None and split.folded == 0
        return
    assert not {id(p) for p in split.prefix.parameters()} & own  # a copy
    assert not any(p.requires_grad for p in split.prefix.parameters()) and not split.prefix.training
    frozen_modules = [m for u in structure.units[:k] for m in u.modules] + (list(structure.tail) if whole else [])
    bns = plain_bn_count(frozen_modules)
    if case.folds:
        assert split.folded == bns > 0  # every pair folded: none is left in the prefix
        assert plain_bn_count([split.prefix]) == 0
    else:
        assert split.folded == 0 == bns
    if whole:
        assert split.prefix(x).shape == (2, structure.feature_dim)
    for name, tensor in model.state_dict().items():  # folding worked on a copy
        assert torch.equal(tensor, before[name]), name


def test_an_exact_fold_is_kept_whatever_the_model_does_at_64_px():
    # BN statistics measured at 32 px only: at 32 px the folded prefix is within 1e-5 of the
    # unfolded one (measured), at 64 px this random EfficientNet's logits reach 1e5 and the
    # rounding differences 1e-2 of them.
    model, structure = build(EFFICIENTNET, probe_side=None)
    split = split_for_training(model, len(structure.units), structure=structure)
    x = images(EFFICIENTNET)
    with torch.no_grad():
        assert rel_error(split(x), model(x)) < 1e-5
    assert split.folded == plain_bn_count([m for u in structure.units for m in u.modules]) == 49


@pytest.mark.skipif(bool(TIMM_BN.marks), reason="needs timm: pip install timm")
def test_the_fast_path_line_names_batch_norms_left_unfolded(zoo):
    model, structure = zoo(TIMM_BN)
    forward = Forward(copy.deepcopy(model), len(structure.units), True, CPU, structure=get_spec(TIMM_BN.name)
                      .structure(model))
    assert forward.folded == 0 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in forward.prefix.modules())
    line = fast_path_line(TIMM_BN.name, structure, len(structure.units), forward)
    assert "no BatchNorm to fold" not in line, line


# --- 3. one training step, fast and reference -----------------------------------------------

LR = 1e-3


def stepped(case, model, strategy_name: str, fast: bool, x, y) -> tuple[nn.Module, Forward]:
    """A copy of `model` after one SGD step the engine's way (sum loss, head at 10 x lr)."""
    model = copy.deepcopy(model)
    structure = get_spec(case.name).structure(model)
    strategy = get_strategy(strategy_name)
    strategy.freeze(model, structure)
    strategy.set_train_mode(model, structure)
    forward = Forward(model, strategy.frozen_units(structure), fast, CPU, structure=structure)
    optimizer = torch.optim.SGD(strategy.param_groups(model, LR, 10.0, structure), lr=LR)
    torch.manual_seed(5)  # dropout and stochastic depth draw alike in both runs
    if strategy.keep_train_features:  # probe: the head on the prefix's kept features
        logits = forward.head(forward.features(x))
    else:
        logits = forward(x)
    loss = F.cross_entropy(logits, y, reduction="sum")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return model, forward


@pytest.mark.parametrize("strategy", ["frozen", "partial:1", "probe"])
@pytest.mark.parametrize("case", params(TRAINED))
def test_a_fast_step_trains_like_the_reference_step(zoo, case, strategy):
    base, structure = zoo(case)
    x, y = images(case, n=4), torch.tensor([0, 1, 1, 0])
    fast, forward = stepped(case, base, strategy, True, x, y)
    plain, reference = stepped(case, base, strategy, False, x, y)
    assert reference.prefix is None
    assert (forward.prefix is not None) == (structure.sequence is not None or strategy != "partial:1")
    start = dict(base.named_parameters())
    plain_params = dict(plain.named_parameters())
    updates = {n: (plain_params[n] - start[n]).detach().norm() for n, p in fast.named_parameters() if p.requires_grad}
    assert updates and updates[f"{structure.head_path}.weight"] > 0
    # A BN bias whose output feeds straight into a conv and a train-mode BN has a gradient that is
    # zero in exact arithmetic (the next BN removes any per-channel shift): its "update" is rounding.
    scale = max(updates.values())
    assert sum(u > 1e-6 * scale for u in updates.values()) >= 0.8 * len(updates)  # the step trained
    for name, p in fast.named_parameters():
        if name not in updates:
            assert torch.equal(p, start[name]) and torch.equal(plain_params[name], start[name]), name
            continue
        # test_engine_fastpath.py's measure: folding reorders fp32 rounding, nothing more.
        diff = (p - plain_params[name]).detach().norm()
        assert diff <= 1e-3 * updates[name] + 1e-6 * scale, (name, diff, updates[name])


# --- 4. frozen BatchNorm statistics ---------------------------------------------------------

def bn_stats(modules) -> dict[int, list[torch.Tensor]]:
    return {id(m): [m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()]
            for top in modules for m in top.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def bn_cells():
    for case in WITH_BN:
        for strategy in ("frozen", "partial:1", f"partial:{case.units() - 2}"):  # the stem and all but one stage
            for fast in (True, False):
                yield pytest.param(case, strategy, fast, marks=case.marks, id=f"{case.id}-{strategy}-{'fast' if fast else 'plain'}")


@pytest.mark.parametrize("case, strategy_name, fast", list(bn_cells()))
def test_frozen_batch_norm_statistics_stay_bit_identical(zoo, case, strategy_name, fast):
    model = copy.deepcopy(zoo(case)[0])
    structure = get_spec(case.name).structure(model)
    strategy = get_strategy(strategy_name)
    strategy.freeze(model, structure)
    frozen_bns = bn_stats(strategy.frozen_modules(model, structure))
    every = bn_stats([model])
    assert frozen_bns and set(frozen_bns) <= set(every)
    forward = Forward(model, strategy.frozen_units(structure), fast, CPU, structure=structure)
    optimizer = torch.optim.SGD(strategy.param_groups(model, LR, 10.0, structure), lr=LR, momentum=0.9)
    for step in range(3):
        strategy.set_train_mode(model, structure)
        loss = F.cross_entropy(forward(images(case, n=4, seed=step)), torch.tensor([0, 1, 1, 0]), reduction="sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = bn_stats([model])
    for key, stats in every.items():
        if key in frozen_bns:
            assert all(torch.equal(a, b) for a, b in zip(after[key], stats)), "a frozen BN moved"
        else:
            assert not torch.equal(after[key][0], stats[0]) and after[key][2] == stats[2] + 3
    assert len(every) > len(frozen_bns) or strategy_name == "frozen"


# --- 5. `fastft train` end to end -----------------------------------------------------------
# Every strategy for every family on the torch and cached loaders (and DALI for ResNet-18); the
# cells that take longest (ConvNeXt-T, ViT-B: 28M and 86M parameters, their checkpoints written
# each run) and a second loader for the small families are `slow`. About 1-10 s a cell.

STRATEGIES = ("finetune", "frozen", "probe", "scratch", "partial:1", "hotdog")


def cli_cells():
    for case in TRAINED:
        for i, strategy in enumerate(STRATEGIES):
            loaders = ["torch", "cached"] + (["dali"] if case is RESNET18 else [])
            for loader in loaders:
                # ResNet-18 runs the whole grid; the small families each strategy once, the loader
                # alternating; ConvNeXt and ViT one cell each (frozen, probe), the rest slow.
                if case is RESNET18:
                    quick = loader != "dali" or strategy in ("frozen", "probe", "partial:1")
                elif case in (CONVNEXT, VIT):
                    quick = (case, strategy, loader) in ((CONVNEXT, "frozen", "torch"), (VIT, "probe", "cached"))
                else:
                    quick = loader == ("torch", "cached")[(i + TRAINED.index(case)) % 2]
                marks = case.marks + ([] if quick else [pytest.mark.slow])
                if loader == "dali":
                    marks.append(pytest.mark.skipif(not dali_available(), reason="no DALI"))
                yield pytest.param(case, strategy, loader, marks=marks, id=f"{case.id}-{strategy}-{loader}")


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory):
    """A 1000-class state_dict file per family, non-trivial weights (ImageNet stands in: hotdog
    seeds its head from the file's 1000-way head, and frozen runs are compared with it)."""
    made: dict[str, Path] = {}

    def get(case: Case) -> Path:
        if case.name not in made:
            model, _ = build(case, num_classes=1000, seed=7)
            made[case.name] = tmp_path_factory.mktemp("weights") / f"{case.id}.pth"
            torch.save(model.state_dict(), made[case.name])
        return made[case.name]
    return get


def expected_fast_path(case: Case, strategy: Strategy, model: nn.Module, structure) -> tuple[str, str] | None:
    """(start, end) of the log's fast-path line; None where nothing is frozen."""
    k = strategy.frozen_units(structure)
    if k == 0:
        return None
    names = ", ".join(unit.name for unit in structure.units[:k])
    if structure.sequence is None and k < len(structure.units):
        return (f"fast path: {case.name}'s frozen {names} run inside the model without autograd (no split: "
                f"the family describes no forward sequence, so no BatchNorm folding)", "")
    start = f"fast path: frozen {names} run apart in inference mode without autograd, "
    if case.folds:
        start += f"{plain_bn_count(strategy.frozen_modules(model, structure))} BatchNorm(s) folded"
    return start, "; test features computed once and kept" if k == len(structure.units) else ""


def train_argv(case: Case, strategy: str, loader: str, weights: str, run: Path) -> list[str]:
    return ["train", "--data", "synthetic", "--synth-train", "16", "--synth-test", "8", "--epochs", "1",
            "--batch-size", "8", "--model", case.name, "--image-size", str(case.size), "--strategy", strategy,
            "--loader", loader, "--device", "cpu", "--amp", "off", "--no-compile", "--out", str(run),
            "--weights", weights]


def test_a_weights_file_loads_for_any_family(imagenet_files, tmp_path, capsys):
    argv = train_argv(EFFICIENTNET, "frozen", "torch", str(imagenet_files(EFFICIENTNET)), tmp_path / "run")
    assert main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize("case, strategy_name, loader", list(cli_cells()))
def test_every_strategy_trains_end_to_end(case, strategy_name, loader, imagenet_files, tmp_path, capsys):
    weights, run = imagenet_files(case), tmp_path / "run"
    argv = train_argv(case, strategy_name, loader, "none" if strategy_name == "scratch" else str(weights), run)
    assert main(argv) == 0, capsys.readouterr().err
    log = capsys.readouterr().out.splitlines()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_examples"] == 8 and summary["loader"] == loader

    spec = get_spec(case.name)
    model = spec.build(2, case.size)
    structure, strategy = spec.structure(model), get_strategy(strategy_name)
    lines = [line for line in log if line.startswith("fast path:")]
    expected = expected_fast_path(case, strategy, model, structure)
    if expected is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(expected[0]) and lines[0].endswith(expected[1]), lines
        assert case.folds or "BatchNorm(s) folded" not in lines[0]
    if strategy_name == "hotdog":
        path = structure.head_path
        assert f"  {path} seeded from the file's 1000-way {path}: 'hotdog' takes ImageNet row 934, every " \
               f"other class the mean of the other 999 rows" in log

    saved, source = load_checkpoint(run)["model"], torch.load(weights, weights_only=True)
    head = {n for n in saved if n.startswith(structure.head_path + ".")}
    frozen = state_names(model, strategy.frozen_modules(model, structure), strategy.frozen_parameters(model, structure))
    same = {n for n in saved if n not in head and torch.equal(saved[n], source[n])}
    if strategy_name == "scratch":  # --weights none: nothing of the file
        assert not {n for n in same if n.endswith("weight")}
        return
    assert frozen <= same  # every frozen tensor as it started, BN statistics included
    if strategy.frozen_stages == ALL:
        assert same == set(saved) - head  # the whole backbone
    else:  # every unit it trains moved: some tensor of each differs from the file
        for unit in structure.units[strategy.frozen_units(structure):]:
            assert not state_names(model, unit.modules, unit.parameters()) <= same, unit.name

"""Each strategy's effect on a real model after real steps: what trained, what stayed bit-identical."""

from __future__ import annotations

import pytest
import torchvision
import torch

from fastft.engine import Trainer
from fastft.errors import ConfigError, WeightsError
from fastft.strategy import IMAGENET_HOTDOG_ROW, get_strategy

BACKBONE = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def changed_after_training(make_cfg, strategy: str) -> tuple[Trainer, set[str], set[str]]:
    """Train one epoch (3 steps); return the trainer and the changed / unchanged state names."""
    trainer = Trainer(make_cfg(strategy=strategy)).setup()
    before = snapshot(trainer.model)
    trainer.train_epoch(0)
    after = snapshot(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    return trainer, changed, set(before) - changed


def test_finetune_changes_every_parameter_and_bn_statistic(make_cfg):
    trainer, changed, unchanged = changed_after_training(make_cfg, "finetune")
    assert unchanged == set(), f"finetune left these untouched: {sorted(unchanged)[:5]}"
    lrs = [group["lr"] for group in trainer.optimizer.param_groups]
    assert lrs == pytest.approx([1e-3, 1e-2])  # head at --head-lr-mult 10


def test_frozen_backbone_is_bit_identical_and_only_the_head_trains(make_cfg):
    trainer, changed, unchanged = changed_after_training(make_cfg, "frozen")
    assert changed == {"fc.weight", "fc.bias"}
    assert {n for n in unchanged if "running_" in n}, "BN running statistics must be among the unchanged"
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if not n.startswith("fc."))
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [2]


@pytest.mark.parametrize("fast_frozen", [False, True])
def test_frozen_backbone_records_no_autograd_graph(make_cfg, fast_frozen):
    trainer = Trainer(make_cfg(strategy="frozen", fast_frozen=fast_frozen)).setup()
    # The fast path runs a BN-folded copy of the backbone; the reference runs the model's own.
    layer4 = trainer.forward.prefix[-3] if fast_frozen else trainer.model.layer4
    seen = []
    layer4.register_forward_hook(lambda m, i, out: seen.append(out.grad_fn))
    trainer.train_epoch(0)
    assert seen and all(fn is None for fn in seen)
    assert not trainer.model.layer4.training and trainer.model.fc.training


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_partial_freezes_the_stem_and_first_k_stages_exactly(make_cfg, k):
    _, changed, unchanged = changed_after_training(make_cfg, f"partial:{k}")
    frozen_prefixes = ("conv1.", "bn1.") + tuple(f"layer{i}." for i in range(1, k + 1))
    expect_frozen = {n for n in changed | unchanged if n.startswith(frozen_prefixes)}
    assert unchanged == expect_frozen
    assert changed == (changed | unchanged) - expect_frozen


def test_hotdog_head_rows_come_from_imagenet_row_934(make_cfg, imagenet_like, capsys):
    source = torch.load(imagenet_like, weights_only=True)
    trainer = Trainer(make_cfg(strategy="hotdog")).setup()
    # The load report lists the file's fc as skipped for its shape; the next line says where the head came from.
    lines = capsys.readouterr().out.splitlines()
    skipped = next(i for i, line in enumerate(lines) if line.startswith("  skipped for a shape mismatch: fc"))
    assert lines[skipped + 1:].count("  fc seeded from the file's 1000-way fc: 'hotdog' takes ImageNet row 934, "
                                     "every other class the mean of the other 999 rows") == 1
    classes = list(trainer.data.classes)
    hot, other = classes.index("hotdog"), classes.index("not-hotdog")
    weight, bias = trainer.model.fc.weight.detach(), trainer.model.fc.bias.detach()
    rest = torch.ones(1000, dtype=torch.bool)
    rest[IMAGENET_HOTDOG_ROW] = False
    assert torch.equal(weight[hot], source["fc.weight"][IMAGENET_HOTDOG_ROW])
    assert torch.equal(bias[hot], source["fc.bias"][IMAGENET_HOTDOG_ROW])
    torch.testing.assert_close(weight[other], source["fc.weight"][rest].mean(0))
    torch.testing.assert_close(bias[other], source["fc.bias"][rest].mean())
    assert not torch.equal(weight[hot], weight[other])


def test_hotdog_needs_a_hotdog_class(make_cfg, tmp_path, tiny_data):
    import shutil
    root = tmp_path / "cats"
    for split in ("train", "test"):
        shutil.copytree(tiny_data / split / "hotdog", root / split / "cat")
        shutil.copytree(tiny_data / split / "not-hotdog", root / split / "dog")
    with pytest.raises(ConfigError, match="class named 'hotdog'"):
        Trainer(make_cfg(strategy="hotdog", data=str(root))).setup()


def test_hotdog_needs_a_1000_way_fc(make_cfg, tmp_path):
    import torchvision
    path = tmp_path / "two_way.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), path)
    with pytest.raises(WeightsError, match="1000-way"):
        Trainer(make_cfg(strategy="hotdog", weights=str(path))).setup()


def test_scratch_uses_one_group_at_ten_times_lr_and_no_pretrained_weights(make_cfg, imagenet_like):
    trainer = Trainer(make_cfg(strategy="scratch", weights="")).setup()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-2])
    source = torch.load(imagenet_like, weights_only=True)
    assert not torch.equal(trainer.model.conv1.weight.detach(), source["conv1.weight"])


@pytest.mark.parametrize("spec", ["partial:x", "unfreeze", "partial"])
def test_unknown_strategy_is_a_clear_error(spec):
    with pytest.raises(ConfigError, match="unknown strategy"):
        get_strategy(spec)


def test_partial_beyond_the_models_stages_names_its_stages():
    """K is checked against the model: ResNet-18 has 4 stages after the stem, ViT's 12 blocks 4 groups."""
    from fastft.models import describe
    resnet = describe(torchvision.models.resnet18(num_classes=2))
    assert get_strategy("partial:4").frozen_units(resnet) == 5
    with pytest.raises(ConfigError, match=r"4 stage\(s\) after the stem \(layer1, layer2, layer3, layer4\); "
                                          r"use partial:0..4"):
        get_strategy("partial:5").frozen_units(resnet)

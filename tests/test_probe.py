"""--strategy probe: the head trains on kept features exactly as it would through the frozen model,
the train set is read once per run, resume is exact, and every backend gives the train split
through the test transform, each image once over all processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastft.data.torch_loader as torch_loader
from fastft.checkpoint import load_checkpoint
from fastft.data import dali_available
from fastft.data.layout import scan_dataset
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastft.engine import Trainer, train
from fastft.fastpath import TrainFeatures
from fastft.runtime import Runtime

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_head_step_on_kept_features_equals_the_step_through_the_frozen_model(make_cfg):
    """Same images, same initial head, one SGD step each way: the plain frozen model (no fast
    path, BN unfolded in eval mode) on the images, and probe's head on their kept features."""
    frozen = Trainer(make_cfg(strategy="frozen", fast_frozen=False, out=make_cfg().out + "-f")).setup()
    probe = Trainer(make_cfg(strategy="probe", out=make_cfg().out + "-p")).setup()
    assert frozen.forward.prefix is None and probe.forward.prefix is not None
    x, y = map(torch.cat, zip(*(probe._to_device(x, y) for x, y in probe.data.train_eval_batches())))
    x, y = x[8:16], y[8:16]  # the files are in class order: this batch holds both classes
    assert len(y) == 8 and set(y.tolist()) == {0, 1}
    before = {n: p.detach().clone() for n, p in frozen.model.named_parameters()}
    for name, p in probe.model.named_parameters():
        assert torch.equal(p, before[name]), name  # the same starting point
    frozen.strategy.set_train_mode(frozen.model)
    probe.strategy.set_train_mode(probe.model)
    frozen_loss, frozen_correct = frozen.train_step(x, y)
    probe_loss, probe_correct = probe.train_step(probe.forward.features(x), y, features=True)
    torch.testing.assert_close(probe_loss, frozen_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(probe_correct, frozen_correct)
    after, reference = dict(probe.model.named_parameters()), dict(frozen.model.named_parameters())
    for name in ("fc.weight", "fc.bias"):
        update = reference[name].detach() - before[name]
        assert update.abs().max() > 1e-4, name  # the step moved the head: the comparison means something
        torch.testing.assert_close(after[name].detach(), reference[name].detach(), rtol=1.3e-6, atol=1e-6)
        assert (after[name] - reference[name]).norm() <= 1e-4 * update.norm(), name
    for name, p in after.items():
        if not name.startswith("fc."):
            assert torch.equal(p, before[name]), name


def test_probe_reads_each_image_once_per_run_and_trains_the_head_alone(make_cfg, monkeypatch):
    loads = []
    real = torch_loader.load_rgb
    monkeypatch.setattr(torch_loader, "load_rgb", lambda path: loads.append(path) or real(path))
    cfg = make_cfg(strategy="probe", epochs=3, lr=1e-2)
    trainer = Trainer(cfg).setup()
    start = {n: p.detach().clone() for n, p in trainer.model.state_dict().items()}
    summary = trainer.fit()
    train_files, test_files = (trainer.layout.files[s] for s in ("train", "test"))
    # 24 train images through the test transform, 12 test images, once each for three epochs.
    assert sorted(loads) == sorted(p for p, _ in [*train_files, *test_files])
    rows = metrics(Path(cfg.out))
    assert [r["examples"] for r in rows] == [24, 24, 24] and summary["test_examples"] == 12
    assert rows[0]["train_loss"] != rows[1]["train_loss"] != rows[2]["train_loss"]
    end = trainer.model.state_dict()
    changed = sorted(n for n in start if not torch.equal(start[n], end[n]))
    assert changed == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize("loader", [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                                  reason="no DALI")), "cached"])
def test_probe_trains_with_the_other_backends_and_asks_them_for_the_train_split_once(make_cfg, loader,
                                                                                     monkeypatch):
    trainer = Trainer(make_cfg(strategy="probe", epochs=2, loader=loader)).setup()
    asked = []
    first_pass = trainer.data.train_eval_batches
    monkeypatch.setattr(trainer.data, "train_eval_batches", lambda: asked.append(1) or first_pass())
    monkeypatch.setattr(trainer.data, "train_batches", lambda epoch: pytest.fail("an augmented pass"))
    summary = trainer.fit()
    assert asked == [1] and summary["test_examples"] == 12 and trainer.data.name == loader
    assert [r["examples"] for r in metrics(trainer.run_dir)] == [24, 24]


def test_probe_resumes_exactly(make_cfg, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(strategy="probe", epochs=2, out=str(straight)))
    train(make_cfg(strategy="probe", epochs=1, out=str(split)))
    train(make_cfg(strategy="probe", epochs=2, out=str(split), resume=True))
    a, b = load_checkpoint(straight), load_checkpoint(split)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if "sec" not in k and k != "epoch_s"} for r in rows]
    assert strip(metrics(straight)) == strip(metrics(split))


def test_kept_feature_order_pads_every_process_to_equal_steps():
    """9 images over 2 processes at batch 4: shards of 5 and 4, both served as 5 rows in 2
    steps; the order is a permutation of the shard from (seed, epoch, rank), the same on resume."""
    for rank, n in ((0, 5), (1, 4)):
        kept = TrainFeatures(9, 4, seed=3, rank=rank, world_size=2)
        kept.fill([(torch.arange(n, dtype=torch.float32).view(n, 1), torch.arange(n))], lambda x: x)
        batches = [y.tolist() for _, y in kept.epoch_batches(0)]
        assert kept.steps == 2 and [len(b) for b in batches] == [4, 1]
        order = sum(batches, [])
        assert sorted(set(order)) == list(range(n)) and order[n:] == order[: 5 - n]
        assert order == kept.order(0).tolist() != kept.order(1).tolist()
    assert TrainFeatures(9, 4, seed=3, world_size=2, drop_ragged=True).steps == 1


BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI")),
            "cached"]


def _backend(name: str, layout, rank: int, world: int):
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, channels_last=True, workers=0,
                 rank=rank, world_size=world)
    if name == "torch":
        return torch_loader.TorchLoaders(layout, 32, 4, 0, seed=0, rank=rank, world_size=world, rt=rt)
    if name == "dali":
        from fastft.data.dali_loader import DaliLoaders
        return DaliLoaders(layout, 32, 4, rt, seed=0)
    from fastft.data.cached_loader import CachedLoaders, plan_cache
    return CachedLoaders(layout, 32, 4, rt, 0, plan=plan_cache(layout, 32, rt))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_eval_batches_give_each_train_image_once_through_the_test_transform(tiny_data, backend):
    """Two processes' shards together: every train image once, with its label, equal to the torch
    loader's test transform of that image within a resampler's rounding (one 8-bit level)."""
    layout = scan_dataset(tiny_data)
    reference = torch_loader.TorchLoaders(layout, 32, 4, 0, seed=0, uint8=False)
    want_x, want_y = map(torch.cat, zip(*reference.train_eval_batches()))
    assert want_y.tolist() == [label for _, label in layout.files["train"]]
    matched = []
    for rank in (0, 1):
        loaders = _backend(backend, layout, rank, 2)
        batches = loaders.train_eval_batches()
        got = [loaders.to_device(x, y) for x, y in batches]
        assert len(got) == len(batches) and all(x.shape[1:] == (3, 32, 32) for x, _ in got)
        x, y = map(torch.cat, zip(*got))
        levels = lambda t: (t.float() * STD + MEAN) * 255
        diff = (levels(x)[:, None] - levels(want_x)[None]).abs().flatten(2).amax(2)  # (mine, all)
        worst, index = diff.min(dim=1)
        assert (worst <= 1.01).all(), worst.max()
        assert y.tolist() == want_y[index].tolist()
        matched += index.tolist()
    assert sorted(matched) == list(range(len(want_y)))

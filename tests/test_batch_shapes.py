"""Unusual sizes: tiny train sets, ragged last batches, one image per process, with every loader.

Each combination of train-set size, --batch-size, --image-size and process count either
trains, with each real image counted once per epoch (less the ragged rest a loader drops,
plus DistributedSampler-style repeats), or stops at setup with a one-line FastftError;
never with a traceback from inside the model. Several processes are imitated by building
rank r of W's loaders in one process: the shards are the same as under torchrun.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fastft.data import MIN_BN_VALUES, build_loaders, check_batch_norm, dali_available
from fastft.data.layout import scan_dataset
from fastft.data.synth import write_synthetic
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastft.engine import train
from fastft.errors import ConfigError, FastftError
from fastft.runtime import Runtime
from fastft.models import describe
from fastft.strategy import REGISTRY, get_strategy

LOADERS = ["torch", "cached", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
STEP = 9  # red levels between two training images' colours


def colour_set(root: Path, n_train: int) -> Path:
    """Solid-colour PNGs whose red level says which training image it is: a crop, resize or
    flip of a solid image keeps its colour, so every batch shows which files it holds."""
    for i in range(n_train):
        folder = root / "train" / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (10 + STEP * i, 128, 128)).save(folder / f"{i:02d}.png")
    for name in ("a", "b"):
        (root / "test" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (250, 0, 0)).save(root / "test" / name / "0.png")
    return root


def identities(x: torch.Tensor) -> list[int]:
    """The training image behind each crop in a normalised batch, by its red level."""
    red = (x.float() * STD + MEAN)[:, 0].mean(dim=(1, 2)) * 255
    return torch.round((red - 10) / STEP).long().tolist()


def runtime(rank: int = 0, world: int = 1, compile: bool = False) -> Runtime:
    return Runtime(device=torch.device("cpu"), amp_dtype=None, compile=compile, channels_last=True,
                   workers=0, rank=rank, world_size=world)


def one_epoch(loaders) -> tuple[list[int], list[int]]:
    """Batch sizes and image identities of one train epoch, as the engine gets the batches."""
    sizes, seen = [], []
    for x, y in loaders.train_batches(0):
        if hasattr(loaders, "to_device"):  # a loader that normalises on the device
            x, y = loaders.to_device(x, y)
        sizes.append(len(y))
        seen += identities(x)
    return sizes, seen


# n_train, global batch, processes, strategy, {loader: per-process batch sizes, or the error's words}.
# At 32 px a train step needs MIN_BN_VALUES = 4 images per process unless every stage is frozen;
# torch and cached drop a smaller ragged last batch, DALI drops every ragged batch.
FEW = "value(s) per channel, fewer than the 4"
CASES = [
    (6, 64, 1, "finetune", {"torch": [6], "dali": [6]}),           # a set smaller than one batch
    (9, 8, 1, "finetune", {"torch": [8], "dali": [8]}),            # a ragged last batch of 1: dropped
    (9, 8, 1, "frozen", {"torch": [8, 1], "dali": [8]}),           # ...which frozen BN does not mind
    (11, 8, 1, "finetune", {"torch": [8], "dali": [8]}),           # ragged 3: still too few, dropped
    (13, 8, 1, "finetune", {"torch": [8, 5], "dali": [8]}),        # ragged 5: kept
    (5, 4, 1, "finetune", {"torch": [4], "dali": [4]}),
    (10, 4, 1, "partial:2", {"torch": [4, 4], "dali": [4, 4]}),
    (10, 8, 2, "finetune", {"torch": [4], "dali": [4]}),           # shards of 5: ragged 1 dropped
    (7, 2, 1, "finetune", {"torch": "--batch-size 2 gives 2 image(s) per process per step",
                           "dali": "--batch-size 2 gives 2 image(s) per process per step"}),
    (3, 1, 1, "finetune", {"torch": FEW, "dali": FEW}),
    (3, 1, 1, "frozen", {"torch": [1, 1, 1], "dali": [1, 1, 1]}),
    (5, 4, 2, "finetune", {"torch": FEW, "dali": FEW}),            # shards of 3, 2 per step
    (6, 64, 4, "finetune", {"torch": "the train split gives each process only 2 image(s)",
                            "dali": "the train split gives each process only 2 image(s)"}),
    (4, 8, 4, "finetune", {"torch": FEW, "dali": FEW}),
    (4, 8, 4, "frozen", {"torch": [1], "dali": [1]}),
    (3, 8, 4, "finetune", {"torch": "at most 3 processes", "dali": "at most 3 processes"}),
]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("n_train, batch, world, strategy, expected", CASES,
                         ids=[f"{c[0]}img-b{c[1]}-w{c[2]}-{c[3]}" for c in CASES])
def test_every_size_combination_trains_or_stops_up_front(tmp_path, make_cfg, loader, n_train, batch, world,
                                                         strategy, expected):
    root = colour_set(tmp_path / "d", n_train)
    layout = scan_dataset(root)
    cfg = make_cfg(data=str(root), loader=loader, batch_size=batch, strategy=strategy)
    want = expected["torch" if loader == "cached" else loader]
    if isinstance(want, str):
        with pytest.raises(ConfigError, match=re.escape(want)) as caught:
            build_loaders(cfg, layout, runtime(0, world))
        assert "\n" not in str(caught.value)
        return
    padded = -(-n_train // world) * world
    seen = []
    for rank in range(world):
        sizes, ids = one_epoch(build_loaders(cfg, layout, runtime(rank, world)))
        assert sizes == want, f"rank {rank}"
        seen += ids
    counts = np.bincount(seen, minlength=n_train)
    assert len(counts) == n_train, "an identity outside the set: a batch mixed images"
    # Each image at most once, or twice where padding repeats some; no more images go
    # missing than the ragged rest a loader drops, and none where it drops nothing.
    assert counts.max() <= (2 if padded > n_train else 1)
    assert (counts == 0).sum() <= padded - world * sum(want)


# n_train, processes, batch per process -> padded, shard, images per step, steps (DALI)
SHARDS = [
    (10, 1, 4, 10, 10, 4, 2), (10, 2, 4, 10, 5, 4, 1), (10, 3, 4, 12, 4, 4, 1), (10, 4, 4, 12, 3, 3, 1),
    (10, 5, 4, 10, 2, 2, 1), (6, 1, 32, 6, 6, 6, 1), (6, 4, 32, 8, 2, 2, 1), (5, 5, 1, 5, 1, 1, 1),
]


@pytest.mark.skipif(not dali_available(), reason="no DALI")
def test_dali_shard_arithmetic_for_one_to_five_processes():
    from fastft.data.dali_loader import train_shards
    for n, world, batch, padded, shard, step, steps in SHARDS:
        got = train_shards(n, batch, world)
        assert (got.padded, got.shard, got.batch, got.steps) == (padded, shard, step, steps), (n, world, batch)
        assert got.dropped == shard - steps * step
    with pytest.raises(ConfigError, match="at most 4 processes"):
        train_shards(4, 1, 5)


@pytest.mark.skipif(not dali_available(), reason="no DALI")
def test_dali_threads_split_the_cores_over_the_processes_here():
    from fastft.data.dali_loader import default_threads
    cores = default_threads({})
    assert cores >= 1 and default_threads({"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)


@pytest.mark.parametrize("loader", ["torch", "cached"])
def test_a_ragged_batch_too_small_for_batch_norm_is_dropped_and_logged(tmp_path, make_cfg, loader):
    """26 images at batch 8 leave a last batch of 2: at 32 px (layer4 1x1) its BatchNorms would
    see 2 values per channel, which blows the weights up; the loader drops it and says so.
    Compiling drops any ragged batch (one shape per step), even one big enough."""
    layout = scan_dataset(colour_set(tmp_path / "d", 26))
    cfg = make_cfg(data=str(tmp_path / "d"), loader=loader, batch_size=8)
    loaders = build_loaders(cfg, layout, runtime())
    sizes, ids = one_epoch(loaders)
    assert sizes == [8, 8, 8] and len(set(ids)) == 24 and loaders.train_batch_sizes() == {8}
    said = " ".join(loaders.describe())
    assert "fewer than 4 images" in said and ("2 of 26 images skipped" in said or "last 2 images" in said)
    frozen = build_loaders(make_cfg(data=str(tmp_path / "d"), loader=loader, batch_size=8, strategy="frozen"),
                           layout, runtime())
    assert one_epoch(frozen)[0] == [8, 8, 8, 2]  # eval-mode BN: nothing to drop
    layout = scan_dataset(colour_set(tmp_path / "e", 13))
    cfg = make_cfg(data=str(tmp_path / "e"), loader=loader, batch_size=8)
    assert one_epoch(build_loaders(cfg, layout, runtime()))[0] == [8, 5]
    assert one_epoch(build_loaders(cfg, layout, runtime(compile=True)))[0] == [8]


STRATEGIES = [*REGISTRY, *(f"partial:{k}" for k in range(5))]


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_batch_norm_rule_covers_the_model(make_cfg, resnet, strategy):
    """check_batch_norm refuses every batch that makes a train-mode forward raise, and every
    other one below MIN_BN_VALUES values per channel in the last stage; frozen BN is exempt."""
    rule = get_strategy(strategy)
    resnet.requires_grad_(True)
    rule.freeze(resnet)
    rule.set_train_mode(resnet)
    for size, batch in ((32, 1), (32, 2), (32, 3), (32, 4), (64, 1)):
        try:
            with torch.no_grad():  # the check is in BatchNorm's forward, with or without autograd
                resnet(torch.randn(batch, 3, size, size))
            raised = False
        except ValueError as err:
            assert "Expected more than 1 value per channel" in str(err)
            raised = True
        try:
            check_batch_norm(make_cfg(strategy=strategy, image_size=size, batch_size=batch), {batch},
                             downsample=rule.bn_downsample(describe(resnet)))
            refused = False
        except ConfigError:
            refused = True
        values = batch * (size // 32) ** 2
        trains_bn = strategy not in ("frozen", "probe", "partial:4")  # partial:4 freezes all 4 stages
        assert rule.bn_downsample(describe(resnet)) == (32 if trains_bn else 0)
        assert refused == (trains_bn and values < MIN_BN_VALUES), (size, batch)
        assert refused or not raised, (size, batch)
    assert not refused  # 64 px, batch 1: 2x2 values per channel in the last stage


@pytest.mark.parametrize("loader", LOADERS)
def test_a_train_set_smaller_than_one_batch_trains_and_counts_each_image_once(tmp_path, make_cfg, loader):
    root = write_synthetic(tmp_path / "d", n_train=6, n_test=2, seed=0, progress=False)
    cfg = make_cfg(data=str(root), loader=loader, batch_size=64, weights="none")
    summary = train(cfg)
    metrics = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
    assert '"examples": 6' in metrics[0] and summary["test_examples"] == 2
    assert np.isfinite(summary["train_loss"]) and summary["peak_mem_scope"].startswith("process peak RSS")


def test_size_errors_reach_the_user_as_one_line(tmp_path, make_cfg):
    root = write_synthetic(tmp_path / "d", n_train=7, n_test=2, seed=0, progress=False)
    with pytest.raises(FastftError) as caught:
        train(make_cfg(data=str(root), loader="torch", batch_size=2, weights="none"))
    assert str(caught.value) == (
        "--batch-size 2 gives 2 image(s) per process per step: at --image-size 32 the last stage is 1x1, so its "
        "BatchNorms would normalise 2 value(s) per channel, fewer than the 4 that keep training stable; use at "
        "least 4 images per process, --image-size 64, or --strategy frozen")

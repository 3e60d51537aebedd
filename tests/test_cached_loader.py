"""The cached backend (--loader cached) on the CPU: layout, parity with the torch loader's eval
transform and with torchvision's resized_crop, shards at any world size, budget, bad files, resume."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DistributedSampler

from fastft.cli import main
from fastft.config import TrainConfig, validate
from fastft.data import build_loaders
from fastft.data import cached_loader
from fastft.data.cached_loader import CachedLoaders, capped, plan_cache
from fastft.data.crops import draw_boxes
from fastft.data.decoders import jpeg_batch_decoder, torchcodec_decoders
from fastft.data.images import decode_problem, load_rgb
from fastft.data.layout import scan_dataset
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from fastft.errors import ConfigError, DataError
from fastft.runtime import Runtime
from jpeg_codings import lossless_jpeg

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def runtime(amp=None, rank=0, world=1, channels_last=True, compile=False) -> Runtime:
    return Runtime(device=torch.device("cpu"), amp_dtype=amp, compile=compile, channels_last=channels_last,
                   workers=1, rank=rank, world_size=world)


def cached(root, size=32, batch=8, rt=None, seed=0, layout=None, cache_gb=0.0, max_side=0) -> CachedLoaders:
    rt = rt or runtime()
    layout = layout or scan_dataset(root)
    plan = plan_cache(layout, size, rt, cache_gb, max_side)
    return CachedLoaders(layout, size, batch, rt, seed, plan=plan, max_side=max_side, drop_ragged=rt.compile)


@pytest.fixture(scope="module")
def loaders(tiny_data) -> CachedLoaders:
    return cached(tiny_data)


def test_batches_come_on_the_device_in_the_training_shape_dtype_and_layout(tiny_data, loaders):
    train = list(loaders.train_batches(0))
    assert [x.shape for x, _ in train] == [(8, 3, 32, 32)] * 3 == [(8, 3, 32, 32)] * loaders.steps_per_epoch()
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) for x, _ in train)
    assert sorted(torch.cat([y for _, y in train]).tolist()) == sorted(l for _, l in scan_dataset(tiny_data).files["train"])
    bf16 = cached(tiny_data, batch=5, rt=runtime(torch.bfloat16, channels_last=False))
    shapes = [(x.shape[0], x.dtype, x.is_contiguous()) for x, _ in bf16.train_batches(0)]
    assert shapes == [(5, torch.bfloat16, True)] * 4 + [(4, torch.bfloat16, True)]  # ragged batch kept
    compiled = cached(tiny_data, batch=5, rt=runtime(compile=True))
    assert [len(y) for _, y in compiled.train_batches(0)] == [5] * 4 and compiled.train_batch_sizes() == {5}
    x, y = next(iter(bf16.test_batches()))
    assert x.dtype == torch.bfloat16 and x.shape == (5, 3, 32, 32) and y.dtype == torch.int64


def test_test_tensors_equal_the_torch_loaders_eval_transform(tiny_data, loaders):
    files = scan_dataset(tiny_data).files["test"]
    xs, ys = zip(*loaders.test_batches())
    expected = torch.stack([eval_transform(32)(load_rgb(path)) for path, _ in files])
    assert torch.equal(torch.cat(xs), expected)
    assert torch.cat(ys).tolist() == [label for _, label in files]


def test_train_crops_equal_torchvision_resized_crop_on_the_same_box(tiny_data, loaders):
    files = scan_dataset(tiny_data).files["train"]
    sampler = DistributedSampler(range(len(files)), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(1)
    order = list(sampler)  # the torch loader's order
    heights, widths = zip(*(load_rgb(files[i][0]).size[::-1] for i in order))
    boxes, flips = draw_boxes(0, 1, order, heights, widths)
    x, y = next(iter(loaders.train_batches(1)))
    assert y.tolist() == [files[i][1] for i in order[:8]]
    for b in range(8):
        image = TF.pil_to_tensor(load_rgb(files[order[b]][0]))
        crop = TF.resized_crop(image, *boxes[b].tolist(), [32, 32], antialias=True)
        crop = crop.flip(-1) if flips[b] else crop
        torch.testing.assert_close(x[b], (crop.float() / 255 - MEAN) / STD, atol=1e-5, rtol=0)
    assert 0 < flips[:8].sum() < 8  # both branches checked


def test_every_test_image_counted_once_and_the_same_global_batches_at_any_world_size(tiny_data):
    """Fake ranks, no process group: each world size's ranks together make one process's steps."""
    layout = scan_dataset(tiny_data)
    one = cached(tiny_data, batch=12, layout=layout)
    rows = lambda plan: sorted(map(tuple, plan.tolist()))  # (index, box, flip) of each sample
    one_steps = [rows(one.epoch_plan(2)[s: s + 12]) for s in (0, 12)]
    one_test = torch.cat([x for x, _ in one.test_batches()])
    for world in (2, 3, 4):
        ranks = [cached(tiny_data, batch=12 // world, rt=runtime(rank=r, world=world), layout=layout)
                 for r in range(world)]
        assert sum(len(y) for rank in ranks for _, y in rank.test_batches()) == 12
        test = torch.empty_like(one_test)
        for r, rank in enumerate(ranks):  # rank r holds test images r, r + world, ...
            test[r::world] = torch.cat([x for x, _ in rank.test_batches()])
        assert torch.equal(test, one_test)
        per, plans = 12 // world, [rank.epoch_plan(2) for rank in ranks]
        assert {rank.steps_per_epoch() for rank in ranks} == {2}
        for s, expected in enumerate(one_steps):  # step s of all ranks = step s of one process, crops too
            assert rows(torch.cat([p[s * per: (s + 1) * per] for p in plans])) == expected, (world, s)


def _torchvision_deprecates_its_decoders() -> bool:
    import torchvision
    return tuple(int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2]) >= (0, 29)


@pytest.mark.parametrize("backend", ["torchcodec", "torchvision"])
def test_the_batched_jpeg_path_and_its_cpu_fallbacks(tiny_data, tmp_path, monkeypatch, backend):
    """The CUDA branch's logic (batched decode_jpeg, PNG, CMYK and lossless JPEG to load_rgb, the
    device-side eval transform), driven on the CPU through each decoder's CPU decode_jpeg: the same
    pixels as PIL. torchvision is the fallback where torchcodec is not installed (the GPU machine);
    with torchcodec no deprecated torchvision decoder runs."""
    if backend == "torchcodec" and torchcodec_decoders() is None:
        pytest.skip("torchcodec is not installed (pip install 'fastft[torchcodec]')")
    monkeypatch.setattr(cached_loader, "jpeg_batch_decoder",
                        lambda: jpeg_batch_decoder(torchcodec=backend == "torchcodec"))
    data = Path(shutil.copytree(tiny_data, tmp_path / "copy"))
    jpegs = sorted((data / "train" / "hotdog").iterdir())
    with Image.open(jpegs[0]) as img:
        img.convert("RGB").save(jpegs[0].with_suffix(".png"))
    jpegs[0].unlink()
    with Image.open(jpegs[1]) as img:
        img.convert("CMYK").save(jpegs[1], "JPEG")
    with Image.open(jpegs[2]) as img:
        jpegs[2].write_bytes(lossless_jpeg(np.asarray(img.convert("RGB"))))
    monkeypatch.setattr(CachedLoaders, "_nvjpeg", lambda self: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaders = cached(data)
    deprecated = [w for w in caught if "capabilities of TorchVision are deprecated" in str(w.message)]
    assert bool(deprecated) == (backend == "torchvision" and _torchvision_deprecates_its_decoders())
    assert loaders.jpeg_decoder.name == backend and loaders.cpu_decoded == 3
    assert f"33 with nvJPEG on cpu ({backend})" in loaders.describe()[0]  # 22 train + 12 test - 1
    files = scan_dataset(data).files
    for i, (path, _) in enumerate(files["train"]):
        assert torch.equal(loaders.images.image(i), torch.from_numpy(np.array(load_rgb(path)))), path
    pil = torch.stack([eval_transform(32)(load_rgb(path)) for path, _ in files["test"]])
    levels = (torch.cat([x for x, _ in loaders.test_batches()]) - pil) * STD * 255  # tensor vs PIL resize
    assert levels.abs().max() < 3 and levels.abs().mean() < 0.5, (levels.abs().max(), levels.abs().mean())


def test_a_file_that_does_not_decode_is_named_in_one_line(tiny_data, tmp_path):
    data = Path(shutil.copytree(tiny_data, tmp_path / "copy"))
    layout = scan_dataset(data)  # sound when scanned, spoiled before the first pass reads it
    bad = sorted((data / "train" / "hotdog").iterdir())[2]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    with pytest.raises(DataError) as caught:
        cached(data, layout=layout)
    assert str(caught.value) == f"{bad}: {decode_problem(bad)}"  # the reason data check gives
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: not an image: starts with "):
        cached(data, layout=layout)
    skipped = scan_dataset(data, skip_bad=True)
    assert cached(data, layout=skipped).train_size == 23


def test_a_set_over_budget_stops_up_front_naming_the_size_and_the_flags(make_cfg, capsys):
    cfg = make_cfg(loader="cached", cache_gb=0.001)
    argv = ["train", "--data", cfg.data, "--weights", cfg.weights, "--image-size", "32", "--batch-size", "8",
            "--device", "cpu", "--loader", "cached", "--cache-gb", "0.001", "--out", cfg.out]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--cache-gb" in err and "--cache-max-side" in err
    needed = float(err.split("needs ")[1].split(" MB")[0])
    assert needed > 1.0  # 24 images of a few hundred px: several MB, over 1 MB
    rt = runtime()
    auto = build_loaders(make_cfg(loader="auto", cache_gb=0.001), scan_dataset(Path(cfg.data)), rt)
    assert auto.name != "cached" and auto.describe()[0].startswith(f"loader auto: {auto.name}, not cached")
    fits = build_loaders(make_cfg(loader="auto", cache_gb=1.0), scan_dataset(Path(cfg.data)), rt)
    assert fits.name == "cached" and fits.describe()[0].startswith("loader auto: cached")
    for bad in (dict(cache_gb=-1), dict(cache_max_side=-1)):
        with pytest.raises(ConfigError, match="--cache-"):
            validate(TrainConfig(**bad))


def test_cache_max_side_caps_the_stored_images_and_the_estimate_is_exact(tiny_data, loaders):
    small = cached(tiny_data, max_side=40)
    heights, widths = small.images.heights.tolist(), small.images.widths.tolist()
    full = list(zip(loaders.images.heights.tolist(), loaders.images.widths.tolist()))
    assert list(zip(heights, widths)) == [capped(h, w, 40) for h, w in full] and max(heights + widths) == 40
    assert small.plan.train_bytes == small.images.data.numel() and loaders.plan.train_bytes == loaders.images.data.numel()
    assert small.cache_stats()["cache_train_mb"] < loaders.cache_stats()["cache_train_mb"]
    x, _ = next(iter(small.train_batches(0)))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()


def test_a_capped_jpeg_decodes_at_a_dct_scale_close_to_a_full_decode(tiny_data, tmp_path, monkeypatch):
    """--cache-max-side far below a JPEG's size: load_rgb decodes it at 1/2, 1/4 or 1/8 scale
    (Image.draft), twice the cap at least, before the resize to the cap, instead of decoding
    every pixel; within a level or so of a full decode resized."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "copy"))
    big = data / "train" / "hotdog" / "big.jpg"
    ys, xs = np.mgrid[0:480, 0:640]
    pixels = np.stack([xs * 255 // 639, ys * 255 // 479, (xs // 40 + ys // 40) % 2 * 200], -1).astype(np.uint8)
    Image.fromarray(pixels).save(big, quality=95)
    asked = {}
    monkeypatch.setattr(cached_loader, "load_rgb", lambda path, at_least=None: asked.setdefault(
        Path(path).name, at_least) and None or load_rgb(path, at_least))
    small = cached(data, max_side=64)
    assert asked["big.jpg"] == (128, 96) and load_rgb(big, (128, 96)).size == (160, 120)  # 1/4 scale
    i = [p.name for p, _ in scan_dataset(data).files["train"]].index("big.jpg")
    full = TF.resize(torch.from_numpy(np.array(load_rgb(big))).permute(2, 0, 1), [48, 64], antialias=True)
    diff = (small.images.image(i).permute(2, 0, 1).int() - full.int()).abs()
    assert diff.float().mean() < 1 and diff.max() <= 4, (diff.float().mean(), diff.max())  # measured 0.53, 3


def test_fastft_train_loader_cached_resumes_exactly(tiny_data, imagenet_like, tmp_path):
    """Two epochs straight equal one epoch, a resume and one more, bit for bit, end to end."""
    def run(out, epochs, *extra):
        argv = ["train", "--data", str(tiny_data), "--weights", str(imagenet_like), "--strategy", "frozen",
                "--image-size", "32", "--batch-size", "8", "--epochs", str(epochs), "--device", "cpu",
                "--amp", "off", "--loader", "cached", "--lr", "1e-3", "--out", str(out), *extra]
        assert main(argv) == 0
    run(tmp_path / "straight", 2)
    run(tmp_path / "split", 1)
    run(tmp_path / "split", 2, "--resume")
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("straight", "split"))
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(t, b["model"][name]) for name, t in a["model"].items())
    lines = {r: [json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
             for r in ("straight", "split")}
    same = lambda rows: [(row["train_loss"], row["train_acc"], row["test_acc"]) for row in rows]
    assert same(lines["straight"]) == same(lines["split"])
    assert lines["straight"][0]["train_loss"] != lines["straight"][1]["train_loss"]  # it trained
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["loader"] == "cached" and summary["test_examples"] == 12
    assert summary["cache_mb"] > 0 and summary["cache_decode_s"] > 0 and summary["cache_cpu_decoded"] == 0


def test_four_gloo_processes_train_exactly_as_one(tmp_path, imagenet_like, tiny_data):
    """torchrun, 4 CPU processes of batch 2 against one process of batch 8: the same crops make
    the same global batches, so the same weights; every test image is counted once."""
    from test_ddp import finish, max_difference, torchrun, train_args, weights_of  # helpers only
    args = train_args(tiny_data, imagenet_like, tmp_path / "ddp", loader="cached", epochs=1,
                      **{"batch-size": 8})
    rc, _, err = finish(torchrun(4, args))
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["test_examples"] == 12 and summary["loader"] == "cached"
    one = train_args(tiny_data, imagenet_like, tmp_path / "one", loader="cached", epochs=1, **{"batch-size": 8})
    assert main(["train", *one]) == 0
    ddp, single = weights_of(tmp_path / "ddp"), weights_of(tmp_path / "one")
    assert max_difference(ddp, single) < 1e-5
    from fastft.cli import parser
    from fastft.engine import Trainer
    fresh = vars(parser().parse_args(["train", *train_args(tiny_data, imagenet_like, tmp_path / "init")]))
    start = Trainer(TrainConfig(**{k: v for k, v in fresh.items() if k != "command"})).setup().model
    assert (single["fc.weight"] - start.fc.weight).abs().max() > 1e-4  # the head did train

"""Each model's own preprocessing (fastft.models.Preprocessing: resize, mean, std, interpolation)
in every loader: a non-ResNet model's agrees across the torch, cached and DALI loaders, and the
arguments are used (a run cannot pass by ignoring them)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fastft.data import build_loaders
from fastft.data import cached_loader
from fastft.data.cached_loader import CachedLoaders
from fastft.data.images import load_rgb
from fastft.data.layout import scan_dataset
from fastft.data.torch_loader import TorchLoaders, sample_seed
from fastft.data.transforms import DEFAULT_PREPROCESSING, DeviceNormalize, eval_transform
from fastft.models import get_spec
from fastft.runtime import Runtime
from loader_agreement import CPU, dali_agrees, levels, torch_equals_cached

HALF = dataclasses.replace(DEFAULT_PREPROCESSING, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def preprocessing(name: str, size: int):
    return get_spec(name).preprocessing().at_size(size)


def test_the_models_numbers_reach_the_transforms():
    eff, vit = preprocessing("efficientnet_b0", 32), preprocessing("timm:test_vit", 32)
    assert (eff.resize, eff.interpolation, vit.resize, vit.mean) == (37, "bicubic", 34, (0.5, 0.5, 0.5))
    resize, crop, _, normalize = eval_transform(32, preprocessing=vit).transforms
    assert (resize.size, resize.interpolation, crop.size) == ([34, 34], T.InterpolationMode.BICUBIC, (32, 32))
    assert (normalize.mean, normalize.std) == ((0.5,) * 3, (0.5,) * 3)
    # The defaults are ResNet-18's, as before: Resize([37, 37]) bilinear for 32 px, ImageNet's numbers.
    resize, _, _, normalize = eval_transform(32).transforms
    assert (resize.size, resize.interpolation) == ([37, 37], T.InterpolationMode.BILINEAR)
    assert normalize.mean == (0.485, 0.456, 0.406) and normalize.std == (0.229, 0.224, 0.225)


# DALI's cubic against PIL's bicubic, measured on tiny_data (12 test images), in grey levels:
# efficientnet_b0 at 32 px (resize 37) max 2, mean 0.067; timm:test_vit at 32 px (resize 34) max 3,
# mean 0.069; efficientnet_b0 at 224 px (resize 256) max 8, mean 0.156 (ResNet-18's bilinear there:
# max 1, mean 0.145). The same on average; a few edge pixels apart. The cached loader's CPU path is
# PIL's, so exactly the torch loader's. A wrong resize, filter or crop moves edges by tens of levels.
@pytest.mark.parametrize("name, size, worst", [("efficientnet_b0", 32, 2.01), ("timm:test_vit", 32, 3.01),
                                               ("efficientnet_b0", 224, 8.01)])
def test_a_models_preprocessing_agrees_across_the_loaders(tiny_data, name, size, worst):
    layout = scan_dataset(tiny_data)
    p = preprocessing(name, size)
    torch_x = torch_equals_cached(layout, size, 4, p)  # the same tensor, labels in order
    dali_agrees(layout, torch_x, size, 4, p, worst=worst)
    resnet = torch.cat([x for x, _ in TorchLoaders(layout, size, 4, 0, 0).test_batches()])
    assert (levels(resnet) - levels(torch_x, p)).abs().max() > 20  # bicubic (and the resize) do show


def test_the_cached_loaders_device_eval_path_resizes_like_pil(tiny_data, monkeypatch):
    """The CUDA branch (decode_jpeg, then torchvision's resize on the device; bicubic one axis at a
    time, rounded and clamped per axis as PIL), driven on the CPU: near the torch loader's."""
    monkeypatch.setattr(CachedLoaders, "_nvjpeg", lambda self: True)
    layout = scan_dataset(tiny_data)
    p = preprocessing("efficientnet_b0", 224)
    loaders = CachedLoaders(layout, 224, 4, CPU, 0, plan=cached_loader.plan_cache(layout, 224, CPU), preprocessing=p)
    got = torch.cat([x for x, _ in loaders.test_batches()])
    want = torch.cat([x for x, _ in TorchLoaders(layout, 224, 4, 0, 0, preprocessing=p).test_batches()])
    diff = (levels(got, p) - levels(want, p)).abs()
    assert diff.max() <= 3 and diff.mean() < 0.1, (diff.max(), diff.mean())  # measured 1, 0.04


def test_train_crops_use_the_models_interpolation_and_statistics(tiny_data):
    """The torch loader's crop is PIL's bicubic resize of RandomResizedCrop's box; the cached
    loader's is torchvision's bicubic resized_crop of its own box; both normalised with 0.5."""
    layout = scan_dataset(tiny_data)
    p = preprocessing("timm:test_vit", 32)  # bicubic, mean = std = 0.5
    path, _ = layout.files["train"][3]
    image = load_rgb(path)
    got = TorchLoaders(layout, 32, 4, 0, seed=0, preprocessing=p).train_set[(0, 3)][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(0, 0, 3))
        top, left, h, w = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        flip = torch.rand(1) < 0.5
    crop = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
    crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop
    want = torch.from_numpy(np.array(crop)).permute(2, 0, 1) / 255 * 2 - 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    cached = CachedLoaders(layout, 32, 8, CPU, 0, plan=cached_loader.plan_cache(layout, 32, CPU), preprocessing=p)
    rows = cached.epoch_plan(1)[:8].tolist()
    x, _ = next(iter(cached.train_batches(1)))
    for b, (i, top, left, h, w, mirror) in enumerate(rows):
        chw = TF.pil_to_tensor(load_rgb(layout.files["train"][i][0]))
        crop = TF.resized_crop(chw, top, left, h, w, [32, 32], T.InterpolationMode.BICUBIC)
        crop = crop.flip(-1) if mirror else crop
        torch.testing.assert_close(x[b], crop.float() / 255 * 2 - 1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loader", ["torch", "cached", "dali"])
def test_a_non_default_mean_and_std_change_the_batches_through_build_loaders(make_cfg, tiny_data, loader):
    """The same pixels, normalised with (0.5, 0.5) instead of ImageNet's: every backend, train and
    test, built by build_loaders as the engine builds it."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = make_cfg(loader=loader, uint8_batches=loader == "torch")  # torch: DeviceNormalize's path
    layout, rt = scan_dataset(tiny_data), Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False,
                                                    channels_last=True, workers=0)
    imagenet, half = build_loaders(cfg, layout, rt), build_loaders(cfg, layout, rt, HALF)
    for split in ("test", "train"):
        if split == "train" and loader == "dali":
            continue  # DALI's crops are its own random stream; the test split is deterministic
        batches = (lambda l: l.test_batches()) if split == "test" else (lambda l: l.train_batches(0))
        a = torch.cat([imagenet.to_device(x, y)[0] for x, y in batches(imagenet)])
        b = torch.cat([half.to_device(x, y)[0] for x, y in batches(half)])
        assert (a - b).abs().mean() > 0.1, split
        torch.testing.assert_close(levels(b, HALF), levels(a), rtol=0, atol=1e-3)  # same pixels


def test_device_normalize_takes_the_preprocessings_mean_and_std():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    half = DeviceNormalize(torch.device("cpu"), preprocessing=HALF)(x)
    torch.testing.assert_close(half, x.float() / 127.5 - 1, rtol=0, atol=1e-6)
    default = DeviceNormalize(torch.device("cpu"))(x)
    torch.testing.assert_close(default, (x.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                               / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), rtol=0, atol=1e-5)


def test_a_loader_that_is_not_pils_says_so_in_one_line(tiny_data):
    layout = scan_dataset(tiny_data)
    plan = cached_loader.plan_cache(layout, 32, CPU)
    bicubic = CachedLoaders(layout, 32, 4, CPU, 0, plan=plan, preprocessing=preprocessing("efficientnet_b0", 32))
    bilinear = CachedLoaders(layout, 32, 4, CPU, 0, plan=plan)
    assert [line for line in bicubic.describe() if "bicubic" in line] == [bicubic.describe()[-1]]
    assert not any("bicubic" in line or "nearest" in line for line in bilinear.describe())
    pytest.importorskip("nvidia.dali")
    from fastft.data.dali_loader import DaliLoaders
    dali = DaliLoaders(layout, 32, 4, CPU, 0, preprocessing=preprocessing("timm:test_vit", 32)).describe()
    assert sum("bicubic is DALI's cubic filter" in line for line in dali) == 1
    assert not any("cubic" in line for line in DaliLoaders(layout, 32, 4, CPU, 0).describe())


@pytest.mark.parametrize("interpolation", ["bicubic", "nearest"])
def test_dalis_train_pipeline_takes_each_filter_and_the_models_statistics(tiny_data, interpolation):
    """DALI's random crops (its own stream: no pixel reference) in the model's filter, normalised with
    0.5: every value in [-1, 1] (ImageNet's numbers would reach -2.1 and 2.6), both ends reached."""
    pytest.importorskip("nvidia.dali")
    from fastft.data.dali_loader import DaliLoaders
    p = dataclasses.replace(HALF, interpolation=interpolation)
    x = torch.cat([x for x, _ in DaliLoaders(scan_dataset(tiny_data), 32, 8, CPU, 0, preprocessing=p).train_batches(0)])
    assert x.shape == (24, 3, 32, 32)
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6 and x.min() < -0.9 and x.max() > 0.9

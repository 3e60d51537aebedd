"""fastft_kernels.resized_crop: the packed buffer, the torch reference against torchvision's
antialiased resized_crop, and the Triton kernel against the reference (run by Triton's
interpreter on CPU tensors, on small images, so it stays in seconds)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fastft_kernels import (PackedImages, resized_crop_normalize, resized_crop_normalize_reference,
                            resized_crop_normalize_triton)
from fastft_kernels.resized_crop import _interpolate, _resample_exact, _resample_fast

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Tolerances in 0-255 pixel units (see kernels/resized_crop.py), turned into normalised units.
PX = 1.0 / (255.0 * min(STD))
# Storing in the output dtype, relative: one rounding (unit roundoff) for fp16; one ulp for bf16,
# because Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even.
ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -11}

# (height, width) of the packed sources: square, 1 px, a row, a column, small, and one for
# 8x downscales along each axis.
SHAPES = [(24, 24), (1, 1), (1, 40), (40, 1), (6, 5), (64, 12), (12, 64)]


def make_images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in SHAPES]


def cases(size: int) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(image id, box) pairs: whole images, every edge and corner, 8x downscales, upscales."""
    return [
        (0, (0, 0, 24, 24)),            # 24 -> size: shrink, antialiased
        (0, (0, 0, 5, 7)),              # top-left corner, upscale
        (0, (19, 17, 5, 7)),            # bottom-right corner
        (0, (0, 20, 24, 4)),            # right edge, full height
        (0, (21, 0, 3, 24)),            # bottom edge, full width
        (1, (0, 0, 1, 1)),              # 1 px source
        (2, (0, 0, 1, 40)),             # 1 x N
        (2, (0, 33, 1, 7)),             # 1 x N, right end
        (3, (0, 0, 40, 1)),             # N x 1
        (4, (0, 0, 6, 5)),              # upscale of a whole small image
        (5, (0, 0, min(8 * size, 64), 12)),  # 8x downscale down the rows (size 8)
        (6, (0, 0, 12, min(8 * size, 64))),  # 8x downscale across the columns
        (0, (2.5, 1.25, 17.5, 20.0)),   # fractional box (the float-box rule)
    ]


def batch(size: int, flip_every: int = 2):
    pairs = cases(size)
    index = torch.tensor([i for i, _ in pairs], dtype=torch.int64)
    boxes = torch.tensor([box for _, box in pairs], dtype=torch.float32)
    flip = torch.arange(len(pairs)) % flip_every == 1
    return index, boxes, flip


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in 0-255 -> ImageNet-normalised, as torchvision's Normalize after ToDtype."""
    return TF.normalize(pixels / 255.0, list(MEAN), list(STD))


# The kernel's interpolation names -> torchvision's modes: "nearest" is PIL's NEAREST (pixel
# centres), torchvision's NEAREST_EXACT on tensors.
MODES = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC,
         "nearest": TF.InterpolationMode.NEAREST_EXACT}


def torchvision_batch(images, index, boxes, flip, size, dtype=torch.float32,
                      interpolation: str = "bilinear") -> torch.Tensor:
    """Expected output: torchvision's resized_crop (antialias=True) per sample, flip, normalise.
    Float bicubic resizes the columns, then the rows, clamping each to 0-255, as PIL does."""
    outs = []
    for i, box, mirror in zip(index.tolist(), boxes.int().tolist(), flip.tolist()):
        chw = images[i].permute(2, 0, 1).to(dtype)
        mode = MODES[interpolation]
        if interpolation == "bicubic" and dtype == torch.float32:
            crop = TF.crop(chw, *box)
            crop = TF.resize(crop, [box[2], size], interpolation=mode, antialias=True).clamp(0, 255)
            out = TF.resize(crop, [size, size], interpolation=mode, antialias=True).clamp(0, 255)
        else:
            out = TF.resized_crop(chw, *box, [size, size], interpolation=mode, antialias=True).float()
        outs.append(out.flip(-1) if mirror else out)
    return normalise(torch.stack(outs))


def integral(index, boxes, flip):
    keep = (boxes == boxes.round()).all(dim=1)
    return index[keep], boxes[keep], flip[keep]


def test_pack_round_trip():
    images = make_images()
    packed = PackedImages.pack(images)
    sizes = [h * w * 3 for h, w in SHAPES]
    assert packed.offsets.tolist() == [sum(sizes[:i]) for i in range(len(sizes))]
    assert packed.heights.tolist() == [h for h, _ in SHAPES] and packed.heights.dtype == torch.int32
    assert packed.widths.tolist() == [w for _, w in SHAPES] and packed.widths.dtype == torch.int32
    assert packed.data.numel() == sum(sizes) and len(packed) == len(SHAPES)
    assert packed.nbytes == sum(sizes) + len(SHAPES) * (8 + 4 + 4)
    for i, image in enumerate(images):
        assert torch.equal(packed.to("cpu").image(i), image)


def test_pack_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="image 1"):
        PackedImages.pack([torch.zeros(2, 2, 3, dtype=torch.uint8), torch.zeros(2, 2, 4, dtype=torch.uint8)])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [8, 13])
def test_exact_reference_matches_torchvision_float(size, interpolation):
    images = make_images()
    index, boxes, flip = integral(*batch(size))
    got = resized_crop_normalize_reference(PackedImages.pack(images), index, boxes, flip, size, MEAN, STD,
                                           torch.float32, fast=False, interpolation=interpolation)
    want = torchvision_batch(images, index, boxes, flip, size, interpolation=interpolation)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * PX)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [8, 13])
def test_fast_reference_matches_torchvision_uint8(size, interpolation):
    images = make_images()
    index, boxes, flip = integral(*batch(size))
    got = resized_crop_normalize_reference(PackedImages.pack(images), index, boxes, flip, size, MEAN, STD,
                                           torch.float32, fast=True, interpolation=interpolation)
    # Same uint8 rounding as torchvision on uint8 input: equal up to the normalisation's fp32 order.
    expected = torchvision_batch(images, index, boxes, flip, size, dtype=torch.uint8, interpolation=interpolation)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Against the float result: within torch's two uint8 roundings (horizontal, vertical pass);
    # bicubic's negative lobes spread the first rounding a little (measured at most 1.04 levels).
    exact = torchvision_batch(images, index, boxes, flip, size, interpolation=interpolation)
    levels = (got - exact).abs() / PX
    assert levels.max() <= (1.0 if interpolation == "bilinear" else 1.1)
    assert levels.max() > 0  # the fast path really is the rounded one


def test_bicubic_is_not_bilinear_and_nearest_copies_source_pixels():
    """The interpolation argument is used: bicubic differs from bilinear by many levels on random
    pixels (and overshoots, clamped to 0-255); nearest outputs only source pixel values."""
    images = make_images()
    packed = PackedImages.pack(images)
    index, boxes, flip = integral(*batch(8))
    run = lambda mode: resized_crop_normalize_reference(packed, index, boxes, flip, 8, (0.0,) * 3, (1 / 255,) * 3,
                                                        torch.float32, fast=False, interpolation=mode)
    linear, cubic, nearest = run("bilinear"), run("bicubic"), run("nearest")
    assert (cubic - linear).abs().max() > 10 and cubic.min() == 0 and cubic.max() == 255
    assert torch.equal(nearest, nearest.round())  # whole levels: copied, not blended
    assert (nearest - linear).abs().max() > 10


def test_interpolation_names_are_checked():
    images = PackedImages.pack(make_images())
    index, boxes, flip = batch(8)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resized_crop_normalize(images, index, boxes, flip, 8, MEAN, STD, torch.float32, interpolation="lanczos")


def test_fractional_box_is_resize_then_centre_crop_away_from_the_edges():
    # Resize([16, 16]) then CenterCrop(14) of a 40 px image is the box (2.5, 2.5, 35, 35) -> 14, except
    # that our filter is clipped at the box's edge pixels instead of the image's: rows/cols 0 and 13.
    hwc = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = TF.center_crop(TF.resize(hwc.permute(2, 0, 1).float(), [16, 16], antialias=True), [14, 14])
    got = resized_crop_normalize_reference(PackedImages.pack([hwc]), torch.zeros(1, dtype=torch.int64),
                                           torch.tensor([[2.5, 2.5, 35.0, 35.0]]), torch.zeros(1, dtype=torch.bool),
                                           14, MEAN, STD, torch.float32, fast=False)
    expected = normalise(expected[None])
    torch.testing.assert_close(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=0, atol=1e-3 * PX)
    assert (got[..., 0, :] - expected[..., 0, :]).abs().max() > 1e-2  # the clipped edge row differs


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_output_layout_and_dispatch(out_dtype):
    images = PackedImages.pack(make_images())
    index, boxes, flip = batch(8)
    out = resized_crop_normalize(images, index, boxes, flip, 8, MEAN, STD, out_dtype)
    assert out.shape == (len(index), 3, 8, 8) and out.dtype == out_dtype
    assert out.stride() == (3 * 64, 1, 3 * 8, 3)  # NHWC-contiguous
    assert torch.equal(out, resized_crop_normalize_reference(images, index, boxes, flip, 8, MEAN, STD, out_dtype))


def per_image_addcmul_reference(images, index, boxes, flip, size, mean, std, out_dtype, fast, interpolation):
    """The reference as it was before _RowNormaliser: each integral crop's (1, 3, h, w) view with
    batch stride 3 (torch reads NCHW and writes planar), and each resampled (S, S, 3) image through
    one addcmul with (3,) constants, cast on store into the NHWC output."""
    out = torch.empty(len(index), size, size, 3, dtype=out_dtype)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std])
    shift = torch.tensor([-m / s for m, s in zip(mean, std)])
    for b, (i, box, mirror) in enumerate(zip(index.tolist(), boxes.tolist(), flip.tolist())):
        exact = not (fast and all(float(v).is_integer() for v in box))
        image = images.image(i)
        if exact:
            pixels = _resample_exact(image, box, size, interpolation)
        else:
            t, l, h, w = (int(v) for v in box)
            crop = image[t:t + h, l:l + w].permute(2, 0, 1)[None]
            pixels = _interpolate(crop, (size, size), interpolation)[0].permute(1, 2, 0)
        torch.addcmul(shift, pixels.flip(1) if mirror else pixels, scale, out=out[b])
    return out.permute(0, 3, 1, 2)


BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_bits_equal_the_planar_per_image_addcmul_form(out_dtype, interpolation):
    """Every case of `cases` (integral boxes through the uint8 path, the fractional one through
    the float path, and all of them through the float path), flipped and not, at sizes whose
    rows (3S elements) leave a tail past the vectorised loop: the same bits as before."""
    packed = PackedImages.pack(make_images())
    for size in (8, 13):
        for flip_every in (1, 2):
            index, boxes, flip = batch(size, flip_every)
            for fast in (True, False):
                got = resized_crop_normalize_reference(packed, index, boxes, flip, size, MEAN, STD, out_dtype,
                                                       fast=fast, interpolation=interpolation)
                want = per_image_addcmul_reference(packed, index, boxes, flip, size, MEAN, STD, out_dtype,
                                                   fast, interpolation)
                assert torch.equal(got.view(BITS[out_dtype]), want.view(BITS[out_dtype])), (size, flip_every, fast)


@pytest.mark.parametrize("mean, std", [(MEAN, STD), ((0.5,) * 3, (0.5,) * 3)], ids=["imagenet", "half"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_bits_equal_it_for_every_pixel_value(out_dtype, mean, std):
    """All 256 levels in every channel and at every position mod 3S (a 37 px identity crop: the
    nearest and the uint8 bilinear filter copy the pixels at scale 1), with and without a flip."""
    levels = torch.arange(37 * 37) % 256
    hwc = torch.stack([levels[torch.randperm(levels.numel(), generator=torch.Generator().manual_seed(c))]
                       for c in range(3)], dim=1).to(torch.uint8).view(37, 37, 3)
    packed = PackedImages.pack([hwc])
    index, boxes = torch.zeros(2, dtype=torch.int64), torch.tensor([[0.0, 0.0, 37.0, 37.0]] * 2)
    flip = torch.tensor([False, True])
    for interpolation in ("nearest", "bilinear"):
        pixels = _resample_fast(hwc, [0, 0, 37, 37], 37, interpolation)
        assert torch.equal(pixels, hwc) and pixels.is_contiguous()  # every level reached; no transpose
        got = resized_crop_normalize_reference(packed, index, boxes, flip, 37, mean, std, out_dtype,
                                               interpolation=interpolation)
        want = per_image_addcmul_reference(packed, index, boxes, flip, 37, mean, std, out_dtype, True, interpolation)
        assert torch.equal(got.view(BITS[out_dtype]), want.view(BITS[out_dtype])), interpolation


def test_reference_rejects_wrong_dtypes():
    images = PackedImages.pack(make_images())
    index, boxes, flip = batch(8)
    with pytest.raises(ValueError, match="index must be int64"):
        resized_crop_normalize(images, index.int(), boxes, flip, 8, MEAN, STD, torch.float32)
    with pytest.raises(ValueError, match="boxes must be float32"):
        resized_crop_normalize(images, index, boxes.double(), flip, 8, MEAN, STD, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        resized_crop_normalize(images, index, boxes, flip, 8, MEAN, STD, torch.int8)


@pytest.fixture(scope="module")
def interpreted():
    """The kernel module re-imported under TRITON_INTERPRET=1 (triton reads it when @jit runs),
    and re-imported again afterwards so no later test inherits the interpreter."""
    pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    module = importlib.import_module("fastft_kernels._resized_crop_triton")
    importlib.reload(module)
    yield module
    patch.undo()
    importlib.reload(module)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_exact_reference(interpreted, out_dtype):
    size = 8
    images = PackedImages.pack(make_images())
    index, boxes, flip = batch(size)
    got = resized_crop_normalize_triton(images, index, boxes, flip, size, MEAN, STD, out_dtype)
    assert got.dtype == out_dtype and got.stride() == (3 * size * size, 1, 3 * size, 3)
    want = resized_crop_normalize_reference(images, index, boxes, flip, size, MEAN, STD, torch.float32, fast=False)
    # fp32: the kernel sums the 2-D taps in one pass, the reference in two: 1e-3 px; other dtypes
    # add one rounding of the stored value.
    torch.testing.assert_close(got.float(), want, rtol=ROUNDING[out_dtype], atol=1e-3 * PX)


def test_triton_flip_mirrors_and_upscales_odd_size(interpreted):
    size = 13  # odd: the middle column maps onto itself; several tiles' worth of rows on a GPU
    images = PackedImages.pack(make_images())
    index = torch.tensor([0, 0, 4, 4], dtype=torch.int64)
    boxes = torch.tensor([[3, 2, 17, 21], [3, 2, 17, 21], [0, 0, 6, 5], [0, 0, 6, 5]], dtype=torch.float32)
    flip = torch.tensor([False, True, False, True])
    got = resized_crop_normalize(images, index, boxes, flip, size, MEAN, STD, torch.float32, use_triton=True)
    assert torch.equal(got[1], got[0].flip(-1)) and torch.equal(got[3], got[2].flip(-1))
    want = resized_crop_normalize_reference(images, index, boxes, flip, size, MEAN, STD, torch.float32, fast=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * PX)


@pytest.mark.parametrize("interpolation", ["bicubic", "nearest"])
def test_triton_matches_exact_reference_bicubic_and_nearest(interpreted, interpolation):
    """Every case of `cases` (edges, 1 px sources, 8x downscales, upscales, a fractional box) with
    the other filters and a non-ImageNet mean/std (timm's 0.5): fp32 within 1e-3 px."""
    size, mean, std = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    images = PackedImages.pack(make_images())
    index, boxes, flip = batch(size)
    got = resized_crop_normalize(images, index, boxes, flip, size, mean, std, torch.float32,
                                 interpolation=interpolation, use_triton=True)
    want = resized_crop_normalize_reference(images, index, boxes, flip, size, mean, std, torch.float32,
                                            fast=False, interpolation=interpolation)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 / (255 * 0.5))
    # The mean/std arguments reach every pixel: ImageNet's result, un-normalised and normalised
    # with 0.5 again, is this one; and the two differ.
    imagenet = resized_crop_normalize_reference(images, index, boxes, flip, size, MEAN, STD, torch.float32,
                                                fast=False, interpolation=interpolation)
    unit = imagenet * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (unit - 0.5) / 0.5, rtol=0, atol=1e-3 / (255 * 0.5))
    assert (got - imagenet).abs().mean() > 0.1

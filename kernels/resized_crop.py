"""Fused random-resized-crop + flip + normalise from a packed buffer of decoded images.

One call turns a batch of (image id, crop box, flip flag) into a normalised (B, 3, S, S) tensor,
channels_last, in bf16, fp16 or fp32. On CUDA it is one Triton launch per batch
(``resized_crop_normalize_triton``); on CPU a pure-torch reference does the same job
(``resized_crop_normalize_reference``). ``resized_crop_normalize`` picks between them.

Semantics, for every sample b (source of the rule: torchvision.transforms.v2.functional.resized_crop
with antialias=True, which crops, then calls torch's ``_upsample_bilinear2d_aa``; the filter is
torch's ``HelperInterpBase::_compute_indices_min_size_weights_aa`` in
aten/src/ATen/native/cpu/UpSampleKernel.cpp with the bilinear (triangle) ``aa_filter``):

- the crop is rows [top, top + height) and columns [left, left + width) of image ``index[b]``;
- each output axis is resampled separately: scale = crop length / size, support = max(scale, 1),
  centre of output pixel i = scale * (i + 0.5) in crop coordinates, taps are the crop pixels j in
  [max(floor(centre - support + 0.5), 0), min(floor(centre + support + 0.5), crop length)), each
  weighted triangle((j - centre + 0.5) / max(scale, 1)), the weights normalised to sum 1. So the
  filter is bilinear (align_corners=False) when enlarging and an antialiasing triangle of width
  2 * scale when shrinking, and it is clipped at the CROP's edges, as crop-then-resize does;
- the output is flipped left-right where ``flip[b]``, then mapped x -> (x / 255 - mean) / std.

``interpolation="bicubic"`` (torch's ``_upsample_bicubic2d_aa``, the same rule as PIL's BICUBIC)
swaps the triangle for Keys' cubic (a = -0.5) over twice the support, 2 * max(scale, 1), weighted
cubic((j - centre + 0.5) / max(scale, 1)); its weights go negative, so, as PIL and torch's uint8
path do, the horizontal pass is clamped to 0-255 before the vertical one, and the result too. ``interpolation="nearest"`` takes the one crop pixel floor(centre) (PIL's
NEAREST, torch's "nearest-exact"; no antialiasing). Bilinear is the default.

Integer boxes follow torchvision's rule exactly (same taps, same weights). Float boxes are allowed:
with lo = floor(top), the centre becomes (top - lo) + scale * (i + 0.5) relative to lo, i.e. the
source position top + (i + 0.5) * height / size - 0.5 in pixel-index units, and the taps are
clipped to rows [floor(top), ceil(top + height)), so a fractional box reads at most one partly
covered pixel past each edge. Resize([R, R]) then CenterCrop(S) of an H x W image is the box
(c * H / R, c * W / R, S * H / R, S * W / R) with c = (R - S) / 2, equal away from the border;
the outermost output rows and columns differ, because Resize clips its filter at the image's edge
and we clip at the box's (a test shows both). Boxes must lie inside their image (as
RandomResizedCrop's do) with height, width >= 1; the kernel clamps its reads into the image, so a
bad box gives a wrong crop, never a bad memory access.

Tolerances held by the tests (tests/test_kernels.py), all before normalisation, in 0-255 units:
- exact reference (``fast=False``) vs torchvision on float input: 1e-3. Same weights, same
  horizontal-then-vertical order; only fp32 summation and weight-rounding differences (~1e-5).
- Triton kernel vs exact reference: fp32 1e-3 (the kernel sums the 2-D taps in one pass, so its
  rounding differs in the last bits; measured ~1e-4); bf16/fp16 outputs: that plus one rounding of
  the stored value (relative 2^-11 for fp16; 2^-7 for bf16 in the tests, because Triton's CPU
  interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even).
- fast reference (``fast=True``, the CPU default) vs torchvision on uint8 input: torch's uint8
  antialiased path rounds the resized image to uint8 exactly as torchvision's uint8 path does, so
  the two agree to the last bit. Against the float result it is within 1.0: torch's uint8 path
  rounds twice (after the horizontal and after the vertical pass) with int16 fixed-point weights
  (bicubic: 1.1, its negative lobes spread the first rounding a little; measured 1.04).

Against PIL (the torch loader's resize), same boxes, 48 synthetic images at 224 px: bilinear within
1 level (mean 0.28 for the float kernel, 0.015 for the uint8 path); bicubic the same on average
(0.29, 0.020) but up to 7 levels at a few edges, because Pillow 13 sometimes resizes the rows first
(to save work) and the order moves where its clamps and roundings fall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # fastft.models.base.Preprocessing's names
_HALF_WIDTH = {"bilinear": 1.0, "bicubic": 2.0}      # filter support before widening, in px
# torch.nn.functional.interpolate's mode for each; "nearest-exact" is PIL's NEAREST (pixel centres)
_TORCH_MODE = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


@dataclass
class PackedImages:
    """Every decoded image of a split in one flat uint8 buffer.

    data: uint8 (total_bytes,), images HWC-contiguous, RGB, back to back.
    offsets: int64 (N,), byte offset of image i in ``data``.
    heights, widths: int32 (N,), image i's shape in pixels.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor

    @staticmethod
    def pack(images: list[torch.Tensor], device: torch.device | str = "cpu") -> "PackedImages":
        """Copy uint8 (H, W, 3) images into one buffer on ``device``.

        Raises ValueError for an image that is not uint8 (H, W, 3) with H, W >= 1.
        """
        heights, widths, sizes = [], [], []
        for i, image in enumerate(images):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3 or image.numel() == 0:
                raise ValueError(f"image {i}: need uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
            heights.append(image.shape[0])
            widths.append(image.shape[1])
            sizes.append(image.numel())
        offsets = [0] * len(sizes)
        for i in range(1, len(sizes)):
            offsets[i] = offsets[i - 1] + sizes[i - 1]
        data = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        for image, start, n in zip(images, offsets, sizes):
            data[start:start + n].copy_(image.reshape(-1))
        return PackedImages(data, torch.tensor(offsets, dtype=torch.int64, device=device),
                            torch.tensor(heights, dtype=torch.int32, device=device),
                            torch.tensor(widths, dtype=torch.int32, device=device))

    @property
    def nbytes(self) -> int:
        """Bytes held on the device, metadata included."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.offsets, self.heights, self.widths))

    def __len__(self) -> int:
        return self.offsets.numel()

    def to(self, device: torch.device | str) -> "PackedImages":
        return PackedImages(self.data.to(device), self.offsets.to(device),
                            self.heights.to(device), self.widths.to(device))

    def image(self, i: int) -> torch.Tensor:
        """Image i as a uint8 (H, W, 3) view of the buffer (a host read of its shape)."""
        h, w, start = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        return self.data[start:start + h * w * 3].view(h, w, 3)


def _check_args(images: PackedImages, index, boxes, flip, size, out_dtype, interpolation="bilinear") -> None:
    """ValueError for shapes and dtypes the kernel and the reference cannot take."""
    b = index.shape[0] if index.dim() == 1 else -1
    if index.dtype != torch.int64 or b < 0:
        raise ValueError(f"index must be int64 (B,), got {index.dtype} {tuple(index.shape)}")
    if boxes.dtype != torch.float32 or tuple(boxes.shape) != (b, 4):
        raise ValueError(f"boxes must be float32 ({b}, 4), got {boxes.dtype} {tuple(boxes.shape)}")
    if flip.dtype != torch.bool or tuple(flip.shape) != (b,):
        raise ValueError(f"flip must be bool ({b},), got {flip.dtype} {tuple(flip.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if images.data.dtype != torch.uint8:
        raise ValueError(f"PackedImages.data must be uint8, got {images.data.dtype}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def _empty_output(b: int, size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B, 3, S, S) whose memory is NHWC-contiguous."""
    return torch.empty(b, size, size, 3, dtype=dtype, device=device).permute(0, 3, 1, 2)


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5, the bicubic filter of PIL and of torch's
    antialiased bicubic (``aa_filter`` in UpSampleKernel.cpp): support |x| < 2."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros(())))


def axis_taps(start: float, length: float, size: int,
              interpolation: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Antialiased taps of one axis, as torch's ``_compute_indices_min_size_weights_aa``.

    start, length: the crop along this axis in source pixels (floats allowed, length >= 1).
    interpolation: "bilinear" (triangle filter, half-width 1), "bicubic" (``cubic``, half-width 2;
    both widened by the downscale factor), or "nearest" (one tap: the pixel under the output
    pixel's centre, PIL's NEAREST and torch's "nearest-exact").
    Returns idx int64 (size, K): source pixel of each tap, and w float32 (size, K): its weight,
    normalised per output pixel; unused taps have weight 0 and a valid index.
    """
    lo = math.floor(start)
    n = math.ceil(start + length) - lo  # crop pixels the filter may read
    scale = torch.tensor(length / size, dtype=torch.float32)
    stretch = torch.clamp(scale, min=1.0)  # the filter widens when shrinking (antialiasing)
    centre = (start - lo) + scale * (torch.arange(size, dtype=torch.float32) + 0.5)
    if interpolation == "nearest":
        j = torch.floor(centre).to(torch.int64).clamp(max=n - 1)[:, None]
        return lo + j, torch.ones(size, 1)
    support = stretch * _HALF_WIDTH[interpolation]
    first = torch.floor(centre - support + 0.5).clamp(min=0).to(torch.int64)
    stop = torch.floor(centre + support + 0.5).to(torch.int64).clamp(max=n)
    k = max(int((stop - first).max()), 1)
    j = first[:, None] + torch.arange(k)[None, :]
    x = (j.float() - centre[:, None] + 0.5) / stretch
    w = cubic(x) if interpolation == "bicubic" else (1.0 - x.abs()).clamp(min=0)
    w = torch.where(j < stop[:, None], w, torch.zeros(()))
    return lo + j.clamp(max=n - 1), w / w.sum(dim=1, keepdim=True)


def _interpolate(crop: torch.Tensor, hw: tuple[int, int], interpolation: str) -> torch.Tensor:
    """torch's interpolate of (1, 3, h, w) to hw: antialiased unless nearest."""
    mode = _TORCH_MODE[interpolation]
    if mode == "nearest-exact":
        return F.interpolate(crop, size=hw, mode=mode)
    return F.interpolate(crop, size=hw, mode=mode, align_corners=False, antialias=True)


def _resample_exact(image: torch.Tensor, box: list[float], size: int, interpolation: str) -> torch.Tensor:
    """float32 (S, S, 3) in 0-255: image uint8 (H, W, 3) cropped to box and resampled.

    Integral boxes go through torch's float interpolate (torchvision's own path);
    fractional ones through the same taps gathered here, horizontal pass first, then vertical,
    in the order torch's CPU kernel uses. Bicubic, whose weights go negative, clamps each pass
    to 0-255, as PIL and torch's uint8 path do (not rounding it: float).
    """
    top, left, height, width = box
    cubic = interpolation == "bicubic"
    if all(float(v).is_integer() for v in box):
        t, l, h, w = (int(v) for v in box)
        crop = image[t:t + h, l:l + w].permute(2, 0, 1)[None].float()
        if cubic:  # the columns alone first (the rows' taps at scale 1 are the identity), clamped
            crop = _interpolate(crop, (h, size), interpolation).clamp(0.0, 255.0)
        out = _interpolate(crop, (size, size), interpolation)[0].permute(1, 2, 0)
    else:
        # The taps are built on the host; the weights must sit with the pixels (a CUDA image too).
        yi, yw, xi, xw = (t.to(image.device) for t in (*axis_taps(top, height, size, interpolation),
                                                       *axis_taps(left, width, size, interpolation)))
        first = int(yi[:, 0].min())
        rows = image[first:int(yi.max()) + 1].float()  # only the rows some tap reads
        tmp = (rows[:, xi] * xw[None, :, :, None]).sum(dim=2)  # (rows, S, 3)
        tmp = tmp.clamp(0.0, 255.0) if cubic else tmp
        out = (tmp[yi - first] * yw[:, :, None, None]).sum(dim=1)  # (S, S, 3)
    return out.clamp(0.0, 255.0) if cubic else out


def _resample_fast(image: torch.Tensor, box: list[float], size: int, interpolation: str) -> torch.Tensor:
    """uint8 (S, S, 3), C-contiguous: torch's uint8 path (rounds to uint8, as torchvision's does)."""
    top, left, height, width = (int(v) for v in box)
    # A (1, 3, h, w) view whose batch stride spans the image, so torch sees channels_last strides
    # (a crop's view with [None] has batch stride 3, which reads as NCHW) and writes channels_last:
    # the same values, without transposing the output to planar and back (1.5x faster at 224 px).
    crop = image[None].permute(0, 3, 1, 2)[:, :, top:top + height, left:left + width]
    return _interpolate(crop, (size, size), interpolation)[0].permute(1, 2, 0)


def resized_crop_normalize_reference(images: PackedImages, index: torch.Tensor, boxes: torch.Tensor,
                                     flip: torch.Tensor, size: int, mean: tuple[float, float, float],
                                     std: tuple[float, float, float], out_dtype: torch.dtype,
                                     *, fast: bool = True, interpolation: str = "bilinear") -> torch.Tensor:
    """Pure-torch resized crop + flip + normalise; the CPU path. Arguments as resized_crop_normalize.

    fast=True (default): samples whose box is integral go through torch's uint8 interpolate
    (AVX2 on CPU), which rounds the resized crop to uint8 before normalising, exactly
    as torchvision does on uint8 images; fractional boxes take the exact path.
    fast=False: the exact float32 path for every sample (what the Triton kernel is tested against).
    Loops over samples on the host and reads index, boxes and flip there: meant for CPU tensors.
    """
    _check_args(images, index, boxes, flip, size, out_dtype, interpolation)
    out = _empty_output(index.shape[0], size, out_dtype, images.data.device)
    nhwc = out.permute(0, 2, 3, 1)
    normalise = _RowNormaliser(size, mean, std, out_dtype, out.device)
    metadata = zip(images.offsets[index].tolist(), images.heights[index].tolist(),
                   images.widths[index].tolist(), boxes.tolist(), flip.tolist())
    for b, (start, h, w, box, mirror) in enumerate(metadata):
        image = images.data[start:start + h * w * 3].view(h, w, 3)
        if fast and all(float(v).is_integer() for v in box):
            pixels = _resample_fast(image, box, size, interpolation)
        else:
            pixels = _resample_exact(image, box, size, interpolation)
        if mirror:
            pixels = pixels.flip(1)
        normalise(pixels, nhwc[b])
    return out


class _RowNormaliser:
    """x -> (x / 255 - mean) / std for one (S, S, 3) image, as one fp32 addcmul over its (S, 3S)
    rows with the per-channel constants repeated along a row.

    The arithmetic per element is the same as addcmul(shift (3,), pixels, scale (3,)): exact
    uint8 -> fp32, fp32 shift + pixel * scale (torch's addcmul kernel, fused multiply-add on the
    stacks tested), rounded once to out_dtype. Only the iteration differs: broadcasting (3,)
    leaves an innermost loop of 3 elements, which never reaches the vectorised kernel, while
    rows of 3S contiguous elements do (3x faster at 224 px; tests/test_kernels.py holds the two
    equal bit for bit). Per image rather than per batch so the fp32 scratch (S * 3S * 4 bytes,
    600 kB at 224 px) stays in cache: one batched op is slower on one thread (19 MB temporaries).
    """

    def __init__(self, size: int, mean, std, out_dtype: torch.dtype, device) -> None:
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device)
        self.size, self.scale, self.shift = size, scale.repeat(size), shift.repeat(size)
        self.scratch = None if out_dtype == torch.float32 else torch.empty(size, 3 * size, device=device)

    def __call__(self, pixels: torch.Tensor, out: torch.Tensor) -> None:
        """pixels uint8 or float32 (S, S, 3) in 0-255 -> out (S, S, 3), C-contiguous, out_dtype."""
        rows = out.view(self.size, 3 * self.size)
        work = rows if self.scratch is None else self.scratch
        work.view_as(out).copy_(pixels)  # exact: uint8 -> fp32, or fp32 as it is
        torch.addcmul(self.shift, work, self.scale, out=work)
        if work is not rows:
            rows.copy_(work)  # the one rounding to bf16 / fp16, as addcmul's cast on store did


def resized_crop_normalize_triton(images: PackedImages, index: torch.Tensor, boxes: torch.Tensor,
                                  flip: torch.Tensor, size: int, mean: tuple[float, float, float],
                                  std: tuple[float, float, float], out_dtype: torch.dtype,
                                  *, interpolation: str = "bilinear") -> torch.Tensor:
    """The same as the exact reference in one Triton launch per batch; needs triton.

    All tensors on one device (CUDA, or CPU under TRITON_INTERPRET=1). No host syncs.
    Raises ImportError with the install hint when triton is missing.
    """
    _check_args(images, index, boxes, flip, size, out_dtype, interpolation)
    from ._resized_crop_triton import launch  # lazy: triton is optional
    out = _empty_output(index.shape[0], size, out_dtype, images.data.device)
    launch(images, index, boxes, flip, size, mean, std, out, interpolation)
    return out


def resized_crop_normalize(images: PackedImages, index: torch.Tensor, boxes: torch.Tensor,
                           flip: torch.Tensor, size: int, mean: tuple[float, float, float],
                           std: tuple[float, float, float], out_dtype: torch.dtype,
                           *, interpolation: str = "bilinear", use_triton: bool | None = None) -> torch.Tensor:
    """Crop, resize (antialiased bilinear or bicubic, or nearest), flip and normalise a batch of
    packed images.

    images: PackedImages on the device that does the work.
    index: int64 (B,) image ids. boxes: float32 (B, 4) = (top, left, height, width) in source
    pixels, torchvision RandomResizedCrop.get_params order. flip: bool (B,), flip the output
    left-right. size: output side in pixels. mean, std: per RGB channel in [0, 1] units
    (the model's preprocessing: ImageNet's for ResNet-18). out_dtype: torch.bfloat16, torch.float16
    or torch.float32. interpolation: "bilinear", "bicubic" or "nearest" (see axis_taps), the
    model's preprocessing's; torchvision's RandomResizedCrop with that InterpolationMode.
    Returns (B, 3, size, size) in out_dtype, NHWC-contiguous (channels_last).
    Dispatch: the Triton kernel for CUDA tensors, or when use_triton=True (CPU needs
    TRITON_INTERPRET=1); the torch reference (fast mode) otherwise.
    Raises ValueError for wrong shapes or dtypes. See the module docstring for the exact rule.
    """
    if use_triton is None:
        use_triton = images.data.is_cuda
    if use_triton:
        return resized_crop_normalize_triton(images, index, boxes, flip, size, mean, std, out_dtype,
                                             interpolation=interpolation)
    return resized_crop_normalize_reference(images, index, boxes, flip, size, mean, std, out_dtype,
                                            interpolation=interpolation)

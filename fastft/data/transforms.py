"""The chapter's image transforms, shared by every data backend, with each model's numbers.

Where the normalisation numbers come from: a model's weights were trained on inputs
normalised with some per-channel mean and standard deviation (RGB, scaled to [0, 1]);
fine-tuning feeds it the same statistics, whatever the new dataset's own are. For the
chapter's ResNet-18 they are ImageNet's training-set statistics (IMAGENET_MEAN/STD);
another model brings its own (`fastft.models.Preprocessing`: mean, std, the eval resize
and the interpolation, from torchvision's Weights.transforms() or timm's pretrained_cfg).
Every function here takes one and defaults to ResNet-18's, DEFAULT_PREPROCESSING.

Two ways to run the same maths. The chapter's (`uint8=False`): ToTensor scales to
[0, 1] and Normalize subtracts and divides in the loader's worker, which then ships
fp32 batches. The fast one (`uint8=True`): the worker stops at uint8 CHW pixels
(4x fewer bytes to collate, pin and copy), and `DeviceNormalize` does the scaling
on the device, as timm's PrefetchLoader does (timm/data/loader.py).
"""

from __future__ import annotations

import torch
import torchvision.transforms as T

from fastft.models.base import DEFAULT_PREPROCESSING, IMAGENET_MEAN, IMAGENET_STD, Preprocessing

__all__ = ["DEFAULT_PREPROCESSING", "IMAGENET_MEAN", "IMAGENET_STD", "DeviceNormalize", "Preprocessing",
           "eval_transform", "interpolation_mode", "train_transform"]


def interpolation_mode(name: str) -> T.InterpolationMode:
    """torchvision's mode for a Preprocessing.interpolation name; "nearest" is PIL's NEAREST,
    which on tensors is NEAREST_EXACT (torch's plain "nearest" samples pixel corners)."""
    if name == "nearest":
        return T.InterpolationMode.NEAREST_EXACT
    return T.InterpolationMode(name)


def _to_tensor(uint8: bool, preprocessing: Preprocessing) -> list:
    """The last steps: uint8 CHW pixels as they are, or fp32 normalised as the chapter does."""
    if uint8:
        return [T.PILToTensor()]
    return [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]


def train_transform(image_size: int, uint8: bool = False,
                    preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> T.Compose:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) with the preprocessing's interpolation,
    + horizontal flip, as in the chapter; normalised with its mean and std.
    Output: (3, size, size) fp32 normalised, or uint8 0-255 with `uint8`."""
    mode = T.InterpolationMode(preprocessing.interpolation)  # PIL images: NEAREST is PIL's own
    return T.Compose([T.RandomResizedCrop(image_size, interpolation=mode), T.RandomHorizontalFlip(),
                      *_to_tensor(uint8, preprocessing)])


def eval_transform(image_size: int, uint8: bool = False,
                   preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> T.Compose:
    """Resize([r, r]) with the preprocessing's interpolation, then CenterCrop(image_size), where r
    is its resize scaled to image_size (Preprocessing.at_size; ResNet-18's: 256 for 224).
    Output: (3, size, size) fp32 normalised, or uint8 0-255 with `uint8`."""
    p = preprocessing.at_size(image_size)
    mode = T.InterpolationMode(p.interpolation)
    return T.Compose([T.Resize([p.resize, p.resize], interpolation=mode), T.CenterCrop(image_size),
                      *_to_tensor(uint8, p)])


class DeviceNormalize:
    """uint8 batches (N, 3, H, W), 0-255, already on the device -> (x - 255 mean) / (255 std),
    with the preprocessing's mean and std (ResNet-18's by default).

    As timm's PrefetchLoader: mean and std are scaled by 255 once, so the pixels need no
    separate division. Unlike timm, which does the arithmetic in the output dtype, this
    works in fp32 and casts last (to `dtype`, e.g. the AMP dtype): a bf16 result is then
    one rounding away from the fp32 path's, not three. The result is then laid out in
    `memory_format`: normalising first, in NCHW, is 3x faster on a CPU than broadcasting
    over the channels of a channels_last batch (32 x 224 px to bf16, one core: 10.6 ms
    against 32.2 ms, the layout change included).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 preprocessing: Preprocessing = DEFAULT_PREPROCESSING):
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([255 * m for m in preprocessing.mean], device=device).view(shape)
        self.std = torch.tensor([255 * s for s in preprocessing.std], device=device).view(shape)
        self.dtype = dtype
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().sub_(self.mean).div_(self.std).to(self.dtype)
        return x.contiguous(memory_format=self.memory_format)

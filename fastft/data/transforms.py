"""The chapter's image transforms, shared by every data backend.

Where the normalisation numbers come from: they are the per-channel mean and
standard deviation of ImageNet's training images (RGB, scaled to [0, 1]). The
pretrained ResNet-18 learned on inputs normalised this way, so fine-tuning
feeds it the same statistics, whatever the new dataset's own are.

Two ways to run the same maths. The chapter's (`uint8=False`): ToTensor scales to
[0, 1] and Normalize subtracts and divides in the loader's worker, which then ships
fp32 batches. The fast one (`uint8=True`): the worker stops at uint8 CHW pixels
(4x fewer bytes to collate, pin and copy), and `DeviceNormalize` does the scaling
on the device, as timm's PrefetchLoader does (timm/data/loader.py).
"""

from __future__ import annotations

import torch
import torchvision.transforms as T

from fastft.config import eval_resize_px

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(uint8: bool) -> list:
    """The last steps: uint8 CHW pixels as they are, or fp32 normalised as the chapter does."""
    if uint8:
        return [T.PILToTensor()]
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(image_size: int, uint8: bool = False) -> T.Compose:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, as in the chapter.
    Output: (3, size, size) fp32 normalised, or uint8 0-255 with `uint8`."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *_to_tensor(uint8)])


def eval_transform(image_size: int, uint8: bool = False) -> T.Compose:
    """Resize([256, 256]) then CenterCrop(224), scaled with the image size.
    Output: (3, size, size) fp32 normalised, or uint8 0-255 with `uint8`."""
    resize = eval_resize_px(image_size)
    return T.Compose([T.Resize([resize, resize]), T.CenterCrop(image_size), *_to_tensor(uint8)])


class DeviceNormalize:
    """uint8 batches (N, 3, H, W), 0-255, already on the device -> (x - 255 mean) / (255 std).

    As timm's PrefetchLoader: mean and std are scaled by 255 once, so the pixels need no
    separate division. Unlike timm, which does the arithmetic in the output dtype, this
    works in fp32 and casts last (to `dtype`, e.g. the AMP dtype): a bf16 result is then
    one rounding away from the fp32 path's, not three. The result is then laid out in
    `memory_format`: normalising first, in NCHW, is 3x faster on a CPU than broadcasting
    over the channels of a channels_last batch (32 x 224 px to bf16, one core: 10.6 ms
    against 32.2 ms, the layout change included).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format):
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=device).view(shape)
        self.std = torch.tensor([255 * s for s in IMAGENET_STD], device=device).view(shape)
        self.dtype = dtype
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().sub_(self.mean).div_(self.std).to(self.dtype)
        return x.contiguous(memory_format=self.memory_format)

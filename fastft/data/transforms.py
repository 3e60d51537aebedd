"""The chapter's image transforms, shared by every data backend.

Where the normalisation numbers come from: they are the per-channel mean and
standard deviation of ImageNet's training images (RGB, scaled to [0, 1]). The
pretrained ResNet-18 learned on inputs normalised this way, so fine-tuning
feeds it the same statistics, whatever the new dataset's own are.
"""

from __future__ import annotations

import torchvision.transforms as T

from fastft.config import eval_resize_px

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int) -> T.Compose:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, as in the chapter."""
    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int) -> T.Compose:
    """Resize([256, 256]) then CenterCrop(224), scaled with the image size."""
    resize = eval_resize_px(image_size)
    return T.Compose([
        T.Resize([resize, resize]),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

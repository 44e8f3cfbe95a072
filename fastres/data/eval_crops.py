"""Evaluation views of the paper: single center crop, 10-crop, and multi-scale
(fully convolutional) testing.

* ``ten_crop(img, size)``: ``[10,C,size,size]`` = top-left, top-right, bottom-left,
  bottom-right, center, then the horizontal flips of those five (torchvision's order).
* ``multiscale_views(img, scales, mean)``: for each scale s the image resized to shorter side
  s (minus the mean image resized to the same size) and its horizontal flip -> ``2*len(scales)``
  tensors of different sizes (a DataLoader over them needs ``batch_size=1`` or a list collate).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .transforms import crop, hflip, resize_tensor, shorter_side_size

__all__ = ["CIFAR_SCALES", "IMAGENET_SCALES", "five_crop", "ten_crop", "multiscale_views",
           "padded_ten_crop"]

IMAGENET_SCALES = (224, 256, 384, 480, 640)
CIFAR_SCALES = (32, 40, 48)


def five_crop(img: torch.Tensor, size: int) -> List[torch.Tensor]:
    h, w = img.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop size {size} larger than the {h}x{w} image")
    return [
        crop(img, 0, 0, size, size),
        crop(img, 0, w - size, size, size),
        crop(img, h - size, 0, size, size),
        crop(img, h - size, w - size, size, size),
        crop(img, (h - size) // 2, (w - size) // 2, size, size),
    ]


def ten_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """``[10,C,size,size]``: 4 corners + center, then their horizontal flips."""
    five = five_crop(img, size)
    return torch.stack(five + [hflip(c) for c in five])


def padded_ten_crop(img: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """10-crop for 32x32 data: zero-pad by ``pad`` (as in training), then crops of the original
    size at the 4 corners and the center (the center crop is the unpadded image) + flips."""
    h = img.shape[-2]
    return ten_crop(F.pad(img, (pad, pad, pad, pad)), h)


def multiscale_views(img: torch.Tensor, scales: Sequence[int],
                     mean: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Views of a tensor image (not yet mean-subtracted) at every scale (shorter side s), each
    followed by its flip; ``mean`` (any size) is resized to each view's size and subtracted."""
    views = []
    h, w = img.shape[-2:]
    for s in scales:
        hw = shorter_side_size(h, w, s)
        v = resize_tensor(img, hw)
        if mean is not None:
            v = v - resize_tensor(mean, hw)
        views += [v.contiguous(), hflip(v).contiguous()]
    return views

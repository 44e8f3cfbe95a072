"""Small tensor-level (and a few PIL-level) transforms for the He et al. (2015) recipes.

Every random transform takes an optional ``generator`` (a ``torch.Generator``); without one
it draws from torch's global RNG, which ``torch.utils.data.DataLoader`` seeds differently in
every worker (from the main process' RNG), so a run seeded with ``torch.manual_seed`` is
reproducible. Images are float32 tensors ``[C, H, W]``; PIL images are RGB.

The deterministic helpers (``pad_crop``, ``hflip``, ``lighting``, ``resize_shorter``,
``center_crop``) take the random choices as arguments so they can be tested exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_EIGVAL",
    "IMAGENET_EIGVEC",
    "pad_crop",
    "random_pad_crop",
    "hflip",
    "random_hflip",
    "lighting",
    "random_lighting",
    "crop",
    "center_crop",
    "random_crop",
    "resize_shorter",
    "resize_shorter_tensor",
    "random_resize_shorter",
    "pil_to_tensor",
    "shorter_side_size",
]

# Eigenvalues / eigenvectors (columns) of the ImageNet RGB pixel covariance, pixels in [0, 1],
# as used for AlexNet-style colour augmentation (Krizhevsky et al. 2012; fb.resnet.torch).
IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = torch.tensor([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
])


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


# ----------------------------------------------------------------------------- CIFAR recipe
def pad_crop(img: torch.Tensor, top: int, left: int, pad: int = 4,
             size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Zero-pad ``img`` [C,H,W] by ``pad`` on every side, then take the ``size`` (default: the
    original H,W) window whose top-left corner is at (top, left) of the padded image."""
    h, w = img.shape[-2:]
    oh, ow = size if size is not None else (h, w)
    if not (0 <= top <= h + 2 * pad - oh and 0 <= left <= w + 2 * pad - ow):
        raise ValueError(f"crop offset ({top}, {left}) out of range for a {h}x{w} image "
                         f"padded by {pad} and a {oh}x{ow} crop")
    padded = F.pad(img, (pad, pad, pad, pad)) if pad else img
    return padded[..., top:top + oh, left:left + ow].clone()


def random_pad_crop(img: torch.Tensor, pad: int = 4,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CIFAR augmentation: zero-pad by ``pad`` and take a random crop of the original size."""
    top = _randint(0, 2 * pad, generator)
    left = _randint(0, 2 * pad, generator)
    return pad_crop(img, top, left, pad)


def hflip(img: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of ``[..., H, W]``."""
    return torch.flip(img, dims=[-1])


def random_hflip(img: torch.Tensor, p: float = 0.5,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if float(torch.rand((), generator=generator)) < p:
        return hflip(img)
    return img


# -------------------------------------------------------------------------- ImageNet recipe
def lighting(img: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """AlexNet PCA colour augmentation with given ``alpha`` [3]: adds, to every pixel, the RGB
    offset ``eigvec @ (alpha * eigval)``. ``img`` is RGB [3,H,W] in [0, 1] scale."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    rgb = IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL)
    return img + rgb.to(img.dtype).view(3, 1, 1)


def random_lighting(img: torch.Tensor, alphastd: float = 0.1,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``lighting`` with alpha ~ N(0, alphastd) per eigenvector."""
    if alphastd == 0:
        return img
    alpha = torch.randn(3, generator=generator) * alphastd
    return lighting(img, alpha)


def crop(img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if not (0 <= top <= h - height and 0 <= left <= w - width):
        raise ValueError(f"crop ({top}, {left}, {height}x{width}) outside a {h}x{w} image")
    return img[..., top:top + height, left:left + width]


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    return crop(img, (h - size) // 2, (w - size) // 2, size, size)


def random_crop(img: torch.Tensor, size: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    h, w = img.shape[-2:]
    top = _randint(0, h - size, generator)
    left = _randint(0, w - size, generator)
    return crop(img, top, left, size, size)


def shorter_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """(new_height, new_width) with the shorter side equal to ``size``, aspect kept."""
    if height <= width:
        return size, max(size, int(round(width * size / height)))
    return max(size, int(round(height * size / width))), size


def resize_shorter(img, size: int):
    """Resize a PIL image so its shorter side is ``size`` (bilinear, aspect ratio kept)."""
    from PIL import Image

    w, h = img.size
    nh, nw = shorter_side_size(h, w, size)
    if (nh, nw) == (h, w):
        return img
    return img.resize((nw, nh), Image.BILINEAR)


def resize_shorter_tensor(img: torch.Tensor, size: int) -> torch.Tensor:
    """Tensor version of ``resize_shorter`` for ``[C,H,W]`` (bilinear, antialiased down)."""
    h, w = img.shape[-2:]
    nh, nw = shorter_side_size(h, w, size)
    if (nh, nw) == (h, w):
        return img
    return resize_tensor(img, (nh, nw))


def resize_tensor(img: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``[C,H,W]`` to ``hw`` (antialiased when shrinking)."""
    nh, nw = int(hw[0]), int(hw[1])
    if tuple(img.shape[-2:]) == (nh, nw):
        return img
    shrink = nh < img.shape[-2] or nw < img.shape[-1]
    return F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear",
                         align_corners=False, antialias=shrink)[0]


def random_resize_shorter(img, low: int = 256, high: int = 480,
                          generator: Optional[torch.Generator] = None):
    """Scale augmentation of the paper: shorter side resized to a uniform random integer in
    [low, high] (PIL image in, PIL image out)."""
    return resize_shorter(img, _randint(low, high, generator))


def pil_to_tensor(img) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3,H,W] in [0, 1]."""
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

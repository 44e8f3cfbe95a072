"""The ``cpu`` data backend: the ImageNet recipe with the work per image cut down.

Per image, in the DataLoader workers (the random draws are the reference's, in its order, from
torch's RNG: scale, crop top, crop left, flip, lighting alpha, so a seeded run draws what
``ImageFolderDataset`` draws):

* JPEGs are decoded at a reduced size where the target allows it (``Image.draft``: libjpeg
  scales by 1/2, 1/4 or 1/8 inside the inverse DCT, while the decoded image stays at least as
  large as the resized one);
* resize and crop are one call, ``Image.resize((224, 224), BILINEAR, box=...)``: only the 224 x
  224 output pixels are computed (PIL's filter, the same weights as resizing the whole image
  and cropping), the flip is a uint8 transpose;
* the item stays uint8 ``[224, 224, 3]`` (HWC: a batch of them permuted to NCHW is
  channels_last, no copy) with its lighting ``alpha``.

The last step, uint8 -> float, lighting, mean image, dtype and memory format, runs once per
batch (``batched.finish_batch``), on the training device (4x less to copy to a GPU than float32).

Evaluation views (fastres-eval): ``10crop`` is five ``resize(box=...)`` calls (the corners and
the center of the image at shorter side 256) and their uint8 flips, finished as one batch of
10 per image; ``multiscale`` resizes the whole image to each of ``IMAGENET_SCALES`` (uint8), then
per view the last step with the mean image resized to the view's size (as the reference) and
the flip of the result.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import transforms as T
from .batched import finish_batch
from .eval_crops import IMAGENET_SCALES

__all__ = ["FastImageFolderDataset", "CPUBatchLoader", "open_draft"]


def open_draft(im, need_w: int, need_h: int, draft: bool = True):
    """Load the opened PIL image ``im`` as RGB (or L), decoded at the smallest JPEG DCT scale
    that keeps it at least ``need_w`` x ``need_h`` (``draft``); other formats load as they are.
    """
    if draft and im.format == "JPEG" and im.mode in ("RGB", "L"):
        im.draft(im.mode, (need_w, need_h))
    im.load()
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return im


class FastImageFolderDataset(Dataset):
    """Items ``(uint8 [crop, crop, 3], alpha float32 [3], label)`` of the samples of an
    ``ImageFolderDataset`` (mode ``train`` or ``center``; ``10crop``: uint8 [10, crop, crop, 3],
    the corners, the center, then their flips; ``multiscale``: a list of uint8 [H_s, W_s, 3],
    the image at each shorter side of ``IMAGENET_SCALES``, not flipped); unreadable files are
    skipped as there (warned with the path, counted in ``skipped``, the next image used)."""

    MODES = ("train", "center", "center1", "10crop", "multiscale")

    def __init__(self, base, mode: Optional[str] = None, draft: bool = True):
        mode = mode or base.mode
        if mode not in self.MODES:
            raise ValueError(f"the cpu backend builds the views {self.MODES}, not {mode!r}")
        self.samples = base.samples
        self.folder = base.folder
        self.mode = mode
        self.scale = base.scale
        self.crop_size = base.crop_size
        self.test_size = base.test_size
        self.alphastd = base.alphastd
        self.draft = draft
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _item(self, path: str) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        c = self.crop_size
        if self.mode in ("10crop", "multiscale"):
            return self._eval_views(path), torch.zeros(3)
        with Image.open(path) as im:
            w, h = im.size
            if self.mode == "train":
                s = T._randint(self.scale[0], self.scale[1], None)
            else:
                s = self.test_size
            nh, nw = T.shorter_side_size(h, w, s)
            if self.mode == "train":
                top = T._randint(0, nh - c, None)
                left = T._randint(0, nw - c, None)
            else:
                top, left = (nh - c) // 2, (nw - c) // 2
            im = open_draft(im, nw, nh, self.draft)
            dw, dh = im.size
            sx, sy = dw / nw, dh / nh
            box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
            out = im.resize((c, c), Image.BILINEAR, box=box)
        alpha = torch.zeros(3)
        if self.mode == "train":
            if float(torch.rand(())) < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            if self.alphastd:
                alpha = torch.randn(3) * self.alphastd
        return torch.from_numpy(_rgb_array(out)), alpha

    def _eval_views(self, path: str):
        from PIL import Image

        c = self.crop_size
        with Image.open(path) as im:
            w, h = im.size
            if self.mode == "multiscale":
                sizes = [T.shorter_side_size(h, w, s) for s in IMAGENET_SCALES]
                im = open_draft(im, max(nw for _, nw in sizes), max(nh for nh, _ in sizes),
                                self.draft)
                return [torch.from_numpy(_rgb_array(im.resize((nw, nh), Image.BILINEAR)))
                        for nh, nw in sizes]
            nh, nw = T.shorter_side_size(h, w, self.test_size)
            im = open_draft(im, nw, nh, self.draft)
            dw, dh = im.size
            sx, sy = dw / nw, dh / nh
            corners = ((0, 0), (0, nw - c), (nh - c, 0), (nh - c, nw - c),
                       ((nh - c) // 2, (nw - c) // 2))
            crops = [_rgb_array(im.resize((c, c), Image.BILINEAR,
                                          box=(left * sx, top * sy, (left + c) * sx,
                                               (top + c) * sy)))
                     for top, left in corners]
        return torch.from_numpy(np.stack(crops + [a[:, ::-1] for a in crops]))

    def __getitem__(self, i: int):
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(i + k) % n]
            try:
                x, alpha = self._item(path)
                return x, alpha, label
            except Exception as e:  # noqa: BLE001 - any decoding failure: skip, with the path
                self.skipped += 1
                warnings.warn(f"skipped unreadable image {path!r} ({type(e).__name__}: {e}); "
                              f"{self.skipped} skipped so far in this process", RuntimeWarning)
        raise RuntimeError(f"no readable image in {self.folder!r}")


def _rgb_array(im) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image (L images converted)."""
    return np.array(im if im.mode == "RGB" else im.convert("RGB"))


def _collate_views(batch):
    views, _, labels = zip(*batch)
    return list(views), None, torch.tensor(labels)


class CPUBatchLoader:
    """Batches of the ``cpu`` backend: workers give uint8 crops; each batch is finished
    (float, lighting, mean, ``out_dtype``, channels_last) on ``device``. Yields ``(x, y)``;
    ``x`` is [B, 10, 3, crop, crop] in mode ``10crop``, and in mode ``multiscale`` a list, per
    image, of its views [3, H_s, W_s] each followed by its flip."""

    def __init__(self, base, batch_size: int, device="cpu", *, mode: Optional[str] = None,
                 sampler=None, shuffle: bool = False, num_workers: int = 0,
                 drop_last: bool = False, generator: Optional[torch.Generator] = None,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 draft: bool = True):
        self.dataset = FastImageFolderDataset(base, mode, draft)
        self.device = torch.device(device)
        self.mean = None if base.mean is None else base.mean.to(self.device, torch.float32)
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        self._means = {}  # the mean image resized to each multiscale view's size
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler,
                                 shuffle=shuffle if sampler is None else False,
                                 num_workers=num_workers, drop_last=drop_last,
                                 generator=generator, pin_memory=self.device.type == "cuda",
                                 persistent_workers=False,
                                 collate_fn=_collate_views if self.dataset.mode == "multiscale"
                                 else None)

    def __len__(self) -> int:
        return len(self.loader)

    def stats(self) -> dict:
        return {"backend": "cpu", "skipped": self.dataset.skipped}

    def _mean_of_size(self, h: int, w: int) -> Optional[torch.Tensor]:
        if self.mean is None:
            return None
        if (h, w) not in self._means:
            self._means[(h, w)] = T.resize_tensor(self.mean, (h, w))
        return self._means[(h, w)]

    def _multiscale(self, views):
        out = []
        for u8 in views:
            x = u8.to(self.device, non_blocking=True).permute(2, 0, 1)[None]
            x = finish_batch(x, None, self._mean_of_size(*u8.shape[:2]), self.out_dtype,
                             channels_last=False)[0]
            out += [x, x.flip(-1)]
        return out

    def __iter__(self):
        mode = self.dataset.mode
        lighting = mode == "train" and bool(self.dataset.alphastd)
        for u8, alpha, y in self.loader:
            y = y.to(self.device, non_blocking=True)
            if mode == "multiscale":
                yield [self._multiscale(views) for views in u8], y
                continue
            x = u8.to(self.device, non_blocking=True)
            b = x.shape[0]
            if mode == "10crop":
                x = x.reshape(-1, *x.shape[2:])
            x = finish_batch(x.permute(0, 3, 1, 2), alpha if lighting else None, self.mean,
                             self.out_dtype, self.channels_last)
            if mode == "10crop":
                x = x.reshape(b, 10, *x.shape[1:])
            yield x, y

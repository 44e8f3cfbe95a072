"""The ImageNet recipe's augmentation and evaluation views as batched tensor operations, on any
device (the ``gpu`` data backend runs them on CUDA; CI runs the same code on CPU).

A bilinear resize (antialiased when shrinking, PIL's filter) is separable: ``out = Wh @ img @
Ww^T`` with one weight matrix per axis. The crop only needs the rows of ``Wh`` and ``Ww`` of
its own output pixels, and a horizontal flip reverses the rows of ``Ww``; so a whole batch of
images of different sizes becomes two batched matrix products (images zero-padded to the
largest of their chunk; the padding has weight 0), followed by one elementwise pass for the
PCA lighting, the mean image, the output dtype and channels_last. The weights follow PIL's
``Image.resize(..., BILINEAR)`` (``ImagingResample``: triangle filter widened by the scale
factor when shrinking, normalised per output pixel), which is what the per-image reference
(``fastres.data.transforms``) uses; the difference to it is interpolation rounding (PIL keeps
uint8 between its two passes and fixed-point weights).

The random draws are explicit (``TrainParams``) so the batched pipeline can be compared with
the reference for the same draws; ``draw_train_params`` draws them with the reference's
distributions: shorter side uniform in [256, 480] (integers), crop offsets uniform, flips with
probability 0.5, lighting alpha ~ N(0, 0.1) per eigenvector.

Memory: images are processed in chunks (sorted by size, so a chunk pads little) whose working
buffers (padded input, the intermediate product, the output) stay below ``budget_bytes``; the
largest chunk's bytes are returned in ``AugmentStats.peak_bytes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC

__all__ = ["TrainParams", "AugmentStats", "draw_train_params", "center_params",
           "ten_crop_params", "resized_sizes", "resize_weights", "augment_batch",
           "multiscale_views_batch", "lighting_offsets", "finish_batch", "default_budget"]


@dataclass
class TrainParams:
    """Per image b and view v: the shorter side ``scale[b, v]`` the image is resized to, the
    crop's top-left corner (``top``, ``left``) in the resized image, ``flip`` and the lighting
    ``alpha[b, v, 3]`` (zeros: no lighting). All tensors on the CPU, shape [B, V(, 3)]."""
    scale: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    alpha: torch.Tensor
    crop: int = 224

    def select(self, idx) -> "TrainParams":
        return TrainParams(self.scale[idx], self.top[idx], self.left[idx], self.flip[idx],
                           self.alpha[idx], self.crop)


@dataclass
class AugmentStats:
    chunks: int = 0
    peak_bytes: int = 0


def default_budget(device) -> int:
    """Working-memory bound of ``augment_batch``: 1 GiB on a GPU; 64 MiB on a CPU (chunks
    that stay in cache are faster there)."""
    return (1 << 30) if torch.device(device).type == "cuda" else (64 << 20)


def resized_sizes(hw: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vectorised ``transforms.shorter_side_size``: (new_h, new_w) for sizes ``hw`` [B, 2]
    (broadcast against ``scale`` [B, V]); Python's round (half to even), as the reference."""
    h = hw[:, 0:1].to(torch.float64)
    w = hw[:, 1:2].to(torch.float64)
    s = scale.to(torch.float64)
    long_w = torch.maximum(s, torch.round(w * s / h))
    long_h = torch.maximum(s, torch.round(h * s / w))
    portrait = h > w
    nh = torch.where(portrait, long_h, s).to(torch.int64)
    nw = torch.where(portrait, s, long_w).to(torch.int64)
    return nh, nw


def draw_train_params(hw: torch.Tensor, scale: Tuple[int, int] = (256, 480), crop: int = 224,
                      alphastd: float = 0.1, generator: Optional[torch.Generator] = None
                      ) -> TrainParams:
    """The paper's random draws for images of sizes ``hw`` [B, 2] (CPU, int)."""
    hw = torch.as_tensor(hw, dtype=torch.int64).reshape(-1, 2)
    b = hw.shape[0]
    low, high = int(scale[0]), int(scale[1])
    if not 0 < low <= high:
        raise ValueError(f"scale range must be 0 < low <= high, got {scale}")
    if low < crop:
        raise ValueError(f"the smallest scale {low} is below the crop size {crop}")
    s = torch.randint(low, high + 1, (b, 1), generator=generator)
    nh, nw = resized_sizes(hw, s)
    u = torch.rand(b, 1, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u[..., 0] * (nh - crop + 1)).to(torch.int64).clamp_(max=nh - crop)
    left = torch.floor(u[..., 1] * (nw - crop + 1)).to(torch.int64).clamp_(max=nw - crop)
    flip = torch.rand(b, 1, generator=generator) < 0.5
    alpha = torch.randn(b, 1, 3, generator=generator) * alphastd
    return TrainParams(s, top, left, flip, alpha, crop)


def center_params(hw: torch.Tensor, size: int = 256, crop: int = 224) -> TrainParams:
    """Validation view: shorter side ``size``, center ``crop`` (one view per image)."""
    hw = torch.as_tensor(hw, dtype=torch.int64).reshape(-1, 2)
    b = hw.shape[0]
    s = torch.full((b, 1), int(size), dtype=torch.int64)
    nh, nw = resized_sizes(hw, s)
    return TrainParams(s, (nh - crop) // 2, (nw - crop) // 2, torch.zeros(b, 1, dtype=torch.bool),
                       torch.zeros(b, 1, 3), crop)


def ten_crop_params(hw: torch.Tensor, size: int = 256, crop: int = 224) -> TrainParams:
    """The 10 views of ``eval_crops.ten_crop`` at shorter side ``size``: top-left, top-right,
    bottom-left, bottom-right, center, then the same five flipped."""
    hw = torch.as_tensor(hw, dtype=torch.int64).reshape(-1, 2)
    b = hw.shape[0]
    s = torch.full((b, 10), int(size), dtype=torch.int64)
    nh, nw = resized_sizes(hw, s[:, :1])
    zero = torch.zeros_like(nh)
    top5 = torch.cat([zero, zero, nh - crop, nh - crop, (nh - crop) // 2], 1)
    left5 = torch.cat([zero, nw - crop, zero, nw - crop, (nw - crop) // 2], 1)
    flip = torch.tensor([False] * 5 + [True] * 5).expand(b, 10)
    return TrainParams(s, top5.repeat(1, 2), left5.repeat(1, 2), flip.clone(),
                       torch.zeros(b, 10, 3), crop)


def resize_weights(in_len: torch.Tensor, out_len: torch.Tensor, start: torch.Tensor, count: int,
                   max_in: int, flip: Optional[torch.Tensor] = None,
                   dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """PIL's bilinear resampling weights along one axis, ``[..., count, max_in]``: row i gives
    output pixel ``start + i`` of the input (length ``in_len``) resized to ``out_len``; rows
    reversed where ``flip``. Columns at or past ``in_len`` are 0 (padding)."""
    dev = device if device is not None else in_len.device
    in_len = in_len.to(dev, torch.float64)[..., None, None]
    out_len = out_len.to(dev, torch.float64)[..., None, None]
    start = start.to(dev, torch.float64)[..., None, None]
    o = torch.arange(count, device=dev, dtype=torch.float64)[:, None] + start
    j = torch.arange(max_in, device=dev, dtype=torch.float64)
    scale = in_len / out_len
    filterscale = torch.clamp(scale, min=1.0)
    center = (o + 0.5) * scale
    w = torch.clamp(1.0 - ((j + 0.5 - center) / filterscale).abs(), min=0.0)
    w = torch.where(j < in_len, w, torch.zeros((), device=dev, dtype=torch.float64))
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    if flip is not None:
        w = torch.where(flip.to(dev)[..., None, None], w.flip(-2), w)
    return w.to(dtype)


def lighting_offsets(alpha: torch.Tensor) -> torch.Tensor:
    """RGB offsets ``eigvec @ (alpha * eigval)`` for alpha [..., 3] (``transforms.lighting``)."""
    dev = alpha.device
    return (alpha.float() * IMAGENET_EIGVAL.to(dev)) @ IMAGENET_EIGVEC.T.to(dev)


def _compute_dtype(device) -> torch.dtype:
    # fp16 on a GPU: pixel values 0..255 are exact and the weights keep 11 bits (errors of
    # about 0.1 of a grey level); tensor cores accumulate in fp32
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _chunks(hw: torch.Tensor, views: int, crop: int, elt: int, budget: int) -> List[List[int]]:
    """Indices grouped so that each group's buffers (padded input, intermediate, output,
    weights) fit ``budget`` bytes (sorted by size so that neighbours pad little; an image
    whose own buffers exceed the budget makes a chunk of its own)."""
    key = (hw[:, 0] * 100_000 + hw[:, 1]).tolist()
    order = sorted(range(len(key)), key=key.__getitem__)
    out, cur, hmax, wmax = [], [], 0, 0
    for i in order:
        h, w = int(hw[i, 0]), int(hw[i, 1])
        nh_, nw_ = max(hmax, h), max(wmax, w)
        n = len(cur) + 1
        need = elt * n * (3 * (nh_ * nw_ + views * crop * nw_ + views * crop * crop)
                          + views * crop * (nh_ + nw_))
        if cur and need > budget:
            out.append(cur)
            cur, nh_, nw_ = [], h, w
        cur.append(i)
        hmax, wmax = nh_, nw_
    if cur:
        out.append(cur)
    return out


def augment_batch(images: Sequence[torch.Tensor], params: TrainParams,
                  mean: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
                  channels_last: bool = True, budget_bytes: Optional[int] = None,
                  compute_dtype: Optional[torch.dtype] = None,
                  stats: Optional[AugmentStats] = None) -> torch.Tensor:
    """Resize + crop + flip + lighting + mean of a list of uint8 ``[3, H_i, W_i]`` images (all
    on one device) -> ``[B, V, 3, crop, crop]`` (V = views per image; ``[B, 3, crop, crop]``
    when V is 1) in ``out_dtype``, channels_last when asked. ``mean`` is [3, crop, crop] in
    [0, 1] units (subtracted after the flip, as in the reference)."""
    if len(images) == 0:
        raise ValueError("augment_batch: no images")
    device = images[0].device
    for im in images:
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"augment_batch: images must be [3, H, W], got {tuple(im.shape)}")
        if im.device != device:
            raise ValueError("augment_batch: images on different devices")
    b, v = params.scale.shape
    if b != len(images):
        raise ValueError(f"augment_batch: {len(images)} images but parameters for {b}")
    crop = params.crop
    cdt = compute_dtype or _compute_dtype(device)
    budget = budget_bytes if budget_bytes is not None else default_budget(device)
    hw = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64)
    nh, nw = resized_sizes(hw, params.scale)
    if bool(((params.top < 0) | (params.top + crop > nh) | (params.left < 0)
             | (params.left + crop > nw)).any()):
        raise ValueError("augment_batch: a crop lies outside its resized image")
    out = torch.empty(b, v, 3, crop, crop, device=device, dtype=cdt)
    elt = torch.empty((), dtype=cdt).element_size()
    for idx in _chunks(hw, v, crop, elt, budget):
        hmax = int(hw[idx, 0].max())
        wmax = int(hw[idx, 1].max())
        it = torch.tensor(idx)
        x = torch.zeros(len(idx), 3, hmax, wmax, device=device, dtype=cdt)
        for k, i in enumerate(idx):
            im = images[i]
            x[k, :, :im.shape[1], :im.shape[2]].copy_(im)
        wh = resize_weights(hw[it, 0:1].expand(-1, v), nh[it], params.top[it], crop, hmax,
                            dtype=cdt, device=device)                      # [n, V, crop, H]
        ww = resize_weights(hw[it, 1:2].expand(-1, v), nw[it], params.left[it], crop, wmax,
                            flip=params.flip[it], dtype=cdt, device=device)  # [n, V, crop, W]
        t = torch.matmul(wh[:, :, None], x[:, None])                       # [n, V, 3, crop, W]
        y = torch.matmul(t, ww.transpose(-1, -2)[:, :, None])              # [n, V, 3, crop, crop]
        out[it.to(device)] = y
        if stats is not None:
            stats.chunks += 1
            used = elt * (x.numel() + t.numel() + y.numel() + wh.numel() + ww.numel())
            stats.peak_bytes = max(stats.peak_bytes, used)
        del x, t, y
    res = finish_batch(out.reshape(b * v, 3, crop, crop), params.alpha.reshape(b * v, 3),
                       mean, out_dtype, channels_last, scale=1.0 / 255.0)
    return res if v == 1 else res.reshape(b, v, 3, crop, crop)


def finish_batch(x: torch.Tensor, alpha: Optional[torch.Tensor], mean: Optional[torch.Tensor],
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 scale: float = 1.0 / 255.0) -> torch.Tensor:
    """The last, elementwise step of every backend: ``x * scale`` (uint8 0..255 -> [0, 1]),
    plus the lighting offset of each image's ``alpha`` [B, 3] (None: none), minus ``mean``
    [3, H, W]; cast to ``out_dtype``, channels_last when asked. ``x`` is [B, 3, H, W] in any
    dtype and memory format (a [B, H, W, 3] uint8 batch permuted is channels_last already).
    Works on the NHWC view, in place on one float32 copy (three passes)."""
    dev = x.device
    y = x.permute(0, 2, 3, 1).to(torch.float32, copy=True)   # NHWC view, dense copy
    y.mul_(scale)
    if alpha is not None:
        y.add_(lighting_offsets(alpha).to(dev, non_blocking=True)[:, None, None, :])
    if mean is not None:
        y.sub_(mean.to(dev, torch.float32).permute(1, 2, 0).contiguous())
    y = y.permute(0, 3, 1, 2)
    if channels_last:
        return y.to(dtype=out_dtype, memory_format=torch.channels_last)
    return y.to(dtype=out_dtype).contiguous()


def multiscale_views_batch(images: Sequence[torch.Tensor], scales: Sequence[int],
                           mean: Optional[torch.Tensor] = None,
                           out_dtype: torch.dtype = torch.float32) -> List[List[torch.Tensor]]:
    """``eval_crops.multiscale_views`` for uint8 [3, H, W] images: per image, for each scale s
    the whole image at shorter side s minus the mean image resized to that size, then its flip
    (views differ in size, so one image at a time; each view is two matrix products)."""
    res = []
    for im in images:
        dev = im.device
        cdt = _compute_dtype(dev)
        h, w = int(im.shape[1]), int(im.shape[2])
        x = im.to(cdt)
        views = []
        for s in scales:
            nh, nw = resized_sizes(torch.tensor([[h, w]]), torch.tensor([[int(s)]]))
            nh, nw = int(nh), int(nw)
            wh = resize_weights(torch.tensor(h), torch.tensor(nh), torch.tensor(0), nh, h,
                                dtype=cdt, device=dev)
            ww = resize_weights(torch.tensor(w), torch.tensor(nw), torch.tensor(0), nw, w,
                                dtype=cdt, device=dev)
            y = (wh @ x @ ww.T).float() / 255.0
            if mean is not None:
                mh, mw = mean.shape[-2:]
                mwh = resize_weights(torch.tensor(mh), torch.tensor(nh), torch.tensor(0), nh, mh,
                                     device=dev)
                mww = resize_weights(torch.tensor(mw), torch.tensor(nw), torch.tensor(0), nw, mw,
                                     device=dev)
                y = y - mwh @ mean.to(dev, torch.float32) @ mww.T
            y = y.to(out_dtype)
            views += [y.contiguous(), y.flip(-1).contiguous()]
        res.append(views)
    return res

"""The ``dali`` data backend: the ImageNet recipe as an NVIDIA DALI pipeline, for users who
have DALI installed (``pip install nvidia-dali-cuda130``, or the build for their CUDA; it is
not a dependency of fastres; it runs on a CUDA GPU, or on the CPU in DALI's CPU-only mode).

DALI reads the files (``fn.readers.file`` with the image folder's own file list and labels,
so classes and skipped files are fastres'), decodes them on the GPU (``fn.decoders.image``,
``device="mixed"``; on a CPU device, DALI's CPU-only mode: decoding and augmentation on its
own threads, ``device_id=None``), resizes the shorter side to a random integer in [256, 480]
(``fn.resize(resize_shorter=...)``, linear with antialiasing), and takes the random 224 crop,
the flip and the scaling to [0, 1] in ``fn.crop_mirror_normalize``; it also draws the lighting
alpha. The last step (lighting offset, per-pixel mean image, dtype, channels_last) is
``fastres.data.batched.finish_batch``, the same code as the other backends. Validation: shorter
side 256, center 224 crop, with the reference's output sizes and crop position (from the file's
header, ``fn.peek_image_shape``), so it matches the reference to a fraction of a level.

Tested where DALI is installed (``tests/test_data_pipelines.py`` skips without it).
"""
from __future__ import annotations

from typing import Optional

import torch

from .batched import finish_batch

__all__ = ["DALI_PACKAGE", "DaliUnavailable", "require_dali", "check_device", "DaliBatchLoader"]

DALI_PACKAGE = "nvidia-dali-cuda130"


class DaliUnavailable(ImportError):
    """NVIDIA DALI is not installed."""


def require_dali():
    """Import and return ``nvidia.dali``, or raise a ``DaliUnavailable`` naming the package."""
    try:
        import nvidia.dali as dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as e:
        raise DaliUnavailable(
            f"--data-backend dali needs NVIDIA DALI, which is not installed ({e}); install it "
            f"with `pip install {DALI_PACKAGE}` (the build for CUDA 13; DALI publishes one "
            f"package per CUDA major version), or use --data-backend gpu, which needs only "
            f"torchvision") from None
    return dali


def check_device(device) -> torch.device:
    """``device`` as a torch.device, if DALI can feed it: a CUDA device, or the CPU (DALI's
    CPU-only mode); else ValueError."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--data-backend dali runs on a CUDA device or the CPU, not "
                         f"{device.type!r}")
    return device


def _center_pos(size, crop: int):
    """crop_pos for DALI's crop of ``crop`` pixels from ``size`` (DataNodes): DALI's anchor is
    round(pos * (size - crop)), the reference's (size - crop) // 2; a quarter pixel past the
    latter rounds to it whatever the parity."""
    from nvidia.dali import math as dmath

    d = size - float(crop)
    return (dmath.floor(d * 0.5) + 0.25) / dmath.max(d, 1.0)


class DaliBatchLoader:
    """Batches ``(x, y)`` on ``device`` from a DALI pipeline over ``base.samples`` (an
    ``ImageFolderDataset``), ``mode`` train or center; ``shard_id``/``num_shards`` split the
    files between distributed processes."""

    def __init__(self, base, batch_size: int, device="cuda", *, mode: Optional[str] = None,
                 shuffle: bool = True, num_workers: int = 4, drop_last: bool = True,
                 seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = True):
        require_dali()
        mode = mode or base.mode
        if mode not in ("train", "center", "center1"):
            raise ValueError(f"the dali backend builds 'train' and 'center' views, not {mode!r}")
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.device = check_device(device)
        on_gpu = self.device.type == "cuda"
        self.mode = mode
        self.mean = None if base.mean is None else base.mean.to(self.device, torch.float32)
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        self.alphastd = float(base.alphastd)
        files = [p for p, _ in base.samples]
        labels = [int(t) for _, t in base.samples]
        crop, low, high, test = base.crop_size, base.scale[0], base.scale[1], base.test_size
        train = mode == "train"
        alphastd = self.alphastd

        @pipeline_def
        def pipe():
            jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=train and
                                           shuffle, shard_id=shard_id, num_shards=num_shards,
                                           pad_last_batch=not train, name="Reader")
            images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu",
                                       output_type=types.RGB)
            if train:
                size = fn.random.uniform(values=[float(v) for v in range(low, high + 1)])
                images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_LINEAR,
                                   antialias=True)
                images = fn.crop_mirror_normalize(
                    images, crop=(crop, crop), crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                    crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
                    mirror=fn.random.coin_flip(probability=0.5), dtype=types.FLOAT,
                    output_layout="CHW", mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0])
                alpha = fn.random.normal(shape=[3]) * alphastd
            else:
                # the reference's sizes and crop exactly (fastres.data.transforms
                # shorter_side_size and center_crop), computed from the file's header
                hw = fn.peek_image_shape(jpegs)
                h, w = fn.cast(hw[0], dtype=types.FLOAT), fn.cast(hw[1], dtype=types.FLOAT)
                scale = float(test) / dmath.min(h, w)
                out_h = dmath.max(float(test), dmath.floor(h * scale + 0.5))
                out_w = dmath.max(float(test), dmath.floor(w * scale + 0.5))
                images = fn.resize(images, resize_y=out_h, resize_x=out_w,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(
                    images, crop=(crop, crop), crop_pos_y=_center_pos(out_h, crop),
                    crop_pos_x=_center_pos(out_w, crop), dtype=types.FLOAT,
                    output_layout="CHW", mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0])
                alpha = fn.random.normal(shape=[3]) * 0.0
            return images, alpha, label

        device_id = None  # DALI's CPU-only mode
        if on_gpu:
            device_id = self.device.index if self.device.index is not None else \
                torch.cuda.current_device()
        self.pipe = pipe(batch_size=batch_size, num_threads=max(1, num_workers),
                         device_id=device_id, seed=seed)
        self.pipe.build()
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator([self.pipe], ["data", "alpha", "label"],
                                            reader_name="Reader", last_batch_policy=policy,
                                            auto_reset=True)

    def __len__(self) -> int:
        return len(self.iterator)

    def stats(self) -> dict:
        return {"backend": "dali"}

    def __iter__(self):
        for out in self.iterator:
            d = out[0]
            alpha = d["alpha"] if self.mode == "train" and self.alphastd else None
            x = finish_batch(d["data"], alpha, self.mean, self.out_dtype, self.channels_last,
                             scale=1.0)
            yield x, d["label"].reshape(-1).long().to(self.device)

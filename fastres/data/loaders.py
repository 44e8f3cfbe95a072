"""Which data pipeline feeds the trainer and fastres-eval: ``--data-backend
auto|reference|cpu|gpu|dali`` (the flag itself: ``fastres.train.common``).

* ``reference``: the per-image PyTorch/PIL transforms of ``ImageFolderDataset`` (float32
  items, batched by a DataLoader) - the definition of the recipe, slow;
* ``cpu``: ``fastres.data.cpu_pipeline`` - reduced-size JPEG decoding, resize+crop in one PIL
  call, uint8 until a batched last step on the training device;
* ``gpu``: ``fastres.data.gpu_pipeline`` - workers read bytes, nvJPEG decodes batches on the
  GPU, batched augmentation there, prefetched on its own stream (also runs on a CPU device);
* ``dali``: ``fastres.data.dali_pipeline`` - NVIDIA DALI, when installed;
* ``auto``: ``gpu`` for image folders on a CUDA device, ``cpu`` for image folders otherwise;
  data sets that are not image folders (digits, CIFAR-10, synthetic) always use their own
  DataLoader (``reference``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

__all__ = ["DATA_BACKENDS", "resolve_data_backend", "make_loader"]

DATA_BACKENDS = ("auto", "reference", "cpu", "gpu", "dali")


def _is_imagefolder(dataset) -> bool:
    from .datasets import ImageFolderDataset
    return isinstance(dataset, ImageFolderDataset)


def resolve_data_backend(name: str, dataset, device) -> str:
    """The backend ``name`` (see ``DATA_BACKENDS``) means for ``dataset`` on ``device``;
    raises ValueError for a combination that cannot run."""
    if name not in DATA_BACKENDS:
        raise ValueError(f"unknown data backend {name!r}; expected one of {DATA_BACKENDS}")
    device = torch.device(device)
    folder = _is_imagefolder(dataset)
    if name == "auto":
        if not folder:
            return "reference"
        return "gpu" if device.type == "cuda" else "cpu"
    if name != "reference" and not folder:
        raise ValueError(f"--data-backend {name} works on image folders (imagefolder:PATH); "
                         f"this data set ({type(dataset).__name__}) has its own loader, use "
                         f"--data-backend auto or reference")
    if name == "dali":
        from .dali_pipeline import check_device, require_dali
        require_dali()
        check_device(device)
    return name


def make_loader(dataset, backend: str, batch_size: int, device, *, mode: Optional[str] = None,
                sampler=None, shuffle: bool = False, num_workers: int = 0,
                drop_last: bool = False, generator: Optional[torch.Generator] = None,
                out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                seed: int = 0, shard_id: int = 0, num_shards: int = 1, log=None):
    """An iterable of ``(x, y)`` batches with ``len()``. ``reference`` gives CPU batches of
    the dataset's own items (the caller moves them); the others give ``x`` on ``device`` in
    ``out_dtype`` (channels_last when asked). ``mode`` (default: the dataset's) is ``train``,
    ``center``, or an evaluation view of ``ImageFolderDataset`` (``center1``, ``10crop``,
    ``multiscale``: cpu and gpu; dali builds train and center only)."""
    device = torch.device(device)
    if backend == "reference":
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          shuffle=shuffle if sampler is None else False,
                          num_workers=num_workers, pin_memory=device.type == "cuda",
                          drop_last=drop_last, generator=generator)
    kw = dict(mode=mode, num_workers=num_workers, drop_last=drop_last, out_dtype=out_dtype,
              channels_last=channels_last)
    if backend == "cpu":
        from .cpu_pipeline import CPUBatchLoader
        return CPUBatchLoader(dataset, batch_size, device, sampler=sampler, shuffle=shuffle,
                              generator=generator, **kw)
    if backend == "gpu":
        from .gpu_pipeline import GPUBatchLoader
        return GPUBatchLoader(dataset, batch_size, device, sampler=sampler, shuffle=shuffle,
                              generator=generator, log=log, **kw)
    if backend == "dali":
        from .dali_pipeline import DaliBatchLoader
        return DaliBatchLoader(dataset, batch_size, device, shuffle=shuffle or sampler is not None,
                               seed=seed, shard_id=shard_id, num_shards=num_shards, **kw)
    raise ValueError(f"unknown data backend {backend!r}; expected one of {DATA_BACKENDS[1:]}")

"""Data layer of the trainer (He et al. 2015 recipes).

    from fastres.data import build_data, build_eval_data, SPEC_HELP
    bundle = build_data("digits")                  # or "cifar10:PATH", "imagefolder:PATH",
                                                   # "synthetic", "synthetic:N"
    x, y = bundle.train[0]                         # float32 [3,32,32] (mean subtracted), int
    ds, num_classes = build_eval_data("cifar10:PATH", crop="10crop", split="test")

See ``fastres.data.datasets`` for the recipes, ``transforms`` and ``eval_crops`` for the
building blocks.
"""
from . import eval_crops, transforms
from .datasets import (SPEC_HELP, DataBundle, ImageFolderDataset, SyntheticDataset,
                       TensorImageDataset, build_data, build_eval_data)

__all__ = [
    "SPEC_HELP",
    "DataBundle",
    "ImageFolderDataset",
    "SyntheticDataset",
    "TensorImageDataset",
    "build_data",
    "build_eval_data",
    "eval_crops",
    "transforms",
]

"""Datasets and the ``build_data`` / ``build_eval_data`` entry points.

Specs (``SPEC_HELP``):

* ``digits`` - scikit-learn's bundled 8x8 digits (1797 real images, no download), scaled to
  [0, 1], bilinearly upsampled to 32x32, replicated to 3 channels. Fixed stratified split of
  1497 train / 300 val (seed 0, independent of ``seed``). CIFAR recipe; note that horizontal
  flips are questionable for digits but the recipe is followed as is.
* ``cifar10:PATH`` - the python pickle batches (``PATH`` is ``cifar-10-batches-py`` or its
  parent). 45k/5k train/val split of the training batches (fixed, seed 0): 5000 val images
  when there are 50000, else ``round(N * 5000 / 50000)`` (at least 1); test set from
  ``test_batch``.
* ``imagefolder:PATH`` - ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``; ImageNet recipe.
* ``synthetic`` / ``synthetic:N`` - random tensors (seeded by ``seed``), N training items
  (default 1024), 256 val; 10 classes at 32 ("cifar") or 1000 classes at 224 ("imagenet");
  no augmentation, zero mean.

Recipes. ``cifar``: per-pixel mean image of the (unaugmented) training images subtracted,
then 4-pixel zero padding, random 32x32 crop, random horizontal flip. ``imagenet``: shorter
side resized to a random integer in [256, 480], random 224 crop, random horizontal flip, PCA
lighting (alpha ~ N(0, 0.1)), per-pixel 224x224 mean image subtracted (mean over center crops
at shorter side 256 of the training images, cached). Evaluation: center (the image / shorter
side 256 + center 224 crop), ``10crop``, ``multiscale``.

Random choices use torch's global RNG (seeded per DataLoader worker), see ``transforms``.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from . import transforms as T
from .eval_crops import (CIFAR_SCALES, IMAGENET_SCALES, multiscale_views, padded_ten_crop,
                         ten_crop)

__all__ = [
    "SPEC_HELP",
    "DataBundle",
    "build_data",
    "build_eval_data",
    "TensorImageDataset",
    "SyntheticDataset",
    "ImageFolderDataset",
    "load_digits_tensors",
    "load_cifar10",
    "split_indices",
    "compute_imagefolder_mean",
    "MODES",
]

SPEC_HELP = (
    "dataset spec: 'digits' (scikit-learn's bundled 8x8 digits upsampled to 32x32, default), "
    "'cifar10:PATH' (python pickle batches; PATH = cifar-10-batches-py or its parent), "
    "'imagefolder:PATH' (PATH/train/<class>/*, PATH/val/<class>/*, ImageNet recipe), "
    "'synthetic' or 'synthetic:N' (random tensors, N training items)"
)

# train: training augmentation; center: deterministic single view (val transform);
# center1 / 10crop / multiscale: the build_eval_data item layouts.
MODES = ("train", "center", "center1", "10crop", "multiscale")
EVAL_CROPS = ("center", "10crop", "multiscale")
RECIPES = ("cifar", "imagenet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
MEAN_CACHE_NAME = ".fastres_mean_224.pt"


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    num_classes: int
    image_size: int
    name: str
    mean: torch.Tensor


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# ------------------------------------------------------------------------- tensor datasets
def _tensor_view(x: torch.Tensor, mode: str, recipe: str, mean: torch.Tensor):
    """Apply the mode's transform to an unnormalised image ``x`` [C,H,W] (float, [0,1])."""
    if mode == "multiscale":
        scales = CIFAR_SCALES if recipe == "cifar" else IMAGENET_SCALES
        return multiscale_views(x, scales, mean)
    x = x - mean
    if mode == "train":
        return T.random_hflip(T.random_pad_crop(x, 4))
    if mode == "center":
        return x
    if mode == "center1":
        return x[None]
    # 10crop
    if recipe == "cifar":
        return padded_ten_crop(x, 4)
    return ten_crop(T.resize_shorter_tensor(x, 256), 224)


class TensorImageDataset(Dataset):
    """In-memory images ``[N,C,H,W]`` (uint8 in [0,255] or float in [0,1]) with labels, for
    the CIFAR recipe. Items: ``(view, label)`` where the view depends on ``mode``; the
    per-pixel ``mean`` image is subtracted before padding (padding is with zeros = the mean)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], mean: torch.Tensor,
                 mode: str = "center", recipe: str = "cifar"):
        _check_mode(mode)
        if images.ndim != 4:
            raise ValueError(f"images must be [N,C,H,W], got {tuple(images.shape)}")
        if len(labels) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        self.images = images.contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.mean = mean.float()
        self.mode = mode
        self.recipe = recipe

    def __len__(self) -> int:
        return self.images.shape[0]

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 [C,H,W] in [0, 1], before mean subtraction/augmentation."""
        x = self.images[i]
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x.float()

    def __getitem__(self, i: int):
        return _tensor_view(self.image(i), self.mode, self.recipe, self.mean), int(self.labels[i])


class SyntheticDataset(Dataset):
    """Random N(0,1) images, item ``i`` generated from seed ``(seed, offset, i)``, so that it is
    identical on every call, in every worker; labels uniform in [0, num_classes)."""

    def __init__(self, length: int, num_classes: int, image_size: int, seed: int = 0,
                 offset: int = 0, mode: str = "center", recipe: str = "cifar"):
        _check_mode(mode)
        self.length = int(length)
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        self.offset = offset
        self.mode = mode
        self.recipe = recipe
        self.mean = torch.zeros(3, image_size, image_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.offset) * 10_000_019 + i)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        x = torch.randn(3, self.image_size, self.image_size, generator=g)
        if self.mode == "train":  # random tensors: no augmentation
            return x, label
        return _tensor_view(x, self.mode, self.recipe, self.mean), label


# ------------------------------------------------------------------------------- loaders
def split_indices(n: int, n_val: int, labels: Optional[Sequence[int]] = None,
                  seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed (seeded) train/val split of ``range(n)``; stratified when ``labels`` are given
    and every class can be represented. Returns sorted index arrays (train, val)."""
    if not 0 < n_val < n:
        raise ValueError(f"cannot split {n} items into train and {n_val} val")
    idx = np.arange(n)
    if labels is not None:
        labels = np.asarray(labels)
        _, counts = np.unique(labels, return_counts=True)
        if n_val >= len(counts) and n - n_val >= len(counts) and counts.min() >= 2:
            from sklearn.model_selection import train_test_split

            tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=labels)
            return np.sort(tr), np.sort(va)
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_digits_tensors() -> Tuple[torch.Tensor, np.ndarray]:
    """scikit-learn digits as float32 [1797,3,32,32] in [0,1] (bilinear upsampling) + labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return x, d.target.astype(np.int64)


DIGITS_VAL = 300
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"


def _cifar_dir(path: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CIFAR-10 path not found (or not a directory): {path!r}")
    sub = os.path.join(path, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(path, "data_batch_1")) and os.path.isdir(sub):
        return sub
    return path


def _load_cifar_batch(file: str) -> Tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"CIFAR-10 batch file missing: {file!r}")
    try:
        with open(file, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a layout problem
        raise ValueError(f"{file!r} is not a readable CIFAR-10 python pickle batch: "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file!r}: expected a pickled dict with b'data' and b'labels', "
                         f"got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{file!r}: missing key b'data' or b'labels' (keys: "
                         f"{sorted(map(repr, d.keys()))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{file!r}: b'data' must be uint8 [N, 3072], got {data.dtype} "
                         f"{list(data.shape)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{file!r}: b'labels' must have one label per image "
                         f"({data.shape[0]}), got shape {list(labels.shape)}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer)
                        or labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{file!r}: b'labels' must be integers in [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(path: str, split: str = "train") -> Tuple[torch.Tensor, np.ndarray]:
    """uint8 [N,3,32,32] images and labels of the training batches (``split="train"``, all
    50000) or of ``test_batch`` (``split="test"``)."""
    root = _cifar_dir(path)
    files = CIFAR_TRAIN_FILES if split == "train" else (CIFAR_TEST_FILE,)
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batch files missing in {root!r}: {', '.join(missing)}")
    xs, ys = zip(*(_load_cifar_batch(os.path.join(root, f)) for f in files))
    return torch.from_numpy(np.concatenate(xs)), np.concatenate(ys)


def cifar_val_size(n: int) -> int:
    """5000 of 50000 as in the paper; the same fraction (at least 1) for smaller sets."""
    if n >= 50000:
        return 5000
    return min(max(1, int(round(n * 5000 / 50000))), n - 1)


# -------------------------------------------------------------------------- image folders
def _list_classes(train_dir: str) -> List[str]:
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"image folder not found: {train_dir!r}")
    classes = sorted(e.name for e in os.scandir(train_dir)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {train_dir!r} (expected {train_dir}/<class>/*)")
    return classes


def _list_samples(folder: str, classes: List[str]) -> List[Tuple[str, int]]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder!r}")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in sorted(os.listdir(folder)):
        d = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isdir(d):
            continue
        if name not in index:
            raise ValueError(f"class folder {d!r} has no counterpart in the train folder")
        for root, _, files in sorted(os.walk(d, followlinks=True)):
            for fn in sorted(files):
                if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                    samples.append((os.path.join(root, fn), index[name]))
    if not samples:
        raise ValueError(f"no images found in {folder!r} (extensions {IMAGE_EXTENSIONS})")
    return samples


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")  # loads the pixels; the file is closed on exit


def _check_readable(samples, what: str):
    """Drop files PIL cannot identify (header check); one counted warning."""
    from PIL import Image

    ok, bad = [], []
    for s in samples:
        try:
            with Image.open(s[0]) as im:
                im.size  # noqa: B018 - header parsed by Image.open
            ok.append(s)
        except Exception:  # noqa: BLE001
            bad.append(s[0])
    if bad:
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image(s) of {len(samples)} "
                      f"(first: {bad[0]})", RuntimeWarning, stacklevel=3)
    if not ok:
        raise ValueError(f"{what}: none of the {len(samples)} image files is readable")
    return ok, bad


class ImageFolderDataset(Dataset):
    """``ROOT/<class>/*`` images for the ImageNet recipe. Unreadable files are skipped with a
    counted warning: at construction (header check, ``skipped`` / ``skipped_files``) and, if a
    file fails to decode later, in ``__getitem__`` (warned, counted, next image used)."""

    def __init__(self, folder: str, classes: List[str], mean: Optional[torch.Tensor],
                 mode: str = "center", samples: Optional[List[Tuple[str, int]]] = None,
                 check: bool = True, alphastd: float = 0.1, scale: Tuple[int, int] = (256, 480),
                 crop_size: int = 224, test_size: int = 256):
        _check_mode(mode)
        self.folder = folder
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        all_samples = samples if samples is not None else _list_samples(folder, self.classes)
        if check:
            self.samples, self.skipped_files = _check_readable(all_samples, folder)
        else:
            self.samples, self.skipped_files = list(all_samples), []
        self.skipped = len(self.skipped_files)
        self.targets = [t for _, t in self.samples]
        self.mean = mean
        self.mode = mode
        self.alphastd = alphastd
        self.scale = scale
        self.crop_size = crop_size
        self.test_size = test_size

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int):
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                return _open_rgb(path), label
            except Exception as e:  # noqa: BLE001
                self.skipped += 1
                warnings.warn(f"skipped unreadable image {path!r} ({type(e).__name__}: {e}); "
                              f"{self.skipped} skipped so far in this process", RuntimeWarning)
        raise RuntimeError(f"no readable image in {self.folder!r}")

    def _sub_mean(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mean is None else x - self.mean

    def __getitem__(self, i: int):
        img, label = self._load(i)
        c = self.crop_size
        if self.mode == "train":
            img = T.random_resize_shorter(img, *self.scale)
            x = T.random_crop(T.pil_to_tensor(img), c)
            x = T.random_lighting(T.random_hflip(x), self.alphastd)
            return self._sub_mean(x).contiguous(), label
        if self.mode == "multiscale":
            views = []
            for s in IMAGENET_SCALES:
                v = T.pil_to_tensor(T.resize_shorter(img, s))
                if self.mean is not None:
                    v = v - T.resize_tensor(self.mean, v.shape[-2:])
                views += [v.contiguous(), T.hflip(v).contiguous()]
            return views, label
        x = T.pil_to_tensor(T.resize_shorter(img, self.test_size))
        if self.mode == "10crop":
            return self._sub_mean(ten_crop(x, c)), label
        x = self._sub_mean(T.center_crop(x, c)).contiguous()
        return (x[None] if self.mode == "center1" else x), label


def _mean_cache_file(root: str, cache_dir: Optional[str]) -> str:
    if cache_dir is None:
        return os.path.join(root, MEAN_CACHE_NAME)
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cache_dir), f"fastres_mean_224_{key}.pt")


def compute_imagefolder_mean(samples: List[Tuple[str, int]], num_workers: Optional[int] = None
                             ) -> torch.Tensor:
    """Mean [3,224,224] over center 224 crops at shorter side 256 (unreadable files skipped)."""
    ds = ImageFolderDataset("", ["_"], None, mode="center", samples=samples, check=False)
    if num_workers is None:
        num_workers = 0 if len(samples) < 2000 else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=num_workers)
    total = torch.zeros(3, 224, 224, dtype=torch.float64)
    n = 0
    for x, _ in loader:
        total += x.double().sum(0)
        n += x.shape[0]
    return (total / n).float()


def imagefolder_mean(root: str, samples: List[Tuple[str, int]], num_files: int,
                     cache_dir: Optional[str] = None) -> torch.Tensor:
    """The cached training mean image; computed (and cached) when absent or stale (the file
    count of the train folder changed)."""
    file = _mean_cache_file(root, cache_dir)
    if os.path.isfile(file):
        try:
            d = torch.load(file, map_location="cpu", weights_only=True)
            if (isinstance(d, dict) and d.get("num_files") == num_files
                    and tuple(d["mean"].shape) == (3, 224, 224)):
                return d["mean"].float()
            warnings.warn(f"mean image cache {file!r} is stale; recomputing", RuntimeWarning)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"unreadable mean image cache {file!r} ({e}); recomputing",
                          RuntimeWarning)
    mean = compute_imagefolder_mean(samples)
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        tmp = f"{file}.tmp{os.getpid()}"
        torch.save({"mean": mean, "num_files": num_files, "root": os.path.abspath(root)}, tmp)
        os.replace(tmp, file)
    except OSError as e:
        warnings.warn(f"could not cache the mean image at {file!r} ({e}); it will be "
                      f"recomputed next time (pass cache_dir= to cache elsewhere)", RuntimeWarning)
    return mean


# ------------------------------------------------------------------------------- builders
def _parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"empty dataset spec; {SPEC_HELP}")
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("digits",) and not sep:
        return kind, None
    if kind in ("cifar10", "imagefolder"):
        if not arg:
            raise ValueError(f"dataset spec {spec!r} needs a path ('{kind}:PATH'); {SPEC_HELP}")
        return kind, arg
    if kind == "synthetic":
        if sep:
            try:
                n = int(arg)
            except ValueError:
                raise ValueError(f"bad synthetic size in {spec!r}; {SPEC_HELP}") from None
            if n < 1:
                raise ValueError(f"synthetic size must be positive in {spec!r}")
        return kind, arg if sep else None
    raise ValueError(f"unknown dataset spec {spec!r}; {SPEC_HELP}")


def _recipe(kind: str, recipe: Optional[str]) -> str:
    if recipe is None:
        return "imagenet" if kind == "imagefolder" else "cifar"
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    if kind in ("digits", "cifar10") and recipe != "cifar":
        raise ValueError(f"{kind} supports only the 'cifar' recipe, not {recipe!r}")
    if kind == "imagefolder" and recipe != "imagenet":
        raise ValueError(f"imagefolder supports only the 'imagenet' recipe, not {recipe!r}")
    return recipe


def _digits(mode_train: str, mode_val: str):
    x, y = load_digits_tensors()
    tr, va = split_indices(len(y), DIGITS_VAL, labels=y, seed=0)
    mean = x[tr].mean(0)
    train = TensorImageDataset(x[tr], y[tr], mean, mode_train)
    val = TensorImageDataset(x[va], y[va], mean, mode_val)
    return train, val, mean


def _cifar(path: str, mode_train: str, mode_val: str, with_test: bool, mode_test: str):
    x, y = load_cifar10(path, "train")
    tr, va = split_indices(len(y), cifar_val_size(len(y)), seed=0)
    mean = x[tr].float().div_(255.0).mean(0)
    train = TensorImageDataset(x[tr], y[tr], mean, mode_train)
    val = TensorImageDataset(x[va], y[va], mean, mode_val)
    test = None
    if with_test:
        xt, yt = load_cifar10(path, "test")
        test = TensorImageDataset(xt, yt, mean, mode_test)
    return train, val, test, mean


def _imagefolder_parts(path: str, cache_dir: Optional[str]):
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder dataset not found: {root!r}")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    classes = _list_classes(train_dir)
    return root, train_dir, val_dir, classes


def build_data(spec: str = "digits", recipe: Optional[str] = None, *, seed: int = 0,
               cache_dir: Optional[str] = None, synthetic_size: Optional[int] = None
               ) -> DataBundle:
    """Training/validation (and CIFAR-10 test) datasets for ``spec`` (see ``SPEC_HELP``).

    ``seed`` seeds the synthetic data only; the digits/CIFAR-10 splits are fixed (seed 0)."""
    kind, arg = _parse_spec(spec)
    recipe = _recipe(kind, recipe)
    if kind == "digits":
        train, val, mean = _digits("train", "center")
        return DataBundle(train, val, None, 10, 32, "digits", mean)
    if kind == "cifar10":
        train, val, test, mean = _cifar(arg, "train", "center", True, "center")
        return DataBundle(train, val, test, 10, 32, f"cifar10:{arg}", mean)
    if kind == "synthetic":
        n = synthetic_size if synthetic_size is not None else (int(arg) if arg else 1024)
        if n < 1:
            raise ValueError(f"synthetic_size must be positive, got {n}")
        classes, size = (10, 32) if recipe == "cifar" else (1000, 224)
        train = SyntheticDataset(n, classes, size, seed, 0, "train", recipe)
        val = SyntheticDataset(256, classes, size, seed, 1, "center", recipe)
        name = "synthetic" if arg is None and synthetic_size is None else f"synthetic:{n}"
        return DataBundle(train, val, None, classes, size, name, torch.zeros(3, size, size))
    # imagefolder
    root, train_dir, val_dir, classes = _imagefolder_parts(arg, cache_dir)
    train_samples = _list_samples(train_dir, classes)
    val_samples = _list_samples(val_dir, classes)
    train = ImageFolderDataset(train_dir, classes, None, "train", samples=train_samples)
    val = ImageFolderDataset(val_dir, classes, None, "center", samples=val_samples)
    mean = imagefolder_mean(root, train.samples, len(train_samples), cache_dir)
    train.mean = val.mean = mean
    return DataBundle(train, val, None, len(classes), 224, f"imagefolder:{arg}", mean)


def build_eval_data(spec: str, recipe: Optional[str] = None, crop: str = "center",
                    split: str = "val", cache_dir: Optional[str] = None
                    ) -> Tuple[Dataset, int]:
    """Evaluation dataset and number of classes. Items per ``crop``:

    * ``center``: ``([1,C,H,W], label)`` (32x32 image / ImageNet: shorter side 256, center 224)
    * ``10crop``: ``([10,C,H,W], label)``, 4 corners + center + their flips (32x32 data: of the
      image zero-padded by 4; ImageNet: 224 crops at shorter side 256)
    * ``multiscale``: ``(list of 2*len(scales) tensors [C,H_s,W_s], label)``, shorter side s in
      (224,256,384,480,640) (32x32 data: (32,40,48)), each view followed by its flip.

    ``split`` is "val", or "test" for cifar10. The mean image is subtracted as in
    ``build_data`` (resized to each scale for multiscale)."""
    if crop not in EVAL_CROPS:
        raise ValueError(f"unknown crop {crop!r}; expected one of {EVAL_CROPS}")
    if split not in ("val", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'val' or 'test'")
    kind, arg = _parse_spec(spec)
    recipe = _recipe(kind, recipe)
    if split == "test" and kind != "cifar10":
        raise ValueError(f"split 'test' exists only for cifar10, not for {spec!r}")
    mode = "center1" if crop == "center" else crop
    if kind == "digits":
        _, val, _ = _digits("center", mode)
        return val, 10
    if kind == "cifar10":
        _, val, test, _ = _cifar(arg, "center", mode, split == "test", mode)
        return (test if split == "test" else val), 10
    if kind == "synthetic":
        classes, size = (10, 32) if recipe == "cifar" else (1000, 224)
        return SyntheticDataset(256, classes, size, 0, 1, mode, recipe), classes
    root, train_dir, val_dir, classes = _imagefolder_parts(arg, cache_dir)
    train_samples = _list_samples(train_dir, classes)
    file = _mean_cache_file(root, cache_dir)
    samples = train_samples
    if not os.path.isfile(file):  # the mean must be computed: drop unreadable files first
        samples, _ = _check_readable(train_samples, train_dir)
    mean = imagefolder_mean(root, samples, len(train_samples), cache_dir)
    return ImageFolderDataset(val_dir, classes, mean, mode), len(classes)

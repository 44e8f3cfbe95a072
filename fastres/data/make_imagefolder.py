"""Generate a small image folder of JPEGs with ImageNet-like sizes, for the data benchmark and
the tests (no ImageNet needed):

    python -m fastres.data.make_imagefolder PATH [--classes 10] [--train-per-class 64]
        [--val-per-class 8] [--size 500x375 | --size imagenet] [--quality 90] [--seed 0]
        [--jobs N]

writes ``PATH/train/<class>/*.JPEG`` and ``PATH/val/<class>/*.JPEG``. The pictures are smooth
random colour fields with some texture and a few shapes (so that they compress like photos:
about 40-90 KB at 500x375, quality 90), sizes either fixed (``--size WxH``) or drawn from
typical ImageNet sizes (``--size imagenet``: 500x375, 375x500, 500x333, 500x400, 640x480,
400x300, 333x500, 800x600, 1024x768, 300x225). Deterministic for a seed, whatever ``--jobs``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["IMAGENET_SIZES", "make_image", "make_imagefolder", "main"]

IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 300),
                  (333, 500), (800, 600), (1024, 768), (300, 225))
# relative frequencies of IMAGENET_SIZES (landscape 500-wide images dominate ImageNet)
_SIZE_WEIGHTS = (0.35, 0.12, 0.15, 0.08, 0.08, 0.06, 0.06, 0.04, 0.03, 0.03)


def make_image(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like uint8 [H, W, 3] picture: smooth colour field + texture + ellipses."""
    gh, gw = max(2, height // 48), max(2, width // 48)
    coarse = rng.uniform(0, 255, size=(gh, gw, 3)).astype(np.float32)
    ys = np.linspace(0, gh - 1, height, dtype=np.float32)
    xs = np.linspace(0, gw - 1, width, dtype=np.float32)
    y0 = np.floor(ys).astype(int).clip(0, gh - 2)
    x0 = np.floor(xs).astype(int).clip(0, gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    img = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
           + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[inside] = 0.4 * img[inside] + 0.6 * rng.uniform(0, 255, size=3)
    img += rng.normal(0, 9, size=img.shape).astype(np.float32)  # sensor-like texture
    return np.clip(img, 0, 255).astype(np.uint8)


def _parse_size(s: str) -> Optional[Tuple[int, int]]:
    if s == "imagenet":
        return None
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WxH or 'imagenet', got {s!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {s!r}")
    return w, h


def _write_class(task) -> List[str]:
    from PIL import Image

    path, split, split_id, c, per_class, size, quality, seed = task
    rng = np.random.default_rng([seed, split_id, c])  # one stream per (split, class)
    d = os.path.join(path, split, f"n{c:08d}")
    os.makedirs(d, exist_ok=True)
    files = []
    for i in range(per_class):
        if size is None:
            w, h = IMAGENET_SIZES[rng.choice(len(IMAGENET_SIZES), p=_SIZE_WEIGHTS)]
        else:
            w, h = size
        f = os.path.join(d, f"{split}_{c:04d}_{i:05d}.JPEG")
        Image.fromarray(make_image(w, h, rng)).save(f, quality=quality)
        files.append(f)
    return files


def make_imagefolder(path: str, classes: int = 10, train_per_class: int = 64,
                     val_per_class: int = 8, size: Optional[Tuple[int, int]] = (500, 375),
                     quality: int = 90, seed: int = 0, jobs: int = 1) -> List[str]:
    """Write the folder (``size=None``: ImageNet-like sizes) with ``jobs`` processes (the
    files do not depend on it); returns the written files."""
    if classes < 1 or train_per_class < 1 or val_per_class < 0:
        raise ValueError("need at least 1 class and 1 training image per class")
    tasks = [(path, split, k, c, per_class, size, quality, seed)
             for k, (split, per_class) in enumerate((("train", train_per_class),
                                                     ("val", val_per_class)))
             for c in range(classes)]
    if jobs > 1:
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()  # fork: no re-import of torch
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(jobs) as pool:
            parts = pool.map(_write_class, tasks)
    else:
        parts = [_write_class(t) for t in tasks]
    return [f for part in parts for f in part]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastres.data.make_imagefolder",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=64)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--size", type=_parse_size, default=(500, 375),
                   help="WxH (default 500x375) or 'imagenet' (typical ImageNet sizes)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="processes writing the files")
    a = p.parse_args(argv)
    try:
        files = make_imagefolder(a.path, a.classes, a.train_per_class, a.val_per_class,
                                 a.size, a.quality, a.seed, a.jobs)
    except (ValueError, OSError) as e:
        print(f"make_imagefolder: error: {e}", file=sys.stderr)
        return 2
    total = sum(os.path.getsize(f) for f in files)
    print(f"wrote {len(files)} JPEGs to {a.path} ({total / len(files) / 1024:.0f} KB on "
          f"average)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

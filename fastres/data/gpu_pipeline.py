"""The ``gpu`` data backend: CPU workers only read the files' bytes; batches of JPEGs are
decoded on the device (``torchvision.io.decode_jpeg(list, device="cuda")``, nvJPEG) and
augmented there in batch (``fastres.data.batched``); a background thread prepares the next
batch on a CUDA stream of its own while the current training step runs.

The same code runs with ``device="cpu"`` (decoding with torchvision's libjpeg-turbo), which is
how CI tests it. Besides the training and validation batches it builds fastres-eval's views of
a batch (10 crops: ``batched.ten_crop_params``; multi-scale: ``batched.multiscale_views_batch``).

Which images go where: the worker reads each file's JPEG header (``jpeg_info``); baseline
JPEGs with 1 or 3 components go to the batched device decoder; everything else (progressive
or arithmetic-coded JPEGs, CMYK/YCCK, PNG and other formats) is decoded by PIL in the worker
("CPU fallback"), as is any image the device decoder refuses. A file that PIL cannot decode
either is skipped (a warning with its path; the batch is one image shorter), never replaced.
Fallbacks are counted (``stats()``) and reported once, with the first file and the reason.

GPU memory: the augmentation works in chunks bounded by ``budget_bytes`` (default 1 GiB); the
largest chunk's bytes and ``torch.cuda.max_memory_allocated`` around the pipeline are in
``stats()``; at most ``prefetch`` finished batches wait in the queue.
"""
from __future__ import annotations

import io
import queue
import threading
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .batched import (AugmentStats, augment_batch, center_params, draw_train_params,
                      multiscale_views_batch, ten_crop_params)
from .eval_crops import IMAGENET_SCALES

__all__ = ["jpeg_info", "EncodedImageFolder", "decode_batch", "GPUBatchLoader",
           "DEVICE_OK", "FALLBACK", "BAD"]

DEVICE_OK, FALLBACK, BAD = 0, 1, 2
_SOF_BASELINE = (0xC0, 0xC1)  # baseline / extended Huffman: what nvJPEG's batched path takes
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def jpeg_info(data: bytes) -> Tuple[int, str]:
    """(DEVICE_OK or FALLBACK, reason) for a file's bytes (only the headers and the last bytes
    are read): DEVICE_OK for a baseline Huffman 8-bit JPEG with 1 or 3 components that ends
    with its end marker, else FALLBACK with why (the device decoder may still refuse a
    DEVICE_OK file; that is caught in ``decode_batch``)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return FALLBACK, "not a JPEG"
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return FALLBACK, "malformed JPEG header"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF_BASELINE or marker in _SOF_OTHER:
            if marker in _SOF_OTHER:
                kind = "progressive" if marker in (0xC2, 0xC6, 0xCA, 0xCE) else "non-baseline"
                return FALLBACK, f"{kind} JPEG"
            if i + 10 > n:
                return FALLBACK, "truncated JPEG header"
            comps = data[i + 9]
            if data[i + 4] != 8:
                return FALLBACK, f"{data[i + 4]}-bit JPEG"
            if comps not in (1, 3):
                return FALLBACK, f"JPEG with {comps} components (CMYK/YCCK)"
            if data[-2:] != b"\xff\xd9" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
                return FALLBACK, "no JPEG end marker (truncated?)"
            return DEVICE_OK, ""
        if marker == 0xDA or length < 2:
            break
        i += 2 + length
    return FALLBACK, "no frame header found"


def _pil_decode(data, path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data if isinstance(data, (bytes, bytearray)) else
                               data.numpy().tobytes())) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class EncodedImageFolder(Dataset):
    """Items ``(payload, label, index, kind, reason)`` of an ``ImageFolderDataset``'s samples:
    ``kind`` DEVICE_OK: payload = the file's bytes (uint8 [n]); FALLBACK: payload = the image
    decoded by PIL (uint8 [3, H, W]); BAD: payload empty, ``reason`` says why (read or decode
    error)."""

    def __init__(self, base):
        self.samples = base.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return torch.empty(0, dtype=torch.uint8), label, i, BAD, f"{type(e).__name__}: {e}"
        kind, reason = jpeg_info(data)
        if kind == DEVICE_OK:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, i, kind, ""
        try:
            return _pil_decode(data, path), label, i, FALLBACK, reason
        except Exception as e:  # noqa: BLE001
            return (torch.empty(0, dtype=torch.uint8), label, i, BAD,
                    f"{reason}; PIL: {type(e).__name__}: {e}")


def _collate(batch):
    payload, label, index, kind, reason = zip(*batch)
    return list(payload), torch.tensor(label), list(index), list(kind), list(reason)


def decode_batch(payloads: List[torch.Tensor], kinds: List[int], paths: List[str], device,
                 reasons: Optional[List[str]] = None) -> Tuple[List[torch.Tensor], List[int],
                                                               List[Tuple[str, str, str]]]:
    """Decode a batch on ``device``. Returns (images uint8 [3, H, W] on device, indices of the
    batch entries kept, events) with events ``(kind, path, reason)`` for each fallback
    ("fallback") and each skipped file ("skipped")."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    reasons = reasons or [""] * len(payloads)
    out: List[Optional[torch.Tensor]] = [None] * len(payloads)
    events = []
    jpeg = [i for i, k in enumerate(kinds) if k == DEVICE_OK]
    if jpeg:
        try:
            dec = decode_jpeg([payloads[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, im in zip(jpeg, dec):
                out[i] = im
        except RuntimeError:  # one bad image fails the batched call: find it
            for i in jpeg:
                try:
                    out[i] = decode_jpeg(payloads[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError as e:
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    try:
                        out[i] = _pil_decode(payloads[i], paths[i]).to(device, non_blocking=True)
                        events.append(("fallback", paths[i], f"device decoder: {msg}"))
                    except Exception as e2:  # noqa: BLE001
                        events.append(("skipped", paths[i], f"{msg}; PIL: "
                                                            f"{type(e2).__name__}: {e2}"))
    for i, k in enumerate(kinds):
        if k == FALLBACK:
            out[i] = payloads[i].to(device, non_blocking=True)
            events.append(("fallback", paths[i], reasons[i]))
        elif k == BAD:
            events.append(("skipped", paths[i], reasons[i]))
    keep = [i for i, im in enumerate(out) if im is not None]
    return [out[i] for i in keep], keep, events


class GPUBatchLoader:
    """Batches ``(x, y)`` of the ``gpu`` backend on ``device`` (CUDA, or CPU for tests):
    ``x`` [B, 3, 224, 224] in ``out_dtype`` (channels_last when asked), mean subtracted; ``mode``
    ``train`` (the paper's augmentation) or ``center`` (shorter side 256, center 224), and the
    evaluation views of ``ImageFolderDataset``: ``center1`` (``x`` [B, 1, 3, 224, 224]),
    ``10crop`` (``x`` [B, 10, 3, 224, 224]: ``batched.ten_crop_params``) and ``multiscale``
    (``x`` a list, per image, of its views at the shorter sides ``IMAGENET_SCALES`` each
    followed by its flip, [3, H_s, W_s]: ``batched.multiscale_views_batch``). Skipped files
    make a batch shorter. ``generator`` (CPU) seeds the augmentation of each pass (one seed
    drawn from it per ``iter``) and the DataLoader's order."""

    MODES = ("train", "center", "center1", "10crop", "multiscale")

    def __init__(self, base, batch_size: int, device="cuda", *, mode: Optional[str] = None,
                 sampler=None, shuffle: bool = False, num_workers: int = 0,
                 drop_last: bool = False, generator: Optional[torch.Generator] = None,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 prefetch: int = 2, budget_bytes: Optional[int] = None, log=None):
        mode = mode or base.mode
        if mode not in self.MODES:
            raise ValueError(f"the gpu backend builds the views {self.MODES}, not {mode!r}")
        self.base = base
        self.mode = mode
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mean = None if base.mean is None else base.mean.to(self.device, torch.float32)
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        self.prefetch = max(1, int(prefetch))
        self.budget_bytes = budget_bytes
        self.generator = generator
        self.log = log or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=2))
        self.dataset = EncodedImageFolder(base)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler,
                                 shuffle=shuffle if sampler is None else False,
                                 num_workers=num_workers, drop_last=drop_last,
                                 generator=generator, collate_fn=_collate,
                                 persistent_workers=False)
        self.aug_stats = AugmentStats()
        self.counts = {"decoded_on_device": 0, "fallback": 0, "skipped": 0}
        self.fallback_reported = False
        self.peak_memory = 0

    def __len__(self) -> int:
        return len(self.loader)

    def stats(self) -> dict:
        return {"backend": "gpu", "device": str(self.device), **self.counts,
                "chunk_peak_bytes": self.aug_stats.peak_bytes,
                "budget_bytes": self.budget_bytes, "pipeline_peak_bytes": self.peak_memory}

    def _process(self, batch, gen: torch.Generator):
        payloads, labels, index, kinds, reasons = batch
        paths = [self.base.samples[i][0] for i in index]
        images, keep, events = decode_batch(payloads, kinds, paths, self.device, reasons)
        for kind, path, reason in events:
            self.counts[kind] += 1
            if kind == "skipped":
                self.log(f"skipped unreadable image {path!r} ({reason}); "
                         f"{self.counts['skipped']} skipped so far")
            elif not self.fallback_reported:
                self.fallback_reported = True
                self.log(f"gpu data backend: {path!r} is decoded on the CPU ({reason}); such "
                         f"fallbacks are counted, not reported again")
        self.counts["decoded_on_device"] += len(images) - sum(1 for e in events if e[0] == "fallback")
        if not images:
            return None
        y = labels[keep].to(self.device, non_blocking=True)
        if self.mode == "multiscale":
            return multiscale_views_batch(images, IMAGENET_SCALES, self.mean, self.out_dtype), y
        hw = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64)
        b = self.base
        if self.mode == "train":
            params = draw_train_params(hw, b.scale, b.crop_size, b.alphastd, generator=gen)
        elif self.mode == "10crop":
            params = ten_crop_params(hw, b.test_size, b.crop_size)
        else:
            params = center_params(hw, b.test_size, b.crop_size)
        x = augment_batch(images, params, self.mean, self.out_dtype, self.channels_last,
                          self.budget_bytes, stats=self.aug_stats)
        if self.mode == "center1":
            x = x[:, None]
        return x, y

    def __iter__(self):
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        gen = torch.Generator().manual_seed(seed)
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        base_mem = torch.cuda.memory_allocated(self.device) if cuda else 0

        def produce():
            try:
                if cuda:  # the current device is per thread (torchrun: this rank's GPU)
                    torch.cuda.set_device(self.device)
                ctx = torch.cuda.stream(stream) if cuda else _null()
                with ctx:
                    for batch in self.loader:
                        if stop.is_set():
                            return
                        res = self._process(batch, gen)
                        if res is None:
                            continue
                        ev = None
                        if cuda:
                            ev = torch.cuda.Event()
                            ev.record(stream)
                            self.peak_memory = max(
                                self.peak_memory,
                                torch.cuda.memory_allocated(self.device) - base_mem)
                        while not stop.is_set():
                            try:
                                q.put((res, ev), timeout=0.1)
                                break
                            except queue.Full:
                                continue
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put((e, None))
                return
            q.put((None, None))

        t = threading.Thread(target=produce, name="fastres-gpu-data", daemon=True)
        t.start()
        try:
            while True:
                res, ev = q.get()
                if res is None:
                    break
                if isinstance(res, BaseException):
                    raise res
                x, y = res
                if cuda:
                    cur = torch.cuda.current_stream(self.device)
                    cur.wait_event(ev)
                    for t in _tensors(x) + [y]:
                        t.record_stream(cur)
                yield x, y
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()


def _tensors(x) -> List[torch.Tensor]:
    """The tensors of a batch's ``x``: itself, or the views of the multiscale lists."""
    return [x] if torch.is_tensor(x) else [v for views in x for v in views]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

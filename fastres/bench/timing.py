"""Timing, peak memory and bandwidth measurement shared by every fastres benchmark.

On a GPU a measurement is the median of CUDA-event timings of single calls after warm-up,
with the peak memory allocated during the timed calls (``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``); on a CPU it is the median of ``time.perf_counter``
timings and the peak memory is not measured (``None``).

    m = measure(step, device, warmup=5, iters=20)
    m.ms, m.ms_min, m.peak_gib
    copy_bandwidth(device)          # bytes/s of a device-to-device copy, measured once
"""
import functools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch

__all__ = ["Measurement", "measure", "copy_bandwidth", "synchronize"]


@dataclass
class Measurement:
    """Times in milliseconds per call; peak memory in bytes (None on CPU)."""

    ms: float                    # median
    ms_min: float
    ms_max: float
    iters: int
    peak_bytes: Optional[int]
    timer: str                   # "cuda-event" or "perf_counter"
    # minor page faults per call (mean over the timed calls); where measured (CPU side by side)
    minor_faults: Optional[float] = None

    def per_second(self, amount: float) -> float:
        """`amount` (images, bytes, ...) handled per call, as a rate per second of median time."""
        return amount / (self.ms / 1e3)

    @property
    def peak_gib(self) -> Optional[float]:
        return None if self.peak_bytes is None else self.peak_bytes / 2**30

    def as_dict(self) -> dict:
        d = asdict(self)
        d["peak_gib"] = self.peak_gib
        return d


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device, warmup: int = 3, iters: int = 10) -> Measurement:
    """Call `fn` `warmup` times, then time `iters` single calls.

    Every call is timed on its own (CUDA events around it on a GPU, so host overhead between
    calls is not counted but launch overhead inside `fn` is), and the median is reported.
    """
    device = torch.device(device)
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device)
        timer = "cuda-event"
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
        timer = "perf_counter"
    return Measurement(ms=statistics.median(times), ms_min=min(times), ms_max=max(times),
                       iters=iters, peak_bytes=peak, timer=timer)


@functools.lru_cache(maxsize=None)
def _copy_bandwidth(device_str: str, nbytes: int) -> float:
    device = torch.device(device_str)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), device, warmup=3, iters=10 if device.type == "cuda" else 3)
    return 2 * src.numel() * src.element_size() / (m.ms_min / 1e3)  # read + write


def copy_bandwidth(device, nbytes: Optional[int] = None) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), best of a few
    copies of `nbytes` (1 GiB on a GPU, 64 MiB on a CPU); measured once per device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**26
    return _copy_bandwidth(str(device), nbytes)

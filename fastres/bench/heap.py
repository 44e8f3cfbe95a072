"""This process's C heap (glibc): whether memory freed by tensors goes back to the kernel, and
how many page faults the process takes.

By default glibc hands large freed blocks back to the kernel (blocks from 128 KiB up are mapped
and unmapped on their own, and free space above the heap's top is trimmed once it exceeds twice
the largest block freed so far). A CPU training step that frees and reallocates the same
megabytes of activations every call then page-faults them in again every call. Whether that
happens is decided by the order of a process's allocations, so two runs of the same
benchmark can differ by several times at the op level (docs/cpu/2026-12-03-page-faults.md).
``keep_freed_memory()`` keeps freed memory in the process instead (glibc's ``mallopt``, what
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` set from the environment); PyTorch's
CPU tuning guide reaches the same end by preloading jemalloc or tcmalloc.

    from fastres.bench.heap import keep_freed_memory, minor_page_faults
    keep_freed_memory()        # True where it took effect (glibc), False elsewhere
"""
import ctypes
import ctypes.util
from typing import Optional

try:
    import resource
except ImportError:  # not a Unix
    resource = None

__all__ = ["keep_freed_memory", "minor_page_faults", "MAX_MMAP_THRESHOLD"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); larger values are refused
MAX_MMAP_THRESHOLD = 32 * 2**20


def _mallopt():
    """glibc's mallopt, or None where the C library has none (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    # glibc only (gnu_get_libc_version): another C library's mallopt may be a stub
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    fn = libc.mallopt
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def keep_freed_memory(trim_threshold: int = 2**31 - 1,
                      mmap_threshold: int = MAX_MMAP_THRESHOLD) -> bool:
    """Keep memory that tensors free in this process for the next allocations: blocks below
    `mmap_threshold` bytes come from the heap (not mapped and unmapped one by one), and the
    heap's top is given back to the kernel only once more than `trim_threshold` bytes are free
    there. Process-wide and lasting; the process's resident memory stays at its peak instead of
    shrinking. Returns True where it took effect (glibc), False where the C library has no
    mallopt (nothing changed)."""
    for name, value, high in (("trim_threshold", trim_threshold, 2**31 - 1),
                              ("mmap_threshold", mmap_threshold, MAX_MMAP_THRESHOLD)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ValueError(f"{name} must be an int in [0, {high}] bytes, got {value!r}")
    fn = _mallopt()
    if fn is None:
        return False
    if fn(_M_MMAP_THRESHOLD, mmap_threshold) != 1 or fn(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        raise RuntimeError(f"mallopt refused mmap_threshold={mmap_threshold} or "
                           f"trim_threshold={trim_threshold}")
    return True


def minor_page_faults() -> Optional[int]:
    """Minor page faults this process has taken so far (getrusage): each is a page of memory
    the kernel mapped in on first touch. None where there is no getrusage (not a Unix)."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

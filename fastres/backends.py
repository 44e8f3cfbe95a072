"""Which implementation runs the fused ops.

Backends: "cpu" (portable C++), "cuda" (CUDA C++ kernels), "triton" (Triton kernels; on CPU
tensors only under TRITON_INTERPRET=1) and "auto", which picks per device: the C++ kernels on
CPU, and on a GPU whichever of "cuda" and "triton" is faster, measured once per device on a
ResNet-sized BatchNorm+add+ReLU (set FASTRES_AUTO_BACKEND=cuda|triton to skip the measurement).
"""
import contextlib
import functools
import importlib.util
import os

import torch

from ._extension import _C

NAMES = ("auto", "cpu", "cuda", "triton")
_current = ["auto"]
_auto_choice: dict = {}


def _built_with_cuda() -> bool:
    return bool(_C.build_info()["cuda"])


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _why_unavailable(name: str):
    """None if `name` can run here, else the reason it cannot."""
    if name in ("auto", "cpu"):
        return None
    if name == "cuda":
        if not _built_with_cuda():
            return ("fastres was built without its CUDA kernels (no CUDA toolkit at build "
                    "time, or FASTRES_NO_CUDA=1); rebuild with CUDA_HOME set")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _triton_interpret():
            return "Triton needs a CUDA device (or TRITON_INTERPRET=1 to run on CPU tensors)"
        return None
    return f"unknown backend {name!r}; choose one of {', '.join(NAMES)}"


def available_backends() -> list:
    """The backends that can run on this machine (always includes "auto" and "cpu")."""
    return [n for n in NAMES if _why_unavailable(n) is None]


def set_backend(name: str) -> None:
    """Choose the implementation of the fused ops: "auto", "cpu", "cuda" or "triton"."""
    _select(_current, name, NAMES, _why_unavailable, "backend")


def _select(current: list, name, names, why_unavailable, what: str) -> None:
    """Set current[0] to `name` after checking it is known and can run here."""
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"fastres: unknown {what} {name!r}; choose one of {', '.join(names)}")
    why = why_unavailable(name)
    if why is not None:
        raise RuntimeError(f"fastres: {what} {name!r} is not available: {why}")
    current[0] = name


@contextlib.contextmanager
def _selected(current: list, name, names, why_unavailable, what: str):
    previous = current[0]
    _select(current, name, names, why_unavailable, what)
    try:
        yield
    finally:
        current[0] = previous


def get_backend() -> str:
    """The backend set by set_backend() or the innermost backend() context ("auto" by default)."""
    return _current[0]


@contextlib.contextmanager
def backend(name: str):
    """Context manager: run the fused ops inside the block with backend `name`."""
    with _selected(_current, name, NAMES, _why_unavailable, "backend"):
        yield


def resolve(device: torch.device) -> str:
    """The concrete backend that runs an op on tensors of `device`."""
    name = _current[0]
    if name == "auto":
        return "cpu" if device.type == "cpu" else _auto_for(device)
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"fastres: backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"fastres: backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if name == "triton":
        _check_triton_device(device, "backend")
    return name


_meta_launches = [False]  # True inside launches_on_meta()


@contextlib.contextmanager
def launches_on_meta(conv: str = "triton"):
    """Inside the block, backend "triton" and conv backend `conv` ("triton" or "cudnn") are
    selected and Triton accepts meta tensors: the static kernel report
    (fastres.kernels.report) runs models on the meta device while recording kernel launches
    (nothing is launched)."""
    if conv not in ("triton", "cudnn"):
        raise ValueError(f"conv must be 'triton' or 'cudnn', got {conv!r}")
    saved = _current[0], _conv_current[0], _meta_launches[0]
    _current[0], _conv_current[0], _meta_launches[0] = "triton", conv, True
    try:
        yield
    finally:
        _current[0], _conv_current[0], _meta_launches[0] = saved


def _check_triton_device(device: torch.device, what: str) -> None:
    if device.type == "meta" and _meta_launches[0]:
        return
    if device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
        raise RuntimeError(f"fastres: {what} 'triton' runs on CUDA tensors (or on CPU under "
                           f"TRITON_INTERPRET=1), got tensors on {device}")


def _auto_for(device: torch.device) -> str:
    if device.type != "cuda":
        raise RuntimeError(f"fastres: no backend runs on {device} tensors (CPU and CUDA only)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _auto_choice:
        return _auto_choice[index]
    have_cuda = _why_unavailable("cuda") is None
    have_triton = _why_unavailable("triton") is None
    pinned = os.environ.get("FASTRES_AUTO_BACKEND")
    if pinned in ("cuda", "triton") and _why_unavailable(pinned) is None:
        choice = pinned
    elif have_cuda and have_triton and not torch.compiler.is_compiling():
        choice = _measure_fastest(torch.device("cuda", index))
    elif have_cuda:
        choice = "cuda"
    elif have_triton:
        choice = "triton"
    else:
        raise RuntimeError("fastres: no GPU backend is available: " + str(_why_unavailable("cuda")))
    if not torch.compiler.is_compiling():
        _auto_choice[index] = choice
    return choice


def _measure_fastest(device: torch.device) -> str:
    """Time forward+backward of BatchNorm+add+ReLU (bf16, channels_last, 64x256x28x28)."""
    from .ops.batch_norm_act import batch_norm_act

    times = {}
    with torch.cuda.device(device):
        shape = (64, 256, 28, 28)
        x = torch.randn(shape, device=device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        r = torch.randn_like(x)
        w = torch.ones(shape[1], device=device, requires_grad=True)
        b = torch.zeros(shape[1], device=device, requires_grad=True)
        x.requires_grad_(True)
        for name in ("cuda", "triton"):
            previous = _current[0]
            _current[0] = name
            try:
                for _ in range(3):
                    batch_norm_act(x, r, None, None, w, b, True, 0.1, 1e-5, True).sum().backward()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    batch_norm_act(x, r, None, None, w, b, True, 0.1, 1e-5, True).backward(r)
                end.record()
                torch.cuda.synchronize()
                times[name] = start.elapsed_time(end)
            finally:
                _current[0] = previous
    return min(times, key=times.get)


# ---------------------------------------------------------------------------------------------
# Convolution backend: which convolutions the fused modules run in training and inference
# ---------------------------------------------------------------------------------------------
CONV_NAMES = ("auto", "cudnn", "triton", "cudnn-fused")
_conv_current = ["cudnn"]
_conv_auto_choice: dict = {}


def _why_cudnn_fused_unavailable():
    """None if the "cudnn-fused" conv backend (cuDNN graph API) can run here, else why not."""
    info = _C.build_info()
    if not info.get("cudnn_fused", False):
        return f"fastres was built without it: {info.get('cudnn_fused_why', 'unknown')}"
    if not torch.cuda.is_available():
        return "it runs on a CUDA device and none is available"
    return None


def _why_conv_unavailable(name: str):
    """None if convolution backend `name` (a known one) can run here, else the reason."""
    if name == "triton":
        return _why_unavailable("triton")
    if name == "cudnn-fused":
        return _why_cudnn_fused_unavailable()
    return None


def set_conv_backend(name: str) -> None:
    """Choose the convolutions of the fused modules: "cudnn" (PyTorch's convolution, cuDNN on a
    GPU, with the fused BatchNorm kernels; the default), "triton" (fastres' implicit-GEMM
    convolutions with BatchNorm fused into their prologue/epilogues), "cudnn-fused" (cuDNN's
    graph API: the BatchNorm+ReLU of the input in the convolution's prologue, the statistics in
    its epilogue, as cuDNN's fused ResNet engines run them; layers cuDNN has no engine for run
    as "cudnn", see fastres.conv_backend_report) or "auto" (per layer shape, whichever of the
    available ones measured fastest on this GPU; "cudnn" on CPU)."""
    _select(_conv_current, name, CONV_NAMES, _why_conv_unavailable, "convolution backend")


def get_conv_backend() -> str:
    """The convolution backend set by set_conv_backend() or conv_backend() ("cudnn" by default)."""
    return _conv_current[0]


@contextlib.contextmanager
def conv_backend(name: str):
    """Context manager: run the fused modules' convolutions inside the block with `name`."""
    with _selected(_conv_current, name, CONV_NAMES, _why_conv_unavailable, "convolution backend"):
        yield


def resolve_conv(device: torch.device, key=None, measure=None) -> str:
    """The convolution backend ("cudnn", "triton" or "cudnn-fused") for a layer on `device`.

    Under "auto", `key` identifies the layer's shape and `measure()` returns the fastest of
    "cudnn" and the available fused backends for it; the answer is cached per (device, key).
    While torch.compile traces, nothing is measured: a cached answer is used, else "cudnn".
    """
    name = _conv_current[0]
    if name == "cudnn":
        return "cudnn"
    if name == "triton":
        _check_triton_device(device, "convolution backend")
        return "triton"
    if name == "cudnn-fused":
        if device.type != "cuda":
            raise RuntimeError(f"fastres: convolution backend 'cudnn-fused' runs on CUDA tensors, "
                               f"got tensors on {device}")
        return "cudnn-fused"
    if device.type != "cuda" or (_why_unavailable("triton") is not None
                                 and _why_cudnn_fused_unavailable() is not None):
        return "cudnn"
    full_key = (device.index, key)
    if full_key in _conv_auto_choice:
        return _conv_auto_choice[full_key]
    if torch.compiler.is_compiling() or measure is None:
        return "cudnn"
    choice = measure()
    _conv_auto_choice[full_key] = choice
    return choice

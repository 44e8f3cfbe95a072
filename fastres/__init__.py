"""fastres: fused BatchNorm/ReLU/residual kernels for ResNets on PyTorch.

    import fastres
    y = fastres.functional.batch_norm_add_relu(x, residual, running_mean, running_var,
                                               weight, bias, training=True)
    fastres.set_backend("triton")            # or "auto" (default), "cuda", "cpu"
    with fastres.backend("cpu"): ...
"""
from .version import __version__
from ._extension import build_info
from .backends import available_backends, backend, get_backend, set_backend
from . import ops
from . import functional

__all__ = [
    "__version__",
    "available_backends",
    "backend",
    "build_info",
    "functional",
    "get_backend",
    "ops",
    "set_backend",
]

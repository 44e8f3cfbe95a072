"""fastres: fused BatchNorm/ReLU/residual kernels for ResNets on PyTorch.

    import fastres
    y = fastres.functional.batch_norm_add_relu(x, residual, running_mean, running_var,
                                               weight, bias, training=True)
    fastres.set_backend("triton")            # or "auto" (default), "cuda", "cpu"
    fastres.set_conv_backend("triton")       # convs with BatchNorm fused in; or "cudnn",
                                             # "cudnn-fused" (cuDNN graph API), "auto"
    with fastres.backend("cpu"): ...

    model = fastres.models.resnet50()        # fused, torchvision-compatible state_dict
    model = fastres.fuse(torchvision_model)  # convert a torchvision ResNet in place
"""
from .version import __version__
from ._extension import build_info
from .backends import (available_backends, backend, conv_backend, get_backend, get_conv_backend,
                       set_backend, set_conv_backend)
from . import ops
from . import functional
from . import nn
from . import models
from .nn import convert_sync_batchnorm
from .nn.conv_bn_chain import conv_backend_report
from .fuse import fuse, unfuse  # the function shadows the module name (fastres.fuse)
from .export import export_onnx, keep_fused_ops

__all__ = [
    "__version__",
    "available_backends",
    "backend",
    "build_info",
    "conv_backend",
    "conv_backend_report",
    "convert_sync_batchnorm",
    "export_onnx",
    "functional",
    "fuse",
    "models",
    "get_backend",
    "get_conv_backend",
    "keep_fused_ops",
    "nn",
    "ops",
    "set_backend",
    "set_conv_backend",
    "unfuse",
]

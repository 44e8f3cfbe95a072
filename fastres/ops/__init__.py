"""Fused operators, one file each, registered with torch.library (fake kernels, autograd); and
option A's shortcut, an autograd function that keeps its input's layout (shortcut_a)."""
from .batch_norm_act import batch_norm_act
from .conv_bn import conv_bn
from .shortcut_a import shortcut_a
from . import conv_bn_cudnn  # registers the cudnn-fused ops' fake kernels and autograd

__all__ = ["batch_norm_act", "conv_bn", "shortcut_a"]

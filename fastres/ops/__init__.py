"""Fused operators, one file each, registered with torch.library (fake kernels, autograd)."""
from .batch_norm_act import batch_norm_act

__all__ = ["batch_norm_act"]

"""BatchNorm modules with a fused activation: drop-in subclasses of ``nn.BatchNorm2d``.

``BatchNormReLU2d(x)`` is ``relu(bn(x))`` and ``BatchNormAddReLU2d(x, residual)`` is
``relu(bn(x) + residual)``. Parameters, buffers, state_dict keys, ``load_state_dict``,
``reset_parameters``, ``train()/eval()``, ``momentum=None`` and ``track_running_stats`` behave
exactly as in ``nn.BatchNorm2d``, and ``isinstance(m, nn.BatchNorm2d)`` holds. ``fused=False``
runs the same computation with unfused PyTorch ops (the reference path).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..export import exporting
from ..functional import batch_norm_add_relu, batch_norm_relu

__all__ = ["BatchNormReLU2d", "BatchNormAddReLU2d", "BatchNormAct2d"]


def bn_arguments(bn: nn.BatchNorm2d) -> dict:
    """The arguments nn.BatchNorm2d.forward would pass to F.batch_norm (for any BatchNorm2d,
    also the plain ones the Triton conv chain normalises)."""
    if bn.training and bn.track_running_stats:
        bn_training = True
    else:
        bn_training = bn.running_mean is None and bn.running_var is None
    use_running = not bn.training or bn.track_running_stats
    return dict(
        running_mean=bn.running_mean if use_running else None,
        running_var=bn.running_var if use_running else None,
        weight=bn.weight, bias=bn.bias, training=bn_training, momentum=bn.momentum, eps=bn.eps)


def batches_counter(bn: nn.BatchNorm2d, bn_training: bool):
    """The num_batches_tracked counter nn.BatchNorm2d increments in this call, or None."""
    if bn.training and bn.track_running_stats and bn_training:
        return bn.num_batches_tracked
    return None


class BatchNormAct2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with an optional fused residual add and ReLU (base of the two below).

    relu: apply ReLU after the (optional) residual add.
    fused: use fastres' fused kernels (True) or unfused PyTorch ops (False).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, relu: bool = True,
                 fused: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.relu = relu
        self.fused = fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}, fused={self.fused}"

    def _bn_arguments(self):
        return bn_arguments(self)

    def _counter(self, bn_training):
        return batches_counter(self, bn_training)

    def _forward(self, input: Tensor, residual) -> Tensor:
        self._check_input_dim(input)
        args = self._bn_arguments()
        if not self.fused or exporting():
            # exporters (ONNX, jit.trace, torch.export) get standard operators: fastres.export
            return _unfused(self, input, residual, args)
        counter = self._counter(args["training"])
        if not self.relu:
            # plain BatchNorm (+ add): nothing to fuse the activation with
            return _unfused(self, input, residual, args)
        if residual is None:
            return batch_norm_relu(input, num_batches_tracked=counter, **args)
        return batch_norm_add_relu(input, residual, num_batches_tracked=counter, **args)

    def forward(self, input: Tensor, residual=None) -> Tensor:
        return self._forward(input, residual)


def _unfused(bn: BatchNormAct2d, input, residual, args):
    """nn.BatchNorm2d's own forward, then add and ReLU."""
    y = nn.BatchNorm2d.forward(bn, input)
    if residual is not None:
        y = y + residual
    return F.relu(y) if bn.relu else y


class BatchNormReLU2d(BatchNormAct2d):
    """``relu(BatchNorm2d(x))`` in one fused op; a drop-in nn.BatchNorm2d subclass."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, fused: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         relu=True, fused=fused)

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, None)


class BatchNormAddReLU2d(BatchNormAct2d):
    """``relu(BatchNorm2d(x) + residual)`` in one fused op; forward(x, residual)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, fused: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         relu=True, fused=fused)

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        if residual is None:
            raise ValueError("BatchNormAddReLU2d.forward needs a residual tensor")
        return self._forward(input, residual)

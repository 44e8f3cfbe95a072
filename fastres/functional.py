"""Functional fused ops, with the arguments of torch.nn.functional.batch_norm.

    batch_norm_relu(x, ...)               == relu(batch_norm(x, ...))
    batch_norm_add_relu(x, residual, ...) == relu(batch_norm(x, ...) + residual)

Semantics are those of ``nn.BatchNorm2d``: in training the batch statistics normalise the
input and the running statistics (when given) are updated in place with `momentum` and the
unbiased variance; ``momentum=None`` gives a cumulative moving average, for which the
``num_batches_tracked`` counter of the module must be passed (it is incremented in place, as
BatchNorm does). In eval the running statistics are used. Parameters and statistics may stay
float32 under float16/bfloat16 inputs.
"""
from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._extension import _C
from .export import _is_exporting
from .ops.batch_norm_act import batch_norm_act

__all__ = ["batch_norm_relu", "batch_norm_add_relu"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(input, residual, running_mean, running_var, weight, bias, training, momentum,
           num_batches_tracked, op):
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"{op}: input must have shape (N, C, ...) with at least 2 dims, "
                         f"got {input.dim()}-D input of shape {tuple(input.shape)}")
    c = input.shape[1]
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{op}: residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} does not match "
                             f"input shape {tuple(input.shape)}")
        if residual.device != input.device:
            raise ValueError(f"{op}: residual is on {residual.device} but input is on {input.device}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{op}: residual dtype {residual.dtype} does not match input dtype "
                            f"{input.dtype}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but input has {c} "
                             f"channels (expected ({c},))")
        if t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
        if t.dtype not in (torch.float32, input.dtype):
            raise TypeError(f"{op}: {name} must be float32 or the input dtype {input.dtype}, "
                            f"got {t.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var must be defined in evaluation mode "
                         f"(training=False)")
    if training:
        per_channel = input.numel() // c if c else 0
        if per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {input.size()}")
        if momentum is None and running_mean is not None and num_batches_tracked is None:
            raise ValueError(f"{op}: momentum=None (cumulative moving average) needs the "
                             f"num_batches_tracked counter")
    if momentum is not None and not isinstance(momentum, (int, float)):
        raise TypeError(f"{op}: momentum must be a float or None, got {type(momentum).__name__}")


def _reference(input, residual, running_mean, running_var, weight, bias, training, momentum,
               eps, num_batches_tracked):
    """Unfused PyTorch, used only for empty inputs (nothing to fuse). The counter is
    incremented as nn.BatchNorm does, also for an empty batch."""
    if training and running_mean is not None and num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
                                       0.0 if momentum is None else momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y)


def _eager_cpu(input, residual, running_mean, running_var, weight, bias, training, momentum,
               eps, num_batches_tracked):
    """The fused op through fastres._C.bn_act_eager (csrc/bn_act_python.cpp): an eager call on
    the CPU whose arguments all pass _check, tested in C++ and run without the Python below
    (some 20 us a call). None where that does not apply: the caller then checks and runs the
    op in Python, and raises the errors."""
    if backends._current[0] not in ("auto", "cpu") or torch.compiler.is_compiling() or \
            _is_exporting():
        return None
    return _C.bn_act_eager(input, residual, running_mean, running_var, weight, bias, training,
                           momentum, eps, num_batches_tracked, True)


def batch_norm_relu(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                    *, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``relu(batch_norm(input, ...))`` in one fused op. See the module docstring."""
    out = _eager_cpu(input, None, running_mean, running_var, weight, bias, training, momentum,
                     eps, num_batches_tracked)
    if out is not None:
        return out
    _check(input, None, running_mean, running_var, weight, bias, training, momentum,
           num_batches_tracked, "batch_norm_relu")
    if input.numel() == 0:
        return _reference(input, None, running_mean, running_var, weight, bias, training,
                          momentum, eps, num_batches_tracked)
    return batch_norm_act(input, None, running_mean, running_var, weight, bias, training,
                          momentum, eps, True, num_batches_tracked)


def batch_norm_add_relu(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, training: bool = False,
                        momentum: Optional[float] = 0.1, eps: float = 1e-5, *,
                        num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``relu(batch_norm(input, ...) + residual)`` in one fused op. See the module docstring."""
    if residual is None:
        raise ValueError("batch_norm_add_relu: residual is required (use batch_norm_relu without one)")
    out = _eager_cpu(input, residual, running_mean, running_var, weight, bias, training, momentum,
                     eps, num_batches_tracked)
    if out is not None:
        return out
    _check(input, residual, running_mean, running_var, weight, bias, training, momentum,
           num_batches_tracked, "batch_norm_add_relu")
    if input.numel() == 0:
        return _reference(input, residual, running_mean, running_var, weight, bias, training,
                          momentum, eps, num_batches_tracked)
    return batch_norm_act(input, residual, running_mean, running_var, weight, bias, training,
                          momentum, eps, True, num_batches_tracked)

"""The fused BatchNorm (+ residual add) (+ ReLU) operator.

    out = relu?(batch_norm(input) + residual?)

Two operator pairs implement it, with one autograd formula and one fake (meta) kernel:

* ``torch.ops.fastres.bn_act_forward`` / ``bn_act_backward``: C++ (csrc/cpu) and CUDA C++
  (csrc/cuda) kernels, declared with TORCH_LIBRARY in csrc/ops.cpp;
* ``torch.ops.fastres.bn_act_forward_triton`` / ``bn_act_backward_triton``: the Triton kernels of
  ``fastres.kernels.batch_norm_act``, registered with ``torch.library.triton_op`` so that
  torch.compile sees the kernels.

Both forward ops are functional: they return ``(out, mean, var)`` (var is the biased batch
variance, or a copy of running_var in eval), and :func:`batch_norm_act` updates the running
statistics from them, so autograd and torch.compile need no mutation inside the op.

What backward keeps (memory is a headline feature):
* BatchNorm+ReLU: the input and two fp32 vectors of C (mean, var); the ReLU mask is recomputed
  from the input with the forward's own arithmetic, so the output is not kept.
* BatchNorm+add+ReLU: the input, the output (its ReLU mask; in a ResNet the output is the next
  block's input, which its convolution keeps anyway, so this costs no extra memory) and the
  two vectors. The residual itself is not kept.
* weight and bias (parameters, kept anyway).
"""
import os
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..export import _is_exporting
from .._extension import _C  # noqa: F401  (loads the C++ operator library)

__all__ = ["batch_norm_act"]


def _stat_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Triton operators (the kernels are imported lazily: triton is optional and TRITON_INTERPRET
# must be set before it is first imported). On a GPU they are triton_ops, whose kernels
# torch.compile sees; under TRITON_INTERPRET=1 (CPU tensors) they are opaque custom ops,
# because PyTorch cannot trace interpreted kernels. TRITON_BODIES keeps each operator's Python
# body by name: the static kernel report (fastres.kernels.report) runs the bodies on meta
# tensors to record which kernels a model launches.
# ---------------------------------------------------------------------------------------------
TRITON_BODIES: dict = {}


def _triton_operator(name):
    def register(fn):
        TRITON_BODIES[name] = fn
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return torch.library.custom_op(name, mutates_args=())(fn)
        return torch.library.triton_op(name, mutates_args=())(fn)
    return register


@_triton_operator("fastres::bn_act_forward_triton")
def _bn_act_forward_triton(
    input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import batch_norm_act as kernels

    return kernels.bn_act_forward(input, residual, weight, bias, running_mean, running_var,
                                  training, eps, relu)


@_triton_operator("fastres::bn_act_backward_triton")
def _bn_act_backward_triton(
    grad_output: Tensor, input: Tensor, output: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool, eps: float, relu: bool,
    has_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels import batch_norm_act as kernels

    return kernels.bn_act_backward(grad_output, input, output, weight, bias, mean, var, training,
                                   eps, relu, has_residual)


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes, dtypes and strides of the outputs, for torch.compile/opcheck.
# ---------------------------------------------------------------------------------------------
def _fake_forward(input, residual, weight, bias, running_mean, running_var, training, eps, relu):
    c = input.shape[1]
    sd = _stat_dtype(input)
    return torch.empty_like(input), input.new_empty((c,), dtype=sd), input.new_empty((c,), dtype=sd)


def _fake_backward(grad_output, input, output, weight, bias, mean, var, training, eps, relu,
                   has_residual):
    c = input.shape[1]
    sd = _stat_dtype(input)
    grad_residual = torch.empty_like(input) if has_residual else input.new_empty((0,))
    return (torch.empty_like(input), grad_residual, input.new_empty((c,), dtype=sd),
            input.new_empty((c,), dtype=sd))


torch.library.register_fake("fastres::bn_act_forward", _fake_forward)
torch.library.register_fake("fastres::bn_act_backward", _fake_backward)
torch.library.register_fake("fastres::bn_act_forward_triton", _fake_forward)
torch.library.register_fake("fastres::bn_act_backward_triton", _fake_backward)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
def _same_layout(t: Tensor, ref: Tensor) -> Tensor:
    """`t` with the strides of `ref` (copied only when they differ)."""
    if t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref)
    out.copy_(t)
    return out


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        input, residual, weight, bias, _rm, _rv, training, eps, relu = inputs
        out, mean, var = output
        has_residual = residual is not None
        keep_out = relu and has_residual
        ctx.save_for_backward(input, out if keep_out else None, weight, bias, mean, var)
        ctx.config = (training, eps, relu, has_residual)
        ctx.mark_non_differentiable(mean, var)
        # the statistics never get a gradient: left None instead of zero [C] tensors made
        # on every backward (a kernel launch each on a GPU)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_mean, _grad_var):
        if grad_out is None:  # no gradient reached the output: none for the inputs
            return (None,) * 9
        input, out, weight, bias, mean, var = ctx.saved_tensors
        training, eps, relu, has_residual = ctx.config
        grad_out = _same_layout(grad_out, input)
        grad_input, grad_residual, grad_weight, grad_bias = backward_op(
            grad_out, input, out, weight, bias, mean, var, training, eps, relu, has_residual)
        return (
            grad_input,
            grad_residual if has_residual else None,
            grad_weight.to(weight.dtype) if weight is not None else None,
            grad_bias.to(bias.dtype) if bias is not None else None,
            None, None, None, None, None,
        )

    return backward, setup_context


# fastres::bn_act_forward (the C++ CPU and CUDA kernels) has its autograd in C++
# (csrc/bn_act_autograd.cpp, the same saved tensors and backward as here): registered from
# Python it cost some 100 us of glue per forward + backward, more than the whole kernel on a
# small CPU batch. The Triton op's autograd stays here (its launches are asynchronous anyway).
_backward, _setup = _make_autograd(torch.ops.fastres.bn_act_backward_triton)
torch.library.register_autograd("fastres::bn_act_forward_triton", _backward,
                                setup_context=_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastres: the fused BatchNorm ops do not support double backward "
                       "(a gradient of their gradient); use the unfused PyTorch ops for that")


for _op in ("fastres::bn_act_backward", "fastres::bn_act_backward_triton"):
    torch.library.register_autograd(_op, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


_EAGER = torch.ops.fastres.bn_act.default
_FORWARD = {
    "cpu": torch.ops.fastres.bn_act_forward,
    "cuda": torch.ops.fastres.bn_act_forward,
    "triton": torch.ops.fastres.bn_act_forward_triton,
}


# ---------------------------------------------------------------------------------------------
# Entry point used by fastres.functional (inputs already validated there).
# ---------------------------------------------------------------------------------------------
def _dense_layout(t: Tensor) -> Tensor:
    """`t` if it is contiguous or channels-last dense, else a contiguous copy."""
    if t.is_contiguous() or t.dim() < 3:
        return t.contiguous()
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t  # without the permute below (a dispatched op: microseconds a call)
    perm = [0, *range(2, t.dim()), 1]
    if t.permute(perm).is_contiguous():
        return t
    return t.contiguous()


def batch_norm_act(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   training: bool, momentum: Optional[float], eps: float, relu: bool,
                   num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """Run the fused op on the selected backend and update running statistics in training."""
    name = backends.resolve(input.device)
    if name == "cpu" and not torch.compiler.is_compiling() and not _is_exporting():
        # eager on the CPU: the same steps in one C++ operator (csrc/bn_act_eager.cpp), which
        # saves the Python below (some 30 us per call: as much as the kernel on a small batch)
        return _EAGER(input, residual, weight, bias, running_mean, running_var,
                      num_batches_tracked, training, momentum, eps, relu)
    input = _dense_layout(input)
    if residual is not None:
        residual = _same_layout(residual, input)
    out, mean, var = _FORWARD[name](input, residual, weight, bias, running_mean, running_var,
                                    training, eps, relu)
    if training and running_mean is not None:
        _update_running_stats(running_mean, running_var, mean, var, momentum, num_batches_tracked,
                              input.numel() // input.shape[1])
    return out


def _update_running_stats(running_mean, running_var, mean, var, momentum, num_batches_tracked,
                          count):
    """As nn.BatchNorm: running = (1 - f) * running + f * batch, with the unbiased variance."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        unbiased = var * (count / (count - 1))
        if momentum is None:  # cumulative moving average
            f = 1.0 / num_batches_tracked.to(mean.dtype)
            running_mean.mul_(1 - f).add_(mean * f)
            running_var.mul_(1 - f).add_(unbiased * f)
        else:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


# ---------------------------------------------------------------------------------------------
# BatchNorm (+ add) (+ ReLU) with given batch statistics: the statistics were computed by the
# epilogue of the Triton convolution that produced `input` (fastres.ops.conv_bn), so the op
# only normalises; its backward is the training-mode backward (gradients flow through the
# statistics into `input`, as if the op had computed them).
# ---------------------------------------------------------------------------------------------
@_triton_operator("fastres::bn_act_apply_triton")
def _bn_act_apply_triton(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                         bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
                         relu: bool) -> Tensor:
    from ..kernels import batch_norm_act as kernels

    out, _, _ = kernels.bn_act_forward(input, residual, weight, bias, mean, var, False, eps, relu)
    return out


@torch.library.register_fake("fastres::bn_act_apply_triton")
def _fake_apply(input, residual, weight, bias, mean, var, eps, relu):
    return torch.empty_like(input)


def _apply_setup_context(ctx, inputs, output):
    input, residual, weight, bias, mean, var, eps, relu = inputs
    has_residual = residual is not None
    ctx.save_for_backward(input, output if relu and has_residual else None, weight, bias, mean,
                          var)
    ctx.config = (eps, relu, has_residual)


def _apply_backward(ctx, grad_out):
    input, out, weight, bias, mean, var = ctx.saved_tensors
    eps, relu, has_residual = ctx.config
    grad_out = _same_layout(grad_out, input)
    grad_input, grad_residual, grad_weight, grad_bias = torch.ops.fastres.bn_act_backward_triton(
        grad_out, input, out, weight, bias, mean, var, True, eps, relu, has_residual)
    return (grad_input, grad_residual if has_residual else None,
            grad_weight.to(weight.dtype) if weight is not None else None,
            grad_bias.to(bias.dtype) if bias is not None else None, None, None, None, None)


torch.library.register_autograd("fastres::bn_act_apply_triton", _apply_backward,
                                setup_context=_apply_setup_context)

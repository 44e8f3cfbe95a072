"""Convolution with BatchNorm fused into its prologue and epilogue (Triton, NHWC).

    out = relu?(conv2d(act(x), weight, stride, padding) + bias? + residual?)
    act(x) = relu?(batch_norm(x; in_weight, in_bias, in_mean, in_var, in_eps))   (prologue)

and, with ``stats=True``, the per-channel mean and biased variance of ``out`` (the statistics
the next BatchNorm needs, from the convolution's epilogue).

Operators (kernels in ``fastres.kernels.conv``; ``torch.library.triton_op`` on a GPU, so
torch.compile sees the kernels; opaque custom ops under TRITON_INTERPRET=1):

* ``fastres::conv_bn_forward_triton(x, weight, bias, residual, in_weight, in_bias, in_mean,
  in_var, stride, padding, in_eps, in_relu, in_training, relu, stats) -> (out, mean, var)``
* ``fastres::conv_bn_backward_triton(grad_out, x, weight, in_weight, in_bias, in_mean, in_var,
  stride, padding, in_eps, in_relu, in_training, need_input, need_weight)
  -> (grad_x, grad_weight, grad_in_weight, grad_in_bias)``

Autograd (training: no bias, residual or ReLU epilogue) treats ``in_mean``/``in_var`` as
the batch statistics of ``x`` when ``in_training`` (they come from the epilogue of the
convolution that produced x), so grad_x is the full training-mode BatchNorm backward; with
``in_training=False`` they are running statistics (constants). What backward keeps: x (the raw,
un-normalised input), the weight and four vectors; the normalised activation act(x) is never
stored, the data- and weight-gradient kernels recompute it.

Backward runs three Triton kernels: the data gradient, whose epilogue applies the prologue's
ReLU mask and emits the partial sums of BatchNorm backward; one elementwise pass that finishes
BatchNorm backward (kernels.batch_norm_act.bn_backward_from_partials); the weight gradient,
which recomputes act(x) while loading x.

Inputs: x, weight, residual channels-last 4-D tensors of one dtype (float32, float16 or
bfloat16); BatchNorm vectors float32 or x's dtype. :func:`conv_bn` converts and checks.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from .batch_norm_act import _triton_operator

__all__ = ["compute_dtype", "conv_bn", "prologue_scale_shift"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a convolution of `x` runs in: autocast's when it is enabled, else x's."""
    kind = x.device.type
    if kind != "meta" and torch.is_autocast_enabled(kind):  # meta: no autocast (kernel report)
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def prologue_scale_shift(in_weight: Optional[Tensor], in_bias: Optional[Tensor], in_mean: Tensor,
                         in_var: Tensor, eps: float):
    """fp32 (scale, shift) of ``x * scale + shift == batch_norm(x)``; computed once per call
    with the same ops in forward and backward, so the ReLU masks of all kernels agree."""
    scale = torch.rsqrt(in_var.float() + eps)
    if in_weight is not None:
        scale = scale * in_weight.float()
    shift = -in_mean.float() * scale
    if in_bias is not None:
        shift = shift + in_bias.float()
    return scale.contiguous(), shift.contiguous()


@_triton_operator("fastres::conv_bn_forward_triton")
def _conv_bn_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
    in_weight: Optional[Tensor], in_bias: Optional[Tensor], in_mean: Optional[Tensor],
    in_var: Optional[Tensor], stride: int, padding: int, in_eps: float, in_relu: bool,
    in_training: bool, relu: bool, stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import conv as kernels

    scale = shift = None
    if in_mean is not None:
        scale, shift = prologue_scale_shift(in_weight, in_bias, in_mean, in_var, in_eps)
    return kernels.conv_forward(x, weight, stride, padding, bias, residual, scale, shift,
                                in_relu, relu, stats)


@_triton_operator("fastres::conv_bn_backward_triton")
def _conv_bn_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_mean: Optional[Tensor], in_var: Optional[Tensor],
    stride: int, padding: int, in_eps: float, in_relu: bool, in_training: bool,
    need_input: bool, need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels import batch_norm_act as bn_kernels
    from ..kernels import conv as kernels

    f32 = dict(dtype=torch.float32, device=x.device)
    scale = shift = None
    if in_mean is not None:
        scale, shift = prologue_scale_shift(in_weight, in_bias, in_mean, in_var, in_eps)
    grad_weight = torch.empty(0, dtype=weight.dtype, device=x.device)
    if need_weight:
        grad_weight = kernels.conv_wgrad(grad_out, x, weight.shape, stride, padding, scale, shift,
                                         in_relu).to(weight.dtype)
    grad_x = torch.empty(0, dtype=x.dtype, device=x.device)
    grad_in_weight = torch.empty(0, **f32)
    grad_in_bias = torch.empty(0, **f32)
    if need_input:
        grad_x, psg, psgx = kernels.conv_dgrad(grad_out, weight, x, stride, padding, scale,
                                               shift, in_mean, in_relu)
        if in_mean is not None:
            grad_x, grad_in_weight, grad_in_bias = bn_kernels.bn_backward_from_partials(
                grad_x, x, in_weight, in_bias, in_mean.float().contiguous(),
                in_var.float().contiguous(), psg, psgx, in_training, in_eps)
    return grad_x, grad_weight, grad_in_weight, grad_in_bias


def _out_hw(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


@torch.library.register_fake("fastres::conv_bn_forward_triton")
def _fake_forward(x, weight, bias, residual, in_weight, in_bias, in_mean, in_var, stride, padding,
                  in_eps, in_relu, in_training, relu, stats):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    out = torch.empty((n, cout, _out_hw(h, kh, stride, padding), _out_hw(w, kw, stride, padding)),
                      dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    c = cout if stats else 0
    return out, x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


@torch.library.register_fake("fastres::conv_bn_backward_triton")
def _fake_backward(grad_out, x, weight, in_weight, in_bias, in_mean, in_var, stride, padding,
                   in_eps, in_relu, in_training, need_input, need_weight):
    grad_x = torch.empty_like(x, memory_format=torch.channels_last) if need_input else \
        x.new_empty((0,))
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                              memory_format=torch.channels_last) \
        if need_weight else weight.new_empty((0,))
    c = x.shape[1] if need_input and in_mean is not None else 0
    return (grad_x, grad_weight, x.new_empty((c,), dtype=torch.float32),
            x.new_empty((c,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, in_weight, in_bias, in_mean, in_var, stride, padding, in_eps,
     in_relu, in_training, relu, stats) = inputs
    ctx.save_for_backward(x, weight, in_weight, in_bias, in_mean, in_var)
    ctx.config = (stride, padding, in_eps, in_relu, in_training)
    ctx.inference_only = bias is not None or residual is not None or relu
    ctx.mark_non_differentiable(output[1], output[2])
    # the statistics never get a gradient: left None instead of zero [C] tensors made on
    # every backward (a kernel launch each on a GPU)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:  # no gradient reached the output: none for the inputs
        return (None,) * 15
    if ctx.inference_only:
        raise RuntimeError("fastres: the Triton convolution's bias/residual/ReLU epilogue is "
                           "inference-only (no backward); in training the BatchNorm follows "
                           "the convolution")
    x, weight, in_weight, in_bias, in_mean, in_var = ctx.saved_tensors
    stride, padding, in_eps, in_relu, in_training = ctx.config
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_in = in_mean is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    grad_x, grad_w, grad_in_w, grad_in_b = torch.ops.fastres.conv_bn_backward_triton(
        grad_out, x, weight, in_weight, in_bias, in_mean, in_var, stride, padding, in_eps,
        in_relu, in_training, need_x or need_in, need_w)
    return (grad_x if need_x else None, grad_w if need_w else None, None, None,
            grad_in_w.to(in_weight.dtype) if in_weight is not None and ctx.needs_input_grad[4]
            else None,
            grad_in_b.to(in_bias.dtype) if in_bias is not None and ctx.needs_input_grad[5]
            else None,
            None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("fastres::conv_bn_forward_triton", _backward,
                                setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastres: the Triton convolution does not support double backward")


torch.library.register_autograd("fastres::conv_bn_backward_triton", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Entry point: argument checks and conversions
# ---------------------------------------------------------------------------------------------
def _square(v, name):
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise ValueError(f"fastres conv: the Triton convolution needs equal {name} in H and "
                             f"W, got {tuple(v)}")
        v = v[0]
    return int(v)


def conv_bn(x: Tensor, weight: Tensor, stride=1, padding=0, *, bias: Optional[Tensor] = None,
            residual: Optional[Tensor] = None, in_weight: Optional[Tensor] = None,
            in_bias: Optional[Tensor] = None, in_mean: Optional[Tensor] = None,
            in_var: Optional[Tensor] = None, in_eps: float = 1e-5, in_relu: bool = True,
            in_training: bool = True, relu: bool = False, stats: bool = False):
    """Fused convolution, see the module docstring; returns (out, mean, var).

    x is converted to channels-last and the weight to x's dtype and channels-last (both
    differentiable conversions); out is channels-last. Under autocast, x and weight are cast to
    the autocast dtype.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fastres conv: x and weight must be Tensors")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"fastres conv: x and weight must be 4-D, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"fastres conv: the Triton convolution needs a square kernel, got "
                         f"{tuple(weight.shape[2:])}")
    if x.device != weight.device:
        raise ValueError(f"fastres conv: x is on {x.device} but weight is on {weight.device}")
    stride, padding = _square(stride, "stride"), _square(padding, "padding")
    dtype = compute_dtype(x)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fastres conv: the Triton convolution supports float32, float16 and "
                        f"bfloat16, got {dtype}")
    cl = torch.channels_last
    x = x.to(dtype).contiguous(memory_format=cl)
    weight = weight.to(dtype).contiguous(memory_format=cl)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=cl)
    if bias is not None:
        bias = bias.contiguous()
    if (in_mean is None) != (in_var is None):
        raise ValueError("fastres conv: give both in_mean and in_var, or neither")
    if in_mean is None and (in_weight is not None or in_bias is not None):
        raise ValueError("fastres conv: in_weight/in_bias need in_mean and in_var")
    if in_mean is not None:
        c = x.shape[1]
        for t, name in ((in_weight, "in_weight"), (in_bias, "in_bias"), (in_mean, "in_mean"),
                        (in_var, "in_var")):
            if t is not None and (t.shape != (c,) or t.device != x.device):
                raise ValueError(f"fastres conv: {name} must have shape ({c},) on {x.device}, "
                                 f"got {tuple(t.shape)} on {t.device}")
        in_mean, in_var = in_mean.contiguous(), in_var.contiguous()
    if torch.is_grad_enabled() and (bias is not None or residual is not None or relu):
        if any(t is not None and t.requires_grad for t in (x, weight, bias, residual, in_weight,
                                                           in_bias)):
            raise RuntimeError("fastres conv: the bias/residual/ReLU epilogue is inference-only; "
                               "run it under torch.no_grad()")
    kind = x.device.type
    no_autocast = torch.autocast(kind, enabled=False) if kind != "meta" \
        else contextlib.nullcontext()  # meta tensors (the static kernel report) have no autocast
    with no_autocast:
        return torch.ops.fastres.conv_bn_forward_triton(
            x, weight, bias, residual, in_weight, in_bias, in_mean, in_var, stride, padding,
            float(in_eps), bool(in_relu), bool(in_training), bool(relu), bool(stats))

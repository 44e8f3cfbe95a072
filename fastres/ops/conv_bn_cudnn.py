"""Convolution with BatchNorm fused in through cuDNN's graph API (conv backend "cudnn-fused").

The patterns of cuDNN's fused ResNet engines (the MLPerf ResNet-50 plan), NHWC, built once per
layer shape with cudnn-frontend and cached with their execution plans
(csrc/cuda/conv_bn_cudnn.cpp):

* ``fastres::conv_bn_forward_cudnn(x, weight, in_weight, in_bias, in_mean, in_var, stride,
  padding, in_eps, in_relu, stats) -> (out, sum, sqsum)``: ``out = conv(relu?(bn(x)))`` with
  the input's BatchNorm (given statistics) as a scale+shift(+ReLU) prologue and, with
  ``stats``, the per-channel fp32 sum and sum of squares of ``out`` from a GenStats epilogue;
* ``fastres::conv_bn_backward_cudnn(...) -> (grad_x, grad_weight, grad_in_weight,
  grad_in_bias)``: the data gradient with the prologue's ReLU mask (recomputed from x) and
  cuDNN's dBN-weight terms (dgamma, dbeta and the coefficients of ``dx = a*dP + b*x + c``), the
  weight gradient on the recomputed ``relu?(bn(x))``;
* ``fastres::conv_bias_act_cudnn(x, weight, bias, residual, stride, padding, relu) -> out``:
  folded inference, ``relu?(conv(x) + bias + residual?)`` (cuDNN's ReLU propagates NaN here:
  the frontend builds it with CUDNN_PROPAGATE_NAN);
* ``fastres::bn_act_apply_cuda(y, residual, weight, bias, mean, var, eps, relu)``: the block's
  final BatchNorm (+ add) + ReLU with the statistics from the epilogue, on the CUDA C++ fused
  kernels (fastres::bn_act_forward / bn_act_backward, training-mode backward through the
  statistics).

The BatchNorm finalize (sum, sum of squares -> mean, biased variance; running statistics with
momentum or momentum=None) runs in :func:`finalize_stats` and the chain's
``_update_running_stats``, exactly as nn.BatchNorm2d; the variance is ``E[y^2] - E[y]^2`` from
fp32 sums, formed in fp64 (the GenStats pattern's sums; cancellation when |mean| >> std is the
price of this pattern, which the GPU tests measure against the numerics rule).

Which layers cuDNN can run is decided per layer by :func:`layer_support` (static rules, then
cuDNN's own answer: plans are built for forward, dgrad and wgrad on the device and cached);
the rest run on the "cudnn" path (PyTorch's convolution + fused BatchNorm kernels).
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from .._extension import _C
from .conv_bn import _fake_backward as _triton_fake_backward

__all__ = ["available", "why_unavailable", "conv_bn_cudnn", "conv_bias_act_cudnn",
           "bn_act_apply_cuda", "finalize_stats", "layer_support", "graph_check"]

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def why_unavailable() -> Optional[str]:
    """None when the cudnn-fused backend can run here, else why not."""
    from ..backends import _why_cudnn_fused_unavailable

    return _why_cudnn_fused_unavailable()


def available() -> bool:
    return why_unavailable() is None


def _built() -> bool:
    return bool(_C.build_info().get("cudnn_fused", False))


def _require_built():
    if not _built():
        raise RuntimeError("fastres: the 'cudnn-fused' conv backend was not built: "
                           + str(_C.build_info().get("cudnn_fused_why")))


def graph_check(kind: str, x_shape, w_shape, stride: int = 1, padding: int = 0,
                dtype: torch.dtype = torch.float16, prologue: bool = False, in_relu: bool = True,
                stats: bool = False, residual: bool = False, relu: bool = False) -> str:
    """Build one layer's cuDNN graph and run cudnn-frontend's host-side ``validate()`` (no GPU
    needed). ``kind``: "forward", "dgrad", "wgrad" or "inference". Returns "" when it
    validates, else the frontend's reason."""
    _require_built()
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"fastres cudnn-fused: dtype must be float16, bfloat16 or float32, "
                        f"got {dtype}")
    return _C.cudnn_fused_graph_check(kind, list(x_shape), list(w_shape), int(stride),
                                      int(padding), _DTYPE_NAMES[dtype], bool(prologue),
                                      bool(in_relu), bool(stats), bool(residual), bool(relu))


def _plan_check(kind, x_shape, w_shape, stride, padding, dtype, **flags) -> str:
    args = dict(prologue=False, in_relu=True, stats=False, residual=False, relu=False)
    args.update(flags)
    return _C.cudnn_fused_plan_check(kind, list(x_shape), list(w_shape), int(stride),
                                     int(padding), _DTYPE_NAMES[dtype], args["prologue"],
                                     args["in_relu"], args["stats"], args["residual"],
                                     args["relu"])


def static_reason(x_shape, w_shape, stride, padding, dtype: torch.dtype) -> Optional[str]:
    """Why cuDNN's fused engines are known not to take this layer (None: ask cuDNN). The
    documented support: NHWC fp16 (bf16 tried), channels multiples of 8 (16-byte vectors)."""
    if dtype not in _DTYPE_NAMES:
        return f"dtype {dtype} (float16, bfloat16 or float32 only)"
    c, k = x_shape[1], w_shape[0]
    if c % 8 or k % 8:
        return f"channels {c}->{k} are not multiples of 8 (cuDNN's fused engines need 16-byte " \
               f"aligned channel vectors)"
    return None


@functools.lru_cache(maxsize=None)
def _layer_support(device_index: int, x_shape, w_shape, stride, padding, dtype, training: bool,
                   prologue: bool, in_relu: bool, residual: bool, relu: bool) -> Optional[str]:
    why = static_reason(x_shape, w_shape, stride, padding, dtype)
    if why is not None:
        return why
    with torch.cuda.device(device_index):
        if training:
            graphs = (("forward", dict(prologue=prologue, in_relu=in_relu, stats=True)),
                      ("dgrad", dict(prologue=prologue, in_relu=in_relu, stats=prologue)),
                      ("wgrad", dict(prologue=prologue, in_relu=in_relu)))
        else:
            graphs = (("inference", dict(residual=residual, relu=relu)),)
        for kind, flags in graphs:
            err = _plan_check(kind, x_shape, w_shape, stride, padding, dtype, **flags)
            if err:
                return f"cuDNN has no engine for its {kind} graph ({err})"
    return None


def layer_support(device: torch.device, x_shape, w_shape, stride: int, padding: int,
                  dtype: torch.dtype, training: bool, prologue: bool = True,
                  in_relu: bool = True, residual: bool = False, relu: bool = True):
    """None when cuDNN runs this layer fused on `device` (training: forward, dgrad and wgrad
    graphs; inference: conv+bias(+residual)(+ReLU)), else why not. Cached per layer."""
    why = why_unavailable()
    if why is not None:
        return why
    if device.type != "cuda":
        return f"tensors on {device} (cudnn-fused runs on CUDA)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _layer_support(index, tuple(x_shape), tuple(w_shape), int(stride), int(padding), dtype,
                          bool(training), bool(prologue), bool(in_relu), bool(residual),
                          bool(relu))


def finalize_stats(sum_: Tensor, sqsum: Tensor, count: int):
    """(mean, biased variance) in fp32 from the epilogue's per-channel sums (fp64 math)."""
    if count < 1:
        raise ValueError("fastres cudnn-fused: no elements per channel")
    mean = sum_.double() / count
    var = (sqsum.double() / count - mean * mean).clamp_min(0)
    return mean.float(), var.float()


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd
# ---------------------------------------------------------------------------------------------
def _out_hw(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _have_ops() -> bool:
    """The schemas are in every build of fastres._C since the cudnn-fused backend; an older
    extension (not rebuilt yet) has none, and fastres must still import."""
    try:
        torch.ops.fastres.conv_bn_forward_cudnn
        return True
    except (AttributeError, RuntimeError):
        return False


_HAVE_OPS = _have_ops()


def _if_ops(register):
    return register if _HAVE_OPS else (lambda fn: fn)


@_if_ops(torch.library.register_fake("fastres::conv_bn_forward_cudnn"))
def _fake_forward(x, weight, in_weight, in_bias, in_mean, in_var, stride, padding, in_eps,
                  in_relu, stats):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    out = torch.empty((n, cout, _out_hw(h, kh, stride, padding), _out_hw(w, kw, stride, padding)),
                      dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    c = cout if stats else 0
    return out, x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


# the same schema and outputs as the Triton op's backward: its fake kernel serves both
_if_ops(torch.library.register_fake("fastres::conv_bn_backward_cudnn"))(
    _triton_fake_backward)


@_if_ops(torch.library.register_fake("fastres::conv_bias_act_cudnn"))
def _fake_infer(x, weight, bias, residual, stride, padding, relu):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    return torch.empty((n, cout, _out_hw(h, kh, stride, padding), _out_hw(w, kw, stride, padding)),
                       dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    (x, weight, in_weight, in_bias, in_mean, in_var, stride, padding, in_eps, in_relu,
     stats) = inputs
    ctx.save_for_backward(x, weight, in_weight, in_bias, in_mean, in_var)
    ctx.config = (stride, padding, in_eps, in_relu)
    ctx.mark_non_differentiable(output[1], output[2])
    # the statistics never get a gradient: left None instead of zero [C] tensors made on
    # every backward (a kernel launch each)
    ctx.set_materialize_grads(False)


def _input_grads(ctx, in_weight, in_bias, grad_x, grad_w, grad_in_w, grad_in_b):
    """The gradients of conv_bn_forward_cudnn's 11 inputs from its backward op's outputs: None
    where an input needs none (or, for the prologue's weight and bias, is absent), the
    prologue's in its parameter's dtype; the other 7 inputs have none."""
    need = ctx.needs_input_grad
    return (grad_x if need[0] else None, grad_w if need[1] else None,
            grad_in_w.to(in_weight.dtype) if in_weight is not None and need[2] else None,
            grad_in_b.to(in_bias.dtype) if in_bias is not None and need[3] else None,
            None, None, None, None, None, None, None)


def _backward(ctx, grad_out, _grad_sum, _grad_sqsum):
    if grad_out is None:  # no gradient reached the output: none for the inputs
        return (None,) * 11
    x, weight, in_weight, in_bias, in_mean, in_var = ctx.saved_tensors
    stride, padding, in_eps, in_relu = ctx.config
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_in = in_mean is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    # in_mean/in_var are the batch statistics of x when they came from a convolution's
    # epilogue; conv_bn_cudnn passes running statistics (eval-mode prologue) with
    # requires_grad False and marks that case in in_training below
    in_training = getattr(ctx, "in_training", True)
    grad_x, grad_w, grad_in_w, grad_in_b = torch.ops.fastres.conv_bn_backward_cudnn(
        grad_out.contiguous(memory_format=torch.channels_last), x, weight, in_weight, in_bias,
        in_mean, in_var, stride, padding, in_eps, in_relu, in_training, need_x or need_in, need_w)
    return _input_grads(ctx, in_weight, in_bias, grad_x, grad_w, grad_in_w, grad_in_b)


if _HAVE_OPS:
    torch.library.register_autograd("fastres::conv_bn_forward_cudnn", _backward,
                                    setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastres: the cudnn-fused convolution does not support double backward")


if _HAVE_OPS:
    torch.library.register_autograd("fastres::conv_bn_backward_cudnn", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _inference_only(ctx, *grads):
    raise RuntimeError("fastres: fastres::conv_bias_act_cudnn (folded inference) has no "
                       "backward; in training the BatchNorm follows the convolution")


if _HAVE_OPS:
    torch.library.register_autograd("fastres::conv_bias_act_cudnn", _inference_only,
                                    setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# The block's final BatchNorm (+ add) + ReLU with the epilogue's statistics, on the CUDA C++
# fused kernels: forward normalises with the given statistics, backward is the training-mode
# BatchNorm backward (gradients flow through the statistics into y).
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastres::bn_act_apply_cuda", mutates_args=())
def bn_act_apply_cuda(y: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                      bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
                      relu: bool) -> Tensor:
    out, _, _ = torch.ops.fastres.bn_act_forward(y, residual, weight, bias, mean, var, False,
                                                 eps, relu)
    return out


@bn_act_apply_cuda.register_fake
def _fake_apply(y, residual, weight, bias, mean, var, eps, relu):
    return torch.empty_like(y)


def _apply_setup(ctx, inputs, output):
    y, residual, weight, bias, mean, var, eps, relu = inputs
    ctx.save_for_backward(y, output, weight, bias, mean, var)
    ctx.config = (eps, relu, residual is not None)


def _apply_backward(ctx, grad_out):
    y, out, weight, bias, mean, var = ctx.saved_tensors
    eps, relu, has_residual = ctx.config
    grad_out = grad_out.contiguous(memory_format=torch.channels_last) \
        if y.is_contiguous(memory_format=torch.channels_last) else grad_out.contiguous()
    gi, gr, gw, gb = torch.ops.fastres.bn_act_backward(grad_out, y, out, weight, bias, mean, var,
                                                       True, eps, relu, has_residual)
    return (gi, gr if has_residual else None,
            gw.to(weight.dtype) if weight is not None else None,
            gb.to(bias.dtype) if bias is not None else None, None, None, None, None)


bn_act_apply_cuda.register_autograd(_apply_backward, setup_context=_apply_setup)


# ---------------------------------------------------------------------------------------------
# Entry points: argument checks and conversions
# ---------------------------------------------------------------------------------------------
def _check(x: Tensor, weight: Tensor, stride, padding):
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fastres cudnn-fused: x and weight must be Tensors")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"fastres cudnn-fused: x and weight must be 4-D, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"fastres cudnn-fused: x is on {x.device} but weight is on "
                         f"{weight.device}")
    for v, name in ((stride, "stride"), (padding, "padding")):
        if isinstance(v, (tuple, list)) and len(set(v)) != 1:
            raise ValueError(f"fastres cudnn-fused: needs equal {name} in H and W, got {tuple(v)}")
    if x.device.type not in ("cuda", "meta"):
        raise RuntimeError(f"fastres cudnn-fused: runs on CUDA tensors, got tensors on "
                           f"{x.device}")
    s = int(stride[0] if isinstance(stride, (tuple, list)) else stride)
    p = int(padding[0] if isinstance(padding, (tuple, list)) else padding)
    if x.device.type == "cuda":
        _require_built()
    return s, p


def conv_bn_cudnn(x: Tensor, weight: Tensor, stride=1, padding=0, *,
                  in_weight: Optional[Tensor] = None, in_bias: Optional[Tensor] = None,
                  in_mean: Optional[Tensor] = None, in_var: Optional[Tensor] = None,
                  in_eps: float = 1e-5, in_relu: bool = True, in_training: bool = True,
                  stats: bool = False):
    """``conv(relu?(bn(x)))`` on cuDNN's fused graph; returns (out, mean, var) where mean/var
    are the batch statistics of out (``stats=True``) or empty tensors. ``in_training``: the
    prologue's in_mean/in_var are x's batch statistics (True) or running statistics."""
    from .conv_bn import compute_dtype

    s, p = _check(x, weight, stride, padding)
    if (in_mean is None) != (in_var is None):
        raise ValueError("fastres cudnn-fused: give both in_mean and in_var, or neither")
    dtype = compute_dtype(x)
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"fastres cudnn-fused: float16, bfloat16 or float32 only, got {dtype}")
    cl = torch.channels_last
    x = x.to(dtype).contiguous(memory_format=cl)
    weight = weight.to(dtype).contiguous(memory_format=cl)
    with torch.autocast(x.device.type, enabled=False) if x.device.type == "cuda" else \
            _nullcontext():
        out, sum_, sqsum = _forward_with_mode(x, weight, in_weight, in_bias, in_mean, in_var, s,
                                              p, float(in_eps), bool(in_relu), bool(in_training),
                                              bool(stats))
    if not stats:
        return out, sum_, sqsum
    count = out.numel() // out.shape[1]
    mean, var = finalize_stats(sum_, sqsum, count)
    return out, mean, var


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _forward_with_mode(x, weight, in_weight, in_bias, in_mean, in_var, s, p, eps, in_relu,
                       in_training, stats):
    if in_mean is not None and not in_training:
        # running statistics in the prologue: the op's backward treats them as constants
        return _EvalPrologue.apply(x, weight, in_weight, in_bias, in_mean, in_var, s, p, eps,
                                   in_relu, stats)
    return torch.ops.fastres.conv_bn_forward_cudnn(x, weight, in_weight, in_bias, in_mean,
                                                   in_var, s, p, eps, in_relu, stats)


class _EvalPrologue(torch.autograd.Function):
    """conv_bn_forward_cudnn with an eval-mode BatchNorm prologue (in_training=False)."""

    @staticmethod
    def forward(ctx, x, weight, in_weight, in_bias, in_mean, in_var, s, p, eps, in_relu, stats):
        ctx.save_for_backward(x, weight, in_weight, in_bias, in_mean, in_var)
        ctx.config = (s, p, eps, in_relu)
        out = torch.ops.fastres.conv_bn_forward_cudnn(x, weight, in_weight, in_bias, in_mean,
                                                      in_var, s, p, eps, in_relu, stats)
        ctx.mark_non_differentiable(out[1], out[2])
        ctx.set_materialize_grads(False)  # as _setup_context
        return out

    @staticmethod
    def backward(ctx, grad_out, _g1, _g2):
        if grad_out is None:
            return (None,) * 11
        x, weight, in_weight, in_bias, in_mean, in_var = ctx.saved_tensors
        s, p, eps, in_relu = ctx.config
        nx, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_in = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        gx, gw, gg, gb = torch.ops.fastres.conv_bn_backward_cudnn(
            grad_out.contiguous(memory_format=torch.channels_last), x, weight, in_weight,
            in_bias, in_mean, in_var, s, p, eps, in_relu, False, nx or need_in, nw)
        return _input_grads(ctx, in_weight, in_bias, gx, gw, gg, gb)


def conv_bias_act_cudnn(x: Tensor, weight: Tensor, bias: Tensor, stride=1, padding=0, *,
                        residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """Folded inference on cuDNN's fused graph: ``relu?(conv(x) + bias + residual?)``."""
    from .conv_bn import compute_dtype

    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (x, weight, bias, residual)):
        raise RuntimeError("fastres cudnn-fused: the folded conv+bias(+add)+ReLU is "
                           "inference-only; run it under torch.no_grad()")
    s, p = _check(x, weight, stride, padding)
    dtype = compute_dtype(x)
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"fastres cudnn-fused: float16, bfloat16 or float32 only, got {dtype}")
    cl = torch.channels_last
    x = x.to(dtype).contiguous(memory_format=cl)
    weight = weight.to(dtype).contiguous(memory_format=cl)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=cl)
    return torch.ops.fastres.conv_bias_act_cudnn(x, weight, bias.float().contiguous(), residual,
                                                 s, p, bool(relu))

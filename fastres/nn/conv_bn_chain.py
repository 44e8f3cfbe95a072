"""Chains of conv -> BatchNorm -> ReLU -> conv on fused convolutions: the Triton convolutions
(conv backend "triton") or cuDNN's graph-API fusions (conv backend "cudnn-fused"), or per layer
whichever measured faster ("auto"), so that in training a block's normalised activations are
never written to memory.

A :class:`PendingBatchNorm` stands for ``relu?(bn(y))`` not yet computed: the raw convolution
output ``y``, its BatchNorm module and the batch statistics the convolution's epilogue produced.
The next convolution applies it in its prologue (:func:`conv_bn_pending`), the block's end
materialises it with the residual add and ReLU in one pass (:func:`materialize`). Running
statistics are updated when the statistics are produced, exactly as nn.BatchNorm2d would.

Where the Triton convolution cannot run a layer (groups, dilation, non-square kernels,
SyncBatchNorm, conv bias, unsupported dtype, or the backend picks cuDNN) the same functions
fall back to PyTorch's convolution and the fused BatchNorm kernels, so callers need no second
code path.
"""
import contextlib
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..ops.batch_norm_act import _update_running_stats
from ..ops.conv_bn import compute_dtype, conv_bn
from .batch_norm import BatchNormAct2d, batches_counter, bn_arguments

__all__ = ["PendingBatchNorm", "conv_bn_pending", "materialize", "triton_conv_for",
           "fused_conv_backend", "conv_backend_report"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PendingBatchNorm:
    """``relu?(bn(y))``, not computed yet. ``mean``/``var`` are None when the BatchNorm must
    compute its own statistics (the convolution ran on cuDNN)."""

    __slots__ = ("y", "bn", "mean", "var", "batch_stats", "relu", "backend")

    def __init__(self, y: Tensor, bn: nn.BatchNorm2d, mean: Optional[Tensor],
                 var: Optional[Tensor], batch_stats: bool, relu: bool, backend: str = "triton"):
        self.y, self.bn, self.mean, self.var = y, bn, mean, var
        self.batch_stats, self.relu, self.backend = batch_stats, relu, backend


def _is_sync(bn: nn.Module) -> bool:
    from .sync_batch_norm import SyncBatchNormAct2d

    return isinstance(bn, (nn.SyncBatchNorm, SyncBatchNormAct2d))


def _square(v) -> bool:
    return not isinstance(v, (tuple, list)) or len(set(v)) == 1


def _supported(conv: nn.Conv2d, bn: nn.Module) -> bool:
    """Can the Triton convolution run this conv + BatchNorm pair?"""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.bias is None
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and _square(conv.kernel_size) and _square(conv.stride) and _square(conv.padding)
            and all(d == 1 for d in conv.dilation)
            and isinstance(bn, nn.BatchNorm2d) and not _is_sync(bn))


def _layer_key(conv: nn.Conv2d, x: Tensor, dtype: torch.dtype, training: bool):
    return (tuple(x.shape), conv.out_channels, conv.kernel_size[0], conv.stride[0],
            conv.padding[0], dtype, training)


# conv module -> (backend, why): how each convolution ran in its last forward
# (conv_backend_report)
_DECISIONS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _record(conv: nn.Module, backend: str, why: str) -> None:
    if not torch.compiler.is_compiling():
        _DECISIONS[conv] = (backend, why)


def _cudnn_fused_why(conv: nn.Conv2d, x: Tensor, dtype: torch.dtype, folded: bool,
                     prologue: bool = False, residual: bool = False, relu: bool = True):
    """None when cuDNN's graph API runs this layer fused, else why not: the chain's forward,
    dgrad and wgrad graphs, or with `folded` the inference graph."""
    from ..ops import conv_bn_cudnn

    if x.device.type != "cuda":
        return f"tensors on {x.device}"
    return conv_bn_cudnn.layer_support(
        x.device, tuple(x.shape), tuple(conv.weight.shape), conv.stride[0], conv.padding[0],
        dtype, not folded, prologue=prologue, residual=residual, relu=relu)


def fused_conv_backend(conv: nn.Conv2d, bn: nn.Module, x: Tensor, training: bool,
                       prologue: bool = False, residual: bool = False, relu: bool = True,
                       folded: bool = False):
    """The fused convolution that runs this layer: "triton", "cudnn-fused", or None (PyTorch's
    convolution + the fused BatchNorm kernels, the "cudnn" path). `prologue`: the input's
    BatchNorm+ReLU runs in the convolution (chain); `folded`: eval-mode folded inference with
    `residual`/`relu` in its epilogue. Records the decision and its reason for conv_backend_report()."""
    name = backends.get_conv_backend()
    if name == "cudnn":
        _record(conv, "cudnn", "conv backend 'cudnn'")
        return None
    if not _supported(conv, bn):
        _record(conv, "cudnn", "layer not supported by the fused convolutions (groups, "
                "dilation, non-square kernel/stride/padding, conv bias, SyncBatchNorm or "
                "padding mode)")
        return None
    dtype = compute_dtype(x)
    if name == "cudnn-fused":
        backends.resolve_conv(x.device)  # raises on non-CUDA tensors
        why = _cudnn_fused_why(conv, x, dtype, folded, prologue, residual, relu)
        if why is not None:
            _record(conv, "cudnn", f"cudnn-fused fallback: {why}")
            return None
        _record(conv, "cudnn-fused", "cuDNN graph API")
        return "cudnn-fused"
    if dtype not in _DTYPES or (dtype == torch.bfloat16 and x.device.type == "cpu"):
        # bfloat16 on CPU: Triton's interpreter cannot multiply it (kernels/conv.py)
        _record(conv, "cudnn", f"dtype {dtype} on {x.device.type} not run by Triton")
        return None
    key = _layer_key(conv, x, dtype, training)
    choice = backends.resolve_conv(
        x.device, key, lambda: _measure(conv, x.shape, dtype, training))
    if choice == "cudnn-fused" and _cudnn_fused_why(conv, x, dtype, folded, prologue, residual,
                                                    relu) is not None:
        choice = "cudnn"
    _record(conv, choice, f"conv backend {name!r}" + (" (measured fastest)" if name == "auto"
                                                       else ""))
    return None if choice == "cudnn" else choice


def triton_conv_for(conv: nn.Conv2d, bn: nn.Module, x: Tensor, training: bool) -> bool:
    """True when the conv backend runs this layer on a fused convolution (Triton or
    cudnn-fused; :func:`fused_conv_backend` says which)."""
    return fused_conv_backend(conv, bn, x, training) is not None


def conv_backend_report(model: nn.Module, x: Optional[Tensor] = None) -> list:
    """Which convolutions of `model` ran on which conv backend in their last forward, and why:
    a list of ``{"layer", "backend", "why"}`` in module order ("backend" is "cudnn",
    "triton" or "cudnn-fused"; layers not yet run say "not run"). With `x`, runs
    ``model(x)`` first (under no_grad in eval mode; a training-mode forward updates the
    BatchNorm running statistics like any forward)."""
    if x is not None:
        with torch.no_grad() if not model.training else contextlib.nullcontext():
            model(x)
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            backend, why = _DECISIONS.get(m, ("not run", "no forward through the fused "
                                              "blocks recorded for this layer"))
            rows.append({"layer": name, "backend": backend, "why": why})
    return rows


def conv_bn_pending(conv: nn.Conv2d, bn: nn.BatchNorm2d, x, relu: bool = True,
                    use_triton: Optional[bool] = None) -> PendingBatchNorm:
    """``relu?(bn(conv(x)))`` as a PendingBatchNorm; `x` is a Tensor or a PendingBatchNorm
    (applied in this convolution's prologue when both run on Triton)."""
    source = x.y if isinstance(x, PendingBatchNorm) else x
    has_prologue = isinstance(x, PendingBatchNorm) and x.mean is not None
    backend = fused_conv_backend(conv, bn, source, bn.training, prologue=has_prologue) \
        if use_triton is not False else None
    if use_triton and backend is None and backends.get_conv_backend() != "cudnn-fused":
        backend = "triton"  # the caller decided (a block whose first layer runs fused)
        _record(conv, "triton", "use_triton=True")
    args = bn_arguments(bn)
    batch_stats, running_mean, running_var = (args["training"], args["running_mean"],
                                              args["running_var"])
    if backend is None:
        y = conv(materialize(x) if isinstance(x, PendingBatchNorm) else x)
        return PendingBatchNorm(y, bn, None, None, batch_stats, relu, "cudnn")
    prologue = {}
    if isinstance(x, PendingBatchNorm):
        if x.mean is None:
            source = materialize(x)
        else:
            prologue = dict(in_weight=x.bn.weight, in_bias=x.bn.bias, in_mean=x.mean,
                            in_var=x.var, in_eps=x.bn.eps, in_relu=x.relu,
                            in_training=x.batch_stats)
    if not batch_stats and running_mean is None:
        raise ValueError("fastres: running_mean and running_var must be defined in evaluation mode")
    if backend == "cudnn-fused":
        from ..ops.conv_bn_cudnn import conv_bn_cudnn

        # always the graph with the statistics epilogue (the one layer_support checked)
        y, mean, var = conv_bn_cudnn(source, conv.weight, conv.stride, conv.padding,
                                     stats=True, **prologue)
    else:
        y, mean, var = conv_bn(source, conv.weight, conv.stride, conv.padding,
                               stats=batch_stats, **prologue)
    if batch_stats:
        if y.numel() // y.shape[1] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {y.size()}")
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, bn.momentum,
                                  batches_counter(bn, batch_stats), y.numel() // y.shape[1])
    else:
        mean, var = running_mean, running_var
    return PendingBatchNorm(y, bn, mean, var, batch_stats, relu, backend)


def materialize(p, residual: Optional[Tensor] = None) -> Tensor:
    """The tensor ``relu?(bn(y) + residual?)`` of a PendingBatchNorm (a Tensor passes through)."""
    if isinstance(p, Tensor):
        return p
    bn, y = p.bn, p.y
    if residual is not None:
        residual = residual.to(y.dtype)
    if p.mean is None:  # the BatchNorm computes its statistics itself
        if isinstance(bn, BatchNormAct2d) and bn.fused and bn.relu == p.relu:
            return bn._forward(y, residual)
        out = bn(y)
        if residual is not None:
            out = out + residual
        return F.relu(out) if p.relu else out
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    if p.backend == "cudnn-fused" or (y.is_cuda and backends._why_unavailable("triton")):
        # the CUDA C++ fused BatchNorm(+add)+ReLU with the epilogue's statistics
        if p.batch_stats:
            from ..ops.conv_bn_cudnn import bn_act_apply_cuda

            return bn_act_apply_cuda(y, residual, bn.weight, bn.bias, p.mean, p.var, bn.eps,
                                     p.relu)
        out, _, _ = torch.ops.fastres.bn_act_forward(y, residual, bn.weight, bn.bias, p.mean,
                                                     p.var, False, bn.eps, p.relu)
        return out
    if p.batch_stats:
        return torch.ops.fastres.bn_act_apply_triton(y, residual, bn.weight, bn.bias, p.mean,
                                                     p.var, bn.eps, p.relu)
    out, _, _ = torch.ops.fastres.bn_act_forward_triton(y, residual, bn.weight, bn.bias, p.mean,
                                                        p.var, False, bn.eps, p.relu)
    return out


def _measure(conv: nn.Conv2d, shape, dtype: torch.dtype, training: bool) -> str:
    """Which of "cudnn", "triton" and "cudnn-fused" (those available, and cudnn-fused only where
    cuDNN has engines for the layer) runs this layer fastest on this GPU (CUDA-event timing).
    cudnn-fused is timed like Triton: prologue + convolution + statistics epilogue.
    Training (forward + backward): Triton's convolution with the previous BatchNorm in its
    prologue and the statistics epilogue, against the fused BatchNorm+ReLU of the input then
    cuDNN's convolution (whose statistics are paid later by the next BatchNorm, so the
    comparison favours cuDNN). Inference: the folded convolution with bias + ReLU epilogue on
    Triton, against cuDNN's convolution + the fused eval-mode BatchNorm + ReLU (what
    fastres.nn.conv_bn runs on CUDA: cuDNN's own fused ReLU drops NaN)."""
    from ..functional import batch_norm_relu

    device = conv.weight.device
    with torch.no_grad():
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        w = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    c = shape[1]
    gamma = torch.ones(c, device=device, requires_grad=training)
    beta = torch.zeros(c, device=device, requires_grad=training)
    mean = torch.zeros(c, device=device)
    var = torch.ones(c, device=device)
    x.requires_grad_(training)
    w.requires_grad_(training)
    stride, padding = conv.stride[0], conv.padding[0]

    bias = torch.zeros(conv.out_channels, device=device, dtype=dtype)

    def run_triton():
        if not training:  # folded inference: bias + ReLU epilogue
            return conv_bn(x, w, stride, padding, bias=bias, relu=True)[0]
        y, _, _ = conv_bn(x, w, stride, padding, in_weight=gamma, in_bias=beta, in_mean=mean,
                          in_var=var, stats=True)
        return y

    out_mean = torch.zeros(conv.out_channels, device=device)
    out_var = torch.ones(conv.out_channels, device=device)

    def run_cudnn():
        if not training:
            y = F.conv2d(x, w, None, stride, padding)
            return batch_norm_relu(y, out_mean, out_var, None, bias.float(), training=False)
        a = batch_norm_relu(x, None, None, gamma, beta, training=True)
        return F.conv2d(a, w, None, stride, padding)

    def run_cudnn_fused():
        from ..ops.conv_bn_cudnn import conv_bias_act_cudnn, conv_bn_cudnn

        if not training:
            return conv_bias_act_cudnn(x, w, bias, stride, padding, relu=True)
        y, _, _ = conv_bn_cudnn(x, w, stride, padding, in_weight=gamma, in_bias=beta,
                                in_mean=mean, in_var=var, stats=True)
        return y

    candidates = [("cudnn", run_cudnn)]
    if backends._why_unavailable("triton") is None and dtype in _DTYPES:
        candidates.append(("triton", run_triton))
    if backends._why_cudnn_fused_unavailable() is None and _cudnn_fused_why(
            conv, x, dtype, not training, prologue=training) is None:
        candidates.append(("cudnn-fused", run_cudnn_fused))
    times = {}
    for name, fn in candidates:
        with torch.set_grad_enabled(training):
            for _ in range(2):
                out = fn()
                if training:
                    out.backward(torch.ones_like(out))
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                out = fn()
                if training:
                    out.backward(torch.ones_like(out))
            end.record()
            torch.cuda.synchronize(device)
            times[name] = start.elapsed_time(end)
    return min(times, key=times.get)

"""Convolution + BatchNorm (+ residual add) (+ ReLU), with BatchNorm folded into the
convolution for inference.

Training (or whenever gradients are needed) runs the convolution, then the fused BatchNorm op.
In eval mode, with no gradient needed, the BatchNorm is folded into the convolution's weight
and bias, ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``,
and the add and ReLU run in the convolution's epilogue: with the conv backend "triton" in
fastres' Triton convolution (bias + residual + ReLU epilogue); on a CPU (float32) in oneDNN's
convolution with the folded weight prepacked for the input's shape and the bias in its
epilogue, then the residual add and the ReLU in place (oneDNN's own ReLU post-op turns NaN
into 0);
elsewhere as ``conv2d`` + add + ReLU. On CUDA with the cuDNN convolution, a conv-BN(-add)-ReLU is not folded: cuDNN's fused
``torch.cudnn_convolution_relu`` / ``_add_relu`` turn NaN into 0 (PyTorch builds their
activation with CUDNN_NOT_PROPAGATE_NAN), so the convolution runs alone and the fused
BatchNorm (+ add) + ReLU kernel normalises its output with the running statistics (one pass
over the output, NaN kept as ``torch.relu`` keeps it). In training with the conv backend
"triton", the convolution emits the BatchNorm statistics from its epilogue
(fastres.nn.conv_bn_chain). On a CPU the fused blocks pick the layout of each convolution
(``cpu_conv_layout``: channels-last, oneDNN's own, where it pays), whatever the model's input
layout. The folded
weights are cached on the BatchNorm module and recomputed
whenever the convolution's or BatchNorm's parameters or buffers change (in-place updates,
``load_state_dict``, ``.to()``), so a model never runs on stale folded weights; under
torch.compile they are recomputed inside the graph. On a CPU each layer keeps a plan of its
folded call (``_PLANS``): a later call with the same inputs' dtype, shape and strides, thread
count and parameter versions skips the decisions.
"""
import os
import threading
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._extension import _C
from ..backends import get_conv_backend
from ..export import exporting, running_eagerly
from ..functional import batch_norm_add_relu, batch_norm_relu
from ..ops.batch_norm_act import _dense_layout
from ..ops.conv_bn import compute_dtype, conv_bn
from .batch_norm import BatchNormAct2d, bn_arguments
from .conv_bn_chain import conv_bn_pending, fused_conv_backend, materialize, triton_conv_for

__all__ = ["ConvBNReLU", "conv_bn_act", "fold_conv_bn"]


def _tensors(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """The convolution's and BatchNorm's parameters and running statistics that exist. Read
    from the modules' dictionaries (nn.Module.__getattr__ costs about a microsecond a name,
    paid on every layer call of the folded inference); through the attributes where one is
    not there (a parametrized weight, a subclass that computes it)."""
    try:
        p, q, b = conv._parameters, bn._parameters, bn._buffers
        ts = (p["weight"], p["bias"], q["weight"], q["bias"], b["running_mean"], b["running_var"])
    except KeyError:
        ts = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return [t for t in ts if t is not None]


def can_fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Eval mode with running statistics, zero padding, and no gradient needed."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(conv, bn)):
        return False
    return True


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: Optional[torch.dtype] = None,
                 memory_format=torch.contiguous_format):
    """(weight, bias) of the convolution with the eval-mode BatchNorm folded in (fp32 math)."""
    with torch.no_grad():
        invstd = torch.rsqrt(bn.running_var.float() + bn.eps)
        scale = invstd if bn.weight is None else bn.weight.float() * invstd
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
        dtype = dtype or conv.weight.dtype
        return weight.to(dtype).contiguous(memory_format=memory_format), shift.to(dtype)


def _cache_key(conv, bn, dtype, memory_format):
    """Identifies the tensors the folded weights were computed from, their versions, and the
    BatchNorm's eps.

    nn.BatchNorm2d updates its running statistics in training without bumping their
    ``_version`` (the update happens inside the batch_norm kernel), but it always increments
    ``num_batches_tracked`` in place, which does; so the counter is part of the key.
    None where a tensor has no version counter (an inference tensor: a model made under
    torch.inference_mode), whose in-place changes nothing can see: nothing is cached then.
    """
    parts = [dtype, str(memory_format), bn.eps]  # (torch.save cannot pickle a memory_format)
    counter = bn._buffers.get("num_batches_tracked")
    try:
        for t in _tensors(conv, bn) + ([counter] if counter is not None else []):
            parts.append((t.data_ptr(), t._version, t.dtype, t.device))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return tuple(parts)


def _folded(conv, bn, dtype, memory_format):
    if torch.compiler.is_compiling():
        return fold_conv_bn(conv, bn, dtype, memory_format)
    key = _cache_key(conv, bn, dtype, memory_format)
    if key is None:
        return fold_conv_bn(conv, bn, dtype, memory_format)
    cache = bn.__dict__.get("_fastres_folded")
    if cache is None or cache[0] != key:
        cache = (key, *fold_conv_bn(conv, bn, dtype, memory_format))
        bn.__dict__["_fastres_folded"] = cache
    return cache[1], cache[2]


def folded_conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor,
                       residual: Optional[Tensor], relu: bool, plan_key=None) -> Tensor:
    """Eval-mode conv + BN (+ add) (+ ReLU) as one convolution with folded weights. With
    `plan_key` (a CPU call, see _plan_key) the convolution it runs is kept as the layer's plan."""
    given = x
    dtype = compute_dtype(x)
    x = x.to(dtype)
    if residual is not None:
        residual = residual.to(dtype)
    backend = None
    if not (torch.is_grad_enabled() and x.requires_grad):
        backend = fused_conv_backend(conv, bn, x, False, residual=residual is not None,
                                     relu=relu, folded=True)
    if backend == "cudnn-fused":  # cuDNN's graph: conv + bias (+ residual) (+ ReLU)
        from ..ops.conv_bn_cudnn import conv_bias_act_cudnn

        weight, bias = _folded(conv, bn, dtype, torch.channels_last)
        return conv_bias_act_cudnn(x, weight, bias, conv.stride, conv.padding,
                                   residual=residual, relu=relu)
    if backend == "triton":
        weight, bias = _folded(conv, bn, dtype, torch.channels_last)
        out, _, _ = conv_bn(x, weight, conv.stride, conv.padding, bias=bias, residual=residual,
                            relu=relu)
        return out
    if x.is_cuda and relu:
        # not torch.cudnn_convolution_relu / _add_relu: they turn NaN into 0 (module docstring)
        y = conv(x)
        args = bn_arguments(bn)
        if residual is None:
            return batch_norm_relu(y, **args)
        return batch_norm_add_relu(y, residual.to(y.dtype), **args)
    native = _native_cpu_conv(conv, x)
    onednn = False
    if _channels_last_conv(native, x):
        x = cpu_channels_last(x)
    if not native:
        onednn = _onednn_ok(conv, x, residual)
    if onednn:
        x = _dense_layout(x)
        weight, bias = _packed(conv, bn, x)
    else:
        channels_last = x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        weight, bias = _folded(conv, bn, dtype, fmt)
    if plan_key is not None:
        _PLANS[bn] = (plan_key, native, onednn, weight, bias, x is given)
        _record(bn)
    run = _onednn_conv_bn_act if onednn else _conv_bias_act
    return run(conv, x, weight, bias, residual, relu)


def _conv_bias_act(conv, x, weight, bias, residual, relu):
    """relu?(conv2d(x, w') + b' + residual?) with PyTorch's convolution; the add and the ReLU
    in place on the convolution's new output (which autograd does not save)."""
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        y = y.add_(residual)
    return torch.relu_(y) if relu else y


# ---------------------------------------------------------------------------------------------
# CPU inference: oneDNN's convolution with the folded weights prepacked
# ---------------------------------------------------------------------------------------------
_ONEDNN = os.environ.get("FASTRES_CPU_ONEDNN", "1") != "0"
# BatchNorm module -> (key, packed weight, bias, folded weight): beside the module, not in its
# __dict__, so deepcopy and pickling of a model never meet the opaque oneDNN tensor
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _native_cpu_conv(conv: nn.Conv2d, x: Tensor) -> bool:
    """Where PyTorch itself runs a float32 CPU convolution with its native kernel rather than
    oneDNN (its ConvParams::use_mkldnn): a single image of at most 20480 elements with a kernel
    of at most 3x3 and no groups, or a 1x1 unstrided kernel on one thread below a batch of 16.
    There the folded inference does the same (F.conv2d in the input's layout): at batch 1
    oneDNN's prepacked convolution took 141 us a call against 97 us for the native one
    (ResNet-20's layers, channels-last), and fastres's whole ResNet-20 was slower than plain
    PyTorch (docs/cpu/2026-12-01-onednn-residual.md)."""
    if (x.device.type != "cpu" or x.dim() != 4 or x.dtype != torch.float32
            or torch.compiler.is_compiling()):  # under torch.compile Inductor decides
        return False
    n = x.shape[0]
    kh, kw = conv.kernel_size
    strided = any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation)
    if (kh, kw) == (1, 1) and not strided and n < 16 and torch.get_num_threads() == 1:
        return True
    return not (conv.groups > 1 or (kh > 3 and kw > 3) or n > 1 or x.numel() > 20480)


def _channels_last_conv(native: bool, x: Tensor) -> bool:
    """Whether the folded CPU inference runs its convolution on a channels-last input: always
    with oneDNN (its own layout), and with PyTorch's native convolution for a single image,
    where input and weight channels-last measured twice as fast as both NCHW on ResNet-20's
    3x3 layers (60 against 128 us at 16x32x32, 46 against 94 at 32x16x16, 37 against 74 at
    64x8x8; docs/cpu/2026-12-03-batch1-layout.py). A native 1x1 convolution on one thread
    below a batch of 16 keeps its input's layout (there the two measured alike, or NCHW
    faster)."""
    return not native or x.shape[0] == 1


def _onednn_ok(conv: nn.Conv2d, x: Tensor, residual: Optional[Tensor]) -> bool:
    """fp32 4-D CPU inference outside torch.compile, with oneDNN available."""
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or (
                residual is not None and residual.requires_grad)))
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (residual is None or residual.dtype == torch.float32))


def _packed(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor):
    """(oneDNN-packed folded weight, folded bias): packed from the cached folded weights
    (``_folded``, which recomputes them when a parameter or statistic changes), and repacked
    when those change or the input shape does (oneDNN picks the weight layout for a shape)."""
    weight, bias = _folded(conv, bn, torch.float32, torch.channels_last)
    # (the folded weight is _folded's own tensor, never changed in place: its identity tells;
    # made under torch.inference_mode it has no version counter to read)
    key = (tuple(x.shape), conv.stride, conv.padding, conv.dilation, conv.groups)
    cache = _PACKED.get(bn)
    if cache is None or cache[0] != key or cache[3] is not weight:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            list(x.shape))
        cache = (key, packed, bias.contiguous(), weight)
        _PACKED[bn] = cache
    return cache[1], cache[2]


def _onednn_conv_bn_act(conv, x, packed, bias, residual, relu):
    """conv(x, w') + b' in one oneDNN call (`packed`: w' prepacked for x's shape by _packed;
    x dense; the bias in its epilogue), then the residual added
    and the ReLU applied in place (``add_``, ``torch.relu_``). Not oneDNN's post-ops for them:
    its ReLU turns NaN into 0, and its binary add post-op measured slower over a whole
    ResNet-20 inference than the separate add (docs/cpu/2026-12-01-onednn-residual.md).
    Not ``aten::_add_relu_`` either: its scalar path (mixed layouts) loses NaN. oneDNN runs
    the prepacked convolution channels-last: the output is channels-last."""
    y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, list(conv.padding),
                                                list(conv.stride), list(conv.dilation),
                                                conv.groups, "none", [], "")
    if residual is not None:
        y = y.add_(residual)
    return torch.relu_(y) if relu else y


_CPU_CHANNELS_LAST = os.environ.get("FASTRES_CPU_CHANNELS_LAST", "1") != "0"


def _cpu_layout_ok(x: Tensor) -> bool:
    return (_CPU_CHANNELS_LAST and x.device.type == "cpu" and x.dim() == 4
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def cpu_channels_last(x: Tensor) -> Tensor:
    """`x` channels-last for a convolution on the CPU (oneDNN's own layout, where NCHW costs
    reorders of the input and the output of every call): the folded inference path, whose
    prepacked convolution runs channels-last anyway. FASTRES_CPU_CHANNELS_LAST=0 keeps the
    input's layout; under torch.compile Inductor picks the layouts."""
    if _cpu_layout_ok(x) and not x.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def cpu_conv_layout(x: Tensor, weight: Tensor) -> Tensor:
    """The layout a fused block's convolution runs in on the CPU, in training: channels-last
    (oneDNN's own: NCHW costs reorders of input, output and gradients, forward and backward)
    where the weight is channels-last already or the activation is at least as large as the
    weight; else NCHW, because channels-last activations with an NCHW weight make PyTorch copy
    the weight to channels-last and its gradient back on every call (the deep layers of an
    ImageNet ResNet at a small batch). An NCHW model thus runs its early, large layers
    channels-last; a channels-last model (``model.to(memory_format=torch.channels_last)``) stays
    channels-last throughout. A 1x1 weight is contiguous in both layouts (PyTorch copies
    nothing), so every 1x1 convolution runs channels-last: in ResNet-50's training step (8 at
    112 px) that measured 1-3% faster than deciding the deep 1x1 layers by size as well, though
    timed alone those layers ran 5-12% faster NCHW (docs/cpu/2026-12-03-conv-layout-1x1.py)."""
    if not _cpu_layout_ok(x):
        return x
    cl = weight.is_contiguous(memory_format=torch.channels_last) or x.numel() >= weight.numel()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------------
# CPU inference plans: the folded layer's decisions, remembered per BatchNorm module
# ---------------------------------------------------------------------------------------------
# The folded CPU inference decides on every call (export? foldable? which convolution
# backend, autocast dtype, PyTorch's native convolution or oneDNN, the layout) and looks its
# folded weights up by a key of every parameter's version: some 60-85 us of Python a layer
# call, measured inside a ResNet-20 at batch 1, more than the 3x3 convolution of 16-64
# channels costs there, which made the fused model slower than plain PyTorch's modules. The
# first call of a layer takes that path and leaves a plan: what it chose and the tensors it
# chose them for; a later call whose key (the inputs' dtype, shape and strides, the thread
# count, the global switches, every parameter's and statistic's data pointer and version)
# equals the plan's runs the same convolution directly. Beside the modules, as _PACKED, so
# that deepcopy and pickling never meet the opaque oneDNN weight.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# torch.backends.mkldnn.enabled without its module property (read on every layer call)
_mkldnn_enabled = getattr(torch._C, "_get_mkldnn_enabled", lambda: torch.backends.mkldnn.enabled)


def _plan_key(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor]):
    """Everything the folded CPU inference's decisions and folded weights depend on, or None
    where no plan is kept (autocast, another convolution backend, a parametrized weight)."""
    params = conv._parameters
    if (torch.is_autocast_enabled("cpu") or get_conv_backend() != "cudnn"
            or "weight" not in params):
        return None
    # every data pointer and version in one C++ pass (this runs on every layer call); None:
    # an inference tensor, which has no version counter: no plan
    state = _C.tensor_state([params, bn._parameters, bn._buffers])
    if state is None:
        return None
    return (x.dtype, x.shape, x.stride(), None if residual is None else residual.dtype,
            torch.get_num_threads(), _mkldnn_enabled(), _ONEDNN, _CPU_CHANNELS_LAST,
            conv.stride, conv.padding, conv.dilation, conv.groups, bn.eps, state)


def _planned(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor],
             relu: bool):
    """The layer's output by its plan, or None (no plan, or one made for other inputs or
    weights) and the key a plan for this call would have."""
    if not running_eagerly():  # Inductor, tracers, exporters: the full path
        return None, None
    key = _plan_key(conv, bn, x, residual)
    plan = _PLANS.get(bn) if key is not None else None
    if plan is None or plan[0] != key:
        return None, key
    _record(bn)
    return run_plan(conv, plan, x, residual, relu), key


def run_plan(conv: nn.Conv2d, plan: tuple, x: Tensor, residual: Optional[Tensor],
             relu: bool, into_residual: bool = False) -> Tensor:
    """The folded layer's output by `plan` (an entry of _PLANS, made for inputs like these):
    the input prepared as folded_conv_bn_act's CPU branch prepared it for the plan (`ready`:
    that preparation left the input as it was; the plan's key holds its strides, so it does
    again), then the same convolution. `into_residual`: the caller owns `residual` and lets
    the layer overwrite it (see _onednn_conv_bn_add_into)."""
    _, native, onednn, weight, bias, ready = plan
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    if not ready:
        if _channels_last_conv(native, x):
            x = cpu_channels_last(x)
        if onednn:
            x = _dense_layout(x)
    if onednn:
        if (into_residual and residual is not None and residual.dtype == torch.float32
                and residual.is_contiguous(memory_format=torch.channels_last)):
            return _onednn_conv_bn_add_into(conv, x, weight, bias, residual, relu)
        return _onednn_conv_bn_act(conv, x, weight, bias, residual, relu)
    return _conv_bias_act(conv, x, weight, bias, residual, relu)


def _onednn_conv_bn_add_into(conv, x, packed, bias, residual, relu):
    """conv(x, w') + b' + residual written into `residual` by oneDNN's binary add post-op in
    place (the convolution accumulates onto the residual's buffer: one pass over it, where a
    new output, ``add_`` and the ReLU take two), then the ReLU in place. The same values bit
    for bit as _onednn_conv_bn_act ((conv + bias) + residual, rounded once, in float32);
    2-7% faster a residual layer of ResNet-20 at batch 64 (docs/cpu/2026-12-03-add-into.py).
    Only for a residual nobody else holds (fastres.nn.inference_program)."""
    y = torch.ops.mkldnn._convolution_pointwise_(
        residual, x, packed, bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "add", 1.0, None, [], None)
    return torch.relu_(y) if relu else y


# While a model's inference program is being made (fastres.nn.inference_program), the
# BatchNorm of every layer that ran by a plan, in call order, per thread.
_RECORDING = threading.local()


def _record(bn: nn.Module) -> None:
    layers = getattr(_RECORDING, "layers", None)
    if layers is not None:
        layers.append(bn)


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor] = None,
                relu: bool = True, fused: bool = True) -> Tensor:
    """relu?(bn(conv(x)) + residual?), fused when `fused` (and folded in eval)."""
    key = None
    if fused and x.is_cpu and not torch.is_grad_enabled() and not bn.training:
        # folded CPU inference: by the layer's plan where it has one for these inputs
        y, key = _planned(conv, bn, x, residual, relu)
        if y is not None:
            return y
    if fused and exporting():
        # exporters (ONNX, jit.trace, torch.export) get standard operators: conv, batch_norm,
        # add, relu (see fastres.export)
        y = nn.BatchNorm2d.forward(bn, conv(x))
        if residual is not None:
            y = y + residual
        return F.relu(y) if relu else y
    if fused and can_fold(conv, bn):
        return folded_conv_bn_act(conv, bn, x, residual, relu, plan_key=key)
    if fused and triton_conv_for(conv, bn, x, bn.training):
        return materialize(conv_bn_pending(conv, bn, x, relu, use_triton=True), residual)
    y = conv(cpu_conv_layout(x, conv.weight) if fused else x)
    if residual is not None and residual.dtype != y.dtype and torch.is_autocast_enabled(y.device.type):
        # autocast: the residual joins the low-precision activations (as the next conv would)
        residual = residual.to(y.dtype)
    if fused and isinstance(bn, BatchNormAct2d) and bn.relu == relu and bn.fused:
        return bn._forward(y, residual)
    y = bn(y)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + optional ReLU; forward(x, residual=None).

    State dict keys: ``conv.weight``, ``bn.weight``, ``bn.bias``, ``bn.running_mean``, ... With
    ``fused=True`` the BatchNorm is a fastres BatchNormReLU2d/BatchNormAddReLU2d (when
    ``relu``), with ``fused=False`` a plain nn.BatchNorm2d and unfused PyTorch ops.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, groups: int = 1, dilation: int = 1,
                 relu: bool = True, residual: bool = False, fused: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation=dilation, groups=groups, bias=False, device=device,
                              dtype=dtype)
        self.bn = make_batch_norm(out_channels, relu=relu, residual=residual, fused=fused,
                                  device=device, dtype=dtype)
        self.relu = relu
        self.fused = fused

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return conv_bn_act(self.conv, self.bn, x, residual, self.relu, self.fused)


def make_batch_norm(channels: int, *, relu: bool, residual: bool, fused: bool, device=None,
                    dtype=None) -> nn.BatchNorm2d:
    """The BatchNorm module for a conv-BN(-add)(-ReLU): fused subclass or plain BatchNorm2d."""
    from .batch_norm import BatchNormAddReLU2d, BatchNormReLU2d

    if not fused or not relu:
        return nn.BatchNorm2d(channels, device=device, dtype=dtype)
    if residual:
        return BatchNormAddReLU2d(channels, device=device, dtype=dtype)
    return BatchNormReLU2d(channels, device=device, dtype=dtype)

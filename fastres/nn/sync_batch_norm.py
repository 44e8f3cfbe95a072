"""Synchronized (multi-process) fused BatchNorm: the batch statistics of the global batch.

``SyncBatchNormReLU2d`` and ``SyncBatchNormAddReLU2d`` are what ``nn.SyncBatchNorm`` is to
``nn.BatchNorm2d``, for fastres' fused modules: in training, inside an initialised process group
of more than one rank, every rank normalises with the mean and variance of the whole batch
across the ranks and updates its running statistics with them, so that DistributedDataParallel
with N ranks computes what one process computes on the whole batch. Anywhere else (eval mode,
no process group, a group of one rank) they are exactly their non-sync parents.
:func:`convert_sync_batchnorm` converts a model, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

How a training step is computed (rank r holds x_r, the global batch has N values per channel):

forward
    local per-channel mean, M2 = sum((x_r - mean_r)^2) and count, in fp32 (fp64 for fp64 input);
    one all_gather of the packed (2C + 1) vector, then Chan's merge on every rank (numerically
    stable, and correct for ranks with different or zero batch sizes):
    ``mean = sum_i n_i mean_i / N``, ``M2 = sum_i M2_i + n_i (mean_i - mean)^2``, ``var = M2 / N``.
    The fused forward op normalises (+ residual, + ReLU) with these global statistics (its
    ``training=False`` path), and the running statistics are updated with ``mean`` and the
    unbiased ``M2 / (N - 1)`` (``momentum=None``: cumulative average, as nn.BatchNorm2d).
backward
    the fused backward op (``training=False``) gives the local ``sum_g = sum(g)`` and
    ``sum_gxhat = sum(g * xhat)`` (its grad_bias and grad_weight), where g is the gradient
    through the ReLU mask and ``xhat = (x - mean) * invstd``, and ``w * invstd * g``. One
    all_reduce of the packed (2C) vector gives the global sums, and
    ``grad_input = w * invstd * (g - SUM_g / N - xhat * SUM_gxhat / N)``, applied as a
    per-channel correction ``- (x * k2 + k0)`` of the op's grad_input with torch ops.
    grad_weight and grad_bias are the *local* sums, as in nn.SyncBatchNorm: each rank's loss
    backpropagates into every rank's input through the all-reduced sums, and
    DistributedDataParallel averages the parameter gradients, which together give the
    single-process gradient of the mean loss.

``fused=False`` modules synchronise with differentiable collectives
(``torch.distributed.nn.functional.all_reduce``) around unfused PyTorch ops: the reference path.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backends
from ..ops.batch_norm_act import (_FORWARD, _dense_layout, _same_layout, _stat_dtype,
                                  _update_running_stats)
from .batch_norm import BatchNormAct2d, BatchNormAddReLU2d, BatchNormReLU2d

__all__ = ["SyncBatchNormAct2d", "SyncBatchNormReLU2d", "SyncBatchNormAddReLU2d",
           "convert_sync_batchnorm"]

_BACKWARD = {
    "cpu": torch.ops.fastres.bn_act_backward,
    "cuda": torch.ops.fastres.bn_act_backward,
    "triton": torch.ops.fastres.bn_act_backward_triton,
}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------
def _all_gather(t: Tensor, group, world_size: int) -> Tensor:
    """(world_size, *t.shape): every rank's `t`, in rank order."""
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts)
    out = t.new_empty((world_size, *t.shape))
    dist.all_gather_into_tensor(out, t, group=group)
    return out


def _reduced_dims(input: Tensor) -> list:
    return [0, *range(2, input.dim())]


def _channel_view(t: Tensor, input: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast against `input` along dim 1."""
    return t.view(1, -1, *([1] * (input.dim() - 2)))


def global_batch_stats(input: Tensor, group, world_size: int):
    """(mean, biased var, count) per channel over the inputs of all ranks of `group`.

    Local mean and M2 (in fp32, fp64 for fp64 input) and the count are gathered with one
    all_gather and merged with Chan's formula. Ranks may hold different or zero batch sizes.
    Every rank of the group must call this (it is a collective). `count` is a 0-dim tensor.
    """
    c = input.shape[1]
    sd = _stat_dtype(input)
    n = input.numel() // c if c else 0
    with torch.no_grad():
        if n > 0:
            var, mean = torch.var_mean(input.to(sd), dim=_reduced_dims(input), correction=0)
            m2 = var * n
        else:  # an empty rank contributes nothing but must join the collective
            mean = m2 = torch.zeros(c, dtype=sd, device=input.device)
        local = torch.cat([mean, m2, mean.new_full((1,), n)])
        gathered = _all_gather(local, group, world_size)
        means, m2s, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        return mean, m2 / total, total


def _check_global_count(local_count: int, count: Tensor, input: Tensor) -> None:
    # Only a rank with at most one local value can see a global count of at most one, so the
    # host synchronisation of .item() happens on that rare path only (and all such ranks raise).
    if local_count <= 1 and count.item() <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{input.size()} and {int(count.item())} value(s) per channel over all "
                         f"ranks")


# ---------------------------------------------------------------------------------------------
# The fused synchronised op
# ---------------------------------------------------------------------------------------------
class _SyncBatchNormActFunction(torch.autograd.Function):
    """relu?(w * (x - mean) * invstd + b + residual?) with *given* global mean/var, whose
    backward all-reduces the per-channel gradient sums (see the module docstring)."""

    @staticmethod
    def forward(ctx, input, residual, weight, bias, mean, var, count, eps, relu, group):
        name = backends.resolve(input.device)
        if input.numel() > 0:
            out, _, _ = _FORWARD[name](input, residual, weight, bias, mean, var, False, eps, relu)
        else:
            out = torch.empty_like(input)
        has_residual = residual is not None
        # float16/bfloat16: grad_input is computed from g in fp32 rather than by correcting the
        # op's rounded w * invstd * g; g comes out of the op as its grad_residual, for which
        # the op needs the forward output (the ReLU mask) when there is a ReLU. As in the
        # parent's add+ReLU, the output is the next layer's input, kept by it anyway.
        need_g = input.dtype not in (torch.float32, torch.float64)
        keep_out = relu and (has_residual or need_g)
        ctx.save_for_backward(input, out if keep_out else None, weight, bias, mean, var, count)
        ctx.config = (name, eps, relu, has_residual, need_g, group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, out, weight, bias, mean, var, count = ctx.saved_tensors
        name, eps, relu, has_residual, need_g, group = ctx.config
        grad_out = _same_layout(grad_out, input)
        want_g = has_residual or need_g
        c = input.shape[1]
        if input.numel() > 0:
            grad_input, g, sum_gxhat, sum_g = _BACKWARD[name](
                grad_out, input, out, weight, bias, mean, var, False, eps, relu, want_g and relu)
            if not relu:
                g = grad_out
        else:  # empty rank: zero sums, but it still joins the all_reduce below
            grad_input, g = torch.empty_like(input), grad_out
            sum_g = sum_gxhat = torch.zeros(c, dtype=mean.dtype, device=input.device)

        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_g, sum_gxhat])
            dist.all_reduce(sums, group=group)
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
            # w*invstd*(g - SUM_g/N - (x - mean)*invstd*SUM_gxhat/N) = w*invstd*g - (x*k2 + k0)
            k2 = scale * invstd * sums[c:] / count
            k0 = scale * sums[:c] / count - mean * k2
            k2, k0 = _channel_view(k2, input), _channel_view(k0, input)
            if need_g:
                gi = g * _channel_view(scale, input)  # promotes to fp32
                gi.sub_(input * k2).sub_(k0)
                grad_input = gi.to(input.dtype)
            else:
                grad_input.addcmul_(input, k2, value=-1).sub_(k0)
        else:
            grad_input = None
        return (
            grad_input,
            g if has_residual and ctx.needs_input_grad[1] else None,
            sum_gxhat.to(weight.dtype) if weight is not None else None,
            sum_g.to(bias.dtype) if bias is not None else None,
            None, None, None, None, None, None,
        )


def _reference_sync(bn: BatchNormAct2d, input: Tensor, residual: Optional[Tensor], args,
                    counter, group) -> Tensor:
    """fused=False: unfused PyTorch ops with differentiable all_reduces (two-pass statistics)."""
    from torch.distributed.nn.functional import all_reduce

    c = input.shape[1]
    sd = _stat_dtype(input)
    dims = _reduced_dims(input)
    x = input.to(sd)
    sums = all_reduce(torch.cat([x.sum(dims), x.new_full((1,), input.numel() // c)]),
                      group=group)
    count = sums[c]
    _check_global_count(input.numel() // c, count, input)
    mean = sums[:c] / count
    xc = x - _channel_view(mean, input)
    var = all_reduce((xc * xc).sum(dims), group=group) / count
    if args["running_mean"] is not None:
        _update_running_stats(args["running_mean"], args["running_var"], mean.detach(),
                              var.detach(), args["momentum"], counter, count.detach())
    y = xc * _channel_view(torch.rsqrt(var + bn.eps), input)
    if bn.weight is not None:
        y = y * _channel_view(bn.weight.to(sd), input) + _channel_view(bn.bias.to(sd), input)
    y = y.to(input.dtype)
    if residual is not None:
        y = y + residual
    return F.relu(y) if bn.relu else y


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class SyncBatchNormAct2d(BatchNormAct2d):
    """BatchNormAct2d whose training statistics are those of the batch across `process_group`.

    process_group: the group to synchronise over (None: the default group, WORLD). Keyword-only,
    so the positional arguments stay those of the parent. In eval mode, without an initialised
    process group, or in a group of one rank, this is exactly the parent module.
    With ``relu=False`` the synchronised path still runs the fused op (without its ReLU).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, relu: bool = True,
                 fused: bool = True, process_group=None):
        # not super(): in the subclasses below the next class in the MRO is BatchNormReLU2d or
        # BatchNormAddReLU2d, whose __init__ has no `relu` argument
        BatchNormAct2d.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device, dtype, relu=relu, fused=fused)
        self.process_group = process_group

    def _sync_group(self, bn_training: bool):
        """(group, world_size) when this forward must synchronise, else None."""
        if not (bn_training and self.training):
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def _forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        self._check_input_dim(input)
        args = self._bn_arguments()
        sync = self._sync_group(args["training"])
        if sync is None:
            return super()._forward(input, residual)
        group, world_size = sync
        _check_sync_inputs(input, residual)
        input = _dense_layout(input)
        if residual is not None:
            residual = _same_layout(residual, input)
        counter = self._counter(args["training"])
        if not self.fused:
            return _reference_sync(self, input, residual, args, counter, group)

        mean, var, count = global_batch_stats(input.detach(), group, world_size)
        _check_global_count(input.numel() // input.shape[1], count, input)
        if args["running_mean"] is not None:
            _update_running_stats(args["running_mean"], args["running_var"], mean, var,
                                  args["momentum"], counter, count)
        return _SyncBatchNormActFunction.apply(input, residual, self.weight, self.bias, mean, var,
                                               count, self.eps, self.relu, group)


def _check_sync_inputs(input: Tensor, residual: Optional[Tensor]) -> None:
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"SyncBatchNorm: input must be float16, bfloat16, float32 or float64, "
                        f"got {input.dtype}")
    if input.shape[1] == 0:
        raise ValueError("SyncBatchNorm: the input has no channels")
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"SyncBatchNorm: residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(f"SyncBatchNorm: residual shape {tuple(residual.shape)} does not match "
                         f"input shape {tuple(input.shape)}")
    if residual.dtype != input.dtype or residual.device != input.device:
        raise TypeError(f"SyncBatchNorm: residual ({residual.dtype}, {residual.device}) must have "
                        f"the input's dtype and device ({input.dtype}, {input.device})")


class SyncBatchNormReLU2d(SyncBatchNormAct2d, BatchNormReLU2d):
    """Synchronised ``relu(BatchNorm2d(x))``; a BatchNormReLU2d (same state_dict keys)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, fused: bool = True,
                 process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         relu=True, fused=fused, process_group=process_group)


class SyncBatchNormAddReLU2d(SyncBatchNormAct2d, BatchNormAddReLU2d):
    """Synchronised ``relu(BatchNorm2d(x) + residual)``; a BatchNormAddReLU2d, forward(x, r)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, fused: bool = True,
                 process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         relu=True, fused=fused, process_group=process_group)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def _sync_version(module: BatchNormAct2d, process_group) -> SyncBatchNormAct2d:
    """The synchronised module of the same kind, sharing `module`'s parameters and buffers."""
    common = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats, fused=module.fused,
                  process_group=process_group)
    if isinstance(module, BatchNormAddReLU2d):
        out = SyncBatchNormAddReLU2d(module.num_features, **common)
    elif isinstance(module, BatchNormReLU2d):
        out = SyncBatchNormReLU2d(module.num_features, **common)
    else:
        out = SyncBatchNormAct2d(module.num_features, relu=module.relu, **common)
    return _share_state(out, module)


def _sync_from_plain(module: nn.BatchNorm2d, process_group) -> SyncBatchNormAct2d:
    """SyncBatchNormAct2d(relu=False) sharing a plain BatchNorm2d's parameters and buffers."""
    out = SyncBatchNormAct2d(module.num_features, eps=module.eps, momentum=module.momentum,
                             affine=module.affine,
                             track_running_stats=module.track_running_stats, relu=False,
                             fused=True, process_group=process_group)
    return _share_state(out, module)


def _share_state(out: SyncBatchNormAct2d, module: nn.BatchNorm2d) -> SyncBatchNormAct2d:
    """`out` with `module`'s Parameter and buffer objects themselves (device, dtype,
    requires_grad, optimizer state), training mode and qconfig."""
    out.weight, out.bias = module.weight, module.bias
    out.running_mean, out.running_var = module.running_mean, module.running_var
    out.num_batches_tracked = module.num_batches_tracked
    out.training = module.training
    if hasattr(module, "qconfig"):
        out.qconfig = module.qconfig
    return out


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace the BatchNorm layers of `module` by synchronised ones, recursively.

    ``BatchNormReLU2d`` -> ``SyncBatchNormReLU2d``, ``BatchNormAddReLU2d`` ->
    ``SyncBatchNormAddReLU2d`` (``BatchNormAct2d`` -> ``SyncBatchNormAct2d``), keeping the
    activation, ``fused``, the parameters and buffers themselves (device, dtype, requires_grad),
    and the training mode; a plain ``nn.BatchNorm2d`` (e.g. a projection shortcut's) becomes
    ``SyncBatchNormAct2d(relu=False)``, which synchronises on CPU and GPU and keeps the block's
    fused shortcut path; any other BatchNorm (1d, 3d, ...) becomes ``nn.SyncBatchNorm``
    through torch's converter. Returns the converted module (a new one when
    `module` itself is a BatchNorm, like ``nn.SyncBatchNorm.convert_sync_batchnorm``).

    Note: nn.SyncBatchNorm only synchronises GPU tensors (it raises on CPU tensors in
    distributed training); the fastres modules synchronise CPU and GPU tensors.
    """
    if isinstance(module, BatchNormAct2d):
        return _sync_version(module, process_group)
    if type(module) is nn.BatchNorm2d:
        return _sync_from_plain(module, process_group)
    if isinstance(module, _BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module

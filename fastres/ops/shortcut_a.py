"""The paper's shortcut option A with its gradient in the input's layout.

    out[:, :C] = x[:, :, ::stride, ::stride],  out[:, C:] = 0        (C = x.size(1))

PyTorch's own ops for it (a strided slice, then ``F.pad``) compute the right values, but the
slice's backward builds the input's gradient as ``zeros(x.shape)``: contiguous (NCHW) whatever
the layout of ``x``. In a channels-last network that gradient meets the channels-last
gradient of the block's first convolution; autograd sums the two in whichever layout came
first, and the BatchNorm before them (fastres's kernels read a gradient in their input's
layout) then copies the sum across layouts: a transposing copy of the block's whole input on
every training step (in the profiler, a copy of about 2% of a channels-last ResNet-20 step
on a 2-core CPU). Here the output and the gradient keep the memory format of ``x``, and the
backward writes the zeros and the subsampled gradient directly (no pad-backward clone in
between).

Used by the fused blocks (fastres.nn.ShortcutA with ``fused=True``) when a gradient is needed
and the model runs eagerly; under torch.compile and the exporters the block keeps the plain
slice and pad (standard operators, which Inductor fuses itself).
"""
import torch
from torch import Tensor

__all__ = ["shortcut_a"]


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels-last tensor (not also NCHW-contiguous), else NCHW."""
    if (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


class ShortcutAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_channels: int, stride: int) -> Tensor:
        fmt = _memory_format(x)
        sub = x[:, :, ::stride, ::stride] if stride != 1 else x
        n, c = x.shape[:2]
        out = torch.empty((n, out_channels) + tuple(sub.shape[2:]), dtype=x.dtype,
                          device=x.device, memory_format=fmt)
        out[:, :c].copy_(sub)
        out[:, c:].zero_()
        ctx.stride, ctx.channels, ctx.shape, ctx.fmt = stride, c, x.shape, fmt
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s, c = ctx.stride, ctx.channels
        if s == 1:
            return grad_out[:, :c].contiguous(memory_format=ctx.fmt), None, None
        grad = torch.empty(ctx.shape, dtype=grad_out.dtype, device=grad_out.device,
                           memory_format=ctx.fmt).zero_()
        grad[:, :, ::s, ::s].copy_(grad_out[:, :c])
        return grad, None, None


def shortcut_a(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """Option A of `x`: subsampled by `stride`, zero channels appended up to `out_channels`;
    output and gradient in the memory format of `x`."""
    if x.dim() != 4:
        raise ValueError(f"shortcut A expects an (N, C, H, W) input, got shape {tuple(x.shape)}")
    if out_channels < x.size(1):
        raise ValueError(f"shortcut A cannot reduce channels ({x.size(1)} -> {out_channels})")
    return ShortcutAFunction.apply(x, out_channels, stride)

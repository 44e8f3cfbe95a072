"""Residual blocks of He et al. (2015), torchvision v1.5 layout (stride on the 3x3).

One class serves both the fused model (``fused=True``: fastres BatchNorm modules, BN folded
into the convolutions in eval) and the plain-PyTorch reference (``fused=False``); parameter
names and state_dict keys are torchvision's (``conv1``, ``bn1``, ..., ``downsample.0/1``).

Shortcuts (the paper's options):
  "A": identity; when the shape changes, stride-2 subsampling and zero-padded extra channels
       (no parameters);
  "B": identity, and a 1x1 projection + BN only when the shape changes (torchvision's choice);
  "C": a 1x1 projection + BN on every block.
``residual=False`` gives the paper's plain networks (no shortcut at all).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..backends import get_conv_backend
from ..export import exporting, running_eagerly
from ..ops.shortcut_a import shortcut_a
from .conv_bn import can_fold, conv_bn_act, make_batch_norm
from .conv_bn_chain import conv_bn_pending, materialize, triton_conv_for

__all__ = ["BasicBlock", "Bottleneck", "ShortcutA", "SHORTCUTS"]

SHORTCUTS = ("A", "B", "C")


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A: subsample with `stride` and append zero channels up to `out_channels`.

    ``forward(x, fused=False)``: the fused blocks pass ``fused=True``, which, where a gradient
    is needed and the model runs eagerly, computes the same values with output and gradient
    in the layout of `x` (fastres.ops.shortcut_a); else PyTorch's slice and pad."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"shortcut A cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        if fused and x.requires_grad and torch.is_grad_enabled() and running_eagerly():
            return shortcut_a(x, self.out_channels, self.stride)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.out_channels > self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def make_shortcut(shortcut: str, residual: bool, in_channels: int, out_channels: int,
                  stride: int, fused: bool) -> Optional[nn.Module]:
    """The `downsample` module of a block (None = identity or no shortcut)."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    if not residual:
        return None
    changes = stride != 1 or in_channels != out_channels
    if shortcut == "C" or (shortcut == "B" and changes):
        return nn.Sequential(conv1x1(in_channels, out_channels, stride),
                             make_batch_norm(out_channels, relu=False, residual=False,
                                             fused=fused))
    if shortcut == "A" and changes:
        return ShortcutA(in_channels, out_channels, stride)
    return None


def is_conv_bn(ds: Optional[nn.Module]) -> bool:
    """A shortcut the blocks run as one conv-BN layer: Sequential(Conv2d, BatchNorm2d)."""
    return (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
            and isinstance(ds[1], nn.BatchNorm2d))


class _Block(nn.Module):
    def _shortcut(self, x: Tensor) -> Tensor:
        ds = self.downsample
        if ds is None:
            return x
        if is_conv_bn(ds):
            return conv_bn_act(ds[0], ds[1], x, relu=False, fused=self.fused)
        if isinstance(ds, ShortcutA):
            return ds(x, fused=self.fused)
        return ds(x)

    def _chained(self, x: Tensor) -> bool:
        """Run the block as a Triton conv chain (BatchNorm in the convolutions' prologues and
        epilogues)? Only for fused blocks whose first layer is not folded (training, or
        gradients needed) and that the conv backend puts on Triton."""
        # the default conv backend ("cudnn": PyTorch's convolution) never chains: decided
        # before can_fold, which costs microseconds on every block call of an inference
        return (self.fused and get_conv_backend() != "cudnn"
                and not can_fold(self.conv1, self.bn1) and not exporting()
                and triton_conv_for(self.conv1, self.bn1, x, self.bn1.training))

    def _shortcut_chained(self, x: Tensor) -> Tensor:
        ds = self.downsample
        if is_conv_bn(ds):
            return materialize(conv_bn_pending(ds[0], ds[1], x, relu=False))
        return self._shortcut(x)

    def _end_chained(self, pending, x: Tensor) -> Tensor:
        return materialize(pending, self._shortcut_chained(x) if self.residual else None)

    def _last(self, conv, bn, out, x):
        if self.residual:
            return conv_bn_act(conv, bn, out, self._shortcut(x), relu=True, fused=self.fused)
        return conv_bn_act(conv, bn, out, relu=True, fused=self.fused)


class BasicBlock(_Block):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, add the shortcut, ReLU (ResNet-18/34, CIFAR nets).

    The positional arguments are torchvision's; a given `downsample` module is used as is,
    otherwise the block builds its shortcut from `shortcut`.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, *, fused: bool = True, shortcut: str = "B",
                 residual: bool = True):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        if norm_layer not in (None, nn.BatchNorm2d):
            raise ValueError("fastres blocks use BatchNorm2d; norm_layer cannot be changed")
        self.fused, self.residual = fused, residual
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = make_batch_norm(planes, relu=True, residual=False, fused=fused)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = make_batch_norm(planes, relu=True, residual=residual, fused=fused)
        self.downsample = downsample if downsample is not None else make_shortcut(
            shortcut, residual, inplanes, planes * self.expansion, stride, fused)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self._chained(x):
            p = conv_bn_pending(self.conv1, self.bn1, x, use_triton=True)
            return self._end_chained(conv_bn_pending(self.conv2, self.bn2, p), x)
        out = conv_bn_act(self.conv1, self.bn1, x, relu=True, fused=self.fused)
        return self._last(self.conv2, self.bn2, out, x)


class Bottleneck(_Block):
    """1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU (stride here, v1.5), 1x1 conv-BN, add, ReLU
    (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, *, fused: bool = True, shortcut: str = "B",
                 residual: bool = True):
        super().__init__()
        if norm_layer not in (None, nn.BatchNorm2d):
            raise ValueError("fastres blocks use BatchNorm2d; norm_layer cannot be changed")
        width = int(planes * (base_width / 64.0)) * groups
        self.fused, self.residual = fused, residual
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = make_batch_norm(width, relu=True, residual=False, fused=fused)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = make_batch_norm(width, relu=True, residual=False, fused=fused)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = make_batch_norm(planes * self.expansion, relu=True, residual=residual,
                                   fused=fused)
        self.downsample = downsample if downsample is not None else make_shortcut(
            shortcut, residual, inplanes, planes * self.expansion, stride, fused)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self._chained(x):
            p = conv_bn_pending(self.conv1, self.bn1, x, use_triton=True)
            p = conv_bn_pending(self.conv2, self.bn2, p)
            return self._end_chained(conv_bn_pending(self.conv3, self.bn3, p), x)
        out = conv_bn_act(self.conv1, self.bn1, x, relu=True, fused=self.fused)
        out = conv_bn_act(self.conv2, self.bn2, out, relu=True, fused=self.fused)
        return self._last(self.conv3, self.bn3, out, x)

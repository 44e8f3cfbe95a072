"""The CIFAR-10 networks of He et al. 2015 (section 4.2), fused.

6n+2 weighted layers on 32x32 inputs: a 3x3 convolution (16 filters) + BN + ReLU, three stages
of n BasicBlocks with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps (the first block of
stages 2 and 3 subsamples with stride 2), global average pooling and a 10-way fully connected
layer. The paper uses shortcut option "A" (identity, zero-padded when the width doubles; no
extra parameters), the default here; "B" and "C" add projections. ``residual=False`` gives the
plain networks of figure 6.

    depth   20     32     44     56     110    1202
    n       3      5      7      9      18     200
    params  0.27M  0.46M  0.66M  0.85M  1.7M   19.4M   (table 6, option A)
"""
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.blocks import BasicBlock, conv3x3
from ..nn.conv_bn import conv_bn_act, make_batch_norm
from ..nn.inference_program import planned_forward
from .resnet import Block, _check_options, init_weights
from .weights import WeightsLike, load_weights

__all__ = [
    "CifarResNet",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
    "plain20", "plain32", "plain44", "plain56", "plain110",
]


class CifarResNet(nn.Module):
    """The paper's CIFAR network: stem, three stages of `layers[i]` blocks, pooling, fc.

    block: BasicBlock in the paper (Bottleneck works too, with 4x wider stage outputs).
    layers: blocks per stage, [n, n, n] for the 6n+2-layer network.
    Keyword-only `fused`, `shortcut` (default "A") and `residual` as in fastres.models.ResNet.
    State dict keys: ``conv1``, ``bn1``, ``layer1..3.<i>.conv1/bn1/conv2/bn2(/downsample)``,
    ``fc``.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 10,
                 zero_init_residual: bool = False, *, fused: bool = True, shortcut: str = "A",
                 residual: bool = True) -> None:
        super().__init__()
        _check_options(None, shortcut, residual, zero_init_residual)
        if len(layers) != 3:
            raise ValueError(f"layers should have 3 entries, got {list(layers)}")
        self.fused, self.shortcut, self.residual = fused, shortcut, residual
        self.inplanes = 16

        self.conv1 = conv3x3(3, self.inplanes)
        self.bn1 = make_batch_norm(self.inplanes, relu=True, residual=False, fused=fused)
        self.layer1 = self._make_layer(block, 16, layers[0])
        self.layer2 = self._make_layer(block, 32, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 64, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64 * block.expansion, num_classes)

        init_weights(self, zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        options = dict(fused=self.fused, shortcut=self.shortcut, residual=self.residual)
        layers = [block(self.inplanes, planes, stride, **options)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # CPU inference of a fused model: one program of its folded layers where it holds
        return planned_forward(self, x, self._forward)

    def _forward(self, x: Tensor) -> Tensor:
        x = conv_bn_act(self.conv1, self.bn1, x, relu=True, fused=self.fused)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _cifar(depth: int, weights: WeightsLike, **kwargs) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n+2 layers, got depth {depth}")
    n = (depth - 2) // 6
    return load_weights(CifarResNet(BasicBlock, [n, n, n], **kwargs), weights)


# Keyword arguments of every model function below:
#   weights: None, a path to a torch.save'd state_dict/checkpoint, or a state_dict; strict.
#   fused: fused BatchNorm/ReLU/residual and BN folding in eval (True) or plain PyTorch ops.
#   num_classes: size of the classifier (10 for CIFAR-10).
#   shortcut: "A" (the paper's, default), "B" or "C".
#   zero_init_residual: start the last BatchNorm of each residual branch at 0 (resnets only).


def resnet20(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
             shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """CIFAR ResNet-20 (n=3); 0.27M parameters with option A."""
    return _cifar(20, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual)


def resnet32(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
             shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """CIFAR ResNet-32 (n=5); 0.46M parameters with option A."""
    return _cifar(32, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual)


def resnet44(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
             shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """CIFAR ResNet-44 (n=7); 0.66M parameters with option A."""
    return _cifar(44, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual)


def resnet56(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
             shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """CIFAR ResNet-56 (n=9); 0.85M parameters with option A."""
    return _cifar(56, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual)


def resnet110(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
              shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """CIFAR ResNet-110 (n=18); 1.7M parameters with option A."""
    return _cifar(110, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual)


def resnet1202(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
               shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """CIFAR ResNet-1202 (n=200); 19.4M parameters with option A."""
    return _cifar(1202, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual)


def plain20(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
            shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """Plain 20-layer CIFAR network: resnet20 without shortcuts."""
    return _cifar(20, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual, residual=False)


def plain32(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
            shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """Plain 32-layer CIFAR network: resnet32 without shortcuts."""
    return _cifar(32, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual, residual=False)


def plain44(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
            shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """Plain 44-layer CIFAR network: resnet44 without shortcuts."""
    return _cifar(44, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual, residual=False)


def plain56(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
            shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """Plain 56-layer CIFAR network: resnet56 without shortcuts."""
    return _cifar(56, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual, residual=False)


def plain110(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 10,
             shortcut: str = "A", zero_init_residual: bool = False) -> CifarResNet:
    """Plain 110-layer CIFAR network: resnet110 without shortcuts."""
    return _cifar(110, weights, fused=fused, num_classes=num_classes, shortcut=shortcut,
                  zero_init_residual=zero_init_residual, residual=False)

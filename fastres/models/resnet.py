"""ImageNet ResNets (He et al. 2015) with fused BatchNorm/ReLU/residual, torchvision layout.

``ResNet`` has torchvision's constructor, module tree and state_dict keys and shapes
(``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer2.0.downsample.0/1``, ``fc``), so
torchvision checkpoints load strictly and back. The blocks are fastres' ``BasicBlock`` and
``Bottleneck``: with ``fused=True`` the BatchNorms are fastres' fused BatchNorm(+add)+ReLU
modules and are folded into the convolutions in eval mode; ``fused=False`` builds the same
network from plain PyTorch ops (the reference).

Beyond torchvision: ``shortcut`` picks the paper's shortcut option ("A" zero-padding identity,
"B" projection only where the shape changes -- torchvision's choice and the default, "C"
projection everywhere) and ``residual=False`` gives the paper's plain networks (``plain18`` ...
``plain152``), which have no shortcut modules at all.
"""
from typing import Optional, Sequence, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.blocks import SHORTCUTS, BasicBlock, Bottleneck
from ..nn.conv_bn import conv_bn_act, make_batch_norm
from ..nn.inference_program import planned_forward
from .weights import WeightsLike, load_weights

__all__ = [
    "ResNet",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "plain18", "plain34", "plain50", "plain101", "plain152",
]

Block = Type[Union[BasicBlock, Bottleneck]]


def _check_options(norm_layer, shortcut: str, residual: bool, zero_init_residual: bool) -> None:
    if norm_layer not in (None, nn.BatchNorm2d):
        raise ValueError("fastres ResNets use BatchNorm2d (fused); norm_layer cannot be changed")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    if zero_init_residual and not residual:
        raise ValueError("zero_init_residual=True needs residual=True: in a plain network it "
                         "would zero the output of every block")


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's initialisation: He (fan_out) normal convolutions, BatchNorm weight 1 and
    bias 0; with `zero_init_residual` the last BatchNorm of each block starts at 0, so every
    residual block starts as the identity (Goyal et al. 2017)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                nn.init.constant_(m.bn2.weight, 0)


class ResNet(nn.Module):
    """torchvision's ResNet with fused BatchNorm/ReLU/residual.

    The positional arguments are those of ``torchvision.models.resnet.ResNet``; ``norm_layer``
    may only be None or nn.BatchNorm2d. Keyword-only:

    fused: fastres' fused BatchNorm modules and BN folding in eval (True) or plain PyTorch ops.
    shortcut: "A", "B" (torchvision, default) or "C"; see fastres.nn.blocks.
    residual: False builds the plain (shortcut-free) network of the same depth.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[Sequence[bool]] = None,
                 norm_layer=None, *, fused: bool = True, shortcut: str = "B",
                 residual: bool = True) -> None:
        super().__init__()
        _check_options(norm_layer, shortcut, residual, zero_init_residual)
        if len(layers) != 4:
            raise ValueError(f"layers should have 4 entries, got {list(layers)}")
        if replace_stride_with_dilation is None:
            # each element tells whether to replace the 2x2 stride with a dilated convolution
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.fused, self.shortcut, self.residual = fused, shortcut, residual
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group

        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_batch_norm(self.inplanes, relu=True, residual=False, fused=fused)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        init_weights(self, zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        """torchvision's stage: the first block changes stride/width (its shortcut built by the
        block from `shortcut`: for "B" torchvision's conv1x1 + BN ``downsample``)."""
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        options = dict(fused=self.fused, shortcut=self.shortcut, residual=self.residual)
        layers = [block(self.inplanes, planes, stride, None, self.groups, self.base_width,
                        previous_dilation, **options)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation, **options))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # CPU inference of a fused model: one program of its folded layers where it holds
        return planned_forward(self, x, self._forward)

    def _forward(self, x: Tensor) -> Tensor:
        x = conv_bn_act(self.conv1, self.bn1, x, relu=True, fused=self.fused)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(block: Block, layers: Sequence[int], weights: WeightsLike, **kwargs) -> ResNet:
    return load_weights(ResNet(block, layers, **kwargs), weights)


# Keyword arguments of every model function below:
#   weights: None, a path to a torch.save'd state_dict/checkpoint, or a state_dict (for the
#       resnets e.g. ``torchvision.models.resnet50().state_dict()``); loaded strictly.
#   fused: fused BatchNorm/ReLU/residual and BN folding in eval (True) or plain PyTorch ops.
#   num_classes: size of the classifier.
#   shortcut: "A", "B" (torchvision's, the default) or "C".
#   zero_init_residual: start the last BatchNorm of each residual branch at 0 (resnets only).
#   **kwargs: the other arguments of ResNet (groups, width_per_group,
#       replace_stride_with_dilation, norm_layer).


def resnet18(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
             shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, stages [2, 2, 2, 2]); 11.7M parameters."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, **kwargs)


def resnet34(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
             shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, stages [3, 4, 6, 3]); 21.8M parameters."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, **kwargs)


def resnet50(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
             shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck v1.5, stages [3, 4, 6, 3]); 25.6M parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, **kwargs)


def resnet101(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
              shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """ResNet-101 (Bottleneck v1.5, stages [3, 4, 23, 3]); 44.5M parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, **kwargs)


def resnet152(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
              shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """ResNet-152 (Bottleneck v1.5, stages [3, 8, 36, 3]); 60.2M parameters."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, **kwargs)


def plain18(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
            shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """Plain 18-layer network: resnet18 without shortcuts (``residual=False``)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, residual=False,
                   **kwargs)


def plain34(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
            shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """Plain 34-layer network: resnet34 without shortcuts (``residual=False``)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, residual=False,
                   **kwargs)


def plain50(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
            shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """Plain 50-layer network: resnet50 without shortcuts (``residual=False``)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, residual=False,
                   **kwargs)


def plain101(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
             shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """Plain 101-layer network: resnet101 without shortcuts (``residual=False``)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, residual=False,
                   **kwargs)


def plain152(*, weights: WeightsLike = None, fused: bool = True, num_classes: int = 1000,
             shortcut: str = "B", zero_init_residual: bool = False, **kwargs) -> ResNet:
    """Plain 152-layer network: resnet152 without shortcuts (``residual=False``)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, fused=fused, num_classes=num_classes,
                   shortcut=shortcut, zero_init_residual=zero_init_residual, residual=False,
                   **kwargs)

"""Drop-in fused modules: BatchNorm with fused ReLU / add+ReLU, conv-BN-ReLU, ResNet blocks."""
from .batch_norm import BatchNormAct2d, BatchNormAddReLU2d, BatchNormReLU2d
from .blocks import BasicBlock, Bottleneck, ShortcutA
from .conv_bn import ConvBNReLU, conv_bn_act, fold_conv_bn
from .sync_batch_norm import (SyncBatchNormAct2d, SyncBatchNormAddReLU2d, SyncBatchNormReLU2d,
                              convert_sync_batchnorm)

__all__ = [
    "BasicBlock",
    "BatchNormAct2d",
    "BatchNormAddReLU2d",
    "BatchNormReLU2d",
    "Bottleneck",
    "ConvBNReLU",
    "ShortcutA",
    "SyncBatchNormAct2d",
    "SyncBatchNormAddReLU2d",
    "SyncBatchNormReLU2d",
    "convert_sync_batchnorm",
    "conv_bn_act",
    "fold_conv_bn",
]

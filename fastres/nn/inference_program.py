"""A fused model's CPU inference as one straight program of its folded layers.

Each folded layer of a fused model keeps a plan for its CPU inference (fastres.nn.conv_bn:
the convolution it chose, the folded weights, keyed by its inputs and parameters), but still
checks that key and walks the module calls on every layer call: some 30-50 us a layer, as much
as a convolution of ResNet-20 costs on a single image. torch.compile has none of that at run
time. So the fused models' forward (fastres.models.ResNet, CifarResNet) runs, where it can, a
program made from one ordinary forward: the layers' plans in call order, the blocks'
dataflow (shortcuts, residual adds), the non-folded modules (pooling, option A's shortcut,
the classifier) called as modules. A call runs the program when one key of the whole model
holds: the input's dtype, shape and strides; the thread count and the CPU switches the plans
depend on; every folded layer's parameters and statistics (data pointer and version), its
convolution's geometry and its BatchNorm's eps and mode; the module tree of the inlined
modules (no module replaced, added or removed); no forward hooks on them or global ones; and
no forward of its own on a stage or block (an instance attribute, as accelerate's hooks and
debugging patches set) nor a patched class forward of the stages and blocks. A model with a
BatchNorm in two layers gets no program (the plans are kept per BatchNorm).
Anything else (gradients enabled, autocast, torch.compile, tracing and export, another
convolution backend, a module of another type than the model's own) takes the ordinary
forward, which is also what makes a program again when the key changes.

The program calls the same functions the layers' plans call (conv_bn.run_plan), so its output
is the ordinary forward's bit for bit.
"""
import operator
import weakref
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as _module

from .._extension import _C
from ..backends import get_conv_backend
from ..export import running_eagerly
from . import conv_bn as cb
from .blocks import BasicBlock, Bottleneck, ShortcutA, is_conv_bn

__all__ = ["planned_forward"]

# model -> _Program; beside the model (as conv_bn's plans), so deepcopy and pickling of a model
# never meet the packed oneDNN weights a program holds
_PROGRAMS: "weakref.WeakKeyDictionary[nn.Module, _Program]" = weakref.WeakKeyDictionary()
tensor_state = _C.tensor_state  # (csrc/tensor_state.cpp)
_CONV_GEOMETRY = operator.attrgetter("stride", "padding", "dilation", "groups")
_BN_MODE = operator.attrgetter("eps", "training")
_BLOCK_FLAGS = operator.attrgetter("fused", "residual")
_VALUES = operator.methodcaller("values")
_HAS_FORWARD = operator.methodcaller("__contains__", "forward")
# the forwards the program inlines (a patched class forward is called by the ordinary forward
# and must be: no program then)
_INLINED_FORWARDS = ((nn.Sequential, nn.Sequential.forward), (BasicBlock, BasicBlock.forward),
                     (Bottleneck, Bottleneck.forward))


def _patched_forwards() -> bool:
    return any(cls.forward is not fn for cls, fn in _INLINED_FORWARDS)


def _global_hooks() -> bool:
    return bool(_module._global_forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_hooks_always_called)


def _applicable(model: nn.Module, x: Tensor) -> bool:
    """Folded CPU inference outside every tracer, with the default convolution backend."""
    return (running_eagerly() and model.fused and not model.training and type(x) is Tensor
            and x.is_cpu and x.dim() == 4 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and get_conv_backend() == "cudnn"
            and not _global_hooks())


def planned_forward(model: nn.Module, x: Tensor, forward: Callable[[Tensor], Tensor]) -> Tensor:
    """`forward(x)` (the model's ordinary forward), or the model's inference program where its
    key holds for this call; an ordinary call makes the program for the next ones."""
    if not _applicable(model, x):
        return forward(x)
    program = _PROGRAMS.get(model)
    if program is not None and program.key(model, x) == program.made_for:
        return program.run(x)
    _PROGRAMS.pop(model, None)
    cb._RECORDING.layers = layers = []
    try:
        y = forward(x)
    finally:
        cb._RECORDING.layers = None
    program = _Program.make(model, layers)
    if program is not None:
        program.made_for = program.key(model, x)
        if program.made_for is not None:  # (None: a hook on an inlined module)
            _PROGRAMS[model] = program
    return y


# A folded layer of the program: (conv, bn, plan); a block: (first layers, shortcut, last
# layer, residual) with the shortcut one of None (identity), ("layer", layer) (a 1x1
# convolution + BatchNorm, folded), ("module", module, fused keyword) (called as a module).
_Layer = Tuple[nn.Conv2d, nn.BatchNorm2d, tuple]


class _Program:
    """A fused ResNet's inference, made from the plans of one ordinary forward."""

    def __init__(self):
        self.made_for = None
        self.layers: List[_Layer] = []          # every folded layer, in call order
        self.inlined: List[nn.Module] = []      # modules whose forward the program replaces
        self.block_modules: List[nn.Module] = []
        self.top: list = []                     # the model's children at making
        self.tree: List[Tuple[nn.Module, list]] = []  # (submodule, its children at making)
        self.dicts: List[dict] = []             # the folded layers' parameter/buffer dicts
        self.stem: Optional[_Layer] = None
        self.pre: List[nn.Module] = []          # modules between the stem and the stages
        self.blocks: list = []
        self.post: Tuple[nn.Module, nn.Module] = None  # (avgpool, fc)

    # -- making ------------------------------------------------------------------------------
    @classmethod
    def make(cls, model: nn.Module, recorded: list) -> "Optional[_Program]":
        """The program of `model`, or None where its structure is not the fused model's own
        or a folded layer did not run by a plan in the recorded forward."""
        from ..models.cifar import CifarResNet
        from ..models.resnet import ResNet

        p = cls()
        kind = type(model)
        if kind is ResNet:
            names, stages = ["conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4",
                             "avgpool", "fc"], ["layer1", "layer2", "layer3", "layer4"]
        elif kind is CifarResNet:
            names, stages = ["conv1", "bn1", "layer1", "layer2", "layer3", "avgpool",
                             "fc"], ["layer1", "layer2", "layer3"]
        else:
            return None
        children = model._modules
        if list(children) != names:
            return None
        # (the model's own children apart: the program, a value of the weak-keyed _PROGRAMS,
        # must not refer to the model, or the model would never be freed)
        p.top = list(children.values())
        p.stem = p._layer(children["conv1"], children["bn1"])
        if "maxpool" in children:
            p.pre.append(children["maxpool"])
        for name in stages:
            stage = children[name]
            if type(stage) is not nn.Sequential:
                return None
            p.tree.append((stage, list(stage._modules.values())))
            p.inlined.append(stage)
            for block in stage:
                b = p._block(block)
                if b is None:
                    return None
                p.blocks.append(b)
        p.post = (children["avgpool"], children["fc"])
        if any(layer is None for layer in p.layers):
            return None
        # every folded layer ran by its plan (the one it holds now), in this order, in the
        # recorded forward; and no BatchNorm in two layers (plans are kept per BatchNorm: a
        # shared one holds the plan of its last call only, with that layer's folded weights)
        bns = [bn for _, bn, _ in p.layers]
        if (bns != recorded or len(set(map(id, bns))) != len(bns)
                or any(plan is None for _, _, plan in p.layers)):
            return None
        # what key() reads, gathered once: the modules' own dictionaries (of children, of
        # hooks), which adding a child or registering a hook changes in place
        p.module_dicts = [m._modules for m, _ in p.tree]
        p.kids = [kids for _, kids in p.tree]
        p.hook_dicts = [d for m in p.inlined for d in (m._forward_hooks, m._forward_pre_hooks)]
        # the instance dictionaries of the inlined stages, blocks and shortcuts, where a
        # `forward` of their own would be found before the class's
        p.instance_dicts = [vars(m) for m, _ in p.tree]
        p.convs = [conv for conv, _, _ in p.layers]
        p.bns = bns
        return p

    def _layer(self, conv, bn) -> Optional[_Layer]:
        if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
            self.layers.append(None)
            return None
        self.inlined += [conv, bn]
        # (not conv._buffers: the folded convolution reads none)
        self.dicts += [conv._parameters, bn._parameters, bn._buffers]
        # the plan the recorded forward left (None: the layer did not run by one)
        layer = (conv, bn, cb._PLANS.get(bn))
        self.layers.append(layer)
        return layer

    def _block(self, block: nn.Module):
        kind = type(block)
        if kind not in (BasicBlock, Bottleneck) or not block.fused:
            return None
        children = block._modules
        self.tree.append((block, list(children.values())))
        self.inlined.append(block)
        self.block_modules.append(block)
        convs = ["conv1", "conv2"] + (["conv3"] if kind is Bottleneck else [])
        first = [self._layer(children[c], children["bn" + c[-1]]) for c in convs[:-1]]
        residual = block.residual
        shortcut = None
        ds = children.get("downsample")
        if residual and ds is not None:
            if is_conv_bn(ds):  # (as _Block._shortcut)
                self.tree.append((ds, list(ds._modules.values())))
                self.inlined.append(ds)
                shortcut = ("layer", self._layer(ds[0], ds[1]))
            elif isinstance(ds, ShortcutA):
                shortcut = ("module", ds, True)
            else:
                shortcut = ("module", ds, None)
        last = self._layer(children[convs[-1]], children["bn" + convs[-1][-1]])
        return (tuple(first), shortcut, last, residual)

    # -- checking ----------------------------------------------------------------------------
    def key(self, model: nn.Module, x: Tensor):
        """What the program depends on, or None where the module tree changed, a hook or a
        forward of its own was added, a class forward patched, or a parameter has no version
        counter (every such call takes the ordinary forward)."""
        # (map over operator's getters: loops in C. Right after a forward every object here is
        # out of the caches, so the key costs several times what it does in a tight loop)
        if (list(model._modules.values()) != self.top
                or list(map(list, map(_VALUES, self.module_dicts))) != self.kids
                or any(map(len, self.hook_dicts))
                or any(map(_HAS_FORWARD, self.instance_dicts)) or "_forward" in vars(model)
                or _patched_forwards()):
            return None
        # every data pointer and version, packed (None: an inference tensor, which has no
        # version counter: no program)
        state = tensor_state(self.dicts)
        if state is None:
            return None
        return (x.dtype, x.shape, x.stride(), torch.get_num_threads(), cb._mkldnn_enabled(),
                cb._ONEDNN, cb._CPU_CHANNELS_LAST, state,
                list(map(_CONV_GEOMETRY, self.convs)), list(map(_BN_MODE, self.bns)),
                list(map(_BLOCK_FLAGS, self.block_modules)))

    # -- running -----------------------------------------------------------------------------
    def run(self, x: Tensor) -> Tensor:
        run_plan = cb.run_plan
        conv, _, plan = self.stem
        x = run_plan(conv, plan, x, None, True)
        # `own`: x is an intermediate only the program holds (a folded layer's output, never
        # seen outside), so a block's last layer may write its sum into it; not a module's
        # output (a forward hook on that module may have kept it), nor the caller's input
        own = True
        for module in self.pre:
            x = module(x)
            own = False
        for first, shortcut, last, residual in self.blocks:
            out = x
            for conv, _, plan in first:
                out = run_plan(conv, plan, out, None, True)
            sc, sc_own = None, False
            if residual:
                if shortcut is None:
                    sc, sc_own = x, own
                elif shortcut[0] == "layer":
                    conv, _, plan = shortcut[1]
                    sc, sc_own = run_plan(conv, plan, x, None, False), True
                elif shortcut[2] is None:
                    sc = shortcut[1](x)
                else:
                    sc = shortcut[1](x, fused=shortcut[2])
            conv, _, plan = last
            x = run_plan(conv, plan, out, sc, True, into_residual=sc_own)
            own = True
        avgpool, fc = self.post
        return fc(torch.flatten(avgpool(x), 1))

"""Convert a torchvision ResNet (or any model built from its blocks and conv-BN-ReLU sequences)
to fastres' fused modules, and back.

    from fastres.fuse import fuse, unfuse
    model = torchvision.models.resnet50()
    model = fuse(model)                       # in place; fuse(model, inplace=False) copies
    model, report = fuse(model, report=True)  # report.fused / report.skipped
    model = unfuse(model)                     # plain torchvision modules again

What ``fuse`` converts:

* every ``torchvision.models.resnet.BasicBlock`` / ``Bottleneck`` (exactly those classes) becomes
  the fastres block of the same configuration (``fastres.nn.BasicBlock`` / ``Bottleneck``):
  ``bn1``/``bn2`` become ``BatchNormReLU2d``, the last BN a ``BatchNormAddReLU2d``, and the
  original ``downsample`` module object is reused. The downsample BN (conv1x1 + BN, no ReLU) is
  handled by the block itself: it runs as conv + BN, with the BN folded into the 1x1 conv in
  eval, so it is neither converted nor reported;
* the stem of ``torchvision.models.resnet.ResNet`` (exactly that class): ``bn1`` followed by
  ``relu`` in ``ResNet.forward``;
* in any ``nn.Sequential`` (or subclass that keeps ``nn.Sequential.forward``, such as
  torchvision's ``Conv2dNormActivation``), an ``nn.BatchNorm2d`` directly followed by an
  ``nn.ReLU`` (typically after a Conv2d; the conv itself does not matter for correctness).

In the last two cases the BatchNorm2d becomes a ``BatchNormReLU2d`` and the ReLU a
``FusedReLU`` marker (an identity) that ``unfuse`` turns back into the ReLU.

What is kept: the very parameter and buffer tensors are moved into the new modules (not
copied), so parameter identity (optimizers stay valid), ``requires_grad``, ``.grad``, device,
dtype, memory format, running statistics and ``num_batches_tracked`` all carry over;
``state_dict`` keys and their order are unchanged; each module keeps its own training/eval
flag; BatchNorm hyper-parameters (eps, momentum, affine, track_running_stats) are copied.

What is left alone: anything whose semantics fuse() cannot be sure of: a BatchNorm not
followed by a ReLU, one called by a module fuse() does not know (including subclasses of the
torchvision classes, which may override ``forward``), modules carrying hooks or
parametrizations, modules referenced from more than one place, norm layers other than exactly
``nn.BatchNorm2d``. Every BatchNorm left unfused is listed, with the reason, in one
``UserWarning`` and in the report. Global module hooks
(``torch.nn.modules.module.register_module_forward_hook``) are not considered; they would see
fewer module calls after fusion.

After these class rules, a pass by pattern (``fastres._fuse_fx``) traces with torch.fx every
other module holding an ``nn.BatchNorm2d`` child (not torchvision's own ResNet classes, which
the rules above own) and fuses ``BatchNorm2d -> ReLU`` and ``BatchNorm2d -> add -> ReLU`` in
its forward: timm's ResNets, ResNeXts, SE-ResNets, wide nets, and subclasses of torchvision's
blocks. ``fuse(model, fx=False)`` skips it.

Converting twice changes nothing (idempotent), and a partially converted model is finished.
torchvision is only needed when the model contains torchvision modules (and by ``unfuse`` to
rebuild its blocks).
"""
import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .nn.batch_norm import BatchNormAct2d, BatchNormAddReLU2d, BatchNormReLU2d
from .nn.blocks import BasicBlock, Bottleneck

__all__ = ["FuseReport", "FusedReLU", "UnfuseReport", "count_fused_batch_norms", "fuse", "unfuse"]

_FASTRES_BLOCKS = (BasicBlock, Bottleneck)
_FASTRES_BN = (nn.BatchNorm2d, BatchNormAct2d, BatchNormReLU2d, BatchNormAddReLU2d)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


class FusedReLU(nn.Identity):
    """Marker left where ``fuse`` merged an ``nn.ReLU`` into the preceding ``BatchNormReLU2d``.

    It is an identity; ``unfuse`` turns it back into ``nn.ReLU(inplace=self.inplace)``.
    """

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"inplace={self.inplace} (ReLU fused into the preceding BatchNormReLU2d)"


@dataclass
class FuseReport:
    """What ``fuse`` did: ``fused`` lists the (qualified name, description) of each module it
    converted in this call; ``skipped`` the (qualified name, reason) of each BatchNorm left
    unfused. Qualified names are those of ``model.named_modules()`` ("" is the model itself)."""

    fused: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    fused_bn: int = 0  # BatchNorms of the returned model that run fused with their ReLU

    def __str__(self) -> str:
        return (_format("fused", self.fused, self.skipped)
                + f"\n{self.fused_bn} BatchNorm(s) of the model run fused with their ReLU")


@dataclass
class UnfuseReport:
    """What ``unfuse`` did: ``unfused`` lists the (qualified name, description) of each module
    converted back; ``skipped`` the (qualified name, reason) of each fastres module left."""

    unfused: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return _format("unfused", self.unfused, self.skipped)


def _format(verb: str, done, skipped) -> str:
    lines = [f"{len(done)} module(s) {verb}, {len(skipped)} left unchanged"]
    lines += [f"  {verb}: {_show(n)}: {d}" for n, d in done]
    lines += [f"  left: {_show(n)}: {r}" for n, r in skipped]
    return "\n".join(lines)


def _show(name: str) -> str:
    return name or "<model>"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _torchvision_resnet():
    """torchvision.models.resnet, or None when torchvision is not installed."""
    try:
        from torchvision.models import resnet
    except ImportError:
        return None
    return resnet


class _Skip(Exception):
    """A module cannot be converted without risking a change of semantics; the message says
    why."""


class _Pass:
    """State of one fuse/unfuse pass over a model."""

    def __init__(self, root: nn.Module):
        # number of parent slots holding each module: a module held in two places cannot be
        # replaced in one of them without splitting it
        self.slots = Counter()
        for m in root.modules():
            for child in m._modules.values():
                if child is not None:
                    self.slots[id(child)] += 1
        self.done: List[Tuple[str, str]] = []
        self.reasons: Dict[int, str] = {}   # id(module) -> why it was left unchanged
        self.replaced: List[nn.Module] = []  # kept alive so that their ids are not reused
        self.visited = set()

    def replaceable(self, module: nn.Module, what: str) -> None:
        """Raise _Skip if `module` carries hooks or parametrizations or is held twice."""
        if any(getattr(module, d, None) for d in _HOOK_DICTS):
            raise _Skip(f"{what} has hooks")
        if parametrize.is_parametrized(module):
            raise _Skip(f"{what} is parametrized")
        if self.slots[id(module)] > 1:
            raise _Skip(f"{what} is shared (held by more than one parent module)")

    def replaceable_tree(self, module: nn.Module, what: str) -> None:
        for name, m in module.named_modules():
            self.replaceable(m, f"{what}.{name}" if name else what)

    def leave(self, tree: nn.Module, reason: str, select) -> None:
        """Record `reason` for every module of `tree` selected by `select`."""
        for m in tree.modules():
            if select(m):
                self.reasons.setdefault(id(m), reason)


# ---------------------------------------------------------------------------------- moving state

def _conv_signature(conv: nn.Conv2d):
    return (type(conv), conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            conv.padding, conv.dilation, conv.groups, conv.bias is None, conv.padding_mode,
            conv.transposed, conv.output_padding)


def _copy_bn_options(src: _BatchNorm, dst: _BatchNorm) -> None:
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(dst, name, getattr(src, name))


def _move_state(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the very parameter and buffer tensors of `old`, module by module (same
    qualified names), after checking that both hold the same names and shapes; then copy every
    module's training flag. Raises _Skip on any mismatch (`new` is then discarded)."""
    old_mods, new_mods = dict(old.named_modules()), dict(new.named_modules())
    for name, n in new_mods.items():
        has_state = any(t is not None for t in (*n._parameters.values(), *n._buffers.values()))
        if has_state and name not in old_mods:
            raise _Skip(f"the converted module has a '{name}' the original lacks")
    for name, o in old_mods.items():
        if not o._parameters and not o._buffers:
            continue
        n = new_mods.get(name)
        if n is None:
            raise _Skip(f"'{name}' has no counterpart in the converted module")
        if n is o:
            continue
        if (set(o._parameters) != set(n._parameters) or set(o._buffers) != set(n._buffers)
                or o._non_persistent_buffers_set != n._non_persistent_buffers_set):
            raise _Skip(f"'{name}' holds other parameters or buffers than its counterpart")
        for store in ("_parameters", "_buffers"):
            for key, t in getattr(o, store).items():
                u = getattr(n, store)[key]
                # a BatchNorm's None entries follow its (copied) affine/track_running_stats
                if (t is None) != (u is None) and not isinstance(n, _BatchNorm):
                    raise _Skip(f"'{_join(name, key)}' is None in only one of the modules")
                if t is not None and u is not None and t.shape != u.shape:
                    raise _Skip(f"'{_join(name, key)}' differs in shape from its counterpart")
    training = {name: m.training for name, m in old_mods.items()}
    for name, o in old_mods.items():
        n = new_mods.get(name)
        if n is not None and n is not o:
            n._parameters.update(o._parameters)
            n._buffers.update(o._buffers)
    for name, n in new_mods.items():
        # modules only the new tree has (torchvision's stateless relu) follow the root
        n.training = training.get(name, old.training)
    if [k for k in old.state_dict(keep_vars=True)] != [k for k in new.state_dict(keep_vars=True)]:
        raise _Skip("state_dict keys differ")  # cannot happen after the checks above
    moved = {id(t) for t in (*old.parameters(), *old.buffers())}
    if any(id(t) not in moved for t in (*new.parameters(), *new.buffers())):
        raise _Skip("the converted module kept tensors of its own")  # idem


def _convert_bn(bn: _BatchNorm, cls) -> _BatchNorm:
    """A `cls` BatchNorm holding `bn`'s tensors, options and training flag."""
    with torch.device("meta"):
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    _move_state(bn, new)
    return new


# ------------------------------------------------------------------------------------- blocks

def _standard_shortcut(downsample) -> bool:
    """Whether a fastres block evaluates `downsample` itself as conv + BN (see
    ``fastres.nn.blocks._Block._shortcut``) instead of calling it."""
    return (isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and isinstance(downsample[0], nn.Conv2d) and isinstance(downsample[1], nn.BatchNorm2d))


def _block_config(block: nn.Module) -> dict:
    """inplanes/planes/stride/groups/base_width/dilation of a torchvision-layout block, read
    from its convolutions."""
    conv1 = block.conv1
    strided = block.conv2 if "conv3" in block._modules else block.conv1
    if len(set(strided.stride)) != 1 or len(set(strided.dilation)) != 1:
        raise _Skip("non-square stride or dilation")
    cfg = dict(inplanes=conv1.in_channels, stride=strided.stride[0], groups=1, base_width=64,
               dilation=1)
    if "conv3" not in block._modules:
        cfg["planes"] = conv1.out_channels
        return cfg
    planes, rest = divmod(block.conv3.out_channels, type(block).expansion)
    groups, width = block.conv2.groups, conv1.out_channels
    if rest or planes == 0 or width % groups:
        raise _Skip("channel counts do not fit the bottleneck layout")
    per_group = width // groups
    # width = int(planes * base_width / 64) * groups: any base_width giving this width will do
    for base_width in (per_group * 64 // planes, -(-per_group * 64 // planes)):
        if base_width > 0 and int(planes * (base_width / 64.0)) == per_group:
            break
    else:
        raise _Skip("no base_width reproduces the bottleneck width")
    cfg.update(planes=planes, groups=groups, base_width=base_width,
               dilation=block.conv2.dilation[0])
    return cfg


def _convert_block(block: nn.Module, target, bn_types, ctx: _Pass, what: str) -> nn.Module:
    """A `target` block (same configuration, same tensors, the same downsample object) in place
    of the torchvision-layout `block`, whose BatchNorms must be of `bn_types`. Raises _Skip."""
    ctx.replaceable_tree(block, what)
    bottleneck = "conv3" in block._modules
    names = ["conv1", "bn1", "conv2", "bn2"] + (["conv3", "bn3"] if bottleneck else [])
    for name in names:
        m = block._modules.get(name)
        wanted = (nn.Conv2d,) if name.startswith("conv") else bn_types
        if type(m) not in wanted:
            raise _Skip(f"{name} is a {type(m).__name__}, not "
                        + " / ".join(t.__name__ for t in wanted))
    downsample = getattr(block, "downsample", None)
    if _standard_shortcut(downsample) and (type(downsample) is not nn.Sequential
                                           or type(downsample[0]) is not nn.Conv2d
                                           or type(downsample[1]) is not nn.BatchNorm2d):
        raise _Skip("downsample is a subclass of nn.Sequential / Conv2d / BatchNorm2d")
    cfg = _block_config(block)
    with torch.device("meta"):
        try:
            new = target(cfg.pop("inplanes"), cfg.pop("planes"), downsample=downsample, **cfg)
        except (ValueError, NotImplementedError) as e:
            raise _Skip(str(e)) from None
    for name in names:
        if name.startswith("conv"):
            if _conv_signature(block._modules[name]) != _conv_signature(new._modules[name]):
                raise _Skip(f"{name} ({block._modules[name]}) differs from the converted "
                            f"block's ({new._modules[name]})")
        else:
            _copy_bn_options(block._modules[name], new._modules[name])
    _move_state(block, new)
    return new


def _bn_relu_problem(bn, relu, ctx: _Pass, relu_name: str) -> Optional[str]:
    """Why BatchNorm `bn` followed by module `relu` cannot become BatchNormReLU2d + FusedReLU."""
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not nn.BatchNorm2d"
    if relu is None:
        return "no ReLU follows it"
    if type(relu) is not nn.ReLU:
        return f"followed by {type(relu).__name__} '{relu_name}', not by nn.ReLU"
    try:
        ctx.replaceable(bn, "the BatchNorm")
        if any(getattr(relu, d, None) for d in _HOOK_DICTS):
            raise _Skip(f"the ReLU '{relu_name}' has hooks")
    except _Skip as e:
        return str(e)
    return None


def _fuse_bn_relu(parent: nn.Module, bn_name: str, relu_name: str, qname: str, ctx: _Pass):
    """Replace parent.<bn_name>, parent.<relu_name> by BatchNormReLU2d, FusedReLU."""
    bn, relu = parent._modules.get(bn_name), parent._modules.get(relu_name)
    problem = _bn_relu_problem(bn, relu, ctx, _join(qname, relu_name))
    if problem is not None:
        ctx.reasons.setdefault(id(bn), problem)
        return
    try:
        new_bn = _convert_bn(bn, BatchNormReLU2d)
    except _Skip as e:
        ctx.reasons.setdefault(id(bn), str(e))
        return
    marker = FusedReLU(relu.inplace)
    marker.training = relu.training
    setattr(parent, bn_name, new_bn)
    setattr(parent, relu_name, marker)
    ctx.replaced += [bn, relu]
    ctx.done.append((_join(qname, bn_name), f"BatchNorm2d + ReLU '{_join(qname, relu_name)}' "
                                            f"-> BatchNormReLU2d + FusedReLU"))


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


# --------------------------------------------------------------------------------------- fuse

def _fuse_child(child: nn.Module, qname: str, ctx: _Pass) -> Optional[nn.Module]:
    """The fastres replacement of a torchvision block, or None (reasons recorded)."""
    tv = _torchvision_resnet()
    if tv is None or not isinstance(child, (tv.BasicBlock, tv.Bottleneck)):
        return None
    kind = "Bottleneck" if isinstance(child, tv.Bottleneck) else "BasicBlock"
    try:
        if type(child) not in (tv.BasicBlock, tv.Bottleneck):
            raise _Skip(f"{type(child).__name__} subclasses torchvision's {kind} and may "
                        f"override forward")
        relu = child._modules.get("relu")
        if type(relu) is not nn.ReLU:
            raise _Skip(f"its relu is a {type(relu).__name__}, not nn.ReLU")
        target = Bottleneck if kind == "Bottleneck" else BasicBlock
        new = _convert_block(child, target, (nn.BatchNorm2d,), ctx, _show(qname))
    except _Skip as e:
        ctx.leave(child, f"in {type(child).__name__} '{_show(qname)}', which was not converted: "
                         f"{e}", lambda m: isinstance(m, _BatchNorm))
        ctx.visited.update(id(m) for m in child.modules())  # left exactly as it is
        return None
    ctx.replaced.append(child)
    shortcut = (", downsample BN handled by the block (folded into its conv in eval)"
                if _standard_shortcut(new.downsample) else "")
    ctx.done.append((qname, f"torchvision {kind} -> fastres {kind}{shortcut}"))
    return new


def _fuse_tree(module: nn.Module, qname: str, ctx: _Pass) -> None:
    if id(module) in ctx.visited:
        return
    ctx.visited.add(id(module))
    tv = _torchvision_resnet()
    if tv is not None and type(module) is tv.ResNet and \
            not isinstance(module._modules.get("bn1"), BatchNormAct2d):
        _fuse_bn_relu(module, "bn1", "relu", qname, ctx)
    if _is_plain_sequential(module):
        names = list(module._modules)
        for i, name in enumerate(names):
            bn = module._modules[name]
            if not isinstance(bn, _BatchNorm) or isinstance(bn, BatchNormAct2d):
                continue
            if i + 1 == len(names):
                ctx.reasons.setdefault(id(bn), "last module of its nn.Sequential: no ReLU follows")
                continue
            _fuse_bn_relu(module, name, names[i + 1], qname, ctx)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _fuse_child(child, _join(qname, name), ctx)
        if new is not None:
            setattr(module, name, new)
            child = new
        _fuse_tree(child, _join(qname, name), ctx)


def _parents(model: nn.Module) -> Dict[int, nn.Module]:
    parents = {}
    for m in model.modules():
        for child in m._modules.values():
            if child is not None:
                parents.setdefault(id(child), m)
    return parents


def _unfused_batch_norms(model: nn.Module, ctx: _Pass) -> List[Tuple[str, str]]:
    """(name, reason) of every BatchNorm of `model` that is neither fused nor the shortcut BN
    of a fused fastres block."""
    handled = set()
    for m in model.modules():
        if type(m) in _FASTRES_BLOCKS and m.fused and m.residual and \
                _standard_shortcut(m.downsample):
            handled.add(id(m.downsample[1]))
    parents, skipped = _parents(model), []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or id(m) in handled:
            continue
        if isinstance(m, BatchNormAct2d) and m.relu:
            continue
        reason = ctx.reasons.get(id(m))
        parent = parents.get(id(m))
        if reason is None and isinstance(parent, _FASTRES_BLOCKS):
            reason = (f"plain {type(m).__name__} in a fastres {type(parent).__name__} built with "
                      f"fused={parent.fused}, runs unfused")
        if reason is None:
            reason = (f"called by {type(parent).__name__}.forward, which fuse() does not know"
                      if parent is not None else "the model itself is a BatchNorm")
        skipped.append((name, reason))
    return skipped


def _fuse_by_pattern(model: nn.Module, ctx: _Pass) -> None:
    """The fx pass (fastres._fuse_fx): every module holding an nn.BatchNorm2d child that the
    class rules above did not convert is traced, its children as leaves, and its BatchNorm ->
    ReLU and BatchNorm -> add -> ReLU patterns are fused."""
    from . import _fuse_fx

    def replaceable(m, name, relu=False):
        try:
            ctx.replaceable(m, f"the {'ReLU' if relu else 'BatchNorm'} '{name}'")
        except _Skip as e:
            return str(e)
        return None

    tv = _torchvision_resnet()
    # torchvision's own ResNet / BasicBlock / Bottleneck (exactly those classes) belong to the
    # class rules: one left there (hooks, ...) is finished by a later fuse() once it can be
    own = (tv.ResNet, tv.BasicBlock, tv.Bottleneck) if tv is not None else ()
    for qname, module in list(model.named_modules()):
        if isinstance(module, _BatchNorm) or _is_plain_sequential(module) or \
                _is_fastres_module(module) or type(module) in own or \
                not any(type(c) is nn.BatchNorm2d for c in module.children()):
            continue
        fused, reasons, replaced = _fuse_fx.fuse_module(
            module, qname, _HOOK_DICTS, replaceable, _convert_bn, FusedReLU, _join)
        ctx.done += fused
        ctx.replaced += replaced
        for name, reason in reasons.items():
            child = module._modules.get(name)
            if child is not None:
                ctx.reasons[id(child)] = reason


def count_fused_batch_norms(model: nn.Module) -> int:
    """How many BatchNorms of `model` run fused with their ReLU (BatchNormReLU2d /
    BatchNormAddReLU2d and their sync versions, in fused mode)."""
    return sum(1 for m in model.modules()
               if isinstance(m, BatchNormAct2d) and m.relu and m.fused)


def fuse(model: nn.Module, inplace: bool = True, *, report: bool = False, warn: bool = True,
         fx: bool = True):
    """Convert a torchvision ResNet, or any model built from torchvision's BasicBlock /
    Bottleneck and conv-BN-ReLU ``nn.Sequential``s, to fastres' fused modules.

    inplace: convert `model` itself (default) or a deep copy of it.
    report: also return a :class:`FuseReport`: ``fuse(model, report=True) -> (model, report)``.
    warn: emit one ``UserWarning`` naming every BatchNorm left unfused, and why.
    fx: also fuse by pattern in the torch.fx graphs of modules the class rules do not know
    (timm's ResNets and the like; see ``fastres._fuse_fx``); ``fx=False`` keeps to the class
    rules.

    Returns the converted model: `model` itself (or its copy), except when the model *is* a
    torchvision block, which is replaced by a new fastres block. See the module docstring for
    what is converted and what is kept; semantics never change: whatever cannot be converted
    safely is left as it is and reported.
    """
    if not inplace:
        model = copy.deepcopy(model)
    ctx = _Pass(model)
    new_root = _fuse_child(model, "", ctx)
    if new_root is not None:
        model = new_root
    _fuse_tree(model, "", ctx)
    if fx:
        _fuse_by_pattern(model, ctx)
    result = FuseReport(fused=ctx.done, skipped=_unfused_batch_norms(model, ctx),
                        fused_bn=count_fused_batch_norms(model))
    if warn and result.skipped:
        warnings.warn(f"fastres.fuse: {len(result.skipped)} BatchNorm module(s) left unfused "
                      f"(semantics unchanged):\n"
                      + "\n".join(f"  {_show(n)}: {r}" for n, r in result.skipped),
                      UserWarning, stacklevel=2)
    return (model, result) if report else model


# ------------------------------------------------------------------------------------- unfuse

def _is_fastres_module(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "fastres"


def _unfuse_bn_relu(parent: nn.Module, bn_name: str, relu_name: str, qname: str, ctx: _Pass):
    """Replace parent.<bn_name>, parent.<relu_name> (BatchNormReLU2d, FusedReLU) by
    nn.BatchNorm2d, nn.ReLU."""
    bn, marker = parent._modules[bn_name], parent._modules[relu_name]
    try:
        ctx.replaceable(bn, "the BatchNorm")
        if any(getattr(marker, d, None) for d in _HOOK_DICTS):
            raise _Skip(f"the FusedReLU '{_join(qname, relu_name)}' has hooks")
        new_bn = _convert_bn(bn, nn.BatchNorm2d)
    except _Skip as e:
        ctx.reasons.setdefault(id(bn), str(e))
        ctx.reasons.setdefault(id(marker), f"its BatchNormReLU2d was not unfused: {e}")
        return
    relu = nn.ReLU(inplace=marker.inplace)
    relu.training = marker.training
    setattr(parent, bn_name, new_bn)
    setattr(parent, relu_name, relu)
    ctx.replaced += [bn, marker]
    ctx.done.append((_join(qname, bn_name), f"BatchNormReLU2d + FusedReLU "
                                            f"'{_join(qname, relu_name)}' -> BatchNorm2d + ReLU"))


def _unfuse_child(child: nn.Module, qname: str, ctx: _Pass) -> Optional[nn.Module]:
    """The torchvision replacement of a fastres block, or None (reasons recorded)."""
    if type(child) not in _FASTRES_BLOCKS:
        return None
    kind = type(child).__name__
    try:
        tv = _torchvision_resnet()
        if tv is None:
            raise _Skip("torchvision is not installed")
        if not child.residual:
            raise _Skip("residual=False (plain network) has no torchvision equivalent")
        new = _convert_block(child, getattr(tv, kind), _FASTRES_BN, ctx, _show(qname))
    except _Skip as e:
        ctx.leave(child, f"in fastres {kind} '{_show(qname)}', which was not converted: {e}",
                  _is_fastres_module)
        ctx.visited.update(id(m) for m in child.modules())
        return None
    if _standard_shortcut(new.downsample):
        # the fastres block cached its folded shortcut weights on the (reused) BatchNorm
        new.downsample[1].__dict__.pop("_fastres_folded", None)
    ctx.replaced.append(child)
    ctx.done.append((qname, f"fastres {kind} -> torchvision {kind}"))
    return new


def _unfuse_tree(module: nn.Module, qname: str, ctx: _Pass) -> None:
    if id(module) in ctx.visited:
        return
    ctx.visited.add(id(module))
    tv = _torchvision_resnet()
    if tv is not None and type(module) is tv.ResNet and \
            type(module._modules.get("bn1")) is BatchNormReLU2d and \
            type(module._modules.get("relu")) is FusedReLU:
        _unfuse_bn_relu(module, "bn1", "relu", qname, ctx)
    if _is_plain_sequential(module):
        names = list(module._modules)
        for name, next_name in zip(names, names[1:]):
            if type(module._modules[name]) is BatchNormReLU2d and \
                    type(module._modules[next_name]) is FusedReLU:
                _unfuse_bn_relu(module, name, next_name, qname, ctx)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _unfuse_child(child, _join(qname, name), ctx)
        if new is not None:
            setattr(module, name, new)
            child = new
        _unfuse_tree(child, _join(qname, name), ctx)


def _remaining_fastres_modules(model: nn.Module, ctx: _Pass) -> List[Tuple[str, str]]:
    skipped = []
    for name, m in model.named_modules():
        if not _is_fastres_module(m):
            continue
        reason = ctx.reasons.get(id(m))
        if reason is None:
            if isinstance(m, BatchNormAct2d):
                reason = ("not followed by a FusedReLU (in an nn.Sequential or the ResNet stem): "
                          "its activation cannot be split off")
            elif isinstance(m, FusedReLU):
                reason = "not preceded by a BatchNormReLU2d: no ReLU to restore"
            else:
                reason = f"fastres {type(m).__name__} has no torchvision equivalent"
        skipped.append((name, reason))
    return skipped


def _unfuse_by_pattern(model: nn.Module, ctx: _Pass) -> None:
    """Undo the fx pass: the modules fuse() rewrote get their class's forward, nn.BatchNorm2d
    and nn.ReLU children back (the same tensors)."""
    from . import _fuse_fx

    for qname, module in list(model.named_modules()):
        if _fuse_fx.RECORD not in module.__dict__:
            continue
        before = {name: m for name, m in module.named_children()}
        for name in _fuse_fx.unfuse_module(module, _convert_bn):
            ctx.replaced.append(before[name])
            ctx.done.append((_join(qname, name), f"{type(before[name]).__name__} -> BatchNorm2d "
                                                 f"(fx fusion of {type(module).__name__} undone)"))


def unfuse(model: nn.Module, inplace: bool = True, *, report: bool = False, warn: bool = True):
    """The inverse of :func:`fuse`: fastres BasicBlock/Bottleneck -> torchvision's (same
    tensors), BatchNormReLU2d + FusedReLU -> nn.BatchNorm2d + nn.ReLU.

    For a model that ``fuse`` converted, ``unfuse(fuse(m))`` has the module types and state of
    `m` (the same tensors, even) and computes the same outputs. fastres modules that cannot be
    converted without changing semantics (a BatchNormReLU2d whose ReLU is not a separate
    FusedReLU, a block with ``residual=False``, ...) are left and reported: one UserWarning
    (`warn`) and, with ``report=True``, ``(model, UnfuseReport)`` is returned.
    """
    if not inplace:
        model = copy.deepcopy(model)
    ctx = _Pass(model)
    _unfuse_by_pattern(model, ctx)
    new_root = _unfuse_child(model, "", ctx)
    if new_root is not None:
        model = new_root
    _unfuse_tree(model, "", ctx)
    result = UnfuseReport(unfused=ctx.done, skipped=_remaining_fastres_modules(model, ctx))
    if warn and result.skipped:
        warnings.warn(f"fastres.unfuse: {len(result.skipped)} fastres module(s) left "
                      f"(semantics unchanged):\n"
                      + "\n".join(f"  {_show(n)}: {r}" for n, r in result.skipped),
                      UserWarning, stacklevel=2)
    return (model, result) if report else model

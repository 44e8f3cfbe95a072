"""fuse() by pattern: BatchNorm2d -> ReLU and BatchNorm2d -> add -> ReLU found in the torch.fx
graph of a module's forward (timm's ResNets, ResNeXts, SE-ResNets, and any other model whose
blocks call their BatchNorm / ReLU children from Python code fuse() has no class rule for).

Each module P that holds an ``nn.BatchNorm2d`` child is traced on its own with ``torch.fx``
symbolic tracing, its children as leaves (so one graph per block, not per model). In that graph:

* ``bn -> [nn.Identity ...] -> relu``, the ReLU an ``nn.ReLU`` child called only there: the
  BatchNorm becomes a ``BatchNormReLU2d`` (the same tensors) and the ReLU a ``FusedReLU``
  identity. P's forward is not touched.
* ``bn -> [Identity ...] -> add(., other) -> [Identity ...] -> relu`` (operator ``+``/``+=``,
  ``torch.add``/``Tensor.add(_)`` without alpha; the ReLU a module, ``F.relu``, ``torch.relu(_)``
  or ``Tensor.relu(_)``), and ``bn -> functional relu``: the BatchNorm becomes a
  ``BatchNormAddReLU2d`` / ``BatchNormReLU2d`` and P gets a forward generated from the rewritten
  graph (an instance attribute; P keeps its class, its methods and its children, so state_dict
  keys do not change). The residual add falls back to ``relu(bn(x) + other)`` at run time where
  ``other`` is not a tensor of ``x``'s shape, dtype and device (broadcasting, type promotion).

Everything else is left as it is, with the reason: a BatchNorm whose output is used twice, one
followed by another activation or module (an SE module, DropBlock, DropPath, ...), modules with
hooks or parametrizations, a BatchNorm called twice, a forward that fx cannot trace or whose
graph depends on the training flag (the generated forward could not follow ``train()`` /
``eval()``).
"""
import linecache
import operator
import uuid
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .nn.batch_norm import BatchNormAddReLU2d, BatchNormReLU2d

RECORD = "_fastres_fx"   # P.__dict__ entry: what fuse() changed in P (for unfuse)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def bn_add_relu(bn: nn.BatchNorm2d, x: Tensor, other) -> Tensor:
    """``relu(bn(x) + other)``: the fused BatchNormAddReLU2d where `other` is a tensor of x's
    shape, dtype and device, else the unfused ops (broadcasting and type promotion as before)."""
    if isinstance(other, Tensor) and other.shape == x.shape and other.dtype == x.dtype and \
            other.device == x.device:
        return bn(x, other)
    return F.relu(nn.BatchNorm2d.forward(bn, x) + other)


class FxForward:
    """The forward fuse() generated for a module from its rewritten fx graph (an instance
    attribute of the module, so the module keeps its class). Deep copies follow the module."""

    def __init__(self, module: nn.Module, fn, src: str):
        self.module, self.fn, self.src = module, fn, src

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __deepcopy__(self, memo):
        import copy
        return FxForward(copy.deepcopy(self.module, memo), self.fn, self.src)

    def __reduce__(self):
        raise TypeError(
            f"fastres.fuse rewrote the forward of this {type(self.module).__name__} from its fx "
            f"graph; such a module cannot be pickled as a whole: save model.state_dict() and load "
            f"it into a model built and fused the same way (or fastres.unfuse(model) first)")

    def __repr__(self) -> str:
        return f"<forward of {type(self.module).__name__} rewritten by fastres.fuse>"


class _Problem(Exception):
    pass


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's forward; every submodule is a leaf."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root


def _trace(module: nn.Module) -> torch.fx.Graph:
    return _LeafTracer(module).trace(module)


def _source(graph: torch.fx.Graph) -> Tuple[str, dict]:
    code = graph.python_code(root_module="self")
    return code.src, dict(code.globals)


def _compile(src: str, globs: dict):
    name = f"<fastres-fuse-{uuid.uuid4().hex[:12]}>"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    exec(compile(src, name, "exec"), globs)
    return globs["forward"]


def _describe(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "output":
        return "the forward's output"
    return f"{node.op} {node.target}"


def _has_hooks(m: nn.Module, hook_dicts) -> bool:
    return any(getattr(m, d, None) for d in hook_dicts)


class _Ctx:
    def __init__(self, modules, calls, hook_dicts):
        self.modules, self.calls, self.hook_dicts = modules, calls, hook_dicts

    def identity(self, node) -> bool:
        if node.op != "call_module":
            return False
        m = self.modules[node.target]
        return type(m) is nn.Identity and not _has_hooks(m, self.hook_dicts) and \
            len(node.args) == 1 and not node.kwargs

    def relu(self, node, value) -> Optional[str]:
        """'module' / 'function' if `node` is relu(value) and nothing else, else None."""
        if node.op == "call_module":
            m = self.modules[node.target]
            if type(m) is nn.ReLU and node.args == (value,) and not node.kwargs:
                if _has_hooks(m, self.hook_dicts):
                    raise _Problem(f"its ReLU '{node.target}' has hooks")
                return "module"
            return None
        if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
            if node.args[:1] == (value,) and len(node.args) <= 2 and \
                    set(node.kwargs) <= {"inplace"}:
                return "function"
            return None
        if node.op == "call_method" and node.target in _RELU_METHODS:
            return "function" if node.args == (value,) and not node.kwargs else None
        return None

    def add_other(self, node, value):
        """The other operand if `node` is value + other (no alpha), else raise/None."""
        if node.op == "call_function" and node.target in _ADD_FUNCTIONS or \
                node.op == "call_method" and node.target in _ADD_METHODS:
            if node.kwargs or len(node.args) != 2:
                return None
            a, b = node.args
            if a is value and b is not value:
                other = b
            elif b is value and a is not value and node.op == "call_function":
                other = a
            else:
                return None
            if not isinstance(other, torch.fx.Node):
                raise _Problem(f"the add ({_describe(node, self.modules)}) adds a constant, "
                               f"not a tensor")
            return other
        return None

    def follow(self, node, what: str):
        """(single user of `node` past nn.Identity modules, the identity nodes passed)."""
        chain = []
        while True:
            users = list(node.users)
            if len(users) != 1:
                raise _Problem(f"{what} is used {len(users)} times" if users else
                               f"{what} is not used")
            user = users[0]
            if self.identity(user):
                chain.append(user)
                node = user
                continue
            return user, chain


def _analyse(graph: torch.fx.Graph, root: nn.Module, hook_dicts, replaceable):
    """Patterns of `graph` (root's forward): list of (kind, bn_node, nodes...) and
    {bn name: reason} for the BatchNorm children that do not fit."""
    modules = dict(root.named_modules())
    calls: Dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    ctx = _Ctx(modules, calls, hook_dicts)
    plans, reasons = [], {}
    for n in graph.nodes:
        if n.op != "call_module" or "." in n.target or type(modules[n.target]) is not nn.BatchNorm2d:
            continue
        name = n.target
        bn = modules[name]
        try:
            if calls[name] > 1:
                raise _Problem(f"called {calls[name]} times in {type(root).__name__}.forward")
            if len(n.args) != 1 or n.kwargs:
                raise _Problem("called with more than one argument")
            problem = replaceable(bn, name)
            if problem:
                raise _Problem(problem)
            user, chain = ctx.follow(n, "its output")
            kind = ctx.relu(user, chain[-1] if chain else n)
            if kind == "module" and calls[user.target] == 1 and "." not in user.target and \
                    not replaceable(modules[user.target], user.target, relu=True):
                plans.append(("relu_module", n, user))
                continue
            if kind is not None:
                plans.append(("relu_graph", n, user))
                continue
            value = chain[-1] if chain else n
            other = ctx.add_other(user, value)
            if other is None:
                raise _Problem(f"followed by {_describe(user, modules)}, not by a ReLU or an add "
                               f"and a ReLU")
            relu, chain2 = ctx.follow(user, "the sum")
            if ctx.relu(relu, chain2[-1] if chain2 else user) is None:
                raise _Problem(f"its sum with '{other.name}' is followed by "
                               f"{_describe(relu, modules)}, not by a ReLU")
            x = n.args[0]
            if isinstance(x, torch.fx.Node) and len(x.users) != 1:
                raise _Problem("its input is used elsewhere too (the fused op would run later "
                               "than the BatchNorm did)")
            plans.append(("add_relu", n, relu, other, user, chain, chain2))
        except _Problem as e:
            reasons[name] = f"in {type(root).__name__}.forward (fx): {e}"
    return plans, reasons


def fuse_module(root: nn.Module, qname: str, hook_dicts, replaceable, convert_bn, marker_cls,
                join) -> Tuple[List[Tuple[str, str]], Dict[str, str], List[nn.Module]]:
    """Fuse the BatchNorm children of `root` found by pattern in its fx graph.

    Returns (fused: [(qualified bn name, description)], reasons: {child name: why not},
    replaced modules). `replaceable(module, name, relu=False)` returns a problem or None;
    `convert_bn(bn, cls)` moves a BatchNorm's tensors into a `cls`."""
    rec = root.__dict__.get(RECORD)
    if rec is not None and rec.get("forward"):
        # fx traces the class's forward; the rewritten one stays as it is
        return [], dict(rec.get("reasons", {})), []
    try:
        graph = _trace(root)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "leave it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [], {name: f"{type(root).__name__}.forward cannot be traced by torch.fx "
                          f"({type(e).__name__}: {first[:200]})"
                    for name, m in root.named_children() if type(m) is nn.BatchNorm2d}, []
    plans, reasons = _analyse(graph, root, hook_dicts, replaceable)
    if not plans:
        return [], reasons, []
    rewrite = any(p[0] != "relu_module" for p in plans)
    if rewrite:
        # the generated forward is fixed: it must not depend on the training flag
        flags = {id(m): m.training for m in root.modules()}
        try:
            root.train(not root.training)
            other = _source(_trace(root))[0]
        except Exception:  # noqa: BLE001
            other = None
        finally:
            for m in root.modules():
                m.training = flags[id(m)]
        if other != _source(graph)[0]:
            why = (f"{type(root).__name__}.forward traces differently in train and eval mode, so "
                   f"fuse() cannot rewrite it")
            for p in plans:
                if p[0] != "relu_module":
                    reasons[p[1].target] = why
            plans = [p for p in plans if p[0] == "relu_module"]
            rewrite = False
    fused, replaced = [], []
    record = dict(rec or {})
    record.setdefault("bn", [])
    record.setdefault("relu", [])
    for plan in plans:
        kind, n = plan[0], plan[1]
        name = n.target
        bn = getattr(root, name)
        cls = BatchNormAddReLU2d if kind == "add_relu" else BatchNormReLU2d
        try:
            new = convert_bn(bn, cls)
        except Exception as e:  # noqa: BLE001 - a _Skip from fuse.py
            reasons[name] = str(e)
            continue
        setattr(root, name, new)
        replaced.append(bn)
        record["bn"].append(name)
        where = f"{type(root).__name__}.forward"
        if kind == "relu_module":
            relu = getattr(root, plan[2].target)
            marker = marker_cls(relu.inplace)
            marker.training = relu.training
            setattr(root, plan[2].target, marker)
            replaced.append(relu)
            record["relu"].append(plan[2].target)
            fused.append((join(qname, name), f"BatchNorm2d + ReLU '{join(qname, plan[2].target)}' "
                                             f"-> BatchNormReLU2d + FusedReLU (fx, {where})"))
        elif kind == "relu_graph":
            relu = plan[2]
            relu.replace_all_uses_with(relu.args[0])
            graph.erase_node(relu)
            fused.append((join(qname, name), f"BatchNorm2d + ReLU -> BatchNormReLU2d ({where} "
                                             f"rewritten by fx)"))
        else:
            relu, other, add, chain, chain2 = plan[2:]
            with graph.inserting_before(add):
                module = graph.get_attr(name)
                node = graph.call_function(bn_add_relu, (module, n.args[0], other))
            relu.replace_all_uses_with(node)
            for dead in [relu, *reversed(chain2), add, *reversed(chain), n]:
                graph.erase_node(dead)
            fused.append((join(qname, name), f"BatchNorm2d + add + ReLU -> BatchNormAddReLU2d "
                                             f"({where} rewritten by fx)"))
    record["reasons"] = {k: v for k, v in reasons.items()}
    if rewrite and any(p[0] != "relu_module" for p in plans):
        graph.lint()
        src, globs = _source(graph)
        root.__dict__["forward"] = FxForward(root, _compile(src, globs), src)
        record["forward"] = True
    if record["bn"]:
        root.__dict__[RECORD] = record
    return fused, reasons, replaced


def unfuse_module(root: nn.Module, convert_bn, relu_cls=nn.ReLU) -> List[str]:
    """Undo what fuse_module did to `root`: restore the class's forward, nn.BatchNorm2d and
    nn.ReLU children. Returns the names of the restored BatchNorm children."""
    rec = root.__dict__.pop(RECORD, None)
    if rec is None:
        return []
    root.__dict__.pop("forward", None)
    done = []
    for name in rec.get("bn", []):
        bn = getattr(root, name)
        if type(bn) in (BatchNormReLU2d, BatchNormAddReLU2d):
            setattr(root, name, convert_bn(bn, nn.BatchNorm2d))
            done.append(name)
    for name in rec.get("relu", []):
        marker = getattr(root, name)
        relu = relu_cls(inplace=getattr(marker, "inplace", False))
        relu.training = marker.training
        setattr(root, name, relu)
    return done

"""Exporting fused models: ONNX, TorchScript tracing, portable ``torch.export`` programs.

While a model is being exported (``torch.onnx.export``, with either exporter, ``torch.jit.trace``
or ``torch.export.export``), fastres' modules run the same computation with standard PyTorch
operators: convolution, ``batch_norm``, add, ReLU. The exported graph then holds no
``fastres::`` operator and runs wherever PyTorch / ONNX runs (ONNX Runtime folds the
BatchNormalization into the convolution itself). The values are those of the unfused model,
which the fused kernels reproduce within the numerics rule of the README.

    torch.onnx.export(model.eval(), (x,), "model.onnx")    # plain ONNX: Conv, BatchNormalization,
                                                            # Add, Relu
    fastres.export_onnx(model, x, "model.onnx")            # the same, checked (eval mode, ...)
    ep = torch.export.export(model.eval(), (x,))           # standard aten ops only
    with fastres.keep_fused_ops():                          # keep torch.ops.fastres.* in the
        ep = torch.export.export(model.eval(), (x,))       # program (AOTInductor on a machine
                                                            # with fastres installed)

Training-mode graphs export the same way (BatchNorm in training mode, running statistics
updated as by ``nn.BatchNorm2d``); :func:`export_onnx` refuses them, because an ONNX inference
graph of a model in training mode would normalise with the batch statistics.
"""
import contextlib
import os
from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = ["exporting", "keep_fused_ops", "export_onnx"]

_KEEP_FUSED_OPS = False


def exporting() -> bool:
    """True while an exporter traces the model (and :func:`keep_fused_ops` is not active):
    fastres' modules then emit standard PyTorch operators instead of ``fastres::`` ones."""
    if _KEEP_FUSED_OPS:
        return False
    if torch.compiler.is_compiling():
        # torch.compile keeps the fused ops; torch.export (strict or not) does not
        return _is_exporting()
    return torch.jit.is_tracing() or _in_onnx_export() or _is_exporting()


def running_eagerly() -> bool:
    """True outside torch.compile, tracing (torch.jit.trace, ONNX) and torch.export, whatever
    :func:`keep_fused_ops` says: where Python-side caches of a module may stand in for its
    computation (fastres.nn.conv_bn's inference plans)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _in_onnx_export()
                or _is_exporting())


_ONNX_FLAGS = None


def _in_onnx_export() -> bool:
    """torch.onnx.is_in_onnx_export() without its two import statements on every call (this
    runs on every layer call of a fused model: the imports cost more than the check)."""
    global _ONNX_FLAGS
    if _ONNX_FLAGS is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
            _ONNX_FLAGS = (_flags, GLOBALS)
        except ImportError:  # another torch layout: the public function
            _ONNX_FLAGS = ()
    if not _ONNX_FLAGS:
        return torch.onnx.is_in_onnx_export()
    flags, globals_ = _ONNX_FLAGS
    return bool(globals_.in_onnx_export or flags._is_onnx_exporting)


def _is_exporting() -> bool:
    # torch.export's own flag: Dynamo in torch 2.11 folds torch.compiler.is_exporting() to
    # True in every torch.compile trace, so the flag is read directly where it exists
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    return torch.compiler.is_exporting()


@contextlib.contextmanager
def keep_fused_ops(keep: bool = True):
    """Within this context exporters see fastres' own operators (``torch.ops.fastres.*``), as
    ``torch.compile`` does: for ``torch.export`` + AOTInductor on machines that have fastres
    installed (the compiled package calls the operators through PyTorch's dispatcher, so
    ``import fastres`` must precede loading it). ONNX and TorchScript have no such operators."""
    global _KEEP_FUSED_OPS
    previous, _KEEP_FUSED_OPS = _KEEP_FUSED_OPS, bool(keep)
    try:
        yield
    finally:
        _KEEP_FUSED_OPS = previous


def export_onnx(model: nn.Module, example: Any, path: "str | os.PathLike", *,
                dynamo: bool = True, opset_version: Optional[int] = None, check: bool = True,
                **kwargs) -> str:
    """Export `model` (in eval mode) to an ONNX file at `path` holding only standard ONNX
    operators; returns the path.

    example: one input tensor or a tuple of inputs. dynamo: the torch.export-based exporter
    (default) or the TorchScript-based one (``dynamo=False``). check: run ``onnx.checker`` on the
    result and make sure no fastres operator is in it (needs the ``onnx`` package). Other keyword
    arguments go to ``torch.onnx.export``. Plain ``torch.onnx.export`` works as well; this only
    adds the checks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.export_onnx: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fastres.export_onnx: the model is in training mode ({len(training)} module(s), "
            f"e.g. {training[0]!r}); call model.eval() first. An ONNX inference graph of a "
            f"training-mode model would normalise every input with its own batch statistics "
            f"and drop the running-statistics update")
    args = example if isinstance(example, tuple) else (example,)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"fastres.export_onnx: example input {i} must be a Tensor, got "
                            f"{type(a).__name__}")
    path = os.fspath(path)
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if _KEEP_FUSED_OPS:
        raise RuntimeError("fastres.export_onnx: called inside fastres.keep_fused_ops(); ONNX "
                           "has no fastres operators")
    torch.onnx.export(model, args, path, dynamo=dynamo, **kwargs)
    if check:
        try:
            import onnx
        except ImportError:
            raise ImportError("fastres.export_onnx(check=True) needs the onnx package: "
                              "pip install onnx (or pass check=False)") from None
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
        foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                          if "fastres" in n.domain or "fastres" in n.op_type})
        if foreign:
            raise RuntimeError(f"fastres.export_onnx: the exported graph holds fastres "
                               f"operators {foreign}")
    return path

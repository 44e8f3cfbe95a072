"""Loading weights into fastres models: ``weights=`` of the model functions.

``weights`` is one of
  * ``None``: keep the random initialisation;
  * a path (``str`` or ``os.PathLike``) to a file written by ``torch.save`` holding a
    state_dict, or a dict with the state_dict under ``"state_dict"`` or ``"model"`` (the usual
    training-checkpoint layouts); it is read with
    ``torch.load(path, map_location="cpu", weights_only=True)``;
  * a state_dict mapping (or such a checkpoint dict) already in memory.

Loading is strict. Before anything is copied the keys and shapes are compared with the
model's, so a checkpoint of another architecture fails with one ``ValueError`` that lists the
missing keys, unexpected keys and shape mismatches, instead of PyTorch's wall of text. Keys
prefixed ``module.`` (DataParallel/DistributedDataParallel) or ``_orig_mod.`` (torch.compile)
throughout are accepted and the prefix dropped.

Nothing is ever downloaded. torchvision's ImageNet weights load as they are, e.g.
``fastres.models.resnet50(weights=torchvision_model.state_dict())``.
"""
import os
from collections.abc import Mapping
from typing import Any, Union

import torch
import torch.nn as nn

__all__ = ["WeightsLike", "load_weights", "read_checkpoint", "extract_state_dict"]

WeightsLike = Union[None, str, os.PathLike, Mapping]

_CONTAINER_KEYS = ("state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many keys of each kind an error message lists


def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    Raises FileNotFoundError when `path` does not exist, and RuntimeError (naming the path)
    when the file cannot be read as a checkpoint: corrupt, truncated, not written by
    torch.save, or holding objects other than tensors and plain containers.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, bad pickle, EOF, non-weights objects, a directory...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(
            f"weights file {path!r} is not a valid checkpoint: torch.load(weights_only=True) "
            f"failed with {type(e).__name__}: {reason[:300]}") from e


def extract_state_dict(obj: Any, source: str = "weights") -> dict:
    """The state_dict inside `obj`: obj itself, or obj["state_dict"] / obj["model"]."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source} does not hold a state_dict: expected a mapping of parameter "
                        f"names to tensors, got {type(obj).__name__}")
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    state_dict = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _listing(what: str, items: list) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"  {len(items)} {what}: {shown}{more}"


def _shape(v) -> str:
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


def check_state_dict(model: nn.Module, state_dict: Mapping, source: str = "weights") -> None:
    """Raise ValueError if `state_dict` does not fit `model` exactly (keys and shapes)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [str(k) for k in state_dict if k not in expected]
    mismatched = [f"{k} {_shape(v)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected
                  and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} do not match {type(model).__name__} "
             f"({len(expected)} entries expected, {len(state_dict)} given); is it a checkpoint "
             f"of another architecture or number of classes?"]
    if missing:
        lines.append(_listing("missing keys", missing))
    if unexpected:
        lines.append(_listing("unexpected keys", unexpected))
    if mismatched:
        lines.append(_listing("shape mismatches", mismatched))
    raise ValueError("\n".join(lines))


def load_weights(model: nn.Module, weights: WeightsLike) -> nn.Module:
    """Load `weights` (None, a checkpoint path or a state_dict) into `model`, strictly."""
    if weights is None:
        return model
    if isinstance(weights, (str, os.PathLike)):
        source = f"weights from {os.fspath(weights)!r}"
        obj = read_checkpoint(weights)
    elif isinstance(weights, Mapping):
        source, obj = "weights", weights
    else:
        raise TypeError(f"weights must be None, a path to a checkpoint or a state_dict, "
                        f"got {type(weights).__name__}")
    state_dict = extract_state_dict(obj, source)
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model

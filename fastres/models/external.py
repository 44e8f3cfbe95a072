"""Models from other libraries, fused with ``fastres.fuse``: ``get_model("timm:resnet50")``.

timm is optional; without it a ``timm:`` name is an ImportError that says ``pip install timm``.
Nothing is downloaded: the model is built with ``pretrained=False`` (load weights with
``weights=``, a timm or fastres state_dict or checkpoint path; the keys are timm's, unchanged
by fuse).
"""
from typing import Optional

import torch.nn as nn

from .weights import WeightsLike, load_weights

__all__ = ["PREFIX", "is_external", "timm_available", "check_timm_name", "timm_model"]

PREFIX = "timm:"


def is_external(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ImportError("timm models ('timm:NAME') need the timm package: pip install timm") \
            from None
    return timm


def timm_available() -> bool:
    try:
        _timm()
    except ImportError:
        return False
    return True


def check_timm_name(name: str) -> str:
    """The timm model name of 'timm:NAME' (or NAME); raises ImportError without timm and
    ValueError for a name timm does not know."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    timm = _timm()
    if not name or name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:10] if name else []
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r} (timm.list_models() lists the names{hint})")
    return name


def timm_model(name: str, *, fused: bool = True, num_classes: Optional[int] = None,
               weights: WeightsLike = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)``, with `weights` loaded
    strictly, then ``fastres.fuse``d (in place, the fx pass included) when `fused`."""
    name = check_timm_name(name)
    timm = _timm()
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_weights(model, weights)
    if fused:
        from ..fuse import fuse
        model = fuse(model, warn=False)
    return model

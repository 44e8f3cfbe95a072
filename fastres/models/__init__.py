"""Model zoo: ResNets with fused BatchNorm/ReLU/residual, like ``torchvision.models``.

    import fastres.models
    model = fastres.models.resnet50()                              # fused, torchvision layout
    model = fastres.models.resnet50(weights=tv_model.state_dict())  # or a checkpoint path
    model = fastres.models.get_model("resnet20", shortcut="B")     # CIFAR-10 (He et al.)
    fastres.models.list_models()

ImageNet: ``resnet18/34/50/101/152`` and their plain twins ``plain18/34/50/101/152``, with
torchvision's state_dict keys (checkpoints load both ways). CIFAR-10 (6n+2 layers):
``resnet20/32/44/56/110/1202`` and ``plain20/32/44/56/110``. Every function takes the keyword
arguments ``weights``, ``fused``, ``num_classes``, ``shortcut`` and ``zero_init_residual``.
"""
from typing import Callable, Dict, List

import torch.nn as nn

from .cifar import (CifarResNet, plain20, plain32, plain44, plain56, plain110, resnet20,
                    resnet32, resnet44, resnet56, resnet110, resnet1202)
from .resnet import (ResNet, plain18, plain34, plain50, plain101, plain152, resnet18, resnet34,
                     resnet50, resnet101, resnet152)
from .external import is_external, timm_model
from .weights import load_weights

_MODELS: Dict[str, Callable[..., nn.Module]] = {fn.__name__: fn for fn in (
    resnet18, resnet34, resnet50, resnet101, resnet152,
    plain18, plain34, plain50, plain101, plain152,
    resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202,
    plain20, plain32, plain44, plain56, plain110,
)}


def list_models() -> List[str]:
    """The names of all models, sorted (those accepted by get_model)."""
    return sorted(_MODELS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The function that builds model `name` (case-insensitive)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _MODELS[key]


def get_model(name: str, **kwargs) -> nn.Module:
    """Build model `name` with keyword arguments `kwargs`, e.g.
    ``get_model("resnet50", weights="ckpt.pt", fused=True)``. ``"timm:NAME"`` builds timm's
    model NAME (``pretrained=False``) and fuses it with ``fastres.fuse`` when ``fused``
    (timm optional: see ``fastres.models.external``)."""
    if is_external(name):
        return timm_model(name, **kwargs)
    return get_model_builder(name)(**kwargs)


__all__ = [
    "CifarResNet", "ResNet", "get_model", "get_model_builder", "list_models", "load_weights",
    *_MODELS,
]

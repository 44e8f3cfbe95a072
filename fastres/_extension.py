"""Loads the compiled extension fastres._C and checks it matches the installed torch."""
import torch

from .version import __version__

_REBUILD = "rebuild it against the installed torch:  pip install -e . --no-build-isolation"


def load():
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            f"fastres could not load its compiled extension fastres._C ({e}). "
            f"It is built by `pip install -e . --no-build-isolation`; if torch was upgraded "
            f"or reinstalled since, {_REBUILD}"
        ) from e
    info = dict(_C.build_info())
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"fastres._C was built against torch {info['torch_version']} but torch "
            f"{torch.__version__} is installed; {_REBUILD}"
        )
    return _C


_C = load()


def build_info() -> dict:
    """How the extension was built: version, torch version, CUDA on/off and GPU archs."""
    info = dict(_C.build_info())
    return info

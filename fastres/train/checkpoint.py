"""Checkpoints of fastres-train: atomic writes, ``weights_only``-loadable content, clear errors.

A checkpoint is a dict with ``format`` = ``FORMAT``, ``model`` (state_dict), ``optimizer``,
``scheduler``, ``scaler``, ``ema``, ``epoch``, ``iteration``, ``best_val_err``, ``rng`` (Python,
NumPy, torch CPU/CUDA and the data-loader generator, as tensors/lists/ints) and ``args`` (the
run's arguments as a plain dict). Everything is a tensor or a plain Python value, so
``torch.load(path, weights_only=True)`` reads it.
"""
import os
import random
import tempfile
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT = "fastres-train-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


def save_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` with torch.save to a temporary file in the same directory, fsync it and
    ``os.replace`` it onto ``path``: a crash at any point leaves the previous file intact."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load and validate a fastres-train checkpoint; raise CheckpointError on any problem."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): truncated or corrupt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors of all kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: the file is corrupt, truncated or not a "
            f"torch.save file ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else \
            f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        raise CheckpointError(
            f"{path!r} is not a fastres-train checkpoint (expected format {FORMAT!r}, "
            f"found {what})")
    for key in ("model", "args", "epoch", "iteration"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path!r} is incomplete: no {key!r} entry")
    return ckpt


def check_compatible(ckpt: Dict[str, Any], path: str, model_name: str, num_classes: int) -> None:
    saved = ckpt["args"].get("model")
    if saved != model_name:
        raise CheckpointError(
            f"checkpoint {path!r} holds model {saved!r}, but this run trains {model_name!r} "
            f"(pass --model {saved} or another checkpoint)")
    saved_nc = ckpt.get("num_classes")
    if saved_nc is not None and int(saved_nc) != int(num_classes):
        raise CheckpointError(
            f"checkpoint {path!r} has {saved_nc} classes, but the data has {num_classes}")


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str,
                     what: str = "model") -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {path!r}: {what} weights do not fit this model: "
                              + " ".join(m.strip() for m in msg[:4])) from None


# -- RNG states as weights_only-friendly values ---------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    py = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    npst = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(npst[1].astype(np.int64)), "pos": int(npst[2]),
                  "has_gauss": int(npst[3]), "cached_gaussian": float(npst[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception as e:  # e.g. another number of devices than when it was saved
            warnings.warn(f"CUDA RNG state not restored ({type(e).__name__}: {e}); the resumed "
                          f"run's CUDA random numbers will differ", RuntimeWarning)


def plain(value: Any) -> Any:
    """Arguments as plain Python values (lists, dicts, str, numbers, bool, None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def find_resume(resume: Optional[str], out_dir: str) -> Optional[str]:
    """``auto`` -> OUT/last.pt when it exists (else start afresh); a path -> that path."""
    if not resume:
        return None
    if resume == "auto":
        p = os.path.join(out_dir, "last.pt")
        return p if os.path.exists(p) else None
    return resume

"""Images/s and peak memory of whole ResNets: fastres fused vs torchvision eager vs
torch.compile, for a training step (forward, backward, SGD) and for inference.

The command-line front end is ``python -m fastres.bench`` (fastres.bench.cli); this module
runs the measurements:

    rows = run_models(["resnet50"], modes=["train", "infer"],
                      variants=["torchvision", "fastres", "torchvision compile"],
                      batch_size=256, image_size=224, dtype=torch.bfloat16,
                      channels_last=True, device="cuda")

``conv_backend`` ("cudnn", "triton" or "auto", see fastres.set_conv_backend) picks the
convolutions of the fastres variants (run inside ``fastres.conv_backend``); their rows carry it
as ``conv_backend``. The torchvision variants are unaffected.

A variant that cannot run (out of memory, a compile or Triton failure) gives a row with
``error`` set instead of stopping the whole run.
"""
import contextlib
import gc
from typing import Callable, Iterable, List, Optional

import torch

import fastres

from .timing import measure
from .workloads import make_model, make_model_step

__all__ = ["VARIANTS", "run_models", "measure_model", "uses_conv_backend"]

VARIANTS = ["torchvision", "fastres", "torchvision compile", "fastres compile"]


def uses_conv_backend(variant: str) -> bool:
    """Does the conv backend apply to `variant`? (the fastres fused models)"""
    return variant.split()[0] == "fastres"


def measure_model(name: str, variant: str, mode: str, *, batch_size: int, image_size: int,
                  dtype: torch.dtype, channels_last: bool, device, warmup: int,
                  iters: int, conv_backend: str = "cudnn") -> dict:
    """One measurement: images/s, ms per step and peak GiB of `variant` of model `name`; the
    fastres variants run their convolutions with `conv_backend`."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch._dynamo.reset()
    ctx = (fastres.conv_backend(conv_backend) if uses_conv_backend(variant)
           else contextlib.nullcontext())
    with ctx:
        model = make_model(name, variant, device, channels_last)
        step, model = make_model_step(model, mode, batch_size, image_size, dtype, channels_last,
                                      device)
        m = measure(step, device, warmup=warmup, iters=iters)
    return {"images_per_s": m.per_second(batch_size), **m.as_dict()}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_models(models: Iterable[str], modes: Iterable[str], variants: Iterable[str], *,
               batch_size: int, image_size: int, dtype: torch.dtype, channels_last: bool,
               device, warmup: int = 5, iters: int = 20, conv_backend: str = "cudnn",
               progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Measure every (model, mode, variant); one dict per measurement, in that order.

    conv_backend: the convolutions of the fastres variants (their rows record it).
    progress: called with a short description before each measurement starts.
    """
    device = torch.device(device)
    rows = []
    for name in models:
        for mode in modes:
            for variant in variants:
                conv = uses_conv_backend(variant)
                if progress is not None:
                    progress(f"{name} {mode} {variant}"  # names a conv backend but the default
                             + (f" ({conv_backend} conv)" if conv and conv_backend != "cudnn"
                                else ""))
                row = {"model": name, "mode": mode, "variant": variant}
                if conv:
                    row["conv_backend"] = conv_backend
                try:
                    row.update(measure_model(name, variant, mode, batch_size=batch_size,
                                             image_size=image_size, dtype=dtype,
                                             channels_last=channels_last, device=device,
                                             warmup=warmup, iters=iters,
                                             conv_backend=conv_backend))
                except Exception as e:  # out of memory, torch.compile and Triton errors
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    row["error"] = f"{type(e).__name__}: {first[:200]}"
                _release(device)
                rows.append(row)
    return rows

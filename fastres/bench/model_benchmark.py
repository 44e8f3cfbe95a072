"""Images/s and peak memory of whole ResNets: fastres fused vs torchvision eager vs
torch.compile, for a training step (forward, backward, SGD) and for inference.

The command-line front end is ``python -m fastres.bench`` (fastres.bench.cli); this module
runs the measurements:

    rows = run_models(["resnet50"], modes=["train", "infer"],
                      variants=["torchvision", "fastres", "torchvision compile"],
                      batch_size=256, image_size=224, dtype=torch.bfloat16,
                      channels_last=True, device="cuda")

A variant that cannot run (out of memory, a compile failure) gives a row with ``error`` set
instead of stopping the whole run.
"""
import gc
from typing import Callable, Iterable, List, Optional

import torch

from .timing import measure
from .workloads import make_model, make_model_step

__all__ = ["VARIANTS", "run_models", "measure_model"]

VARIANTS = ["torchvision", "fastres", "torchvision compile", "fastres compile"]


def measure_model(name: str, variant: str, mode: str, *, batch_size: int, image_size: int,
                  dtype: torch.dtype, channels_last: bool, device, warmup: int,
                  iters: int) -> dict:
    """One measurement: images/s, ms per step and peak GiB of `variant` of model `name`."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch._dynamo.reset()
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
               device, warmup: int = 5, iters: int = 20,
               progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Measure every (model, mode, variant); one dict per measurement, in that order.

    progress: called with a short description before each measurement starts.
    """
    device = torch.device(device)
    rows = []
    for name in models:
        for mode in modes:
            for variant in variants:
                if progress is not None:
                    progress(f"{name} {mode} {variant}")
                row = {"model": name, "mode": mode, "variant": variant}
                try:
                    row.update(measure_model(name, variant, mode, batch_size=batch_size,
                                             image_size=image_size, dtype=dtype,
                                             channels_last=channels_last, device=device,
                                             warmup=warmup, iters=iters))
                except (RuntimeError, torch.OutOfMemoryError) as e:  # includes compile errors
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    row["error"] = f"{type(e).__name__}: {first[:200]}"
                _release(device)
                rows.append(row)
    return rows

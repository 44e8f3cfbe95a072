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

On a CPU, ``run_cpu_suite`` and ``run_cpu_op_suite`` (``python -m fastres.bench --suite cpu``)
compare fastres with plain PyTorch the way its CPU targets are stated: the fused model against
the same network from plain PyTorch ops (and torchvision's, and torch.compile's) with the same
weights, and the fused ops against eager PyTorch's separate ops (and torch.compile of them),
every variant timed side by side in one process (``measure_side_by_side``).
"""
import contextlib
import gc
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

import fastres

from .heap import minor_page_faults
from .timing import Measurement, measure
from .workloads import make_model, make_model_step

__all__ = ["VARIANTS", "run_models", "measure_model", "uses_conv_backend", "CPU_SUITE",
           "CPU_VARIANTS", "measure_side_by_side", "run_cpu_suite", "run_cpu_op_suite"]

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


# ---------------------------------------------------------------------------------------------
# The CPU suite (issue 14): fastres against plain PyTorch, side by side in one process
# ---------------------------------------------------------------------------------------------
# (model, batch, image size, channels_last): the configurations the CPU targets are set on
CPU_SUITE = [("resnet20", 64, 32, False), ("resnet20", 64, 32, True),
             ("resnet18", 16, 112, False), ("resnet18", 16, 112, True),
             ("resnet50", 8, 112, False), ("resnet50", 8, 112, True)]
CPU_VARIANTS = ["fastres", "plain", "torchvision", "torchvision compile"]


def measure_side_by_side(steps: Dict[str, Callable[[], None]], warmup: int, iters: int,
                         timer: Callable[[], float] = time.perf_counter,
                         faults: Callable[[], Optional[int]] = minor_page_faults
                         ) -> Dict[str, Measurement]:
    """Time several steps against each other: after `warmup` rounds, `iters` rounds in each of
    which every step runs once, the order rotating from round to round, so that a slower or
    busier moment of a shared machine falls on all of them alike. Median, min and max per
    step, in ms, and the minor page faults per call (read outside the timed interval)."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    counting = faults() is not None  # no counter on this OS: no count rather than a wrong one
    faulted = dict.fromkeys(names, 0)
    for i in range(iters):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            f0 = faults() if counting else 0
            t0 = timer()
            steps[name]()
            times[name].append((timer() - t0) * 1e3)
            if counting:
                faulted[name] += faults() - f0
    return {name: Measurement(ms=statistics.median(t), ms_min=min(t), ms_max=max(t),
                              iters=iters, peak_bytes=None, timer="perf_counter",
                              minor_faults=faulted[name] / iters if counting else None)
            for name, t in times.items()}


def _suite_models(name: str, variants: Iterable[str], channels_last: bool, device):
    """{variant: model} with the same weights (the plain model's); "torchvision" only where
    torchvision has the model (elsewhere it would be the plain model again)."""
    import torchvision

    plain = fastres.models.get_model(name, fused=False)
    weights = plain.state_dict()
    models = {}
    for variant in variants:
        if variant == "torchvision" and not hasattr(torchvision.models, name):
            continue
        models[variant] = make_model(name, variant, device, channels_last, state_dict=weights)
    return models


def run_cpu_suite(configs=None, modes: Iterable[str] = ("train", "infer"),
                  variants: Iterable[str] = ("fastres", "plain", "torchvision"), *,
                  warmup: int = 2, iters: int = 7,
                  progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Images/s of the variants of each CPU_SUITE configuration (fp32), measured side by side
    (measure_side_by_side) on models with the same weights. One row per (configuration, mode,
    variant) with model, batch, image_size, layout, mode, variant, images_per_s (of the
    median step) and the Measurement's fields; a variant that fails gets "error"."""
    device = torch.device("cpu")
    rows = []
    for name, batch, size, channels_last in (configs or CPU_SUITE):
        layout = "channels_last" if channels_last else "NCHW"
        for mode in modes:
            if progress is not None:
                progress(f"{name} b{batch}@{size} {layout} {mode}")
            torch._dynamo.reset()
            base = {"model": name, "batch": batch, "image_size": size, "layout": layout,
                    "mode": mode}
            steps, failed = {}, {}
            for variant, model in _suite_models(name, variants, channels_last, device).items():
                try:
                    steps[variant], _ = make_model_step(model, mode, batch, size, torch.float32,
                                                        channels_last, device)
                    steps[variant]()  # compiles a compile variant (not timed)
                except Exception as e:  # compile errors
                    failed[variant] = f"{type(e).__name__}: {str(e).strip()[:200]}"
                    steps.pop(variant, None)
            results = measure_side_by_side(steps, warmup, iters) if steps else {}
            for variant in variants:
                row = {**base, "variant": variant}
                if variant in results:
                    m = results[variant]
                    row.update(images_per_s=m.per_second(batch), **m.as_dict())
                elif variant in failed:
                    row["error"] = failed[variant]
                else:
                    continue  # not a torchvision model
                rows.append(row)
            _release(device)
    return rows


def run_cpu_op_suite(batch: int = 2, layouts: Iterable[bool] = (False, True),
                     impls: Iterable[str] = ("eager", "fastres:cpu"), *, warmup: int = 3,
                     iters: int = 25, progress: Optional[Callable[[str], None]] = None
                     ) -> List[dict]:
    """Forward+backward of every ResNet-50 BatchNorm shape (RESNET50_BN_SHAPES, fp32, training
    mode) with each implementation ("eager": F.batch_norm + add + relu, "compile":
    torch.compile of that, "fastres:cpu"), side by side. One row per (shape, layout) with
    op, shape, count, layout and {impl: Measurement dict} under "ms"."""
    from .workloads import RESNET50_BN_SHAPES, make_op_step

    rows = []
    for channels_last in layouts:
        layout = "channels_last" if channels_last else "NCHW"
        for case in RESNET50_BN_SHAPES:
            if progress is not None:
                progress(f"{case.name} {layout}")
            steps = {impl: make_op_step(case, batch, torch.float32, channels_last, "cpu", impl,
                                        True) for impl in impls}
            results = measure_side_by_side(steps, warmup, iters)
            rows.append({"op": case.op, "shape": [batch, case.channels, case.hw, case.hw],
                         "count": case.count, "layout": layout,
                         "ms": {impl: m.as_dict() for impl, m in results.items()}})
    return rows

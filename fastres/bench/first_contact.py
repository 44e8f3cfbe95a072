"""The headline GPU measurement of ``scripts/gpu_check.sh first`` (and ``second``), side by side
in one process:

* whole models (ResNet-50 by default; batch 256, AMP bf16, channels_last): torchvision eager,
  fastres with cuDNN convolutions, fastres with Triton convolutions, fastres with cuDNN's
  graph-API fusions (conv backend "cudnn-fused"), torchvision torch.compile; a training step (forward, loss, backward, SGD) and inference: images/s, peak
  GiB, and the first step's seconds (compilation and autotuning included) apart;
* the fused BatchNorm+add+ReLU op (ResNet-50's 256x56x56 shape, training forward+backward and
  forward) on every fastres GPU backend and in eager PyTorch, as bytes/s and as a fraction of
  a device-to-device copy measured in the same process.

    python -m fastres.bench.first_contact --out DIR [--models resnet50] [--budget SECONDS]

Everything goes to ``DIR/first.json`` (``--name`` changes the file name), rewritten after every
measurement, so a run that is killed keeps what it measured. A measurement that fails is a row
with ``error``; once ``--budget`` seconds have passed, the remaining ones are rows with
``skipped`` (torch.compile ones are skipped when less than ``--compile-reserve`` is left).
Cheap measurements run first. Exit status 1 if any measurement failed.
"""
import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

import torch

__all__ = ["main", "MODEL_VARIANTS"]

# key: (label, make_model variant, conv backend or None)
MODEL_VARIANTS = {
    "eager": ("torchvision eager", "torchvision", None),
    "cudnn": ("fastres (cudnn conv)", "fastres", "cudnn"),
    "triton": ("fastres (triton conv)", "fastres", "triton"),
    "cudnn-fused": ("fastres (cudnn-fused conv)", "fastres", "cudnn-fused"),
    "compile": ("torchvision compile", "torchvision compile", None),
}
OP_IMPLS = ["eager", "fastres:cuda", "fastres:triton"]


def _nvidia_smi() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                               "clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Run:
    """The JSON document, written after every change."""

    def __init__(self, path: str, device: str, budget: float, compile_reserve: float,
                 settings: dict):
        from .report import environment

        self.path, self.device = path, torch.device(device)
        self.budget, self.compile_reserve = budget, compile_reserve
        self.start = time.time()
        self.doc = {"kind": "first-contact", "environment": environment(self.device),
                    "nvidia_smi": _nvidia_smi(), "settings": settings, "copy_bandwidth": None,
                    "ops": [], "models": []}
        self.save()

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.path)


def measure_models(run: Run, models: List[str], modes: List[str], batch: int, size: int,
                   dtype: torch.dtype, warmup: int, iters: int,
                   variants: Optional[List[str]] = None) -> None:
    import fastres

    from .timing import measure, synchronize
    from .workloads import make_model, make_model_step

    device = run.device
    torch.backends.cudnn.benchmark = True
    for name in models:
        for mode in modes:
            for key in (variants or list(MODEL_VARIANTS)):
                label, variant, conv = MODEL_VARIANTS[key]
                row = {"model": name, "mode": mode, "variant": label}
                reserve = run.compile_reserve if "compile" in variant else 0
                if run.left() < reserve or run.left() <= 0:
                    row["skipped"] = f"time budget ({run.budget:.0f} s) spent"
                    run.doc["models"].append(row)
                    run.save()
                    continue
                print(f"[{run.elapsed():5.0f} s] {name} {mode} {label}", flush=True)
                torch._dynamo.reset()
                try:
                    ctx = fastres.conv_backend(conv) if conv else contextlib.nullcontext()
                    with ctx:
                        model = make_model(name, variant, device, True)
                        step, model = make_model_step(model, mode, batch, size, dtype, True,
                                                      device)
                        synchronize(device)
                        t0 = time.time()
                        step()  # compilation / autotuning / cudnn.benchmark search
                        synchronize(device)
                        row["first_step_s"] = time.time() - t0
                        m = measure(step, device, warmup=warmup, iters=iters)
                    row.update(images_per_s=m.per_second(batch), **m.as_dict())
                except Exception as e:  # noqa: BLE001 - out of memory, compile, Triton errors
                    row["error"] = _error(e)
                model = step = None
                _release()
                run.doc["models"].append(row)
                run.save()


def measure_ops(run: Run, batch: int, dtype: torch.dtype, warmup: int, iters: int,
                channels: int = 256, hw: int = 56) -> None:
    import fastres

    from .timing import copy_bandwidth, measure
    from .workloads import OpCase, make_op_step, op_bytes

    device = run.device
    copy = copy_bandwidth(device)
    run.doc["copy_bandwidth"] = copy
    run.save()
    case = OpCase("bn_add_relu", channels, hw, 3)
    available = fastres.available_backends()
    impls = OP_IMPLS if device.type == "cuda" else ["eager", "fastres:cpu"]
    for backward in (True, False):
        for impl in impls:
            row = {"op": case.name, "batch": batch, "backward": backward, "impl": impl}
            if impl.startswith("fastres:") and impl.split(":")[1] not in available:
                row["error"] = f"backend {impl.split(':')[1]} is not available here"
            else:
                try:
                    step = make_op_step(case, batch, dtype, True, device, impl, backward)
                    m = measure(step, device, warmup=warmup, iters=iters)
                    nbytes = op_bytes(case, batch, dtype, backward)
                    row.update(ms=m.ms, bytes_per_s=m.per_second(nbytes),
                               copy_fraction=m.per_second(nbytes) / copy)
                except Exception as e:  # noqa: BLE001
                    row["error"] = _error(e)
                _release()
            run.doc["ops"].append(row)
            run.save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastres.bench.first_contact",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON")
    p.add_argument("--name", default="first.json")
    p.add_argument("--models", default="resnet50")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke test of this script (tiny sizes), not a measurement")
    p.add_argument("--variants", default=",".join(MODEL_VARIANTS),
                   help="of " + ", ".join(f"{k} ({v[0]})" for k, v in MODEL_VARIANTS.items())
                        + "; in this order")
    p.add_argument("--op-shape", default="256x56", help="channels x size of the fused op")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds; measurements not started by then are skipped")
    p.add_argument("--compile-reserve", type=float, default=120.0,
                   help="seconds a torch.compile measurement needs at least")
    p.add_argument("--no-ops", action="store_true", help="skip the op bandwidth")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or any(v not in MODEL_VARIANTS for v in variants):
        p.error(f"--variants takes {', '.join(MODEL_VARIANTS)}, got {args.variants!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA device (--device cpu only smoke-tests the script)")
    try:
        op_channels, op_hw = (int(v) for v in args.op_shape.split("x"))
    except ValueError:
        p.error(f"--op-shape must be CHANNELSxSIZE, got {args.op_shape!r}")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("train", "infer") for m in modes):
        p.error("--modes takes train and/or infer")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    settings = dict(batch_size=args.batch_size, image_size=args.image_size,
                    dtype=args.dtype if args.dtype == "fp32" else f"AMP {args.dtype}",
                    layout="channels_last", warmup=args.warmup,
                    iters=args.iters, conv_autotune=os.environ.get("FASTRES_CONV_AUTOTUNE", "1"),
                    budget_s=args.budget)
    run = Run(os.path.join(args.out, args.name), args.device, args.budget, args.compile_reserve,
              settings)
    if not args.no_ops:
        measure_ops(run, args.batch_size, dtype, args.warmup, args.iters, op_channels, op_hw)
    measure_models(run, [m for m in args.models.split(",") if m], modes, args.batch_size,
                   args.image_size, dtype, args.warmup, args.iters, variants)
    run.doc["seconds"] = run.elapsed()
    run.save()
    from .gpu_status import headline_markdown

    print(headline_markdown(run.doc))
    failed = [r for r in run.doc["models"] + run.doc["ops"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

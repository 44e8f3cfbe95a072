"""The headline GPU measurement of ``scripts/gpu_check.sh first`` (and ``second``), side by side
in one process:

* whole models (ResNet-50 by default; batch 256, AMP bf16, channels_last): torchvision eager,
  fastres with cuDNN convolutions, fastres with Triton convolutions, torchvision
  torch.compile; a training step (forward, loss, backward, SGD) and inference: images/s, peak
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

# (label, make_model variant, conv backend or None)
MODEL_VARIANTS = [
    ("torchvision eager", "torchvision", None),
    ("fastres (cudnn conv)", "fastres", "cudnn"),
    ("fastres (triton conv)", "fastres", "triton"),
    ("torchvision compile", "torchvision compile", None),
]
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
    torch.cuda.empty_cache()


class Run:
    """The JSON document, written after every change."""

    def __init__(self, path: str, budget: float, compile_reserve: float, settings: dict):
        from .report import environment

        self.path, self.budget, self.compile_reserve = path, budget, compile_reserve
        self.start = time.time()
        self.doc = {"kind": "first-contact", "environment": environment("cuda"),
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
                   dtype: torch.dtype, warmup: int, iters: int) -> None:
    import fastres

    from .timing import measure
    from .workloads import make_model, make_model_step

    torch.backends.cudnn.benchmark = True
    for name in models:
        for mode in modes:
            for label, variant, conv in MODEL_VARIANTS:
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
                        model = make_model(name, variant, "cuda", True)
                        step, model = make_model_step(model, mode, batch, size, dtype, True,
                                                      "cuda")
                        torch.cuda.synchronize()
                        t0 = time.time()
                        step()  # compilation / autotuning / cudnn.benchmark search
                        torch.cuda.synchronize()
                        row["first_step_s"] = time.time() - t0
                        m = measure(step, "cuda", warmup=warmup, iters=iters)
                    row.update(images_per_s=m.per_second(batch), **m.as_dict())
                except Exception as e:  # noqa: BLE001 - out of memory, compile, Triton errors
                    row["error"] = _error(e)
                model = step = None
                _release()
                run.doc["models"].append(row)
                run.save()


def measure_ops(run: Run, batch: int, dtype: torch.dtype, warmup: int, iters: int) -> None:
    import fastres

    from .timing import copy_bandwidth, measure
    from .workloads import OpCase, make_op_step, op_bytes

    copy = copy_bandwidth("cuda")
    run.doc["copy_bandwidth"] = copy
    run.save()
    case = OpCase("bn_add_relu", 256, 56, 3)
    available = fastres.available_backends()
    for backward in (True, False):
        for impl in OP_IMPLS:
            row = {"op": case.name, "batch": batch, "backward": backward, "impl": impl}
            if impl.startswith("fastres:") and impl.split(":")[1] not in available:
                row["error"] = f"backend {impl.split(':')[1]} is not available here"
            else:
                try:
                    step = make_op_step(case, batch, dtype, True, "cuda", impl, backward)
                    m = measure(step, "cuda", warmup=warmup, iters=iters)
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
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds; measurements not started by then are skipped")
    p.add_argument("--compile-reserve", type=float, default=120.0,
                   help="seconds a torch.compile measurement needs at least")
    p.add_argument("--no-ops", action="store_true", help="skip the op bandwidth")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("train", "infer") for m in modes):
        p.error("--modes takes train and/or infer")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    settings = dict(batch_size=args.batch_size, image_size=args.image_size,
                    dtype=f"AMP {args.dtype}", layout="channels_last", warmup=args.warmup,
                    iters=args.iters, conv_autotune=os.environ.get("FASTRES_CONV_AUTOTUNE", "1"),
                    budget_s=args.budget)
    run = Run(os.path.join(args.out, args.name), args.budget, args.compile_reserve, settings)
    if not args.no_ops:
        measure_ops(run, args.batch_size, dtype, args.warmup, args.iters)
    measure_models(run, [m for m in args.models.split(",") if m], modes, args.batch_size,
                   args.image_size, dtype, args.warmup, args.iters)
    run.doc["seconds"] = run.elapsed()
    run.save()
    from .gpu_status import headline_markdown

    print(headline_markdown(run.doc))
    failed = [r for r in run.doc["models"] + run.doc["ops"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

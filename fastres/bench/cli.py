"""fastres-bench / python -m fastres.bench: whole-model comparison of fastres against
torchvision eager and torch.compile.

    python -m fastres.bench                                   # GPU: ResNet-18/50/152, batch 256
    python -m fastres.bench --models resnet50 --mode infer --dtype bf16 --channels-last
    python -m fastres.bench --device cpu --models resnet18 --batch-size 2 --image-size 32
    python -m fastres.bench --models resnet50 --conv-backend triton   # Triton convolutions
    python -m fastres.bench --suite cpu [--compile]   # CPU: fastres vs plain PyTorch, ops+models

Prints a markdown table (images/s, peak GiB, speed-up of fastres over torchvision eager and
over torchvision torch.compile) and writes it, the numbers as JSON and a bar chart (PNG) to
--out. Defaults on a GPU: batch 256, 224 px, AMP bf16, channels_last, compile on, 5 warm-up
and 20 timed steps (CUDA events). On a CPU: batch 4, 64 px, fp32, NCHW, no compile, 1 + 3.
--conv-backend (cudnn by default, or triton, auto; see fastres.set_conv_backend) picks the
convolutions of the fastres models only; the table names it in their column.

--suite cpu measures what fastres promises on a CPU, every variant side by side in one process
(fastres.bench.model_benchmark.measure_side_by_side): the fused forward+backward of every
ResNet-50 BatchNorm shape (batch 2, fp32, NCHW and channels_last) against eager PyTorch's
separate ops (and, with --compile, torch.compile of them), and resnet20 (batch 64), resnet18
(16 @ 112 px) and resnet50 (8 @ 112 px), fp32, NCHW and channels_last, training and inference,
fused against the same network in plain PyTorch with the same weights, torchvision's, and with
--compile torch.compile of the plain one (Inductor's CPU backend; minutes of compilation).
--models and --mode narrow it; --iters / --warmup set the side-by-side rounds (default 7 / 2
for models, 25 / 3 for ops); --no-ops skips the op table. The op table also gives the minor page
faults per step; --keep-freed-memory keeps the memory tensors free in the process
(fastres.bench.heap.keep_freed_memory, glibc) so that no step faults its outputs in afresh,
which otherwise some processes do on every call and others never (the header says which).
"""
import argparse
import os
import sys
from typing import List, Optional

import torch

from .model_benchmark import run_models
from .report import bar_chart, environment, markdown_table, write_json
from .workloads import DTYPES

__all__ = ["main", "parse_args"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastres-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma-separated names of fastres.models.list_models() "
                        "(default: resnet18,resnet50,resnet152; with --suite cpu its models)")
    p.add_argument("--suite", choices=["cpu"], default=None,
                   help="cpu: the CPU comparison with plain PyTorch (ops and models, side by "
                        "side; see above)")
    p.add_argument("--ops", action=argparse.BooleanOptionalAction, default=True,
                   help="with --suite cpu: also the op table (default on)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="with --suite cpu: keep freed memory in the process (glibc mallopt) "
                        "instead of returning it to the kernel, for every variant alike")
    p.add_argument("--mode", choices=["train", "infer", "both"], default="both",
                   help="training step, inference, or both (default)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 4 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 224 on GPU, 64 on CPU")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="fp32, or autocast bf16/fp16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and inputs (default on GPU, off on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of both models (default on GPU, off on CPU)")
    p.add_argument("--conv-backend", choices=["cudnn", "triton", "auto"], default="cudnn",
                   help="convolutions of the fastres models (fastres.conv_backend): PyTorch's "
                        "(cuDNN), fastres' Triton ones with BatchNorm fused in, or per layer the "
                        "faster; triton on CPU needs TRITON_INTERPRET=1 (default %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (5 GPU, 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (20 GPU, 3 CPU)")
    p.add_argument("--out", default="bench_results",
                   help="directory for results.md, results.json, results.png (default %(default)s)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG chart")
    g = p.add_argument_group("data benchmark (fastres.bench.data_benchmark)")
    g.add_argument("--data", default=None, metavar="imagefolder:PATH",
                   help="measure the input pipeline (alone and feeding a training step) instead "
                        "of models; a folder: python -m fastres.data.make_imagefolder PATH")
    g.add_argument("--data-backend", default="gpu",
                   help="with --data: comma-separated backends among reference, cpu, gpu, dali "
                        "(default gpu; on a CPU device use e.g. reference,cpu)")
    g.add_argument("--workers", type=int, default=0, help="with --data: DataLoader workers")
    g.add_argument("--threads", type=int, default=None,
                   help="with --data: torch threads of the main process (per-core numbers: 1)")
    g.add_argument("--data-batches", type=int, default=None,
                   help="with --data: batches per round (default 20 GPU, 4 CPU); --iters is "
                        "the number of rounds, --warmup the warm-up batches")
    args = p.parse_args(argv)
    if args.data is not None:
        return _data_args(p, args)

    if args.suite == "cpu":
        if args.device not in (None, "cpu"):
            p.error("--suite cpu runs on the CPU (leave --device out or give cpu)")
        args.device = "cpu"
    elif args.keep_freed_memory:
        p.error("--keep-freed-memory goes with --suite cpu")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    gpu = device.type == "cuda"
    defaults = dict(batch_size=256 if gpu else 4, image_size=224 if gpu else 64,
                    dtype="bf16" if gpu else "fp32", channels_last=gpu, compile=gpu,
                    warmup=5 if gpu else 1, iters=20 if gpu else 3)
    if args.suite == "cpu":
        from .model_benchmark import CPU_SUITE

        defaults.update(warmup=2, iters=7)
        if args.models is None:
            args.models = ",".join(dict.fromkeys(name for name, *_ in CPU_SUITE))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = "resnet18,resnet50,resnet152"
    for key in ("batch_size", "image_size", "iters"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    import fastres.models
    if args.conv_backend != "cudnn":
        try:  # can the backend run here, on this device?
            with fastres.conv_backend(args.conv_backend):
                fastres.backends.resolve_conv(device)
        except RuntimeError as e:
            p.error(f"--conv-backend {args.conv_backend}: {e}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m.lower() not in fastres.models.list_models()]
    if unknown or not args.models:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(fastres.models.list_models())}")
    return args


def _data_args(p, args):
    """Defaults and checks of ``--data`` (the data benchmark)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    gpu = torch.device(args.device).type == "cuda"
    if args.models is None:
        args.models = "resnet50" if gpu else ""
    args.models = [m.strip() for m in args.models.split(",") if m.strip()][:1]
    defaults = dict(batch_size=256 if gpu else 32, dtype="bf16" if gpu else "fp32",
                    channels_last=True, warmup=2 if gpu else 1, iters=5 if gpu else 3,
                    data_batches=20 if gpu else 4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size < 1 or args.iters < 1 or args.data_batches < 1 or args.workers < 0:
        p.error("--batch-size, --iters and --data-batches must be >= 1, --workers >= 0")
    import fastres.models
    unknown = [m for m in args.models if m not in fastres.models.list_models()]
    if unknown:
        p.error(f"unknown model(s) {unknown}")
    return args


def _progress(total: int):
    """A progress callback: tqdm when installed, else numbered lines on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        count = [0]

        def report(what: str) -> None:
            count[0] += 1
            print(f"[{count[0]}/{total}] {what}", file=sys.stderr, flush=True)
        return report, (lambda: None)
    bar = tqdm(total=total, desc="fastres-bench", unit="run", file=sys.stderr)
    started = [False]

    def report(what: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(what)
    return report, (lambda: (bar.update(1), bar.close()))


def _cpu_suite(args, modes: List[str]) -> int:
    """--suite cpu: the op and model tables of the CPU comparison (markdown + JSON)."""
    from .model_benchmark import CPU_SUITE, run_cpu_op_suite, run_cpu_suite
    from .report import cpu_suite_markdown

    configs = [c for c in CPU_SUITE if c[0] in args.models]
    if not configs:
        print(f"--suite cpu: none of {args.models} is in its models "
              f"({', '.join(dict.fromkeys(c[0] for c in CPU_SUITE))})", file=sys.stderr)
        return 2
    variants = ["fastres", "plain", "torchvision"] + (["torchvision compile"] if args.compile
                                                       else [])
    impls = ["eager"] + (["compile"] if args.compile else []) + ["fastres:cpu"]
    kept = False
    if args.keep_freed_memory:
        from .heap import keep_freed_memory
        kept = keep_freed_memory()
        if not kept:
            print("--keep-freed-memory: this C library has no mallopt; measuring as it is",
                  file=sys.stderr)
    total = (len(configs) * len(modes)) + (24 if args.ops else 0)
    progress, done = _progress(total)
    op_rows = run_cpu_op_suite(impls=impls, progress=progress) if args.ops else []
    model_rows = run_cpu_suite(configs, modes, variants, warmup=args.warmup, iters=args.iters,
                               progress=progress)
    done()
    meta = environment("cpu")
    meta["settings"] = {"dtype": "fp32", "model warmup/rounds": f"{args.warmup}/{args.iters}",
                        "compile": bool(args.compile),
                        "freed memory": "kept (mallopt)" if kept else "C library default"}
    if args.ops:
        meta["settings"].update({"op batch": 2, "op warmup/rounds": "3/25"})
    table = cpu_suite_markdown(op_rows, model_rows, meta)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_suite.md"), "w") as f:
        f.write(table)
    write_json(os.path.join(args.out, "cpu_suite.json"), op_rows + model_rows, meta)
    print(f"wrote {os.path.join(args.out, 'cpu_suite.md')}, "
          f"{os.path.join(args.out, 'cpu_suite.json')}")
    return 1 if any("error" in r for r in model_rows) else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.data is not None:
        from .data_benchmark import main_data
        return main_data(args)
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    if args.suite == "cpu":
        return _cpu_suite(args, modes)
    variants = ["torchvision", "fastres"]
    if args.compile:
        variants += ["torchvision compile", "fastres compile"]
    meta = environment(args.device)
    meta["settings"] = {"batch_size": args.batch_size, "image_size": args.image_size,
                        "dtype": args.dtype if args.dtype == "fp32" else f"AMP {args.dtype}",
                        "layout": "channels_last" if args.channels_last else "NCHW",
                        "warmup": args.warmup, "iters": args.iters,
                        "conv_backend": args.conv_backend}
    progress, done = _progress(len(args.models) * len(modes) * len(variants))
    rows = run_models(args.models, modes, variants, batch_size=args.batch_size,
                      image_size=args.image_size, dtype=DTYPES[args.dtype],
                      channels_last=args.channels_last, device=args.device,
                      warmup=args.warmup, iters=args.iters,
                      conv_backend=args.conv_backend, progress=progress)
    done()
    table = markdown_table(rows, meta)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    write_json(os.path.join(args.out, "results.json"), rows, meta)
    written = ["results.md", "results.json"]
    if args.plot:
        bar_chart(os.path.join(args.out, "results.png"), rows, meta)
        written.append("results.png")
    print(f"wrote {', '.join(os.path.join(args.out, w) for w in written)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the fused BatchNorm ops against the unfused PyTorch sequence and torch.compile of it.

    python -m fastres.bench.op_benchmark                   # GPU: ResNet-50 shapes, batch 256
    python -m fastres.bench.op_benchmark --batch-size 64 --dtype fp16 --nchw
    python -m fastres.bench.op_benchmark --device cpu      # small CPU run (smoke test)

Each row is one BatchNorm layer shape of ResNet-50 (torchvision v1.5 layout). The timed step
is forward + backward (all input gradients) unless --forward-only; times are medians of CUDA
event timings after warm-up. Prints a markdown table; --json FILE writes the numbers.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import fastres
from fastres.functional import batch_norm_add_relu, batch_norm_relu

# (op, channels, height/width) for every distinct BatchNorm of ResNet-50 (count in the net)
RESNET50_BN_SHAPES = [
    ("bn_relu", 64, 112, 1), ("bn_relu", 64, 56, 6), ("bn_add_relu", 256, 56, 3),
    ("bn_relu", 128, 56, 1), ("bn_relu", 128, 28, 7), ("bn_add_relu", 512, 28, 4),
    ("bn_relu", 256, 28, 1), ("bn_relu", 256, 14, 11), ("bn_add_relu", 1024, 14, 6),
    ("bn_relu", 512, 14, 1), ("bn_relu", 512, 7, 5), ("bn_add_relu", 2048, 7, 3),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def unfused(x, r, rm, rv, w, b):
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    if r is not None:
        y = y + r
    return F.relu(y)


def fused(x, r, rm, rv, w, b):
    if r is None:
        return batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5)
    return batch_norm_add_relu(x, r, rm, rv, w, b, True, 0.1, 1e-5)


def timer(device, fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(op, c, hw, args, device, dtype):
    shape = (args.batch_size, c, hw, hw)
    x = torch.randn(shape, device=device, dtype=dtype)
    if not args.nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if op == "bn_add_relu" else None
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    x.requires_grad_(True)
    if r is not None:
        r.requires_grad_(True)
    leaves = [t for t in (x, r, w, b) if t is not None]
    g = torch.randn_like(x)

    def step(fn):
        def run():
            if args.forward_only:
                with torch.no_grad():
                    fn(x, r, rm, rv, w, b)
            else:
                torch.autograd.grad(fn(x, r, rm, rv, w, b), leaves, g)
        return run

    results = {"unfused eager": timer(device, step(unfused), args.warmup, args.reps)}
    if args.compile:
        compiled = torch.compile(unfused)
        results["unfused torch.compile"] = timer(device, step(compiled), args.warmup, args.reps)
    names = ["cpu"] if device.type == "cpu" else [n for n in ("cuda", "triton")
                                                   if n in fastres.available_backends()]
    for name in names:
        with fastres.backend(name):
            results[f"fastres {name}"] = timer(device, step(fused), args.warmup, args.reps)
    return shape, results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 2 on CPU")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--max-hw", type=int, default=None, help="skip shapes larger than this (CPU default 14)")
    p.add_argument("--json", default=None, help="write results to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 2)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.reps = args.reps if args.reps is not None else (20 if gpu else 3)
    max_hw = args.max_hw or (1000 if gpu else 14)
    if gpu:
        torch.backends.cudnn.benchmark = True

    rows, columns = [], None
    for op, c, hw, count in RESNET50_BN_SHAPES:
        if hw > max_hw:
            continue
        shape, res = bench_shape(op, c, hw, args, device, dtype)
        columns = columns or list(res)
        rows.append({"op": op, "shape": list(shape), "count": count, "ms": res})
        print(f"  {op} {tuple(shape)}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()),
              flush=True)

    layout = "NCHW" if args.nchw else "channels_last"
    mode = "forward" if args.forward_only else "forward+backward"
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"\n{mode}, {dtype}, {layout}, batch {args.batch_size}, {name}, torch {torch.__version__}\n")
    print("| op | shape | " + " | ".join(f"{c} ms" for c in columns) + " | best fastres vs eager | vs compile |")
    print("|---" * (len(columns) + 4) + "|")
    total = {c: 0.0 for c in columns}
    for row in rows:
        ms = row["ms"]
        for c in columns:
            total[c] += ms[c] * row["count"]
        best = min(v for k, v in ms.items() if k.startswith("fastres"))
        vs_compile = f"{ms['unfused torch.compile'] / best:.2f}x" if "unfused torch.compile" in ms else "-"
        print(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | "
              + " | ".join(f"{ms[c]:.3f}" for c in columns)
              + f" | {ms['unfused eager'] / best:.2f}x | {vs_compile} |")
    best_total = min(v for k, v in total.items() if k.startswith("fastres"))
    vs_compile = (f"{total['unfused torch.compile'] / best_total:.2f}x"
                  if "unfused torch.compile" in total else "-")
    print("| all BN layers of ResNet-50 (weighted by count) | | "
          + " | ".join(f"{total[c]:.3f}" for c in columns)
          + f" | {total['unfused eager'] / best_total:.2f}x | {vs_compile} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "layout": layout, "mode": mode,
                       "batch_size": args.batch_size, "torch": torch.__version__, "rows": rows,
                       "total_ms": total}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

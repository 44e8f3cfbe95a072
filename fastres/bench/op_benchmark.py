"""Time the fused BatchNorm ops against the unfused PyTorch sequence and torch.compile of it.

    python -m fastres.bench.op_benchmark                   # GPU: ResNet-50 shapes, batch 256
    python -m fastres.bench.op_benchmark --batch-size 64 --dtype fp16 --nchw
    python -m fastres.bench.op_benchmark --device cpu      # small CPU run (smoke test)

Each row is one BatchNorm layer shape of ResNet-50 (torchvision v1.5 layout). The timed step
is forward + backward (all input gradients) unless --forward-only; times are medians of CUDA
event timings after warm-up. Each time also gives the useful bandwidth (the minimal traffic of
the op, fastres.bench.workloads.op_bytes, over the time) as a fraction of the device's
measured copy bandwidth. Prints a markdown table; --json FILE writes the numbers.
"""
import argparse
import json

import torch

from .timing import copy_bandwidth, measure
from .workloads import DTYPES, RESNET50_BN_SHAPES, fastres_backends, make_op_step, op_bytes

__all__ = ["bench_case", "main"]


def implementations(device: torch.device, compile: bool):
    """(column name, implementation) pairs timed on `device`."""
    impls = [("unfused eager", "eager")]
    if compile:
        impls.append(("unfused torch.compile", "compile"))
    impls += [(f"fastres {b}", f"fastres:{b}") for b in fastres_backends(device)]
    return impls


def bench_case(case, *, batch_size, dtype, channels_last, device, backward, compile, warmup,
               reps):
    """{column: Measurement-dict with "bandwidth_fraction"} for one OpCase."""
    device = torch.device(device)
    nbytes = op_bytes(case, batch_size, dtype, backward)
    peak_bw = copy_bandwidth(device)
    results = {}
    for column, impl in implementations(device, compile):
        step = make_op_step(case, batch_size, dtype, channels_last, device, impl, backward)
        m = measure(step, device, warmup=warmup, iters=reps)
        results[column] = {**m.as_dict(), "bandwidth_fraction": m.per_second(nbytes) / peak_bw}
    return results


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
    for case in RESNET50_BN_SHAPES:
        if case.hw > max_hw:
            continue
        res = bench_case(case, batch_size=args.batch_size, dtype=dtype,
                         channels_last=not args.nchw, device=device,
                         backward=not args.forward_only, compile=args.compile,
                         warmup=args.warmup, reps=args.reps)
        columns = columns or list(res)
        shape = [args.batch_size, case.channels, case.hw, case.hw]
        rows.append({"op": case.op, "shape": shape, "count": case.count,
                     "ms": {k: v["ms"] for k, v in res.items()},
                     "bandwidth_fraction": {k: v["bandwidth_fraction"] for k, v in res.items()},
                     "peak_gib": {k: v["peak_gib"] for k, v in res.items()}})
        print(f"  {case.op} {tuple(shape)}: "
              + ", ".join(f"{k} {v['ms']:.3f} ms ({v['bandwidth_fraction']:.0%} of copy bw)"
                          for k, v in res.items()), flush=True)

    layout = "NCHW" if args.nchw else "channels_last"
    mode = "forward" if args.forward_only else "forward+backward"
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    bw = copy_bandwidth(device)
    print(f"\n{mode}, {dtype}, {layout}, batch {args.batch_size}, {name}, torch {torch.__version__}, "
          f"copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print("| op | shape | " + " | ".join(f"{c} ms (% copy bw)" for c in columns)
          + " | best fastres vs eager | vs compile |")
    print("|---" * (len(columns) + 4) + "|")
    total = {c: 0.0 for c in columns}
    for row in rows:
        ms, frac = row["ms"], row["bandwidth_fraction"]
        for c in columns:
            total[c] += ms[c] * row["count"]
        best = min(v for k, v in ms.items() if k.startswith("fastres"))
        vs_compile = f"{ms['unfused torch.compile'] / best:.2f}x" if "unfused torch.compile" in ms else "-"
        print(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | "
              + " | ".join(f"{ms[c]:.3f} ({frac[c]:.0%})" for c in columns)
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
                       "batch_size": args.batch_size, "torch": torch.__version__,
                       "copy_bandwidth_bytes_per_s": bw, "rows": rows, "total_ms": total},
                      f, indent=1)
    return rows


if __name__ == "__main__":
    main()

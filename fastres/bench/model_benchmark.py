"""Images/s and peak memory of whole ResNets: fastres fused vs torchvision eager vs
torch.compile, for a training step (forward, backward, SGD) and for inference.

    python -m fastres.bench.model_benchmark                       # GPU: ResNet-18/50/152, batch 256
    python -m fastres.bench.model_benchmark --models resnet50 --mode infer --no-compile
    python -m fastres.bench.model_benchmark --device cpu          # tiny CPU smoke run

Defaults on a GPU: AMP bf16 (autocast), channels_last, cudnn.benchmark, CUDA-event timing
after warm-up. Prints a markdown table; --json FILE writes the numbers.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision

import fastres
import fastres.models


def make_model(name, variant, device, channels_last):
    if variant.startswith("torchvision"):
        model = getattr(torchvision.models, name)()
    else:
        model = fastres.models.get_model(name, fused=True)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if variant.endswith("compile"):
        model = torch.compile(model)
    return model


def measure(model, mode, args, device):
    size = args.image_size
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step():
        if mode == "train":
            model.train()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.no_grad(), torch.autocast(**amp):
                model(x)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return args.batch_size * args.iters / seconds, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50,resnet152")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 2 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 224 on GPU, 64 on CPU")
    p.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of AMP bf16")
    p.add_argument("--nchw", dest="channels_last", action="store_false")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 2)
    args.image_size = args.image_size or (224 if gpu else 64)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.iters = args.iters if args.iters is not None else (20 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    variants = ["torchvision eager", "fastres eager"]
    if args.compile:
        variants += ["torchvision compile", "fastres compile"]
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]

    rows = []
    for name in args.models.split(","):
        for mode in modes:
            res = {}
            for variant in variants:
                torch._dynamo.reset()
                model = make_model(name, variant, device, args.channels_last)
                res[variant] = measure(model, mode, args, device)
                print(f"  {name} {mode} {variant}: {res[variant][0]:,.0f} images/s, "
                      f"peak {res[variant][1]:.2f} GiB", flush=True)
                del model
                if gpu:
                    torch.cuda.empty_cache()
            rows.append({"model": name, "mode": mode, "results": res})

    gpu_name = torch.cuda.get_device_name(device) if gpu else "CPU"
    precision = "AMP bf16" if args.amp else "fp32"
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"\n{gpu_name}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.image_size}px, {precision}, {layout}\n")
    print("| model | mode | " + " | ".join(f"{v} img/s (GiB)" for v in variants)
          + " | fastres eager vs torchvision eager | vs torchvision compile |")
    print("|---" * (len(variants) + 4) + "|")
    for row in rows:
        r = row["results"]
        fe = r["fastres eager"][0]
        vs_c = f"{fe / r['torchvision compile'][0]:.2f}x" if "torchvision compile" in r else "-"
        print(f"| {row['model']} | {row['mode']} | "
              + " | ".join(f"{r[v][0]:,.0f} ({r[v][1]:.2f})" for v in variants)
              + f" | {fe / r['torchvision eager'][0]:.2f}x | {vs_c} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": gpu_name, "torch": torch.__version__, "precision": precision,
                       "layout": layout, "batch_size": args.batch_size, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

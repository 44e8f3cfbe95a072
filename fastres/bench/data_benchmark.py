"""The data benchmark: does the input pipeline or the training step limit a run?

    python -m fastres.bench --data imagefolder:PATH --data-backend gpu          # on a GPU
    python -m fastres.bench --data imagefolder:PATH --data-backend reference,cpu --workers 0
    python -m fastres.data.make_imagefolder PATH     # a folder to run it on, without ImageNet

For each backend, side by side in one process (rounds interleaved so that a machine shared
with other work slows every backend alike; the median round counts; each round first takes,
untimed, the batches that the backend's worker processes and prefetch thread prepared while
the others were measured):

* ``pipeline``: images/s of the input pipeline alone (batches ready on the device, the last
  one synchronised), training augmentation, ``--batch-size`` images per batch;
* ``per core``: the same divided by the cores the pipeline may use (max(1, workers) worker
  processes; with 0 workers the main process, ``--threads`` torch threads);
* ``synthetic step``: a training step (forward, cross-entropy, backward, SGD) of ``--models``
  (default resnet50 on a GPU; none on a CPU unless given) on one fixed batch on the device;
* ``fed step``: the same step fed by the pipeline; ``fed / synthetic`` near 1 means the
  pipeline keeps up.

With worker processes on a machine with few cores, an idle backend's workers keep prefetching
while another is timed and take cores from it: compare per-core numbers with ``--workers 0
--threads 1`` there (or measure one backend per run).

The ``reference`` backend is the per-image reference pipeline (what fastres-train used before
the cpu/gpu backends), so ``--data-backend reference,cpu`` measures the CPU speed-up.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["run_data_benchmark", "data_markdown", "main_data"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(make_iter):
    """Endless batches: a new pass (a new iterator) whenever one ends."""
    while True:
        n = 0
        for b in make_iter():
            n += 1
            yield b
        if n == 0:
            raise RuntimeError("the data loader gave no batch (too few images for the batch "
                               "size with drop_last?)")


def _loader(dataset, backend: str, batch: int, device, workers: int, dtype, channels_last,
            seed: int):
    from fastres.data.loaders import make_loader
    g = torch.Generator().manual_seed(seed)
    return make_loader(dataset, backend, batch, device, mode="train", shuffle=True,
                       num_workers=workers, drop_last=True, generator=g, out_dtype=dtype,
                       channels_last=channels_last, seed=seed, log=lambda m: print(m,
                                                                                  file=sys.stderr))


def _as_device_batch(b, device, dtype, channels_last):
    x, y = b
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype), y.to(device, non_blocking=True)


def _timed_batches(stream, drain: int, batches: int, device: torch.device,
                   consume=None) -> Tuple[int, float]:
    """One timed round of a backend: ``drain`` batches taken untimed (those its workers and
    prefetch thread prepared meanwhile), then ``batches`` batches, each given to
    ``consume(x, y)`` when set, timed from the first to the synchronised end. Returns (images,
    seconds)."""
    for _ in range(drain):
        next(stream)
    _sync(device)
    n = 0
    t = time.perf_counter()
    for _ in range(batches):
        x, y = next(stream)
        if consume is not None:
            consume(x, y)
        n += x.shape[0]
    _sync(device)
    return n, time.perf_counter() - t


def run_data_benchmark(spec: str, backends: List[str], batch_size: int, device, workers: int,
                       rounds: int = 3, batches: int = 4, warmup: int = 1,
                       model: Optional[str] = None, dtype: torch.dtype = torch.float32,
                       channels_last: bool = True, seed: int = 0,
                       progress=None) -> List[Dict]:
    """Rows (one per backend) with images/s of the pipeline alone and, with ``model``, of a
    synthetic-data and a pipeline-fed training step."""
    from fastres.data import build_data
    from fastres.data.loaders import resolve_data_backend

    device = torch.device(device)
    data = build_data(spec, recipe="imagenet")
    for b in backends:
        resolve_data_backend(b, data.train, device)
    streams, drain = {}, {}
    for b in backends:
        loader = _loader(data.train, b, batch_size, device, workers, dtype, channels_last, seed)
        streams[b] = _cycle(lambda loader=loader: iter(loader))
        # batches that worker processes and the gpu loader's thread prepare while another
        # backend is measured: taken untimed at the start of each round
        drain[b] = 2 * workers + (getattr(loader, "prefetch", 0) + 1 if b == "gpu" else 0)
    times: Dict[str, List[float]] = {b: [] for b in backends}
    counts: Dict[str, List[int]] = {b: [] for b in backends}
    for b in backends:  # warm-up: workers started, first batches, decoder initialised
        for _ in range(warmup):
            next(streams[b])
        _sync(device)
    for r in range(rounds):
        for b in backends:
            if progress:
                progress(f"pipeline {b}, round {r + 1}/{rounds}")
            n, seconds = _timed_batches(streams[b], drain[b], batches, device)
            times[b].append(seconds)
            counts[b].append(n)
    cores = max(1, workers) if workers else max(1, torch.get_num_threads())
    rows = []
    for b in backends:
        rates = [n / t for n, t in zip(counts[b], times[b])]
        rows.append({"backend": b, "pipeline_images_per_s": statistics.median(rates),
                     "pipeline_rounds": rates, "cores": cores,
                     "per_core_images_per_s": statistics.median(rates) / cores})
    if model:
        _train_columns(rows, streams, drain, model, batch_size, device, dtype, channels_last,
                       rounds, batches, progress)
    return rows


def _train_columns(rows, streams, drain, model_name, batch, device, dtype, channels_last, rounds,
                   batches, progress):
    import torch.nn.functional as F

    import fastres.models

    model = fastres.models.get_model(model_name, num_classes=1000)
    model = model.to(device, memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = dtype if dtype in (torch.bfloat16, torch.float16) else None

    def step(x, y):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fed_step(x, y):
        x, y = _as_device_batch((x, y), device, dtype, channels_last)
        step(x, y % 1000)

    xs = torch.randn(batch, 3, 224, 224, device=device).to(dtype)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, 1000, (batch,), device=device)
    step(xs, ys)
    _sync(device)
    synth, fed = [], {r["backend"]: [] for r in rows}
    for r in range(rounds):
        if progress:
            progress(f"training step {model_name}, round {r + 1}/{rounds}")
        t = time.perf_counter()
        for _ in range(batches):
            step(xs, ys)
        _sync(device)
        synth.append(batch * batches / (time.perf_counter() - t))
        for row in rows:
            b = row["backend"]
            n, seconds = _timed_batches(streams[b], drain[b], batches, device, fed_step)
            fed[b].append(n / seconds)
    for row in rows:
        row["model"] = model_name
        row["synthetic_step_images_per_s"] = statistics.median(synth)
        row["fed_step_images_per_s"] = statistics.median(fed[row["backend"]])


def data_markdown(rows: List[Dict], meta: dict) -> str:
    s = meta.get("settings", {})
    lines = [f"Data pipeline, {meta.get('device')}, {meta.get('date')}: "
             + ", ".join(f"{k} {v}" for k, v in s.items()), ""]
    train = any("model" in r for r in rows)
    head = "| backend | pipeline images/s | cores | per core | vs first |"
    sep = "|---|---|---|---|---|"
    if train:
        head += f" synthetic step ({rows[0]['model']}) | fed step | fed / synthetic |"
        sep += "---|---|---|"
    lines += [head, sep]
    first = rows[0]["per_core_images_per_s"]
    for r in rows:
        line = (f"| {r['backend']} | {r['pipeline_images_per_s']:.0f} | {r['cores']} | "
                f"{r['per_core_images_per_s']:.0f} | {r['per_core_images_per_s'] / first:.2f}x |")
        if train:
            line += (f" {r['synthetic_step_images_per_s']:.0f} | {r['fed_step_images_per_s']:.0f}"
                     f" | {r['fed_step_images_per_s'] / r['synthetic_step_images_per_s']:.2f} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main_data(args) -> int:
    """``python -m fastres.bench --data ...`` (arguments parsed by ``fastres.bench.cli``)."""
    from .report import environment, write_json

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main_data(args)
    finally:
        torch.set_num_threads(threads)


def _main_data(args) -> int:
    from .report import environment, write_json

    device = torch.device(args.device)
    backends = [b.strip() for b in args.data_backend.split(",") if b.strip()]
    gpu = device.type == "cuda"
    model = (args.models[0] if args.models else None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        rows = run_data_benchmark(args.data, backends, args.batch_size, device, args.workers,
                                  rounds=args.iters, batches=args.data_batches,
                                  warmup=args.warmup, model=model, dtype=dtype,
                                  channels_last=args.channels_last,
                                  progress=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as e:
        print(f"fastres-bench: error: --data {args.data!r}: {e}", file=sys.stderr)
        return 2
    meta = environment(device)
    meta["settings"] = {"data": args.data, "batch": args.batch_size, "workers": args.workers,
                        "torch threads": torch.get_num_threads(),
                        "rounds x batches": f"{args.iters} x {args.data_batches}",
                        "dtype": args.dtype, "gpu": gpu}
    table = data_markdown(rows, meta)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data_bench.md"), "w") as f:
        f.write(table)
    write_json(os.path.join(args.out, "data_bench.json"), rows, meta)
    print(f"wrote {os.path.join(args.out, 'data_bench.md')}, "
          f"{os.path.join(args.out, 'data_bench.json')}")
    return 0

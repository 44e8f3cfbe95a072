"""A/B of the fused models' CPU inference program (fastres.nn.inference_program), side by side
in one process, freed memory kept (fastres.bench.heap):

  program      model(x): the inference program, made by the first call
  layers       model._forward(x): the same model without it, each layer by its plan
  layers-nchw  as "layers", with a single image's native convolution in the input's layout
               (NCHW here) as before 2026-12-03 instead of channels-last
  compile      torch.compile of the plain model (same weights)
  plain        the plain model

Each round runs every variant `reps` times (enough for some 50 ms), in an order that rotates
from round to round. Printed: the median ms of a forward per variant and the median over rounds
of the per-round ratio (other variant's time / the program's).

    python docs/cpu/2026-12-03-inference-program-ab.py ROUNDS [name:batch:px:layout ...]
"""
import statistics
import sys
import time

import torch

import fastres
import fastres.nn.conv_bn as cb
from fastres.bench.heap import keep_freed_memory

rounds = int(sys.argv[1])
configs = sys.argv[2:] or ["resnet20:1:32:nchw", "resnet20:1:32:cl", "resnet20:8:32:nchw",
                           "resnet20:64:32:nchw", "resnet20:64:32:cl", "resnet18:1:112:nchw",
                           "resnet18:16:112:cl", "resnet50:1:112:nchw", "resnet50:8:112:cl"]
keep_freed_memory()
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
new_rule = cb._channels_last_conv


def old_rule(native, x):
    return not native


for config in configs:
    name, batch, px, layout = config.split(":")
    batch, px = int(batch), int(px)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    fn = getattr(fastres.models, name)
    torch.manual_seed(0)
    fused = fn(fused=True).eval().to(memory_format=fmt)
    old = fn(fused=True).eval().to(memory_format=fmt)
    plain = fn(fused=False).eval().to(memory_format=fmt)
    old.load_state_dict(fused.state_dict())
    plain.load_state_dict(fused.state_dict())
    compiled = torch.compile(plain)
    x = torch.randn(batch, 3, px, px).contiguous(memory_format=fmt)

    def with_rule(rule, f):
        def step():
            cb._channels_last_conv = rule
            try:
                return f(x)
            finally:
                cb._channels_last_conv = new_rule
        return step

    steps = {"program": lambda: fused(x), "layers": lambda: fused._forward(x),
             "layers-nchw": with_rule(old_rule, old._forward), "compile": lambda: compiled(x),
             "plain": lambda: plain(x)}
    with torch.no_grad():
        want = plain(x)
        for k, s in steps.items():
            torch.testing.assert_close(s(), want, rtol=1e-3, atol=1e-3, msg=k)
            s()
        t0 = time.perf_counter()
        steps["program"]()
        reps = max(1, round(0.05 / (time.perf_counter() - t0)))
        names = list(steps)
        times = {k: [] for k in names}
        for i in range(rounds):
            shift = i % len(names)
            for k in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                for _ in range(reps):
                    steps[k]()
                times[k].append((time.perf_counter() - t0) / reps * 1e3)
    ms = " ".join(f"{k} {statistics.median(v):.3f}" for k, v in times.items())
    ratios = " ".join(
        f"{k} {statistics.median(a / b for a, b in zip(times[k], times['program'])):.3f}"
        for k in names[1:])
    print(f"{name} {batch}@{px} {layout} reps {reps} | ms: {ms} | other/program: {ratios}",
          flush=True)

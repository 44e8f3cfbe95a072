"""A/B of the folded CPU inference at a small batch: PyTorch's native convolution where PyTorch
itself picks it (fastres.nn.conv_bn._native_cpu_conv, "after") against oneDNN's prepacked one at
every size ("before", on a deep copy of the model so that each variant keeps its own
folded-weight cache), with the plain model and torch.compile of it, side by side in one process
(fastres.bench.model_benchmark.measure_side_by_side).

    python docs/cpu/2026-12-01-batch1-native-ab.py resnet20 1 32 channels_last 60
"""
import copy
import sys

import torch

import fastres.nn.conv_bn as cb
from fastres.bench.model_benchmark import _suite_models, measure_side_by_side
from fastres.bench.workloads import make_model_step

name, batch, px, layout, rounds = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                   int(sys.argv[5]))
cl = layout == "channels_last"
cpu = torch.device("cpu")
models = _suite_models(name, ["fastres", "plain", "torchvision compile"], cl, cpu)
steps = {}
for k, m in models.items():
    steps[k], _ = make_model_step(m, "infer", batch, px, torch.float32, cl, cpu)
    steps[k]()
after = steps.pop("fastres")
before_step, _ = make_model_step(copy.deepcopy(models["fastres"]), "infer", batch, px,
                                 torch.float32, cl, cpu)
native = cb._native_cpu_conv


def before():
    cb._native_cpu_conv = lambda conv, x: False
    try:
        before_step()
    finally:
        cb._native_cpu_conv = native


steps = {"after (add_, relu_)": after, "oneDNN at every size (before)": before, **steps}
r = measure_side_by_side(steps, 3, rounds)
base = r["after (add_, relu_)"].ms
for k, v in r.items():
    print(f"| {name} | {batch} @ {px} | {layout} | {k} | {v.ms:.2f} | {v.ms_min:.2f} | "
          f"{base / v.ms:.2f}x |")

"""Fused BatchNorm(+add)+ReLU, training forward + backward (fp32, 2 threads, batch 2), against
eager PyTorch's separate ops, side by side in one process (measure_side_by_side), at the small
ResNet-50 BatchNorm shapes where per-call costs dominate. Medians in us. Run once with each
build to compare two builds of the C++ kernels: the ratio to eager is the comparable figure.
Usage: python docs/cpu/2026-12-02-one-region.py [rounds]"""
import sys

import torch

import fastres
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.workloads import OpCase, make_op_step

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
torch.set_num_threads(2)
print(f"fastres from {fastres.__file__}")
print("| op | shape | layout | eager us | fastres us | fastres vs eager |")
print("|---|---|---|---|---|---|")
cases = [OpCase("bn_relu", 512, 7, 1), OpCase("bn_add_relu", 2048, 7, 1),
         OpCase("bn_relu", 256, 14, 1), OpCase("bn_relu", 512, 14, 1),
         OpCase("bn_add_relu", 1024, 14, 1), OpCase("bn_relu", 128, 28, 1)]
for channels_last in (True, False):
    for case in cases:
        steps = {impl: make_op_step(case, 2, torch.float32, channels_last, "cpu", impl, True)
                 for impl in ("eager", "fastres:cpu")}
        r = measure_side_by_side(steps, 20, rounds)
        e, f = r["eager"].ms * 1e3, r["fastres:cpu"].ms * 1e3
        layout = "channels_last" if channels_last else "NCHW"
        print(f"| {case.op} | 2x{case.channels}x{case.hw}x{case.hw} | {layout} | {e:.0f} | {f:.0f} "
              f"| {e / f:.2f}x |", flush=True)

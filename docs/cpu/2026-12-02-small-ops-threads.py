"""The small fused ops (training-mode forward + backward, batch 2, fp32) on one thread and on
two, against eager PyTorch's separate ops on one and two, side by side in one process (each
step sets its thread count before it runs; measure_side_by_side rotates the order). Asks
whether running the small shapes on one thread (no parallel regions to wake) would be faster.
Usage: python docs/cpu/2026-12-02-small-ops-threads.py [nchw|cl] [rounds]"""
import sys

import torch

from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.workloads import OpCase, make_op_step

channels_last = (sys.argv[1] if len(sys.argv) > 1 else "cl") == "cl"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 300


def on_threads(n, step):
    def run():
        torch.set_num_threads(n)
        step()
    return run


print(f"layout {'channels_last' if channels_last else 'NCHW'}, medians in us")
print("| op | shape | eager 1T | eager 2T | fastres 1T | fastres 2T | fastres 2T vs 1T "
      "| fastres 2T vs eager 2T |")
print("|---|---|---|---|---|---|---|---|")
for op, c, hw in [("bn_relu", 512, 7), ("bn_add_relu", 2048, 7), ("bn_relu", 256, 14),
                  ("bn_relu", 512, 14), ("bn_add_relu", 1024, 14), ("bn_relu", 128, 28),
                  ("bn_add_relu", 512, 28)]:
    steps = {}
    for impl in ("eager", "fastres:cpu"):
        step = make_op_step(OpCase(op, c, hw, 1), 2, torch.float32, channels_last, "cpu", impl,
                            True)
        for n in (1, 2):
            steps[f"{impl}/{n}"] = on_threads(n, step)
    us = {k: v.ms * 1e3 for k, v in measure_side_by_side(steps, 30, rounds).items()}
    print(f"| {op} | 2x{c}x{hw}x{hw} | {us['eager/1']:.0f} | {us['eager/2']:.0f} "
          f"| {us['fastres:cpu/1']:.0f} | {us['fastres:cpu/2']:.0f} "
          f"| {us['fastres:cpu/1'] / us['fastres:cpu/2']:.2f}x "
          f"| {us['eager/2'] / us['fastres:cpu/2']:.2f}x |", flush=True)
torch.set_num_threads(2)

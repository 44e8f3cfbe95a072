"""What the saved output costs the add's backward: fastres::bn_act_backward timed with the
ReLU mask recomputed from x (BN + ReLU, no residual: reads dy and x, writes dx) and with the
mask read from the saved output (BN + add + ReLU: reads dy, x and y, writes dx and the
residual's gradient), on one shape, channels-last and NCHW, with freed memory kept (fastres.bench.heap). Medians of 50 calls, ms. The
difference bounds what a 1-bit ReLU mask (written by the forward, read instead of y) could
save: it would remove the two reads of y, not the residual gradient's write.

    python docs/cpu/2026-12-03-relu-mask-lead.py 2x256x56x56
"""
import statistics
import sys
import time

import torch

import fastres  # noqa: F401  (registers the fastres operators)
from fastres.bench.heap import keep_freed_memory

# freed memory kept in the process: without it the outputs' pages were faulted in afresh on
# some calls, which moved the add's backward by up to 6x between processes
keep_freed_memory()

torch.manual_seed(0)
N, C, H, W = [int(v) for v in sys.argv[1].split("x")]
op_b = torch.ops.fastres.bn_act_backward
for lay in ("cl", "nchw"):
    mf = torch.channels_last if lay == "cl" else torch.contiguous_format
    x = torch.randn(N, C, H, W).contiguous(memory_format=mf)
    r = torch.randn_like(x)
    w, b = torch.ones(C), torch.zeros(C)
    y_add, mean, var = torch.ops.fastres.bn_act_forward(x, r, w, b, None, None, True, 1e-5, True)
    dy = torch.randn_like(x)
    T = {"relu (mask from x)": [], "add+relu (reads y, writes dres)": []}
    for i in range(60):
        t0 = time.perf_counter(); op_b(dy, x, None, w, b, mean, var, True, 1e-5, True, False); t1 = time.perf_counter()
        op_b(dy, x, y_add, w, b, mean, var, True, 1e-5, True, True); t2 = time.perf_counter()
        if i >= 10:
            T["relu (mask from x)"].append(t1 - t0); T["add+relu (reads y, writes dres)"].append(t2 - t1)
    print(lay, sys.argv[1], " ".join(f"{k}: {statistics.median(v)*1e3:.3f} ms" for k, v in T.items()))

"""resnet20's convolutions (batch 64, channels-last) timed alone, side by side in one process:
F.conv2d with the bias (PyTorch's oneDNN convolution, what plain PyTorch and Inductor call),
oneDNN's _convolution_pointwise with the weight prepacked for the input's shape (fastres's
folded CPU inference), and _convolution_pointwise with the plain weight. Medians over 80
rounds, ms; the last line sums over the network (the 3x3 16/32/64-channel stride-1 shapes
counted 6, 5 and 5 times, as resnet20 has them).

    python docs/cpu/2026-12-03-folded-conv-calls.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)
shapes = [(64,3,32,32,16,1),(64,16,32,32,16,1),(64,16,32,32,32,2),(64,32,16,16,32,1),(64,32,16,16,64,2),(64,64,8,8,64,1)]
tot = [0, 0, 0]
for (N,C,H,W,K,s) in shapes:
    x = torch.randn(N,C,H,W).contiguous(memory_format=torch.channels_last)
    w = torch.randn(K,C,3,3).contiguous(memory_format=torch.channels_last); b = torch.randn(K)
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1,1], [s,s], [1,1], 1, list(x.shape))
    fs = {"conv2d": lambda: F.conv2d(x, w, b, s, 1),
          "pointwise_packed": lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1,1], [s,s], [1,1], 1, "none", [], ""),
          "pointwise_plain": lambda: torch.ops.mkldnn._convolution_pointwise(x, w, b, [1,1], [s,s], [1,1], 1, "none", [], "")}
    T = {k: [] for k in fs}
    with torch.no_grad():
        for k, f in fs.items(): f(); f()
        for r in range(80):
            for k, f in fs.items():
                t0 = time.perf_counter(); f(); T[k].append(time.perf_counter() - t0)
    m = [statistics.median(v) * 1e3 for v in T.values()]
    for i in range(3): tot[i] += m[i] * ({16: 6, 32: 5, 64: 5}[C] if (C == K and s == 1) else 1)
    print((N,C,H,W,K,s), " ".join(f"{k} {v:.3f}" for k, v in zip(fs, m)))
print("weighted total", [round(t, 2) for t in tot])

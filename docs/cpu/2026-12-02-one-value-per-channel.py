"""Fused BatchNorm+ReLU (training forward + backward, fp32, 2 threads) against eager PyTorch's
batch_norm + relu on inputs with one value per channel and image ((N, C, 1, 1)) and, for
comparison, a 2-D (N, C) input and a 3-D one, side by side in one process
(measure_side_by_side). Medians in us. Usage: python docs/cpu/2026-12-02-one-value-per-channel.py"""
import torch
import torch.nn.functional as F

import fastres  # noqa: F401  (registers the ops)
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.functional import batch_norm_relu

torch.set_num_threads(2)
print("| input | eager us | fastres us | fastres vs eager |")
print("|---|---|---|---|")
for shape in [(256, 2048), (2, 2048, 1, 1), (64, 512, 1, 1), (32, 1024, 3)]:
    c = shape[1]
    x = torch.randn(*shape, requires_grad=True)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    g = torch.randn(*shape)
    steps = {
        "eager": lambda: torch.autograd.grad(
            F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)), (x, w, b), g),
        "fastres": lambda: torch.autograd.grad(
            batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5), (x, w, b), g)}
    r = measure_side_by_side(steps, 20, 300)
    print(f"| {'x'.join(map(str, shape))} | {r['eager'].ms * 1e3:.0f} | {r['fastres'].ms * 1e3:.0f} "
          f"| {r['eager'].ms / r['fastres'].ms:.2f}x |", flush=True)

"""Training steps of a CIFAR ResNet side by side in one process: plain PyTorch modules, the
fused model, and the fused model with its option-A shortcuts on PyTorch's slice + pad (the
code before fastres.ops.shortcut_a). Each round times one step of each; the figures are the
medians over rounds of the per-round ratios.

    python docs/cpu/2026-12-03-shortcut-a-layout.py [MODEL] [ROUNDS] [cl|nchw]
    KEEP=1: keep freed memory in the process (fastres.bench.heap), as the suite's
    --keep-freed-memory does.
"""
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

import fastres
from fastres.nn import ShortcutA

if os.environ.get("KEEP") == "1":
    from fastres.bench.heap import keep_freed_memory
    keep_freed_memory()

name = sys.argv[1] if len(sys.argv) > 1 else "resnet20"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 40
cl = (sys.argv[3] if len(sys.argv) > 3 else "cl") == "cl"
batch = {"resnet20": 64, "resnet32": 64, "resnet56": 32}[name]
torch.manual_seed(0)


def make(fused):
    m = getattr(fastres.models, name)(fused=fused)
    if cl:
        m = m.to(memory_format=torch.channels_last)
    return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


variants = {"plain": make(False), "fused": make(True), "fused_slice_pad": make(True)}
for mod in variants["fused_slice_pad"][0].modules():
    if isinstance(mod, ShortcutA):  # the old path: PyTorch's slice + pad, NCHW gradient
        mod.forward = types.MethodType(lambda self, x, fused=False: ShortcutA.forward(self, x),
                                       mod)
x = torch.randn(batch, 3, 32, 32)
if cl:
    x = x.contiguous(memory_format=torch.channels_last)
t = torch.randint(0, 10, (batch,))


def step(m, opt):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), t).backward()
    opt.step()


for m, opt in variants.values():
    for _ in range(2):
        step(m, opt)
times = {k: [] for k in variants}
ratios = []
for _ in range(rounds):
    for k, (m, opt) in variants.items():
        t0 = time.perf_counter()
        step(m, opt)
        times[k].append(time.perf_counter() - t0)
    p, f, o = (times[k][-1] for k in variants)
    ratios.append((p / f, p / o, o / f))
med = [statistics.median(r[i] for r in ratios) for i in range(3)]
print(f"{name} {'channels_last' if cl else 'NCHW'} batch {batch}, {rounds} rounds: "
      + ", ".join(f"{k} {batch / statistics.median(v):.0f} img/s" for k, v in times.items())
      + f"; fused vs plain {med[0]:.3f}x, fused with slice+pad vs plain {med[1]:.3f}x,"
      f" fused vs fused with slice+pad {med[2]:.3f}x")

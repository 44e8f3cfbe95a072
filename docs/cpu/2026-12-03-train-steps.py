"""Training steps (forward, cross-entropy, backward, SGD with momentum) of fastres's plain
(`fused=False`) and fused models side by side in one process: each round times one step of
each; the result is the median over rounds of the per-round ratio plain/fused, and the
median images/s of each.

    python docs/cpu/2026-12-03-train-steps.py MODEL ROUNDS [cl|nchw]
    (resnet18: batch 16 at 112 px, resnet50: 8 at 112 px, resnet20: 64 at 32 px)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastres

name, rounds = sys.argv[1], int(sys.argv[2])
cl = len(sys.argv) > 3 and sys.argv[3] == "cl"
batch = {"resnet18": 16, "resnet50": 8, "resnet20": 64}[name]
px = 32 if name == "resnet20" else 112
torch.manual_seed(0)


def make(fused):
    m = getattr(fastres.models, name)(fused=fused)
    if cl:
        m = m.to(memory_format=torch.channels_last)
    return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


variants = {"plain": make(False), "fused": make(True)}
x = torch.randn(batch, 3, px, px)
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
for _ in range(rounds):
    for k, (m, opt) in variants.items():
        t0 = time.perf_counter()
        step(m, opt)
        times[k].append(time.perf_counter() - t0)
ratio = statistics.median(p / f for p, f in zip(times["plain"], times["fused"]))
print(f"{name} {'channels_last' if cl else 'NCHW'} batch {batch} @ {px}, {rounds} rounds: "
      + ", ".join(f"{k} {batch / statistics.median(v):.1f} img/s" for k, v in times.items())
      + f"; fused vs plain {ratio:.3f}x")

"""A fused network's CPU training step with two layout rules for its convolutions, side by side
in one process (steps alternating, the order flipped every round, freed memory kept):

* "code": fastres.nn.conv_bn.cpu_conv_layout as it is: channels-last where the weight is
  channels-last contiguous (every 1x1 weight is, being contiguous in both layouts) or the
  activation has at least as many elements as the weight;
* "size": the same, but a weight contiguous in both layouts (1x1) is decided by size like the
  others, and a 1x1 layer keeps a channels-last input channels-last (a channels-last model).

docs/cpu/2026-12-03-conv-layouts.py timed each convolution alone and took "size" for the
rule; it found the deep 1x1 layers of ResNet-50 (7x7 and 4x4 at 112 px) 5-12% faster NCHW.

    python docs/cpu/2026-12-03-conv-layout-1x1.py MODEL ROUNDS [cl]
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastres
import fastres.nn.conv_bn as cb
from fastres.bench.heap import keep_freed_memory

keep_freed_memory()
name, rounds = sys.argv[1], int(sys.argv[2])
channels_last = "cl" in sys.argv[3:]
batch, px = {"resnet18": (16, 112), "resnet50": (8, 112), "resnet20": (64, 32)}[name]
torch.manual_seed(0)
x = torch.randn(batch, 3, px, px)
target = torch.randint(0, 10, (batch,))
model = getattr(fastres.models, name)(fused=True)
if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)


def by_size(x, weight):
    if not cb._cpu_layout_ok(x):
        return x
    w_cl = weight.is_contiguous(memory_format=torch.channels_last)
    if w_cl and not weight.is_contiguous():
        cl = True  # a channels-last model's (3x3, 7x7) weight
    elif w_cl and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        cl = True  # a 1x1 weight and a channels-last input: stays
    else:
        cl = x.numel() >= weight.numel()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


rules = {"code": cb.cpu_conv_layout, "size": by_size}


def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()
    opt.step()


for rule in rules.values():
    cb.cpu_conv_layout = rule
    step()
    step()
times = {k: [] for k in rules}
items = list(rules.items())
for r in range(rounds):
    for k, rule in (items if r % 2 == 0 else items[::-1]):
        cb.cpu_conv_layout = rule
        start = time.perf_counter()
        step()
        times[k].append(time.perf_counter() - start)
cb.cpu_conv_layout = rules["code"]
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(f"{name} {'channels_last' if channels_last else 'NCHW'} {batch}@{px}: code {med['code']:.1f} ms, "
      f"size {med['size']:.1f} ms a step (median of {rounds}); size / code {med['size'] / med['code']:.3f}")

"""Where a training step's time goes (PyTorch profiler, self CPU time over 5 steps): the
convolutions (oneDNN forward and backward), the BatchNorm/ReLU/add ops (fastres's fused op,
or PyTorch's batch_norm, relu, add and their backwards), everything else.

    python docs/cpu/2026-12-03-train-profile.py MODEL fused|plain
    (resnet18: batch 16 at 112 px, resnet50: 8 at 112 px, resnet20: 64 at 32 px; NCHW)
"""
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastres

name, fused = sys.argv[1], sys.argv[2] == "fused"
batch = {"resnet18": 16, "resnet50": 8, "resnet20": 64}[name]
px = 32 if name == "resnet20" else 112
m = getattr(fastres.models, name)(fused=fused)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(batch, 3, px, px)
t = torch.randint(0, 10, (batch,))


def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), t).backward()
    opt.step()


for _ in range(3):
    step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(5):
        step()
CONV = {"aten::convolution_backward", "aten::mkldnn_convolution"}
BN = {"fastres::bn_act_forward", "fastres::bn_act_backward", "aten::native_batch_norm",
      "aten::native_batch_norm_backward", "aten::threshold_backward", "aten::clamp_min",
      "aten::relu_", "aten::clamp_min_", "aten::add"}
parts = {"convolutions": 0.0, "BatchNorm/ReLU/add": 0.0, "other": 0.0}
for e in prof.key_averages():
    key = ("convolutions" if e.key in CONV else "BatchNorm/ReLU/add" if e.key in BN
           else "other")
    parts[key] += e.self_cpu_time_total
total = sum(parts.values())
print(f"{name} {'fused' if fused else 'plain'}: {total / 5e3:.1f} ms a step; "
      + ", ".join(f"{k} {v / total:.1%}" for k, v in parts.items()))

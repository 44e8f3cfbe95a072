"""Each convolution of a ResNet (its shapes recorded from a forward pass), forward + backward
timed side by side in three layouts: NCHW input and weight; channels-last input, NCHW weight
(what fastres's cpu_conv_layout picks for an NCHW model where the activation is at least as
large as the weight); both channels-last (a channels-last model). Medians over rounds, ms; the
last line: the sum over the network, each shape times its count, also for the heuristic's
choice and for the better of the first two per layer (layout conversions not counted). `heur` is cpu_conv_layout's
choice for an NCHW model.

    python docs/cpu/2026-12-03-conv-layouts.py resnet50 8 112 10
"""
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
name = sys.argv[1]; B = int(sys.argv[2]); px = int(sys.argv[3]); R = int(sys.argv[4])
m = getattr(fastres.models, name)(fused=False)
shapes = []
def hook(mod, inp, out):
    shapes.append((tuple(inp[0].shape), tuple(mod.weight.shape), mod.stride, mod.padding))
hs = [mm.register_forward_hook(hook) for mm in m.modules() if isinstance(mm, nn.Conv2d)]
m(torch.randn(B, 3, px, px))
cnt = Counter(shapes)
tot = Counter()
for (xs, ws, st, pd), n in cnt.items():
    w = (torch.randn(ws) * 0.05).requires_grad_()
    wcl = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    x0 = torch.randn(xs)
    need_x = xs[1] != 3
    xn = x0.clone().requires_grad_(need_x); xc = x0.contiguous(memory_format=torch.channels_last).requires_grad_(need_x)
    y = F.conv2d(x0, w.detach(), None, st, pd)
    dyn = torch.randn_like(y); dyc = dyn.contiguous(memory_format=torch.channels_last)
    def run(x, w, dy):
        x.grad = None; w.grad = None
        F.conv2d(x, w, None, st, pd).backward(dy)
    V = {"nchw": (xn, w, dyn), "cl_x": (xc, w, dyc), "cl_xw": (xc, wcl, dyc)}
    T = {k: [] for k in V}
    for k, a in V.items(): run(*a)
    for r in range(R):
        for k, a in V.items():
            t0 = time.perf_counter(); run(*a); T[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in T.items()}
    for k in med: tot[k] += med[k] * n
    xn_el = xs[0]*xs[1]*xs[2]*xs[3]; wn = ws[0]*ws[1]*ws[2]*ws[3]
    heur = "cl" if xn_el >= wn else "nchw"
    tot["heuristic"] += med["cl_x" if heur == "cl" else "nchw"] * n
    tot["best_of_nchw_cl_x"] += min(med["nchw"], med["cl_x"]) * n
    print(f"{n:2d}x x{xs} w{ws} s{st[0]} heur={heur:4s} " + " ".join(f"{k} {v:.2f}" for k, v in med.items()))
print({k: round(v, 1) for k, v in tot.items()})

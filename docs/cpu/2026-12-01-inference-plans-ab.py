"""Folded CPU inference with and without the per-layer plans (fastres.nn.conv_bn._PLANS),
against the plain model, side by side in one process (fastres.bench.model_benchmark.
measure_side_by_side: every round runs each variant once, the order rotating). Each variant
has its own copy of the model (the folded-weight caches are per BatchNorm module). fp32, eval,
no_grad, 2 threads. Prints one markdown row per model, batch and layout: medians in ms and the
ratios. Usage: python docs/cpu/2026-12-01-inference-plans-ab.py [rounds]"""
import copy
import sys

import torch

import fastres
import fastres.nn.conv_bn as cb
from fastres.bench.model_benchmark import measure_side_by_side

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
planned = cb._planned


def without_plans(model, x):
    def run():
        cb._planned = lambda *a: (None, None)
        try:
            return model(x)
        finally:
            cb._planned = planned
    return run


print("| model | batch @ px | layout | plain ms | fused, no plans ms | fused ms | fused vs plain "
      "| fused vs no plans |")
print("|---|---|---|---|---|---|---|---|")
for name, batch, px in [("resnet20", 1, 32), ("resnet20", 8, 32), ("resnet20", 64, 32),
                        ("resnet18", 1, 112), ("resnet50", 1, 112)]:
    torch.manual_seed(0)
    plain = fastres.models.get_model(name, fused=False).eval()
    fused = fastres.models.get_model(name, fused=True).eval()
    fused.load_state_dict(plain.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last):
        p = copy.deepcopy(plain).to(memory_format=fmt)
        f = copy.deepcopy(fused).to(memory_format=fmt)
        n = copy.deepcopy(fused).to(memory_format=fmt)
        x = torch.randn(batch, 3, px, px).contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(f(x), p(x), rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(without_plans(n, x)(), f(x), rtol=0, atol=0)
            r = measure_side_by_side({"plain": lambda: p(x), "noplan": without_plans(n, x),
                                      "fused": lambda: f(x)}, warmup=10,
                                     iters=max(10, rounds // batch))
        ms = {k: v.ms for k, v in r.items()}
        layout = "NCHW" if fmt == torch.contiguous_format else "channels_last"
        print(f"| {name} | {batch} @ {px} | {layout} | {ms['plain']:.3f} | {ms['noplan']:.3f} "
              f"| {ms['fused']:.3f} | {ms['plain'] / ms['fused']:.2f}x "
              f"| {ms['noplan'] / ms['fused']:.2f}x |", flush=True)

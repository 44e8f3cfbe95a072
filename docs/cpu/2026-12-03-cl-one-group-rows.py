"""A/B of the channels-last backward's reduction, streaming rows against tiles, side by side in
one process. Ran against a temporary build (not kept) in which `fastres._C._experiment(e)` set a
field of BackwardArgs that the reduction's choice read: e = 0 the rule of then (stream from
kStreamReduction elements on), 1 stream only where a row holds more than one channel group
(C > kGroup * STEP, the rule kept), 2 never stream (tiles always).

    python docs/cpu/2026-12-03-cl-one-group-rows.py ROUNDS E
    ATEN_CPU_CAPABILITY=avx2 python docs/cpu/2026-12-03-cl-one-group-rows.py ROUNDS 2
"""
import torch, sys
import fastres
from fastres._extension import _C
from fastres.bench.heap import keep_freed_memory
from fastres.bench.model_benchmark import measure_side_by_side
keep_freed_memory()
bwd = torch.ops.fastres.bn_act_backward; fwd = torch.ops.fastres.bn_act_forward
rounds = int(sys.argv[1])
def at(e, f):
    def g():
        _C._experiment(e); return f()
    return g
shapes = [(64, 32, 16, 16), (64, 64, 16, 16), (2, 64, 112, 112), (32, 64, 16, 16), (8, 64, 56, 56), (16, 32, 32, 32), (2, 128, 56, 56), (2, 256, 56, 56)]
for n, c, h, w_ in shapes:
  for add in (False, True):
    steps = {}
    for e in (0, int(sys.argv[2])):
        x = torch.randn(n, c, h, w_).contiguous(memory_format=torch.channels_last)
        r = torch.randn_like(x) if add else None
        w = torch.ones(c); b = torch.zeros(c); rm = torch.zeros(c); rv = torch.ones(c)
        g = torch.randn_like(x)
        y, mean, var = fwd(x, r, w, b, rm, rv, True, 1e-5, True)
        yy = y if add else None
        steps[f"e{e}"] = at(e, lambda g=g, x=x, yy=yy, w=w, b=b, mean=mean, var=var: bwd(g, x, yy, w, b, mean, var, True, 1e-5, True, add))
    res = measure_side_by_side(steps, 5, rounds)
    ms = {k: v.ms * 1e3 for k, v in res.items()}
    print(f"CL {n}x{c}x{h}x{w_} add={add} ({n*c*h*w_/2**19:.2f}x2^19): stream {ms['e0']:.0f}us exp {list(ms.values())[1]:.0f}us  exp gain {ms['e0']/list(ms.values())[1]:.2f}x", flush=True)
_C._experiment(0)

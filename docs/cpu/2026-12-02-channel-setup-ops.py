import torch, time, sys
import fastres  # noqa: F401 (registers torch.ops.fastres)
tag=sys.argv[1]
op = torch.ops.fastres.bn_act_forward; bop = torch.ops.fastres.bn_act_backward
def t(f, n=3000):
    for _ in range(200): f()
    ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[0]*1e6, ts[len(ts)//2]*1e6
for C,H in ((512,7),(2048,7),(256,14)):
  for cl in (True, False):
    x = torch.randn(2,C,H,H)
    if cl: x = x.contiguous(memory_format=torch.channels_last)
    w = torch.ones(C); b = torch.zeros(C); rm = torch.zeros(C); rv = torch.ones(C)
    y, m, v = op(x, None, w, b, rm, rv, True, 1e-5, True)
    g = torch.randn_like(y)
    f1 = t(lambda: op(x, None, w, b, rm, rv, True, 1e-5, True))
    f2 = t(lambda: bop(g, x, y, w, b, m, v, True, 1e-5, True, False))
    print(f"{tag} {C}x{H} {'CL  ' if cl else 'NCHW'} fwd min {f1[0]:6.1f} med {f1[1]:6.1f}   bwd min {f2[0]:6.1f} med {f2[1]:6.1f}", flush=True)

"""The fused CPU kernels alone (fastres::bn_act_forward / bn_act_backward called directly, no
autograd, fp32, 2 threads, training statistics, ReLU), medians of 1,500 calls in us. Run it
with each of two builds, alternating, to compare them (the label is the first argument).
Usage: PYTHONPATH=<checkout> python docs/cpu/2026-12-02-one-region-kernels.py <label>"""
import torch, time, sys
import fastres  # noqa: F401  (registers the ops)
torch.set_num_threads(2)
op_f = torch.ops.fastres.bn_act_forward.default
op_b = torch.ops.fastres.bn_act_backward.default
def med(f, n=1500):
    for _ in range(100): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e6
out=[]
for shp, cl in [((2,128,28,28),False),((2,1024,14,14),False),((2,2048,7,7),False),((2,512,7,7),True),((2,2048,7,7),True),((2,512,14,14),True)]:
    c=shp[1]
    x=torch.randn(shp); 
    if cl: x=x.contiguous(memory_format=torch.channels_last)
    w=torch.ones(c); b=torch.zeros(c)
    with torch.no_grad():
        y,m,v=op_f(x,None,w,b,None,None,True,1e-5,True)
    g=torch.randn_like(x)
    tf=med(lambda: op_f(x,None,w,b,None,None,True,1e-5,True))
    tb=med(lambda: op_b(g,x,None,w,b,m,v,True,1e-5,True,False))
    out.append(f"{'x'.join(map(str,shp))} {'CL' if cl else 'NCHW'} fwd {tf:.0f} bwd {tb:.0f}")
print(sys.argv[1], " | ".join(out))

"""The fused CPU kernels alone (bn_act_forward, bn_act_backward) against torch.relu on the same
tensor, and the training op step (forward + backward through autograd) of fastres against eager
PyTorch's separate ops, side by side in one process (measure_side_by_side). Two builds cannot
share a process (one operator library each), so the script runs once per build, alternately,
and prints ratios to in-process anchors (relu, eager) that the build does not change.
Usage: python docs/cpu/2026-12-02-kernel-ab.py ROUNDS TAG  (run from the build's checkout)"""
import sys, torch, fastres  # noqa: F401 (registers torch.ops.fastres)
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.workloads import OpCase, make_op_step
it = int(sys.argv[1]); tag = sys.argv[2]
F = torch.ops.fastres.bn_act_forward; B = torch.ops.fastres.bn_act_backward
res = []
for cl in (False, True):
  for op, n, c, h in [("bn_relu",2,512,7),("bn_add_relu",2,2048,7),("bn_relu",2,256,14),("bn_add_relu",2,1024,14),("bn_relu",8,512,4),("bn_relu",64,64,8)]:
    x = torch.randn(n,c,h,h)
    if cl: x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if op == "bn_add_relu" else None
    w = torch.rand(c)+.5; b = torch.randn(c); rm = torch.zeros(c); rv = torch.ones(c)
    g = torch.randn_like(x)
    out, mean, var = F(x, r, w, b, rm, rv, True, 1e-5, True)
    o = out if r is not None else None
    steps = {"fwd": lambda: F(x, r, w, b, rm, rv, True, 1e-5, True),
             "bwd": lambda: B(g, x, o, w, b, mean, var, True, 1e-5, True, r is not None),
             "relu": lambda: torch.relu(x),
             "eager": make_op_step(OpCase(op, c, h, 1), n, torch.float32, cl, "cpu", "eager", True),
             "fastres": make_op_step(OpCase(op, c, h, 1), n, torch.float32, cl, "cpu", "fastres:cpu", True)}
    t = {k: v.ms*1e3 for k, v in measure_side_by_side(steps, 20, it).items()}
    print(f"{tag} {'CL  ' if cl else 'NCHW'} {op:11s} {n}x{c}x{h}x{h}: fwd/relu {t['fwd']/t['relu']:.2f} bwd/relu {t['bwd']/t['relu']:.2f} step eager/fastres {t['eager']/t['fastres']:.2f}  (fwd {t['fwd']:.0f} bwd {t['bwd']:.0f} relu {t['relu']:.0f} us)", flush=True)

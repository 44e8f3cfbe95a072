"""Channels-last fused BN(+add)+ReLU, training: the kernels alone (bn_act_forward,
bn_act_backward) and the op step through autograd against eager PyTorch's separate ops, side by
side in one process (measure_side_by_side), freed memory kept (fastres.bench.heap). ResNet-50's
BN shapes at batch 2 and 8 (112 px), resnet20's at 64 and resnet18's at 16. Two builds cannot
share a process: run once per build, alternately, each labelled by TAG, and summarise with
2026-12-03-cl-kernel-summary.py.
Usage: TAG=name [DT=bfloat16] [ONLY=2x256x56x56,...] python docs/cpu/2026-12-03-cl-kernel-ab.py ROUNDS MAX_ELEMENTS"""
import sys, os, torch, fastres  # noqa
from fastres.bench.heap import keep_freed_memory
keep_freed_memory()
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.workloads import OpCase, make_op_step
it = int(sys.argv[1]); tag = os.environ.get("TAG", "-")
F = torch.ops.fastres.bn_act_forward; B = torch.ops.fastres.bn_act_backward
shapes = [s for s in [("bn_relu",2,64,112),("bn_relu",2,64,56),("bn_add_relu",2,256,56),("bn_relu",2,128,56),("bn_relu",2,128,28),("bn_add_relu",2,512,28),("bn_relu",2,256,28),("bn_relu",2,256,14),("bn_add_relu",2,1024,14),("bn_relu",2,512,14),("bn_relu",2,512,7),("bn_add_relu",2,2048,7),
          ("bn_relu",64,32,16),("bn_add_relu",64,16,32),("bn_add_relu",64,64,8),("bn_relu",16,64,56),("bn_add_relu",16,64,28),("bn_add_relu",16,128,14),("bn_relu",16,256,7),("bn_relu",8,128,14),("bn_add_relu",8,512,14),("bn_relu",8,256,7),("bn_add_relu",8,1024,7),("bn_relu",8,512,4),("bn_add_relu",8,2048,4),("bn_relu",16,512,4),("bn_add_relu",16,256,7)] if (len(sys.argv) < 3 or (s[1]*s[3]*s[3] <= int(sys.argv[2]))) and
          (not os.environ.get("ONLY") or f"{s[1]}x{s[2]}x{s[3]}x{s[3]}" in os.environ["ONLY"].split(","))]
for op, n, c, h in shapes:
    x = torch.randn(n,c,h,h, dtype=getattr(torch, os.environ.get("DT","float32"))).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if op == "bn_add_relu" else None
    w = torch.rand(c)+.5; b = torch.randn(c); rm = torch.zeros(c); rv = torch.ones(c)
    g = torch.randn_like(x)
    out, mean, var = F(x, r, w, b, rm, rv, True, 1e-5, True)
    o = out if r is not None else None
    steps = {"fwd": lambda: F(x, r, w, b, rm, rv, True, 1e-5, True),
             "bwd": lambda: B(g, x, o, w, b, mean, var, True, 1e-5, True, r is not None),
             "eager": make_op_step(OpCase(op, c, h, 1), n, x.dtype, True, "cpu", "eager", True),
             "fastres": make_op_step(OpCase(op, c, h, 1), n, x.dtype, True, "cpu", "fastres:cpu", True)}
    t = {k: v.ms*1e3 for k, v in measure_side_by_side(steps, 10, it).items()}
    print(f"{tag} {op:11s} {n}x{c}x{h}x{h}: fwd {t['fwd']:7.0f} bwd {t['bwd']:7.0f} eager {t['eager']:7.0f} fastres {t['fastres']:7.0f} us  eager/fastres {t['eager']/t['fastres']:.2f}", flush=True)

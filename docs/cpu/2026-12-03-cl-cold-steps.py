"""The training op step of fastres and of eager PyTorch (forward + backward through autograd, fp32,
ResNet-50's BN shapes at batch 2, channels-last unless NCHW is set), side by side in one
process with freed memory kept, twice: cold (each timed step first evicts the caches with an
in-place pass over 64 MiB, whose own time, measured alone in the same rounds, is subtracted)
and warm (the step alone). Run once per build, alternately, labelled by TAG; summarise with
2026-12-03-cl-cold-summary.py.
Usage: TAG=name [ONLY=2x128x28x28,...] [NCHW=1] python docs/cpu/2026-12-03-cl-cold-steps.py ROUNDS"""
import sys, os, torch, fastres  # noqa
from fastres.bench.heap import keep_freed_memory
keep_freed_memory()
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.workloads import OpCase, make_op_step
it = int(sys.argv[1]); tag = os.environ.get("TAG", "-")
big = torch.zeros(16 << 20)
def evict(): big.add_(1.0)
shapes = [("bn_relu",2,64,112),("bn_relu",2,64,56),("bn_add_relu",2,256,56),("bn_relu",2,128,56),("bn_relu",2,128,28),("bn_add_relu",2,512,28),("bn_relu",2,256,28),("bn_relu",2,256,14),("bn_add_relu",2,1024,14),("bn_relu",2,512,14),("bn_relu",2,512,7),("bn_add_relu",2,2048,7)]
only = os.environ.get("ONLY")
cl = os.environ.get("NCHW") is None
for op, n, c, h in shapes:
    if only and f"{n}x{c}x{h}x{h}" not in only.split(","): continue
    e = make_op_step(OpCase(op, c, h, 1), n, torch.float32, cl, "cpu", "eager", True)
    f = make_op_step(OpCase(op, c, h, 1), n, torch.float32, cl, "cpu", "fastres:cpu", True)
    steps = {"evict": evict, "eager": lambda: (evict(), e()), "fastres": lambda: (evict(), f()),
             "eager_warm": e, "fastres_warm": f}
    t = {k: v.ms*1e3 for k, v in measure_side_by_side(steps, 5, it).items()}
    ec, fc = t["eager"] - t["evict"], t["fastres"] - t["evict"]
    print(f"{tag} {op:11s} {n}x{c}x{h}x{h}: cold eager {ec:6.0f} fastres {fc:6.0f} us eager/fastres {ec/fc:.2f} | warm eager {t['eager_warm']:6.0f} fastres {t['fastres_warm']:6.0f} eager/fastres {t['eager_warm']/t['fastres_warm']:.2f} | evict {t['evict']:.0f}", flush=True)

"""The small fused ops (training-mode forward + backward, channels-last, batch 2) against eager
PyTorch's separate ops, side by side in one process, under the OpenMP wait policy of the
environment. Usage:
    python docs/cpu/2026-12-01-omp-wait-policy.py
    OMP_WAIT_POLICY=ACTIVE python docs/cpu/2026-12-01-omp-wait-policy.py
    OMP_WAIT_POLICY=PASSIVE python docs/cpu/2026-12-01-omp-wait-policy.py
Prints the medians in us and eager / fastres (used in docs/cpu/2026-12-01-omp-wait-policy.md)."""
import torch, sys, os
from fastres.bench.workloads import make_op_step, OpCase
from fastres.bench.model_benchmark import measure_side_by_side
torch.set_num_threads(2)
out = []
for (op, c, hw) in [("bn_relu",512,7),("bn_add_relu",2048,7),("bn_relu",256,14),("bn_relu",512,14),("bn_add_relu",1024,14),("bn_relu",128,28)]:
    case = OpCase(op, c, hw, 1)
    steps = {impl: make_op_step(case, 2, torch.float32, True, "cpu", impl, True) for impl in ("eager","fastres:cpu")}
    res = measure_side_by_side(steps, 30, 400)
    e, f = res["eager"].ms*1000, res["fastres:cpu"].ms*1000
    print(f"{os.environ.get('OMP_WAIT_POLICY','default')} {op} {c}x{hw} eager {e:.0f} fastres {f:.0f} ratio {e/f:.2f}", flush=True)

import os, sys, time, torch, fastres
from fastres.bench.workloads import make_op_step, RESNET50_BN_SHAPES
from fastres.bench import heap
heap.keep_freed_memory()
torch.set_num_threads(2)
lay = sys.argv[1]
variants = {  # name -> env
  "old": dict(AB_BLOCK="32768", AB_SLAB="0", AB_OLDPART="1"),
  "part": dict(AB_BLOCK="32768", AB_SLAB="0"),
  "part+slab": dict(AB_BLOCK="32768"),
  "part+8k": dict(AB_SLAB="0"),
  "new": dict(),
}
def med(step, reps=15):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[len(ts)//2] * 1e3
def setenv(d):
    for k in ("AB_BLOCK", "AB_SLAB", "AB_OLDPART"): os.environ.pop(k, None)
    os.environ.update(d)
tot = {k: 0 for k in variants}
print(" " * 27 + " ".join(f"{k:>10s}" for k in variants))
for case in RESNET50_BN_SHAPES:
    f = make_op_step(case, 2, torch.float32, lay == "cl", "cpu", "fastres:cpu", True)
    for _ in range(5): f()
    res = {k: [] for k in variants}
    for i in range(6):
        for k, d in variants.items():
            setenv(d); res[k].append(med(f))
    m = {k: min(v) for k, v in res.items()}
    for k in variants: tot[k] += m[k] * case.count
    print(f"{case.name:26s} " + " ".join(f"{m[k]:10.3f}" for k in variants), flush=True)
print(f"{'all':26s} " + " ".join(f"{tot[k]:10.2f}" for k in variants))

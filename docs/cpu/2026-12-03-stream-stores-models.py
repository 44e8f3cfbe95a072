"""Training steps, streaming stores at 2 MiB / 8 MiB against none (fastres._C._cpu_stream_store_min_bytes), and the
unfused model, side by side in one process; each variant its own model (same weights).

    python docs/cpu/2026-12-03-stream-stores-models.py ROUNDS
"""
import torch, sys
import fastres
from fastres._extension import _C
from fastres.bench.heap import keep_freed_memory
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.workloads import make_model, make_model_step
keep_freed_memory()
rounds = int(sys.argv[1])
NEVER = 1 << 62
def at(t, f):
    def g():
        _C._cpu_stream_store_min_bytes(t); f()
    return g
for name, batch, px, cl in [("resnet20", 64, 32, True), ("resnet18", 16, 112, False)]:
    sd = fastres.models.get_model(name, fused=False).state_dict()
    steps = {}
    for v, t in (("s2M", 2 << 20), ("s8M", 8 << 20), ("off", NEVER)):
        m = make_model(name, "fastres", "cpu", cl, state_dict=sd)
        steps[v] = at(t, make_model_step(m, "train", batch, px, torch.float32, cl, "cpu")[0])
    pm = make_model(name, "plain", "cpu", cl, state_dict=sd)
    steps["plain"] = make_model_step(pm, "train", batch, px, torch.float32, cl, "cpu")[0]
    res = measure_side_by_side(steps, 2, rounds)
    ms = {k: v.ms for k, v in res.items()}
    print(f"{name} {'CL' if cl else 'NCHW'}: s8M {ms['s8M']:.1f} ({ms['off']/ms['s8M']:.3f}x) s2M {ms['s2M']:.1f} off {ms['off']:.1f} plain {ms['plain']:.1f} | s2M/off {ms['off']/ms['s2M']:.3f}x plain/s2M {ms['plain']/ms['s2M']:.3f}x plain/off {ms['plain']/ms['off']:.3f}x", flush=True)
_C._cpu_stream_store_min_bytes(2 << 20)

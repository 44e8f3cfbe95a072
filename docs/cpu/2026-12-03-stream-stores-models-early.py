"""The first two model A/B runs of streaming stores (threshold THRESHOLD bytes, a second
variant at 4 MiB added for run 2) against none and the unfused model, side by side.

    python docs/cpu/2026-12-03-stream-stores-models-early.py ROUNDS THRESHOLD
"""
import torch, sys
import fastres
from fastres._extension import _C
from fastres.bench.heap import keep_freed_memory
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.workloads import make_model, make_model_step
keep_freed_memory()
rounds = int(sys.argv[1]); thr = int(sys.argv[2])
OFF = 1 << 62
def with_thr(t, f):
    def g():
        _C._cpu_stream_store_min_bytes(t); f()
    return g
configs = [("resnet20", 64, 32, False), ("resnet20", 64, 32, True), ("resnet18", 16, 112, False), ("resnet18", 16, 112, True), ("resnet50", 8, 112, False), ("resnet50", 8, 112, True)]
for name, batch, px, cl in configs:
    plain = fastres.models.get_model(name, fused=False)
    sd = plain.state_dict()
    steps = {}
    for v, t in (("nt", thr), ("nt4M", 4 << 20), ("off", OFF)):
        m = make_model(name, "fastres", "cpu", cl, state_dict=sd)
        s, _ = make_model_step(m, "train", batch, px, torch.float32, cl, "cpu")
        steps[v] = with_thr(t, s)
    pm = make_model(name, "plain", "cpu", cl, state_dict=sd)
    steps["plain"], _ = make_model_step(pm, "train", batch, px, torch.float32, cl, "cpu")
    res = measure_side_by_side(steps, 2, rounds)
    ms = {k: v.ms for k, v in res.items()}
    print(f"{name} {batch}@{px} {'CL' if cl else 'NCHW'} train: nt {ms['nt']:.1f} nt4M {ms['nt4M']:.1f} ({ms['off']/ms['nt4M']:.3f}x) off {ms['off']:.1f} plain {ms['plain']:.1f} | nt gain {ms['off']/ms['nt']:.3f}x  plain/nt {ms['plain']/ms['nt']:.3f}x plain/off {ms['plain']/ms['off']:.3f}x", flush=True)
_C._cpu_stream_store_min_bytes(4 << 20)

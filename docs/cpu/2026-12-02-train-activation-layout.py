"""Training (or inference) steps of one fastres model, fused and plain, with NCHW weights fed an
NCHW batch, NCHW weights fed a channels-last batch (activations channels-last from the first
convolution on), and channels-last weights and batch, side by side in one process. Asks
whether the fused model should run its activations channels-last on the CPU whatever the
input's layout. Usage: python docs/cpu/2026-12-02-train-activation-layout.py MODEL BATCH SIZE
ROUNDS [train|infer]"""
import sys, torch, torch.nn.functional as F, fastres
from fastres.bench.model_benchmark import measure_side_by_side
torch.manual_seed(0)
name, batch, size, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mode = sys.argv[5] if len(sys.argv) > 5 else "train"
plain = fastres.models.get_model(name, fused=False); sd = plain.state_dict()
def mk(fused, wcl):
    m = fastres.models.get_model(name, fused=fused); m.load_state_dict(sd)
    if wcl: m = m.to(memory_format=torch.channels_last)
    return m
x = torch.randn(batch, 3, size, size); nc = plain.fc.out_features
y = torch.randint(0, nc, (batch,))
def step(m, act_cl):
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    m.train(mode == "train")
    def s():
        xi = x.contiguous(memory_format=torch.channels_last) if act_cl else x
        if mode == "train":
            opt.zero_grad(set_to_none=True); F.cross_entropy(m(xi), y).backward(); opt.step()
        else:
            with torch.no_grad(): m(xi)
    return s
steps = {"plain nchw": step(mk(False, False), False), "fused nchw": step(mk(True, False), False),
         "fused nchw-w cl-act": step(mk(True, False), True), "fused cl": step(mk(True, True), True),
         "plain nchw-w cl-act": step(mk(False, False), True), "plain cl": step(mk(False, True), True)}
r = measure_side_by_side(steps, 2, iters)
b = r["plain nchw"].ms
for k, v in r.items(): print(f"{name} {mode} {k:22s} {v.ms:8.2f} ms  vs plain nchw {b/v.ms:.2f}x  vs plain cl {r['plain cl'].ms/v.ms:.2f}x")

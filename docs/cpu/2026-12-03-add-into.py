"""The residual add of the folded CPU inference inside oneDNN's convolution, in place
(fastres.nn.conv_bn._onednn_conv_bn_add_into: conv + bias + residual written into the
residual's buffer, then ReLU) against a new output + add_ + relu_ (_onednn_conv_bn_act):
1. per layer: ResNet-20's residual layers at batch 64 and 1, channels-last, prepacked weights;
   the in-place variant works on a fresh copy of the residual each call, whose copy is timed
   apart and subtracted;
2. whole models: the fused models' inference program with and without it, side by side in one
   process (median over rounds of the per-round ratio), and torch.compile of the plain model.
Freed memory kept (fastres.bench.heap).

    python docs/cpu/2026-12-03-add-into.py ROUNDS
"""
import statistics
import sys
import time

import torch

import fastres
import fastres.nn.conv_bn as cb
from fastres.bench.heap import keep_freed_memory

rounds = int(sys.argv[1])
keep_freed_memory()
torch.manual_seed(0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
for n, c, hw in ((64, 16, 32), (64, 32, 16), (64, 64, 8), (1, 16, 32)):
    x = torch.randn(n, c, hw, hw).contiguous(memory_format=torch.channels_last)
    r = torch.randn(n, c, hw, hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
    b = torch.randn(c)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1,
                                                          list(x.shape))
    fs = {"new output + add_": lambda: cb._onednn_conv_bn_act(conv, x, packed, b, r, True),
          "into the residual": lambda: cb._onednn_conv_bn_add_into(conv, x, packed, b,
                                                                   r.clone(), True),
          "residual copy": lambda: r.clone()}
    with torch.no_grad():
        assert torch.equal(fs["new output + add_"](), fs["into the residual"]())
        t = {k: [] for k in fs}
        for _ in range(5):
            for f in fs.values():
                f()
        for _ in range(rounds):
            for k, f in fs.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    f()
                t[k].append((time.perf_counter() - t0) / 5 * 1e6)
    m = {k: statistics.median(v) for k, v in t.items()}
    into = m["into the residual"] - m["residual copy"]
    print(f"layer {n}x{c}x{hw}x{hw}: new output + add_ {m['new output + add_']:.0f} us, into the "
          f"residual {into:.0f} us (copy {m['residual copy']:.0f} us subtracted): "
          f"{m['new output + add_'] / into:.3f}x", flush=True)

into_fn = cb._onednn_conv_bn_add_into


def not_into(conv, x, packed, bias, residual, relu):
    return cb._onednn_conv_bn_act(conv, x, packed, bias, residual, relu)


for name, batch, px, cl in (("resnet20", 64, 32, False), ("resnet20", 64, 32, True),
                            ("resnet18", 16, 112, True), ("resnet50", 8, 112, True)):
    fmt = torch.channels_last if cl else torch.contiguous_format
    fn = getattr(fastres.models, name)
    torch.manual_seed(0)
    a = fn(fused=True).eval().to(memory_format=fmt)
    b = fn(fused=True).eval().to(memory_format=fmt)
    plain = fn(fused=False).eval().to(memory_format=fmt)
    b.load_state_dict(a.state_dict())
    plain.load_state_dict(a.state_dict())
    compiled = torch.compile(plain)
    x = torch.randn(batch, 3, px, px).contiguous(memory_format=fmt)

    def without():
        cb._onednn_conv_bn_add_into = not_into
        try:
            return b(x)
        finally:
            cb._onednn_conv_bn_add_into = into_fn

    steps = {"into": lambda: a(x), "without": without, "compile": lambda: compiled(x)}
    with torch.no_grad():
        assert torch.equal(a(x), without()) and torch.equal(a(x), without())
        for s in steps.values():
            s()
        names = list(steps)
        times = {k: [] for k in names}
        for i in range(rounds):
            shift = i % len(names)
            for k in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                steps[k]()
                times[k].append(time.perf_counter() - t0)
    ms = " ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in times.items())
    ratio = {k: statistics.median(p / q for p, q in zip(times[k], times["into"]))
             for k in ("without", "compile")}
    print(f"{name} {batch}@{px} {'channels_last' if cl else 'NCHW'}: ms {ms} | without/into "
          f"{ratio['without']:.3f}, compile/into {ratio['compile']:.3f}", flush=True)

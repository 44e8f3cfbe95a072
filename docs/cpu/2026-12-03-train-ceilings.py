"""How fast could a fused BatchNorm make each CPU training row of issue 14 at most?

For each model and layout, the plain network (fused=False) and the fused one (fused=True, the
same weights) train side by side in one process, steps alternating, each op timed by a
TorchDispatchMode (a wall clock around every ATen/fastres op; no torch.profiler, which with
record_shapes on made single fastres backward calls read 10-40x their time in a ResNet-50 step
on this VM). Per step it reports:

* plain and fused step times (median) and their ratio (the issue's "fused over plain");
* what plain PyTorch spends in the ops a fused BatchNorm replaces: native_batch_norm and its
  backward, relu / relu_ and threshold_backward, and the residual add (4-D `add` on
  activations; the optimizer's weight-decay `add` on parameters is left out);
* the ceiling: plain step / (plain step - those ops), the fused-over-plain ratio a BatchNorm
  + ReLU + add that cost nothing at all would give, with the convolutions as they are;
* what the fused network spends in fastres's ops, and in its convolutions against plain's;
* expected: plain step / (plain step - plain's ops + fastres's ops), the ratio the op times
  alone predict with the convolutions equal in both (what is left of "fused over plain" is
  the convolutions moving between the two networks);
* needed for 1.15x: the most fastres's ops could take in the fused step for fused over plain
  to reach 1.15x with the convolutions as in plain, as a share of plain's ops (negative: not
  even ops that cost nothing would do).

The dispatch-mode timer costs a few microseconds per op in both networks alike.

    python docs/cpu/2026-12-03-train-ceilings.py [ROUNDS] [MODEL[,MODEL...]]
"""
import collections
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.bench.heap import keep_freed_memory

keep_freed_memory()
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
MODELS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["resnet20", "resnet18", "resnet50"]
CONFIG = {"resnet20": (64, 32), "resnet18": (16, 112), "resnet50": (8, 112)}
BN_OPS = {"native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
          "_native_batch_norm_legit_no_training", "batch_norm_backward", "relu", "relu_",
          "threshold_backward"}
CONV_OPS = {"convolution", "convolution_backward"}
FASTRES_OPS = {"bn_act_forward", "bn_act_backward"}


class OpTimer(TorchDispatchMode):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch
        self.times = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        if name in BN_OPS:
            self.times["bn"] += elapsed
        elif name in ("add", "add_") and self._activation(args):
            self.times["bn"] += elapsed  # the residual add
        elif name in CONV_OPS:
            self.times["conv"] += elapsed
        elif name in FASTRES_OPS:
            self.times["fastres"] += elapsed
        return out

    def _activation(self, args):
        a = args[0] if args else None
        b = args[1] if len(args) > 1 else None
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 4
                and a.shape == b.shape and a.shape[0] == self.batch and a.shape[1] != 3
                and a.shape[-1] not in (1, 3))


def run(name, channels_last):
    batch, px = CONFIG[name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, px, px)
    target = torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    plain = getattr(fastres.models, name)(fused=False)
    fused = getattr(fastres.models, name)(fused=True)
    fused.load_state_dict(plain.state_dict())
    nets = {}
    for label, model in (("plain", plain), ("fused", fused)):
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
        nets[label] = (model, opt)

    def step(label, timer):
        model, opt = nets[label]
        with timer:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()

    for label in nets:
        for _ in range(2):
            step(label, OpTimer(batch))
    steps = {label: [] for label in nets}
    parts = {label: collections.Counter() for label in nets}
    order = list(nets)
    for r in range(ROUNDS):
        for label in (order if r % 2 == 0 else order[::-1]):
            timer = OpTimer(batch)
            start = time.perf_counter()
            step(label, timer)
            steps[label].append(time.perf_counter() - start)
            parts[label].update(timer.times)
    p = statistics.median(steps["plain"]) * 1e3
    f = statistics.median(steps["fused"]) * 1e3
    bn = parts["plain"]["bn"] / ROUNDS * 1e3
    fr = parts["fused"]["fastres"] / ROUNDS * 1e3
    cp = parts["plain"]["conv"] / ROUNDS * 1e3
    cf = parts["fused"]["conv"] / ROUNDS * 1e3
    layout = "channels_last" if channels_last else "NCHW"
    needed = p / 1.15 - (p - bn)
    print(f"| {name} | {batch} @ {px} | {layout} | {p:.1f} | {f:.1f} | {p / f:.2f}x | "
          f"{bn:.1f} ({bn / p:.1%}) | {p / (p - bn):.2f}x | {fr:.1f} ({fr / f:.1%}) | "
          f"{p / (p - bn + fr):.2f}x | {needed:.1f} ({needed / bn:.0%}) | {cp:.1f} / {cf:.1f} |",
          flush=True)


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastres CPU kernels "
      f"{fastres.build_info().get('cpu_kernels', '?')}, {ROUNDS} rounds")
print("| model | batch @ px | layout | plain ms | fused ms | fused over plain | plain's BN, ReLU, "
      "add ms (share) | ceiling | fused's fastres ops ms (share) | expected | needed for 1.15x ms "
      "(of plain's ops) | convolutions plain / fused ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in MODELS:
    for cl in (False, True):
        run(name, cl)

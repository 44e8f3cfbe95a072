"""Streaming (non-temporal) stores in the CPU BatchNorm kernels, A/B side by side in one
process (fastres.bench.model_benchmark.measure_side_by_side, freed memory kept):

  stream  outputs of at least THRESHOLD bytes stored streaming (fastres._C._cpu_stream_store_min_bytes)
  plain   no output stored streaming
  eager   (ops) PyTorch's batch_norm + add + relu; plain (models) the unfused fastres model

Ops: forward + backward of every ResNet-50 BatchNorm shape at batch 2, fp32, both layouts,
each variant with its own tensors. Models: training steps of the CPU suite's configurations,
each variant its own model (same weights).

    python docs/cpu/2026-12-03-stream-stores.py OP_ROUNDS MODEL_ROUNDS [THRESHOLD]
"""
import sys

import torch

import fastres
from fastres._extension import _C
from fastres.bench.heap import keep_freed_memory
from fastres.bench.model_benchmark import CPU_SUITE, measure_side_by_side
from fastres.bench.workloads import (RESNET50_BN_SHAPES, make_model, make_model_step,
                                     make_op_step)

op_rounds, model_rounds = int(sys.argv[1]), int(sys.argv[2])
threshold = int(sys.argv[3]) if len(sys.argv) > 3 else 4 << 20
NEVER = 1 << 62
keep_freed_memory()
default = _C._cpu_stream_store_min_bytes(threshold)
_C._cpu_stream_store_min_bytes(default)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels "
      f"{fastres.build_info()['cpu_kernels']}, threshold {threshold} bytes (default {default})")


def at(t, f):
    def step():
        _C._cpu_stream_store_min_bytes(t)
        f()
    return step


for cl in (False, True):
    total = dict.fromkeys(("eager", "stream", "plain"), 0.0)
    for case in RESNET50_BN_SHAPES:
        def fused():
            return make_op_step(case, 2, torch.float32, cl, "cpu", "fastres:cpu", True)
        steps = {"eager": make_op_step(case, 2, torch.float32, cl, "cpu", "eager", True),
                 "stream": at(threshold, fused()), "plain": at(NEVER, fused())}
        ms = {k: m.ms for k, m in measure_side_by_side(steps, 3, op_rounds).items()}
        for k in total:
            total[k] += ms[k] * case.count
        mb = 2 * case.channels * case.hw ** 2 * 4 / 1e6
        print(f"op {'CL  ' if cl else 'NCHW'} {case.name:24s} {mb:4.1f} MB | ms eager "
              f"{ms['eager']:.3f} stream {ms['stream']:.3f} plain {ms['plain']:.3f} | vs eager: "
              f"stream {ms['eager'] / ms['stream']:.2f}x plain {ms['eager'] / ms['plain']:.2f}x"
              f" | stream/plain {ms['plain'] / ms['stream']:.3f}x", flush=True)
    print(f"op {'CL  ' if cl else 'NCHW'} all layers (x count) | ms eager {total['eager']:.2f} "
          f"stream {total['stream']:.2f} plain {total['plain']:.2f} | vs eager: stream "
          f"{total['eager'] / total['stream']:.2f}x plain {total['eager'] / total['plain']:.2f}x",
          flush=True)

for name, batch, px, cl in CPU_SUITE:
    weights = fastres.models.get_model(name, fused=False).state_dict()
    steps = {}
    for variant, t in (("stream", threshold), ("plain", NEVER)):
        model = make_model(name, "fastres", "cpu", cl, state_dict=weights)
        steps[variant] = at(t, make_model_step(model, "train", batch, px, torch.float32, cl,
                                               "cpu")[0])
    unfused = make_model(name, "plain", "cpu", cl, state_dict=weights)
    steps["unfused"] = make_model_step(unfused, "train", batch, px, torch.float32, cl, "cpu")[0]
    ms = {k: m.ms for k, m in measure_side_by_side(steps, 2, model_rounds).items()}
    print(f"train {name} {batch}@{px} {'CL  ' if cl else 'NCHW'} | ms stream {ms['stream']:.1f} "
          f"plain {ms['plain']:.1f} unfused {ms['unfused']:.1f} | stream/plain "
          f"{ms['plain'] / ms['stream']:.3f}x | unfused/stream {ms['unfused'] / ms['stream']:.3f}x"
          f" unfused/plain {ms['unfused'] / ms['plain']:.3f}x", flush=True)
_C._cpu_stream_store_min_bytes(default)

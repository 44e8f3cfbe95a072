"""Layer level: every distinct convolution of ResNet-50 (the 7x7 stem included), training mode,
forward and forward+backward:

* ``cudnn``          PyTorch's convolution alone (F.conv2d; cuDNN on a GPU), for reference;
* ``cudnn+bn_relu``  that convolution, then fastres' fused BatchNorm+ReLU of its output
                     (fastres.functional.batch_norm_relu, batch statistics; backend "auto");
* ``triton``         fastres.ops.conv_bn: the Triton implicit-GEMM convolution with the previous
                     BatchNorm+ReLU in its prologue and the output's batch statistics from its
                     epilogue (the stem has no prologue: its input is the image).

``cudnn+bn_relu`` and ``triton`` do the same work per layer in a conv -> BN -> ReLU chain (one
convolution and one BatchNorm+ReLU), so they compare directly.

On a GPU: batch 256, bf16, channels_last, the real shapes. On a CPU: batch 2, fp32, channels
divided by 16 and maps of 4 to 16 pixels (test ids keep the ResNet-50 shape; extra_info has the
one run);
the Triton cases run there only under TRITON_INTERPRET=1 (set before pytest starts) and are
skipped otherwise. extra_info: ms (CUDA events), peak_gib, flops (2*N*P*Q*COUT*CIN*KH*KW
forward, 3x with backward) and tflops (flops over the median time).
"""
import dataclasses
import os

import pytest
import torch

import fastres
from fastres.bench.workloads import (CONV_IMPLS, RESNET50_CONV_SHAPES, conv_flops,
                                     make_conv_step)

from harness import DEVICE, GPU, SCALE, run_benchmark

DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH = 256 if GPU else 2
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sized(case):
    """The case as run here: the real shape on a GPU, a tiny one on a CPU."""
    if GPU:
        return case
    return dataclasses.replace(case, cin=case.cin if case.cin < 16 else case.cin // 16,
                               cout=case.cout // 16, hw=min(16, max(4, case.hw // 8)))


def _triton_skip_reason():
    if GPU:
        if "triton" not in fastres.available_backends():
            return "Triton is not available: " + str(fastres.backends._why_unavailable("triton"))
        return None
    if not INTERPRET:
        return ("the Triton convolution runs on CPU tensors only in the interpreter: set "
                "TRITON_INTERPRET=1 before starting pytest")
    if "triton" not in fastres.available_backends():
        return "Triton is not available: " + str(fastres.backends._why_unavailable("triton"))
    return None


PARAMS = [(c, impl) for c in RESNET50_CONV_SHAPES for impl in CONV_IMPLS]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.name}-{impl}" for c, impl in PARAMS])
def test_conv(benchmark, case, impl, backward):
    if impl == "triton":
        reason = _triton_skip_reason()
        if reason:
            pytest.skip(reason)
    benchmark.group = f"conv {case.name} {'fwd+bwd' if backward else 'fwd'}"
    run = _sized(case)
    step = make_conv_step(run, BATCH, DTYPE, True, DEVICE, impl, backward)
    flops = conv_flops(run, BATCH, backward)
    info = dict(op="conv", impl=impl, shape=[BATCH, run.cin, run.hw, run.hw],
                weight=[run.cout, run.cin, run.kernel, run.kernel], stride=run.stride,
                padding=run.padding, out_hw=run.out_hw, count=case.count, dtype=str(DTYPE),
                layout="channels_last", flops=flops)
    if impl == "cudnn+bn_relu":
        info["bn"] = f"fastres.functional.batch_norm_relu ({fastres.backends.resolve(DEVICE)})"
    if impl == "triton":
        info.update(prologue=run.prologue, stats=True)
    m = run_benchmark(benchmark, step, **info)
    benchmark.extra_info["tflops"] = m.per_second(flops) / 1e12
    assert benchmark.extra_info["tflops"] > 0

"""Op level: fused BN+ReLU and BN+add+ReLU, forward and forward+backward, each fastres backend
against the unfused PyTorch sequence and torch.compile of it, on every BatchNorm shape of
ResNet-50 (bf16 channels_last at batch 256 on a GPU; fp32 at batch 2, NCHW and channels_last,
on a CPU).
extra_info: ms (CUDA events), peak_gib, bytes and bandwidth_fraction (the op's minimal traffic
over the time, as a fraction of the device's measured copy bandwidth)."""
import pytest
import torch

from fastres.bench.timing import copy_bandwidth
from fastres.bench.workloads import (RESNET50_BN_SHAPES, fastres_backends, make_op_step,
                                     op_bytes)

from harness import DEVICE, GPU, SCALE, run_benchmark

DTYPE = torch.bfloat16 if GPU else torch.float32
CASES = [c for c in RESNET50_BN_SHAPES if c.hw <= SCALE.op_max_hw]


def _compile_cases():
    if SCALE.op_compile_cases < 0:
        return CASES
    # the smallest shape of each op on a CPU (Inductor compiles each shape anew)
    picked = []
    for op in ("bn_relu", "bn_add_relu"):
        picked += sorted((c for c in CASES if c.op == op),
                         key=lambda c: c.channels * c.hw * c.hw)[:SCALE.op_compile_cases // 2]
    return picked


IMPLS = ["eager"] + [f"fastres:{b}" for b in fastres_backends(DEVICE)]
PARAMS = [(c, impl) for c in CASES for impl in IMPLS] + [(c, "compile") for c in _compile_cases()]
# the GPU headline layout is channels_last; on a CPU both layouts matter (NCHW is the default)
LAYOUTS = ["channels_last"] if GPU else ["nchw", "channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,impl", PARAMS,
                         ids=[f"{c.name}-{impl.replace(':', '-')}" for c, impl in PARAMS])
def test_op(benchmark, case, impl, backward, layout):
    if impl == "compile" and layout != "channels_last":
        pytest.skip("torch.compile is timed in channels_last only (each case compiles anew)")
    benchmark.group = f"op {case.name} {'fwd+bwd' if backward else 'fwd'} {layout}"
    step = make_op_step(case, SCALE.op_batch, DTYPE, layout == "channels_last", DEVICE, impl,
                        backward)
    nbytes = op_bytes(case, SCALE.op_batch, DTYPE, backward)
    run_benchmark(benchmark, step, nbytes=nbytes, copy_bw=copy_bandwidth(DEVICE),
                  op=case.op, shape=[SCALE.op_batch, case.channels, case.hw, case.hw],
                  impl=impl, dtype=str(DTYPE), layout=layout)
    assert 0 < benchmark.extra_info["bandwidth_fraction"] < 100

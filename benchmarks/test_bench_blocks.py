"""Block level: ResNet-18's first BasicBlock and ResNet-50's first Bottleneck, fastres fused vs
the same block unfused (plain PyTorch) vs torch.compile of each, training (forward+backward)
and inference, AMP bf16 channels_last on a GPU (fp32 on a CPU)."""
import pytest
import torch

from fastres.bench.workloads import BLOCKS, make_block_step

from harness import DEVICE, GPU, SCALE, run_benchmark

DTYPE = torch.bfloat16 if GPU else torch.float32
IMPLS = ["unfused", "fused", "unfused compile", "fused compile"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("impl", IMPLS, ids=[i.replace(" ", "-") for i in IMPLS])
@pytest.mark.parametrize("block", [b[0] for b in BLOCKS])
def test_block(benchmark, block, impl, train):
    torch._dynamo.reset()
    benchmark.group = f"block {block} {'train' if train else 'infer'}"
    step = make_block_step(block, SCALE.block_batch, DTYPE, True, DEVICE, impl, train,
                           size=SCALE.block_size)
    run_benchmark(benchmark, step, images=SCALE.block_batch, block=block, impl=impl,
                  mode="train" if train else "infer", dtype=str(DTYPE),
                  size=SCALE.block_size, batch=SCALE.block_batch)

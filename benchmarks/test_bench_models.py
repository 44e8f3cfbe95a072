"""Model level: ResNet-18/50/152 training step (forward, loss, backward, SGD) and inference,
fastres fused vs torchvision eager vs torch.compile of both, fp32 and AMP bf16, NCHW and
channels_last; images/s and peak memory in extra_info. On a CPU: ResNet-18 at 32 px, batch 2,
without the compile variants (compiling a whole ResNet there takes minutes)."""
import math

import pytest
import torch

from fastres.bench.workloads import DTYPES, make_model, make_model_step

from harness import DEVICE, SCALE, run_benchmark

VARIANTS = ["torchvision", "fastres"] + (
    ["torchvision compile", "fastres compile"] if SCALE.model_compile else [])


def _params():
    for name in SCALE.models:
        for mode in ("train", "infer"):
            for dtype in SCALE.model_dtypes:
                for layout in ("nchw", "channels_last"):
                    for variant in VARIANTS:
                        # compile only in the headline setting (AMP bf16, channels_last)
                        if variant.endswith("compile") and (dtype, layout) != ("bf16",
                                                                                "channels_last"):
                            continue
                        yield name, mode, dtype, layout, variant


PARAMS = list(_params())


@pytest.mark.parametrize("name,mode,dtype,layout,variant", PARAMS,
                         ids=["-".join(p).replace(" ", "-") for p in PARAMS])
def test_model(benchmark, name, mode, dtype, layout, variant):
    torch._dynamo.reset()
    benchmark.group = f"model {name} {mode} {dtype} {layout}"
    channels_last = layout == "channels_last"
    model = make_model(name, variant, DEVICE, channels_last)
    step, model = make_model_step(model, mode, SCALE.model_batch, SCALE.model_image,
                                  DTYPES[dtype], channels_last, DEVICE)
    before = [p.detach().clone() for p in list(model.parameters())[:3]]
    run_benchmark(benchmark, step, images=SCALE.model_batch, model=name, mode=mode,
                  dtype=dtype, layout=layout, variant=variant, batch=SCALE.model_batch,
                  image_size=SCALE.model_image)
    assert math.isfinite(benchmark.extra_info["images_per_s"])
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == (mode == "train")  # a training step updates the weights, inference not

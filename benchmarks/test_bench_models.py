"""Model level: ResNet-18/50/152 training step (forward, loss, backward, SGD) and inference,
fastres fused vs torchvision eager vs torch.compile of both, fp32 and AMP bf16, NCHW and
channels_last; images/s and peak memory in extra_info. On a CPU: ResNet-18 at 32 px, batch 2,
without the compile variants (compiling a whole ResNet there takes minutes).

The fastres fused model also runs with conv backend "triton" (fastres.conv_backend: Triton
convolutions with BatchNorm fused in) in channels_last, fp32 and AMP bf16 (ids end in
``-triton-conv``; extra_info ``conv_backend``); on a GPU only: on a CPU the Triton kernels run
only in the interpreter, far too slow for whole models, so those cases are skipped there."""
import math

import pytest
import torch

import fastres
from fastres.bench.workloads import DTYPES, make_model, make_model_step

from harness import DEVICE, GPU, SCALE, run_benchmark

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
                        yield name, mode, dtype, layout, variant, "cudnn"
                    if layout == "channels_last":  # the Triton convolutions are NHWC
                        yield name, mode, dtype, layout, "fastres", "triton"


PARAMS = list(_params())


def _id(p):
    *rest, conv = p
    return "-".join(rest).replace(" ", "-") + ("" if conv == "cudnn" else f"-{conv}-conv")


@pytest.mark.parametrize("name,mode,dtype,layout,variant,conv", PARAMS,
                         ids=[_id(p) for p in PARAMS])
def test_model(benchmark, name, mode, dtype, layout, variant, conv):
    if conv == "triton":
        if not GPU:
            pytest.skip("Triton convolutions run on CPU tensors only in the interpreter "
                        "(TRITON_INTERPRET=1), far too slow for whole models")
        if "triton" not in fastres.available_backends():
            pytest.skip("Triton is not available: "
                        + str(fastres.backends._why_unavailable("triton")))
    torch._dynamo.reset()
    benchmark.group = f"model {name} {mode} {dtype} {layout}"
    channels_last = layout == "channels_last"
    info = dict(model=name, mode=mode, dtype=dtype, layout=layout, variant=variant,
                batch=SCALE.model_batch, image_size=SCALE.model_image)
    if variant.startswith("fastres"):
        info["conv_backend"] = conv
    with fastres.conv_backend(conv):  # the default, "cudnn", unless a Triton case
        model = make_model(name, variant, DEVICE, channels_last)
        step, model = make_model_step(model, mode, SCALE.model_batch, SCALE.model_image,
                                      DTYPES[dtype], channels_last, DEVICE)
        before = [p.detach().clone() for p in list(model.parameters())[:3]]
        run_benchmark(benchmark, step, images=SCALE.model_batch, **info)
    assert math.isfinite(benchmark.extra_info["images_per_s"])
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == (mode == "train")  # a training step updates the weights, inference not

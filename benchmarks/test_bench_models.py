"""Model level: ResNet-18/50/152 training step (forward, loss, backward, SGD) and inference,
fastres fused vs torchvision eager vs torch.compile of both, fp32 and AMP bf16, NCHW and
channels_last; images/s and peak memory in extra_info. On a CPU: ResNet-18 at 32 px, batch 2,
without the compile variants (compiling a whole ResNet there takes minutes).

The fastres fused model also runs with conv backend "triton" (fastres.conv_backend: Triton
convolutions with BatchNorm fused in) in channels_last, fp32 and AMP bf16 (ids end in
``-triton-conv``; extra_info ``conv_backend``); on a GPU only: on a CPU the Triton kernels run
only in the interpreter, far too slow for whole models, so those cases are skipped there.

On a CPU with FASTRES_BENCH_CPU_SUITE=1, test_cpu_suite_model times the configurations the CPU
targets are set on (fastres.bench.model_benchmark.CPU_SUITE: resnet20 at batch 64, resnet18
16 @ 112 px, resnet50 8 @ 112 px), fp32, NCHW and channels_last, training and inference,
fastres fused against the same network in plain PyTorch ("plain") and torchvision's, with the
same weights (a few minutes; without the variable the CPU suite keeps to about a minute). pytest-benchmark times the cases one after the other;
``python -m fastres.bench --suite cpu`` measures them side by side, which is what its ratios
are taken from."""
import math

import pytest
import torch

import fastres
from fastres.bench.workloads import DTYPES, make_model, make_model_step

from harness import CPU_SUITE_ALL, DEVICE, GPU, SCALE, run_benchmark

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


def _cpu_suite_params():
    from fastres.bench.model_benchmark import CPU_SUITE

    if GPU:
        return []
    if not CPU_SUITE_ALL:
        return
    for name, batch, size, channels_last in CPU_SUITE:
        for mode in ("train", "infer"):
            for variant in ("fastres", "plain", "torchvision"):
                yield name, batch, size, channels_last, mode, variant


CPU_PARAMS = list(_cpu_suite_params())


@pytest.mark.skipif(GPU, reason="the CPU suite runs on a CPU")
@pytest.mark.parametrize("name,batch,size,channels_last,mode,variant", CPU_PARAMS,
                         ids=[f"{n}-b{b}-{s}px-{'channels_last' if cl else 'nchw'}-{m}-{v}"
                              for n, b, s, cl, m, v in CPU_PARAMS])
def test_cpu_suite_model(benchmark, name, batch, size, channels_last, mode, variant):
    import torchvision

    if variant == "torchvision" and not hasattr(torchvision.models, name):
        pytest.skip(f"torchvision has no {name} (the plain variant is that network)")
    layout = "channels_last" if channels_last else "nchw"
    benchmark.group = f"cpu suite {name} b{batch} {size}px {layout} {mode}"
    torch.manual_seed(0)
    weights = fastres.models.get_model(name, fused=False).state_dict()
    model = make_model(name, variant, DEVICE, channels_last, state_dict=weights)
    step, model = make_model_step(model, mode, batch, size, torch.float32, channels_last, DEVICE)
    run_benchmark(benchmark, step, images=batch, model=name, mode=mode, dtype="fp32",
                  layout=layout, variant=variant, batch=batch, image_size=size)
    assert math.isfinite(benchmark.extra_info["images_per_s"])

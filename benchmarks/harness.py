"""Shared settings and the timing harness of the pytest-benchmark suite
(`pytest benchmarks/ --benchmark-only`).

Sizes follow the device: on a GPU the real ones (batch 256, every BatchNorm shape of
ResNet-50, ResNet-18/50/152 at 224 px, torch.compile baselines); on a CPU small ones, so the
whole suite finishes in about a minute (CI runs it): the ops at batch 2 (NCHW and
channels_last), ResNet-18 at 32 px; FASTRES_BENCH_CPU_SUITE=1 adds the CPU configurations of
fastres.bench.model_benchmark.CPU_SUITE (resnet20 at batch 64, resnet18 16 @ 112 px, resnet50
8 @ 112 px; fused vs plain PyTorch vs torchvision), a few minutes more. FASTRES_BENCH_MODELS=resnet50,... picks the models of the model-level
benchmarks.

Every benchmark times its step twice: with CUDA events (median of single calls after warm-up,
fastres.bench.timing.measure), whose numbers, with peak memory, images/s and achieved
bandwidth, go into the benchmark's ``extra_info`` (``--benchmark-json`` keeps them); and with
pytest-benchmark's own timer around the step plus a device synchronisation, which fills its
table.
"""
import math
import os
from dataclasses import dataclass
from typing import List

import pytest
import torch

from fastres.bench.timing import measure, synchronize

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


@dataclass(frozen=True)
class Scale:
    op_batch: int
    op_max_hw: int             # op shapes with larger maps are left out
    op_compile_cases: int      # how many op shapes also time torch.compile (-1: all)
    block_batch: int
    block_size: int
    model_batch: int
    model_image: int
    models: List[str]
    model_dtypes: List[str]
    model_compile: bool        # torch.compile of whole models (minutes of compile on a CPU)
    warmup: int
    iters: int
    rounds: int                # pytest-benchmark rounds


GPU_SCALE = Scale(op_batch=256, op_max_hw=1000, op_compile_cases=-1, block_batch=256,
                  block_size=56, model_batch=256, model_image=224,
                  models=["resnet18", "resnet50", "resnet152"], model_dtypes=["fp32", "bf16"],
                  model_compile=True, warmup=5, iters=20, rounds=10)
CPU_SCALE = Scale(op_batch=2, op_max_hw=1000, op_compile_cases=2, block_batch=2, block_size=14,
                  model_batch=2, model_image=32, models=["resnet18"],
                  model_dtypes=["fp32", "bf16"], model_compile=False, warmup=1, iters=2,
                  rounds=2)
SCALE = GPU_SCALE if GPU else CPU_SCALE
CPU_SUITE_ALL = os.environ.get("FASTRES_BENCH_CPU_SUITE", "0") == "1"
if os.environ.get("FASTRES_BENCH_MODELS"):
    SCALE = Scale(**{**SCALE.__dict__,
                     "models": os.environ["FASTRES_BENCH_MODELS"].split(",")})


def run_benchmark(benchmark, step, *, images: int = 0, nbytes: int = 0, copy_bw: float = 0.0,
                  **info):
    """Time `step` (see the module docstring), record extra_info, return the measurement.
    A step that does not fit in GPU memory is skipped (with the reason), not failed."""
    try:
        m = measure(step, DEVICE, warmup=SCALE.warmup, iters=SCALE.iters)
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory on {DEVICE}: {str(e).splitlines()[0][:200]}")
    assert m.ms > 0 and math.isfinite(m.ms), f"bad timing {m}"
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(ms=m.ms, ms_min=m.ms_min, timer=m.timer, peak_gib=m.peak_gib,
                                device=str(DEVICE))
    if images:
        benchmark.extra_info["images_per_s"] = m.per_second(images)
    if nbytes and copy_bw:
        benchmark.extra_info["bandwidth_fraction"] = m.per_second(nbytes) / copy_bw
        benchmark.extra_info["bytes"] = nbytes

    def synced():
        step()
        synchronize(DEVICE)

    benchmark.pedantic(synced, rounds=SCALE.rounds, warmup_rounds=1, iterations=1)
    if GPU:
        assert m.peak_gib is not None and m.peak_gib > 0
    return m

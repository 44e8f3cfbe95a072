"""Test configuration.

Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter,
which must be switched on before triton is imported anywhere.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many cases the differential fuzzer (tests/test_fuzz.py) ran, per op and backend."""
    import sys

    fuse_models = sys.modules.get("test_fuse_models")
    if fuse_models is not None and fuse_models.FUSED_COUNTS:
        terminalreporter.section("fastres fuse: BatchNorms fused per model")
        for model, (fused, total) in sorted(fuse_models.FUSED_COUNTS.items()):
            terminalreporter.write_line(f"{model}: {fused} of {total} BatchNorm2d fused")
    fuzzing = sys.modules.get("fuzzing")
    if fuzzing is None or not fuzzing.SUMMARY:
        return
    terminalreporter.section("fastres fuzz")
    terminalreporter.write_line(
        f"seed {fuzzing.SEED}; budget {fuzzing.BN_CASES} BatchNorm cases "
        f"(FASTRES_FUZZ_CASES), {fuzzing.CONV_CASES} convolution cases "
        f"(FASTRES_FUZZ_CONV_CASES), each through every backend here")
    for key, n in sorted(fuzzing.SUMMARY.items()):
        terminalreporter.write_line(f"{key}: {n}")

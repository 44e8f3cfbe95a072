"""The fused-op backends every numerics test runs through, as pytest parameters.

``backend_params()``: (backend, device) for the C++ CPU kernels, the Triton kernels under
TRITON_INTERPRET=1 on a machine without a GPU, and the CUDA and Triton GPU kernels (marked
``gpu``: they skip without one). ``require_backend(backend)`` skips where that backend was
not built or is not installed.
"""
import importlib.util
import os

import pytest
import torch

import fastres

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
gpu = pytest.mark.gpu


def backend_params():
    cases = [pytest.param("cpu", "cpu", id="cpu")]
    if HAS_TRITON and INTERPRET and not HAS_CUDA:
        cases.append(pytest.param("triton", "cpu", id="triton-interpreter"))
    cases.append(pytest.param("cuda", "cuda", id="cuda", marks=gpu))
    cases.append(pytest.param("triton", "cuda", id="triton-gpu", marks=gpu))
    return cases


def require_backend(backend):
    if backend == "cuda" and not fastres.build_info()["cuda"]:
        pytest.skip("fastres was built without its CUDA kernels")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")

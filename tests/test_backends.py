"""Backend selection and build information."""
import importlib.util
import subprocess
import sys

import pytest
import torch

import fastres
from fastres import backends


def test_build_info_describes_the_build():
    info = fastres.build_info()
    assert info["version"] == fastres.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_build_info_from_the_command_line():
    out = subprocess.run([sys.executable, "-c", "import fastres; print(fastres.build_info())"],
                         capture_output=True, text=True, check=True).stdout
    assert "torch_version" in out and fastres.__version__ in out


def test_default_is_auto_and_context_manager_restores():
    assert fastres.get_backend() == "auto"
    with fastres.backend("cpu"):
        assert fastres.get_backend() == "cpu"
        with pytest.raises(RuntimeError):
            with fastres.backend("cpu"):
                raise RuntimeError("boom")
        assert fastres.get_backend() == "cpu"
    assert fastres.get_backend() == "auto"


def test_set_backend_validates_names():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        fastres.set_backend("tensorrt")
    fastres.set_backend("cpu")
    try:
        assert fastres.get_backend() == "cpu"
    finally:
        fastres.set_backend("auto")


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert backends.resolve(torch.device("cpu")) == "cpu"


def test_available_backends_lists_what_runs():
    names = fastres.available_backends()
    assert names[:2] == ["auto", "cpu"]
    assert ("cuda" in names) == (fastres.build_info()["cuda"] and torch.cuda.is_available())
    if importlib.util.find_spec("triton") is None:
        assert "triton" not in names


def test_cpu_backend_refuses_gpu_tensors_and_triton_needs_interpreter_or_gpu(monkeypatch):
    with fastres.backend("cpu"):
        with pytest.raises(RuntimeError, match="runs on CPU tensors"):
            backends.resolve(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="Triton needs a CUDA device|triton is not installed"):
            fastres.set_backend("triton")


def test_mismatched_torch_version_gives_rebuild_message(monkeypatch):
    from fastres import _extension

    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(ImportError, match="rebuild"):
        _extension.load()

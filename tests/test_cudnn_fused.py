"""The "cudnn-fused" conv backend (cuDNN graph API) without a GPU: the build reports it, the
cuDNN graphs of every ResNet-18/50 convolution layer validate host-side (cudnn-frontend's
validate(): dimensions, strides, data types, node wiring), the statistics finalize, the
BatchNorm-apply op on the CUDA C++ kernels' CPU twins, fake kernels, and the error and fallback
paths. Execution on a GPU: tests/test_gpu_cudnn_fused.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres import backends
from fastres.nn import conv_bn_chain
from fastres.ops import conv_bn_cudnn

BUILT = bool(fastres.build_info().get("cudnn_fused"))
needs_build = pytest.mark.skipif(not BUILT, reason="fastres built without cudnn-fused: "
                                 + str(fastres.build_info().get("cudnn_fused_why")))


def layer_shapes(arch, batch=32):
    """Distinct (x_shape, w_shape, stride, padding) of the model's convolutions (224x224)."""
    import torchvision

    model = getattr(torchvision.models, arch)().to("meta")
    seen = []

    def hook(conv, inputs, _out):
        key = (tuple(inputs[0].shape), tuple(conv.weight.shape), conv.stride[0], conv.padding[0])
        if key not in seen:
            seen.append(key)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, 224, 224, device="meta"))
    for h in handles:
        h.remove()
    return seen


SHAPES = sorted(set(layer_shapes("resnet18")) | set(layer_shapes("resnet50")))


def test_build_info_reports_the_backend():
    info = fastres.build_info()
    assert isinstance(info["cudnn_fused"], bool)
    assert isinstance(info["cudnn_fused_why"], str) and info["cudnn_fused_why"]
    if info["cudnn_fused"]:
        assert info["cudnn_fused_why"].startswith("cudnn-frontend 1.")
        assert "cuDNN headers 9." in info["cudnn_fused_why"]
    else:
        assert backends._why_cudnn_fused_unavailable().startswith("fastres was built without it")


def test_resnet_layer_shapes_cover_both_models():
    # 7x7 stem, 1x1/3x3 bodies, strided 3x3 and 1x1 downsamples; every channel count but the
    # stem's a multiple of 8
    assert len(SHAPES) >= 25
    assert any(w[2] == 7 for _, w, _, _ in SHAPES)
    assert all(x[1] % 8 == 0 for x, _, _, _ in SHAPES if x[1] != 3)


@needs_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0][1]}x{s[0][2]}-{s[1][0]}-k{s[1][2]}s{s[2]}")
def test_every_resnet_layer_graph_validates(shape, dtype):
    """Forward (prologue + conv + GenStats), dgrad (drelu + dBN weight), wgrad (prologue),
    folded inference with and without residual: all validate host-side."""
    x_shape, w_shape, stride, padding = shape
    prologue = x_shape[1] != 3  # the stem reads the image
    cases = [
        ("forward", dict(prologue=prologue, stats=True)),
        ("forward", dict(prologue=False, stats=True)),
        ("dgrad", dict(prologue=prologue, stats=prologue)),
        ("wgrad", dict(prologue=prologue)),
        ("inference", dict(relu=True)),
        ("inference", dict(residual=True, relu=True)),
        ("inference", dict(residual=False, relu=False)),
    ]
    for kind, flags in cases:
        why = conv_bn_cudnn.graph_check(kind, x_shape, w_shape, stride, padding, dtype, **flags)
        assert why == "", f"{kind} {flags} {shape}: {why}"


@needs_build
def test_graph_check_fp32_and_prologue_without_relu():
    x, w = (8, 64, 56, 56), (64, 64, 3, 3)
    assert conv_bn_cudnn.graph_check("forward", x, w, 1, 1, torch.float32, prologue=True,
                                     stats=True) == ""
    assert conv_bn_cudnn.graph_check("dgrad", x, w, 1, 1, torch.float16, prologue=True,
                                     in_relu=False, stats=True) == ""
    assert conv_bn_cudnn.graph_check("wgrad", x, w, 1, 1, torch.float16, prologue=True,
                                     in_relu=False) == ""


@needs_build
def test_graph_check_rejects_bad_specs_clearly():
    x, w = (8, 64, 56, 56), (64, 64, 3, 3)
    with pytest.raises(RuntimeError, match="kind must be forward, dgrad, wgrad or inference"):
        conv_bn_cudnn.graph_check("backward", x, w, 1, 1)
    with pytest.raises(RuntimeError, match="has 32 channels but the weight expects 64"):
        conv_bn_cudnn.graph_check("forward", (8, 32, 56, 56), w, 1, 1)
    with pytest.raises(RuntimeError, match="output would be empty"):
        conv_bn_cudnn.graph_check("forward", (8, 64, 2, 2), w, 1, 0)
    with pytest.raises(RuntimeError, match="4 entries"):
        conv_bn_cudnn.graph_check("forward", (8, 64, 56), w, 1, 1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        conv_bn_cudnn.graph_check("forward", x, w, 1, 1, torch.float64)


def test_static_reasons_for_layers_cudnn_does_not_fuse():
    assert "multiples of 8" in conv_bn_cudnn.static_reason((8, 3, 224, 224), (64, 3, 7, 7), 2, 3,
                                                           torch.float16)
    assert "multiples of 8" in conv_bn_cudnn.static_reason((8, 64, 8, 8), (12, 64, 1, 1), 1, 0,
                                                           torch.float16)
    assert "float64" in conv_bn_cudnn.static_reason((8, 64, 8, 8), (64, 64, 1, 1), 1, 0,
                                                    torch.float64)
    assert conv_bn_cudnn.static_reason((8, 64, 8, 8), (64, 64, 3, 3), 1, 1, torch.float16) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_set_conv_backend_without_a_gpu_says_why():
    assert "cudnn-fused" in backends.CONV_NAMES
    with pytest.raises(RuntimeError, match="cudnn-fused.*not available.*CUDA device|"
                                           "cudnn-fused.*not available.*built without"):
        fastres.set_conv_backend("cudnn-fused")
    assert fastres.get_conv_backend() == "cudnn"
    with pytest.raises(RuntimeError, match="not available"):
        with fastres.conv_backend("cudnn-fused"):
            pass


def test_entry_points_reject_cpu_tensors_and_bad_arguments():
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 8, 3, 3)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, got tensors on cpu"):
        conv_bn_cudnn.conv_bn_cudnn(x, w, 1, 1)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        with torch.no_grad():
            conv_bn_cudnn.conv_bias_act_cudnn(x, w, torch.zeros(8), 1, 1)
    with pytest.raises(ValueError, match="equal stride"):
        conv_bn_cudnn.conv_bn_cudnn(x, w, (1, 2), 1)
    with pytest.raises(ValueError, match="4-D"):
        conv_bn_cudnn.conv_bn_cudnn(x[0], w, 1, 1)
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn_cudnn.conv_bias_act_cudnn(x, w.requires_grad_(), torch.zeros(8), 1, 1)


def test_chain_refuses_cpu_tensors_under_cudnn_fused(monkeypatch):
    """With the backend selected (forced here: no GPU), a CPU tensor gets a clear error, and the
    layer check says why cuDNN cannot take it."""
    monkeypatch.setattr(backends, "_conv_current", ["cudnn-fused"])
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(RuntimeError, match="'cudnn-fused' runs on CUDA tensors, got tensors on cpu"):
        conv_bn_chain.fused_conv_backend(conv, bn, x, True)
    assert conv_bn_chain._cudnn_fused_why(conv, x, torch.float32, False) == "tensors on cpu"


def test_unsupported_layers_fall_back_and_the_report_says_why(monkeypatch):
    """Layers the fused convolutions cannot run (groups here) fall back to the cudnn path
    under cudnn-fused, before any device check, and conv_backend_report() says so."""
    monkeypatch.setattr(backends, "_conv_current", ["cudnn-fused"])
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
    assert conv_bn_chain.fused_conv_backend(conv, nn.BatchNorm2d(8), torch.randn(2, 8, 6, 6),
                                            True) is None
    rows = fastres.conv_backend_report(nn.Sequential(conv))
    assert rows == [{"layer": "0", "backend": "cudnn",
                     "why": rows[0]["why"]}] and "not supported" in rows[0]["why"]


def test_conv_backend_report_on_a_model():
    model = fastres.models.resnet18(num_classes=10)
    rows = fastres.conv_backend_report(model)
    assert len(rows) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert {r["backend"] for r in rows} == {"not run"}
    model.train()
    rows = fastres.conv_backend_report(model, torch.randn(2, 3, 32, 32))
    assert all(r["backend"] == "cudnn" and r["why"] == "conv backend 'cudnn'" for r in rows), rows


def test_finalize_stats_matches_batch_norm():
    torch.manual_seed(0)
    y = torch.randn(4, 16, 5, 7, dtype=torch.float64) * 3 + 1
    s, sq = y.sum((0, 2, 3)).float(), (y * y).sum((0, 2, 3)).float()
    mean, var = conv_bn_cudnn.finalize_stats(s, sq, y.numel() // 16)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), y.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), y.var((0, 2, 3), unbiased=False), rtol=1e-5,
                               atol=1e-5)
    # a constant channel: E[y^2] - E[y]^2 may round below zero, the variance does not
    _, var = conv_bn_cudnn.finalize_stats(torch.tensor([30.0]), torch.tensor([300.00003]), 3)
    assert var.item() >= 0
    with pytest.raises(ValueError, match="no elements"):
        conv_bn_cudnn.finalize_stats(s, sq, 0)


@pytest.mark.parametrize("residual", [False, True])
def test_bn_act_apply_matches_training_batch_norm(residual):
    """bn_act_apply_cuda (the block's final BN(+add)+ReLU with the epilogue's statistics) on the
    fused kernels' CPU implementation: forward and training-mode backward through the
    statistics, against F.batch_norm computing its own statistics."""
    torch.manual_seed(0)
    y = torch.randn(4, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 8, 5, 5, dtype=torch.float64, requires_grad=True) if residual else None
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    mean, var = y.detach().mean((0, 2, 3)), y.detach().var((0, 2, 3), unbiased=False)
    out = conv_bn_cudnn.bn_act_apply_cuda(y, r, w, b, mean, var, 1e-5, True)
    ref = F.batch_norm(y, None, None, w, b, True, 0.0, 1e-5)
    ref = torch.relu(ref + r if residual else ref)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    inputs = [y, w, b] + ([r] if residual else [])
    got = torch.autograd.grad(out, inputs, go)
    want = torch.autograd.grad(ref, inputs, go)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


def test_fake_kernels_give_shapes_for_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 64, 56, 56).contiguous(memory_format=torch.channels_last)
        w = torch.empty(128, 64, 3, 3).contiguous(memory_format=torch.channels_last)
        v = torch.empty(64)
        y, s, sq = torch.ops.fastres.conv_bn_forward_cudnn(x, w, v, v, v, v, 2, 1, 1e-5, True,
                                                           True)
        assert y.shape == (8, 128, 28, 28) and s.shape == sq.shape == (128,)
        assert y.is_contiguous(memory_format=torch.channels_last)
        _, s0, _ = torch.ops.fastres.conv_bn_forward_cudnn(x, w, None, None, None, None, 2, 1,
                                                           1e-5, True, False)
        assert s0.shape == (0,)
        go = torch.empty(8, 128, 28, 28)
        gx, gw, gg, gb = torch.ops.fastres.conv_bn_backward_cudnn(
            go, x, w, v, v, v, v, 2, 1, 1e-5, True, True, True, True)
        assert gx.shape == x.shape and gw.shape == w.shape and gg.shape == gb.shape == (64,)
        out = torch.ops.fastres.conv_bias_act_cudnn(x, w, torch.empty(128), None, 2, 1, True)
        assert out.shape == (8, 128, 28, 28)


# ---------------------------------------------------------------------------------------------
# The build without the frontend ("and without it, cleanly"): setup.py's decision, and the one
# translation unit that changes (csrc/ops.cpp, the only user of the fusion macros; the cuDNN
# graphs live in csrc/cuda/conv_bn_cudnn.cpp, which such a build leaves out)
# ---------------------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _setup_function(name):
    """A top-level function of setup.py, without running setup()."""
    import ast
    import os
    from pathlib import Path

    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"os": os, "Path": Path, "CUDA_HOME": "/usr/local/cuda"}
    exec(compile(ast.Module([fn], []), "setup.py", "exec"), scope)
    return scope[name]


def test_setup_decides_to_build_without_the_frontend(monkeypatch, tmp_path):
    cudnn_fusion = _setup_function("cudnn_fusion")
    monkeypatch.setenv("FASTRES_NO_CUDNN_FUSION", "1")
    assert cudnn_fusion() == (None, None, "disabled")
    monkeypatch.delenv("FASTRES_NO_CUDNN_FUSION")
    monkeypatch.setenv("FASTRES_CUDNN_FRONTEND_INCLUDE", str(tmp_path))  # no cudnn_frontend.h
    assert cudnn_fusion() == (None, None, "no_frontend")
    (tmp_path / "cudnn_frontend.h").write_text("")
    monkeypatch.setenv("FASTRES_CUDNN_ROOT", str(tmp_path / "no-cudnn"))
    assert cudnn_fusion() == (None, None, "no_cudnn")


@pytest.mark.parametrize("why", ["DISABLED", "NO_FRONTEND"])
def test_ops_cpp_compiles_without_the_frontend(why):
    """csrc/ops.cpp as a CUDA build without the frontend compiles it: the op stubs that say why
    and build_info()'s reason (a compile error here would only show in such a build)."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", *includes, "-DFASTRES_WITH_CUDA",
           f"-DFASTRES_CUDNN_FUSION_WHY_{why}", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", str(ROOT / "csrc/ops.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

"""Exporting fused models (fastres.export): ONNX with both exporters, checked through ONNX
Runtime, torch.jit.trace, torch.export without fastres operators (and with them, on request).

ONNX Runtime's outputs follow the README's numerics rule: the error against a float64 run of
the same model is at most 2x the error of unfused PyTorch float32 plus a small floor.
onnx, onnxscript and onnxruntime are optional: these tests skip, naming the package, without
them.
"""
import copy

import pytest
import torch

import fastres
from fastres.fuse import fuse

IMAGE = (2, 3, 32, 32)
FLOOR = 1e-5


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = fuse(timm.create_model(name[5:], pretrained=False, num_classes=10), warn=False)
    else:
        model = fastres.models.get_model(name, num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
    return model.eval()


def _plain(name, model):
    """Unfused PyTorch with the same weights: fastres.unfuse of the fused timm model, or the
    fastres model built with fused=False."""
    if name.startswith("timm:"):
        return fastres.unfuse(copy.deepcopy(model), warn=False)
    plain = fastres.models.get_model(name, fused=False, num_classes=10)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def _standard_ops(path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    return proto, {(n.domain or "ai.onnx", n.op_type) for n in proto.graph.node}


def _run_ort(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _check_numerics(name, model, x, got):
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        unfused_err = (_plain(name, model)(x).double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err <= 2 * unfused_err + FLOOR * max(1.0, exact.abs().max().item()), \
        f"ONNX Runtime error {err:.3g} vs unfused PyTorch {unfused_err:.3g}"


@pytest.mark.parametrize("name, dynamo", [
    ("resnet18", True), ("resnet18", False), ("resnet50", True), ("resnet20", True),
    ("resnet20", False), ("timm:resnet18", True), ("timm:resnet18", False)])
def test_onnx_round_trip(name, dynamo, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = _model(name)
    x = torch.randn(IMAGE, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)  # plain torch.onnx.export
    _, ops = _standard_ops(path)
    assert all(domain == "ai.onnx" for domain, _ in ops), ops  # no fastres (custom) domain
    kinds = {op for _, op in ops}
    assert {"Conv", "Relu", "Add"} <= kinds, kinds  # BN folded into Conv, or BatchNormalization
    assert kinds <= {"Conv", "Relu", "Add", "BatchNormalization", "MaxPool", "Gemm", "Flatten",
                     "GlobalAveragePool", "ReduceMean", "Reshape", "Identity", "Pad", "Slice",
                     "Constant", "Concat", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Transpose",
                     "ConstantOfShape"}, kinds
    got = _run_ort(path, x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    _check_numerics(name, model, x, got)


def test_export_onnx_helper(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = _model("resnet20")
    x = torch.randn(IMAGE)
    path = fastres.export_onnx(model, x, tmp_path / "r20.onnx", dynamo=False)
    with torch.no_grad():
        torch.testing.assert_close(_run_ort(path, x), model(x), rtol=1e-4, atol=1e-4)
    model.train()
    with pytest.raises(ValueError, match=r"training mode .*model\.eval\(\)"):
        fastres.export_onnx(model, x, tmp_path / "t.onnx")
    with pytest.raises(TypeError, match="example input 0 must be a Tensor"):
        fastres.export_onnx(model.eval(), [x], tmp_path / "t.onnx")


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18"])
def test_jit_trace(name):
    model = _model(name)
    x = torch.randn(IMAGE)
    traced = torch.jit.trace(model, (x,))  # check_trace (the sanity check) on
    assert "fastres::" not in str(traced.inlined_graph)  # only aten ops
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
        y = torch.randn(1, 3, 40, 40)
        torch.testing.assert_close(traced(y), model(y), rtol=1e-5, atol=1e-5)


def _fastres_ops(graph):
    return [str(n.target) for n in graph.nodes if "fastres" in str(n.target)]


@pytest.mark.parametrize("name", ["resnet20", "timm:resnet18"])
def test_torch_export_is_portable_unless_asked(name):
    model = _model(name)
    x = torch.randn(IMAGE)
    ep = torch.export.export(model, (x,)).run_decompositions()
    assert _fastres_ops(ep.graph) == []
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
    with fastres.keep_fused_ops():  # AOTInductor on a machine with fastres
        kept = torch.export.export(model, (x,))
    assert any("bn_act_forward" in op for op in _fastres_ops(kept.graph))
    assert not fastres.export.exporting()
    # a training-mode program holds standard ops too (BatchNorm in training mode)
    train_ep = torch.export.export(copy.deepcopy(model).train(), (x,)).run_decompositions()
    assert _fastres_ops(train_ep.graph) == []


def test_compile_still_uses_fused_ops():
    """torch.compile is not an export: the compiled graph keeps fastres' operators."""
    model = _model("resnet20").train()
    seen = []

    def backend(gm, inputs):
        seen.extend(_fastres_ops(gm.graph))
        return gm

    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(IMAGE))
    assert any("bn_act_forward" in op for op in seen)

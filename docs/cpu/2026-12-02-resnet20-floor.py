"""ResNet-20 inference at batch 64 (fp32, eval, no_grad, 2 threads): fastres's fused model
against the same convolutions called with no module code at all ("bare": the folded weights
prepacked for oneDNN, mkldnn::_convolution_pointwise with the bias, relu_, add_, the option-A
shortcut, pooling and fc, in a plain loop) and torch.compile of the plain model, side by side
in one process (measure_side_by_side: rotated rounds), each on its own model copy. Shows how
much of fastres's time is its module code and how far the bare convolutions are from
Inductor's. Usage: python docs/cpu/2026-12-02-resnet20-floor.py [rounds]"""
import copy
import sys

import torch
import torch.nn.functional as F

import fastres
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.nn.conv_bn import _folded

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 150


def conv_pw(x, packed, bias, conv):
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, list(conv.padding), list(conv.stride), list(conv.dilation), 1, "none",
        [], "")


def bare_model(model, x):
    """A function running `model`'s layers as bare oneDNN calls, weights packed for x's shapes."""
    def pack(conv, bn, shape):
        w, b = _folded(conv, bn, torch.float32, torch.channels_last)
        w, b = w.clone(), b.clone()
        return torch.ops.mkldnn._reorder_convolution_weight(
            w, list(conv.padding), list(conv.stride), list(conv.dilation), 1, list(shape)), b

    layers = []
    with torch.no_grad():
        h = x.contiguous(memory_format=torch.channels_last)
        p = pack(model.conv1, model.bn1, h.shape)
        layers.append(("stem", model.conv1, p))
        h = conv_pw(h, *p, model.conv1).relu_()
        for stage in (model.layer1, model.layer2, model.layer3):
            for blk in stage:
                p1 = pack(blk.conv1, blk.bn1, h.shape)
                o = conv_pw(h, *p1, blk.conv1)
                p2 = pack(blk.conv2, blk.bn2, o.shape)
                layers.append(("block", blk, p1, p2))
                h = conv_pw(o, *p2, blk.conv2)

    def run(x):
        h = x.contiguous(memory_format=torch.channels_last)
        for layer in layers:
            if layer[0] == "stem":
                h = conv_pw(h, *layer[2], layer[1]).relu_()
                continue
            _, blk, p1, p2 = layer
            o = conv_pw(h, *p1, blk.conv1).relu_()
            o = conv_pw(o, *p2, blk.conv2)
            s = blk.downsample(h) if blk.downsample is not None else h
            h = o.add_(s).relu_()
        return model.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
    return run


print("| layout | plain ms | fastres ms | bare ms | torch.compile ms | fastres vs compile "
      "| bare vs compile | fastres vs bare |")
print("|---|---|---|---|---|---|---|---|")
for fmt in (torch.contiguous_format, torch.channels_last):
    torch.manual_seed(0)
    plain = fastres.models.get_model("resnet20", fused=False).eval().to(memory_format=fmt)
    fused = fastres.models.get_model("resnet20", fused=True).eval()
    fused.load_state_dict(plain.state_dict())
    fused = fused.to(memory_format=fmt)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=fmt)
    compiled = torch.compile(copy.deepcopy(plain))
    bare = bare_model(copy.deepcopy(fused), x)
    with torch.no_grad():
        want = plain(x)
        for f in (fused, bare, compiled):
            torch.testing.assert_close(f(x), want, rtol=1e-3, atol=1e-4)
        r = measure_side_by_side({"plain": lambda: plain(x), "fastres": lambda: fused(x),
                                  "bare": lambda: bare(x), "compile": lambda: compiled(x)},
                                 warmup=5, iters=rounds)
    ms = {k: v.ms for k, v in r.items()}
    layout = "NCHW" if fmt == torch.contiguous_format else "channels_last"
    print(f"| {layout} | {ms['plain']:.2f} | {ms['fastres']:.2f} | {ms['bare']:.2f} "
          f"| {ms['compile']:.2f} | {ms['compile'] / ms['fastres']:.2f}x "
          f"| {ms['compile'] / ms['bare']:.2f}x | {ms['bare'] / ms['fastres']:.2f}x |", flush=True)

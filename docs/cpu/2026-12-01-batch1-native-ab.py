"""A/B of the folded CPU inference's residual: oneDNN's binary add post-op (before) against
add_ + relu_ after the convolution (after), side by side in one process
(fastres.bench.model_benchmark.measure_side_by_side), with torch.compile of the plain model."""
import sys, torch
import fastres.nn.conv_bn as cb
from fastres.bench.model_benchmark import _suite_models, measure_side_by_side
from fastres.bench.workloads import make_model_step

def binary_post_op(conv, bn, x, residual, relu):  # the code before this change
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    packed, bias = cb._packed(conv, bn, x)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None or residual.shape[-2:] == (1, 1):
        y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "none", [], "")
        if residual is not None:
            y = y.add_(residual)
    else:
        y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *args,
                                                           "add", 1.0, None, [], "")
    return torch.relu_(y) if relu else y

name, batch, px, layout, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
cl = layout == "channels_last"
models = _suite_models(name, ["fastres", "plain", "torchvision compile"], cl, torch.device("cpu"))
steps = {}
for k, m in models.items():
    steps[k], _ = make_model_step(m, "infer", batch, px, torch.float32, cl, torch.device("cpu"))
    steps[k]()
after = steps.pop("fastres")
current = cb._onednn_conv_bn_act
def before():
    cb._onednn_conv_bn_act = binary_post_op
    try:
        after()
    finally:
        cb._onednn_conv_bn_act = current
orig_native = cb._native_cpu_conv
import copy
before_step, _ = make_model_step(copy.deepcopy(models["fastres"]), "infer", batch, px, torch.float32, cl, torch.device("cpu"))
def E():
    cb._native_cpu_conv = lambda conv, x: False
    try:
        before_step()
    finally:
        cb._native_cpu_conv = orig_native
steps = {"after (add_, relu_)": after, "oneDNN at every size (before)": E, **steps}
r = measure_side_by_side(steps, 3, rounds)
base = r["after (add_, relu_)"].ms
for k, v in r.items():
    print(f"| {name} | {batch} @ {px} | {layout} | {k} | {v.ms:.2f} | {v.ms_min:.2f} | {base / v.ms:.2f}x |")

"""A/B of the folded CPU inference's residual: oneDNN's binary add post-op (before) against
add_ + relu_ after the convolution (after), side by side in one process
(fastres.bench.model_benchmark.measure_side_by_side), with torch.compile of the plain model."""
import sys, torch
import fastres.nn.conv_bn as cb
from fastres.bench.model_benchmark import _suite_models, measure_side_by_side
from fastres.bench.workloads import make_model_step

def binary_post_op(conv, x, packed, bias, residual, relu):  # the code before this change
    # (in the signature cb._onednn_conv_bn_act has since the inference plans: x dense, the
    # weight prepacked by the caller)
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
models = _suite_models(name, ["fastres", "torchvision compile"], cl, torch.device("cpu"))
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
steps = {"before (binary post-op)": before, "after (add_, relu_)": after, **steps}
r = measure_side_by_side(steps, 3, rounds)
base = r["before (binary post-op)"].ms
for k, v in r.items():
    print(f"| {name} | {batch} @ {px} | {layout} | {k} | {v.ms:.2f} | {v.ms_min:.2f} | {base / v.ms:.2f}x |")

"""The folded CPU inference's planned layer call before and after 2026-12-02's trimming (the plan
key built by one comprehension; a plan that found its input already in the convolution's layout
skips the layout checks; _dense_layout's channels-last test without a permute), against the
plain model, side by side in one process (fastres.bench.model_benchmark.measure_side_by_side:
every round runs each variant once, the order rotating). "before" runs the previous functions,
copied below, swapped in for its own calls only; each variant has its own copy of the model.
fp32, eval, no_grad, 2 threads. Prints one markdown row per model, batch and layout: medians in
ms and the ratios. Usage: python docs/cpu/2026-12-02-plan-overhead-ab.py [rounds]"""
import copy
import sys

import torch

import fastres
import fastres.nn.conv_bn as cb
from fastres.bench.model_benchmark import measure_side_by_side

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200


# ---- the previous versions (fastres at f600c31), as they were ----
def old_dense_layout(t):
    if t.is_contiguous() or t.dim() < 3:
        return t.contiguous()
    perm = [0, *range(2, t.dim()), 1]
    if t.permute(perm).is_contiguous():
        return t
    return t.contiguous()


def old_plan_key(conv, bn, x, residual):
    if (torch.is_autocast_enabled("cpu") or cb.get_conv_backend() != "cudnn"
            or "weight" not in conv._parameters):
        return None
    state = []
    for d in (conv._parameters, bn._parameters, bn._buffers):
        for t in d.values():
            state.append(None if t is None else (t.data_ptr(), t._version))
    return (x.dtype, x.shape, x.stride(), None if residual is None else residual.dtype,
            torch.get_num_threads(), cb._mkldnn_enabled(), cb._ONEDNN, cb._CPU_CHANNELS_LAST,
            conv.stride, conv.padding, conv.dilation, conv.groups, bn.eps, tuple(state))


def old_planned(conv, bn, x, residual, relu):
    if not cb.running_eagerly():
        return None, None
    key = old_plan_key(conv, bn, x, residual)
    plan = cb._PLANS.get(bn) if key is not None else None
    if plan is None or plan[0] != key:
        return None, key
    _, native, onednn, weight, bias = plan[:5]
    if residual is not None:
        residual = residual.to(x.dtype)
    if not native:
        x = cb.cpu_channels_last(x)
    if onednn:
        return cb._onednn_conv_bn_act(conv, old_dense_layout(x), weight, bias, residual,
                                      relu), key
    return cb._conv_bias_act(conv, x, weight, bias, residual, relu), key


new = (cb._planned, cb._plan_key, cb._dense_layout)


def before(model, x):
    def run():
        cb._planned, cb._plan_key, cb._dense_layout = old_planned, old_plan_key, old_dense_layout
        try:
            return model(x)
        finally:
            cb._planned, cb._plan_key, cb._dense_layout = new
    return run


print("| model | batch @ px | layout | plain ms | before ms | after ms | after vs plain "
      "| after vs before |")
print("|---|---|---|---|---|---|---|---|")
for name, batch, px in [("resnet20", 1, 32), ("resnet20", 8, 32), ("resnet20", 64, 32),
                        ("resnet18", 1, 112), ("resnet50", 1, 112)]:
    torch.manual_seed(0)
    plain = fastres.models.get_model(name, fused=False).eval()
    fused = fastres.models.get_model(name, fused=True).eval()
    fused.load_state_dict(plain.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last):
        p = copy.deepcopy(plain).to(memory_format=fmt)
        a = copy.deepcopy(fused).to(memory_format=fmt)
        b = copy.deepcopy(fused).to(memory_format=fmt)
        x = torch.randn(batch, 3, px, px).contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(a(x), p(x), rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(before(b, x)(), a(x), rtol=0, atol=0)
            torch.testing.assert_close(before(b, x)(), a(x), rtol=0, atol=0)  # both planned
            r = measure_side_by_side({"plain": lambda: p(x), "before": before(b, x),
                                      "after": lambda: a(x)}, warmup=10,
                                     iters=max(10, rounds // batch))
        ms = {k: v.ms for k, v in r.items()}
        layout = "NCHW" if fmt == torch.contiguous_format else "channels_last"
        print(f"| {name} | {batch} @ {px} | {layout} | {ms['plain']:.3f} | {ms['before']:.3f} "
              f"| {ms['after']:.3f} | {ms['plain'] / ms['after']:.2f}x "
              f"| {ms['before'] / ms['after']:.2f}x |", flush=True)

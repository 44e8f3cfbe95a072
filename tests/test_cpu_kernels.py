"""The vectorised C++ CPU kernels (csrc/cpu/bn_act_kernel.inc) on shapes big enough to run every
code path the small cases of test_batch_norm_act.py do not reach: several statistics chunks per
channel, several row blocks (NHWC), partial vectors, the second (re-centred) statistics pass,
the double fallback on overflow, and more than one thread; each CPU capability build (DEFAULT,
AVX2, AVX512) where the machine has it; determinism for any thread count; and the folded CPU
inference path (oneDNN with prepacked weights)."""
import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres.functional import batch_norm_add_relu, batch_norm_relu
from numerics import assert_close_rule, reference_dtype, unfused

# (N, C, H, W): per-channel sizes of several chunks, NHWC row blocks and partial vectors; the
# last three are big enough (at least 2**19 elements) for the NHWC backward's streaming
# reduction (kStreamReduction), which runs where a row holds more than one channel group (more
# than 64 float channels at AVX512, 16 at AVX2): several channel groups with a partial step;
# a row of one group with a partial step (tiles at AVX512); one channel step per row
SHAPES = [(4, 24, 40, 40), (3, 37, 17, 19), (2, 520, 7, 7), (64, 16, 8, 8), (2, 72, 60, 64),
          (2, 40, 90, 80), (4, 16, 96, 96)]


def _data(shape, dtype, channels_last, residual, seed=0, offset_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    offset = torch.randn(c, generator=g, dtype=torch.float64) * offset_scale
    spread = torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.1
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spread.view(view) + offset.view(view)
    r = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64) * 0.5

    def act(t):
        if t is None:
            return None
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    return act(x), act(r), act(grad), w, b


def _run(x, r, grad, w, b, fused, training=True, threads=None):
    """forward + backward in x's dtype (parameters and statistics in the statistics dtype)."""
    sd = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().clone().requires_grad_(True)
    r = r.detach().clone().requires_grad_(True) if r is not None else None
    w = w.to(sd).requires_grad_(True)
    b = b.to(sd).requires_grad_(True)
    rm, rv = torch.zeros(x.shape[1], dtype=sd), torch.ones(x.shape[1], dtype=sd)
    with _threads(threads or torch.get_num_threads()):
        if fused:
            with fastres.backend("cpu"):
                y = (batch_norm_relu(x, rm, rv, w, b, training) if r is None
                     else batch_norm_add_relu(x, r, rm, rv, w, b, training))
        else:
            y = unfused(x, r, rm, rv, w, b, training, 0.1, 1e-5)
        inputs = [t for t in (x, r, w, b) if t is not None]
        grads = torch.autograd.grad(y, inputs, grad)
    return [y.detach(), *grads, rm, rv]


@contextlib.contextmanager
def _threads(n):
    """PyTorch's intra-op thread count set to n inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_large_shapes_follow_the_numerics_rule(shape, dtype, channels_last, residual, training):
    x, r, grad, w, b = _data(shape, dtype, channels_last, residual)
    fused = _run(x, r, grad, w, b, True, training)
    same = _run(x, r, grad, w, b, False, training)
    ref = _run(*(t.to(reference_dtype(dtype)) if t is not None else None for t in (x, r, grad)),
               w, b, False, training)
    assert fused[0].stride() == x.stride()
    names = ["out", "grad_input"] + (["grad_residual"] if residual else []) + \
        ["grad_weight", "grad_bias"]
    for name, f, s, rf in zip(names, fused, same, ref):
        assert_close_rule(f, s, rf, dtype, name, mask_flips=name != "out")
    torch.testing.assert_close(fused[-2], same[-2], rtol=1e-5, atol=1e-6)  # running stats
    torch.testing.assert_close(fused[-1], same[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("offset", [2.0, 1e3], ids=["normal", "large_mean"])
def test_float64_within_1e9_of_pytorch(channels_last, residual, offset):
    """float64: every result within 1e-9 (relative to its scale) of unfused PyTorch. (Both
    normalise as x * scale + shift, whose rounding grows with |mean| / std: at a mean of 1e6
    and unit spread both are ~1e-9 off the exact result, see tests/fuzzing.py's allowance.)"""
    x, r, grad, w, b = _data((4, 24, 40, 40), torch.float64, channels_last, residual,
                             offset_scale=offset)
    fused = _run(x, r, grad, w, b, True)
    same = _run(x, r, grad, w, b, False)
    for f, s in zip(fused, same):
        scale = max(1.0, s.abs().max().item())
        assert (f - s).abs().max().item() <= 1e-9 * scale


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_recentre_where_the_first_chunk_is_far_from_the_mean(channels_last):
    """A channel whose first values sit far from the rest (the shifted sums' centre is then
    far from the mean): the second pass around the mean keeps float32 accurate."""
    n, c, h = 8, 8, 32
    x = torch.randn(n, c, h, h, dtype=torch.float64) * 0.01
    x[0, :, :4, :] += 1000.0  # the first rows of the first image, in every channel
    xs = x.float()
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _, mean, var = torch.ops.fastres.bn_act_forward(xs, None, None, None, None, None, True,
                                                         1e-5, True)
    ref_mean = xs.double().mean((0, 2, 3))
    ref_var = xs.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_channels_statistics_do_not_depend_on_its_neighbours(channels_last, dtype):
    """Where some channels' first values sit far from the rest, only those channels are summed
    again around their means: every other channel's mean, variance and output are the same
    bits as when no channel is far (the NHWC kernels once re-centred every channel then)."""
    n, c, h = 4, 40, 20  # several vector steps with a partial one, several NHWC row blocks
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, h, h, generator=g, dtype=torch.float64) * 0.5 + 3.0
    far = x.clone()
    far[0, 5, :2, :] += 1000.0
    far[0, 21, :2, :] -= 500.0
    others = [k for k in range(c) if k not in (5, 21)]

    def stats(t):
        t = t.to(dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return torch.ops.fastres.bn_act_forward(t, None, None, None, None, None, True,
                                                    1e-5, True)

    y0, m0, v0 = stats(x)
    y1, m1, v1 = stats(far)
    assert torch.equal(m1[others], m0[others]) and torch.equal(v1[others], v0[others])
    assert torch.equal(y1[:, others], y0[:, others])
    ref = far.to(dtype).double()
    # the far channels' means to float accuracy on the channel's spread (its standard deviation
    # 80-160 here, its mean -9.5 and 28: a bar relative to the mean would ask more of a float
    # sum than its rounding gives; on AVX2 bfloat16 the 16-step first chunk of channel 21 lands
    # within a standard deviation of the mean, so it is not re-centred, and its mean is 1.4e-6
    # off relatively, 1.7e-7 of the spread)
    spread = ref.std((0, 2, 3))[[5, 21]]
    err = (m1.double()[[5, 21]] - ref.mean((0, 2, 3))[[5, 21]]).abs()
    assert (err <= 1e-6 * spread).all(), (err, spread)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float32_squares_that_overflow_fall_back_to_double(channels_last):
    """|x| ~ 1e19: (x - centre)^2 overflows float, the variance (~1e38) does not: it is
    recomputed in double. (PyTorch's own float32 batch_norm returns zeros here.)"""
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * 1e19
    xs = x.float()
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, mean, var = torch.ops.fastres.bn_act_forward(xs, None, None, None, None, None, True,
                                                           1e-5, False)
        ref = F.batch_norm(xs.double(), None, None, None, None, True, 0.1, 1e-5)
    assert torch.isfinite(var).all() and torch.isfinite(out).all()
    torch.testing.assert_close(var.double(), xs.double().var((0, 2, 3), unbiased=False),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 24, 40, 40), (2, 520, 7, 7), (3, 1030, 5, 7)],
                         ids=["24ch", "520ch", "1030ch"])
def test_deterministic_for_any_thread_count(channels_last, dtype, shape):
    """Same bits with 1, 2 and 3 threads and from run to run: fixed chunks, fixed combine
    order. The wide shapes: channels-last row blocks of few rows, a short last block, channels
    that are not whole vector steps."""
    x, r, grad, w, b = _data(shape, dtype, channels_last, True)
    one = _run(x, r, grad, w, b, True, threads=1)
    two = _run(x, r, grad, w, b, True, threads=2)
    three = _run(x, r, grad, w, b, True, threads=3)
    again = _run(x, r, grad, w, b, True, threads=2)
    for a, b2, b3, c in zip(one, two, three, again):
        assert torch.equal(a, b2) and torch.equal(b2, b3) and torch.equal(b2, c)


@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
def test_one_value_per_channel_and_image_runs_as_rows(dtype, residual):
    """(N, C, 1, 1) and (N, C, 1) inputs, contiguous or channels-last, hold N rows of C in
    memory as a 2-D (N, C) input does: they run its kernel (the same bits, outputs, gradients
    and running statistics) rather than per-channel tasks striding over the rows, and follow
    the numerics rule."""
    x, r, grad, w, b = _data((48, 520), dtype, False, residual)
    rows = _run(x, r, grad, w, b, True)
    same = _run(x, r, grad, w, b, False)
    ref = _run(*(t.to(reference_dtype(dtype)) if t is not None else None for t in (x, r, grad)),
               w, b, False)
    names = ["out", "grad_input"] + (["grad_residual"] if residual else []) + \
        ["grad_weight", "grad_bias"]
    for name, f, s, rf in zip(names, rows, same, ref):
        assert_close_rule(f, s, rf, dtype, name, mask_flips=name != "out")
    for shape, fmt in [((48, 520, 1, 1), torch.contiguous_format),
                       ((48, 520, 1, 1), torch.channels_last), ((48, 520, 1), None)]:
        def view(t):
            if t is None:
                return None
            t = t.reshape(shape)
            return t.contiguous(memory_format=fmt) if fmt is not None else t
        got = _run(view(x), view(r), view(grad), w, b, True)
        assert got[0].shape == shape and got[0].stride() == view(x).stride()
        for a, g in zip(rows, got):
            assert torch.equal(g.reshape(a.shape), a), (shape, fmt)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_recomputed_mask_is_the_stored_outputs_sign(dtype, channels_last):
    """BN+ReLU keeps no output: the backward recomputes the ReLU mask from x with the
    forward's arithmetic and rounding, so the gradient passes exactly where the stored output
    is > 0 (with a gradient of ones, grad_bias counts those positions)."""
    x, _, _, w, b = _data((3, 37, 17, 19), dtype, channels_last, False)
    w, b = w.float(), b.float() * 1e-3  # many pre-activations near 0, some rounded to 0
    with torch.no_grad():
        y, mean, var = torch.ops.fastres.bn_act_forward(x, None, w, b, None, None, True, 1e-5,
                                                         True)
        g = torch.ones_like(x)
        _, _, _, gb = torch.ops.fastres.bn_act_backward(g, x, None, w, b, mean, var, True, 1e-5,
                                                         True, False)
    assert torch.equal(gb, (y > 0).to(torch.float32).sum((0, 2, 3)))


CAPABILITY_SCRIPT = textwrap.dedent("""
    import torch, fastres
    from fastres.functional import batch_norm_add_relu
    print(fastres.build_info()["cpu_kernels"])
    torch.manual_seed(0)
    for cl, shape in ((False, (3, 37, 17, 19)), (True, (3, 37, 17, 19)), (True, (2, 37, 90, 80))):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = torch.randn(shape, dtype=torch.float64) * 2 + 1
            r = torch.randn_like(x)
            x, r = x.to(dtype), r.to(dtype)
            if cl:
                x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
            x.requires_grad_(True)
            r.requires_grad_(True)
            sd = torch.float64 if dtype == torch.float64 else torch.float32
            w = torch.linspace(0.5, 1.5, 37, dtype=sd).requires_grad_(True)
            b = torch.linspace(-0.2, 0.2, 37, dtype=sd).requires_grad_(True)
            y = batch_norm_add_relu(x, r, None, None, w, b, True)
            gs = torch.autograd.grad(y, (x, r, w, b), torch.ones_like(y))
            ref = torch.relu(torch.nn.functional.batch_norm(x.double(), None, None, w.double(),
                                                            b.double(), True) + r.double())
            gr = torch.autograd.grad(ref, (x, r, w, b), torch.ones_like(ref))
            tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
            assert (y.double() - ref).abs().max() < tol * 10, (cl, dtype)
            for a, e in zip(gs, gr):
                assert (a.double() - e.double()).abs().max() < tol * 100, (cl, dtype)
    print("ok")
""")


# the x86 capability builds of the kernels, lowest first (ATEN_CPU_CAPABILITY's names, upper-case)
CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_capability_build(capability):
    """Each at::vec build of the kernels, as ATEN_CPU_CAPABILITY selects it (a machine without
    the instructions runs the best build it has: ATen caps the capability there)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    picked, ok = out.stdout.split()
    supported = torch.backends.cpu.get_cpu_capability()
    order = CAPABILITIES
    expected = order[min(order.index(capability.upper()), order.index(supported))] \
        if supported in order else "DEFAULT"
    assert picked == expected and ok == "ok"


STREAM_SCRIPT = textwrap.dedent("""
    import torch, fastres
    from fastres._extension import _C
    from fastres.functional import batch_norm_add_relu, batch_norm_relu
    print(fastres.build_info()["cpu_kernels"])
    torch.manual_seed(0)

    def step(x, r, w, b):
        x = x.detach().clone().requires_grad_(True)
        leaves = [x, w, b] + ([r.detach().clone().requires_grad_(True)] if r is not None else [])
        y = (batch_norm_relu(x, None, None, w, b, True) if r is None
             else batch_norm_add_relu(x, leaves[3], None, None, w, b, True))
        return [y, *torch.autograd.grad(y, leaves, torch.randn_like(y).sign())]

    # whole-vector rows and planes (streamed where asked), channels-last rows that are not
    # whole vectors at AVX512 (24 channels: not streamed there, at AVX2 they are), planes
    # that are not (5x5)
    for shape in ((2, 32, 16, 16), (3, 24, 20, 20), (2, 48, 5, 5)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for cl in (False, True):
                for residual in (False, True):
                    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
                    r = torch.randn_like(x) if residual else None
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                        r = r.contiguous(memory_format=torch.channels_last) if residual else None
                    sd = torch.float64 if dtype == torch.float64 else torch.float32
                    w = torch.linspace(0.5, 1.5, shape[1], dtype=sd).requires_grad_(True)
                    b = torch.linspace(-0.2, 0.2, shape[1], dtype=sd).requires_grad_(True)
                    outs = []
                    for bytes_ in (0, 1 << 62):  # every output streamed where it may be; none
                        _C._cpu_stream_store_min_bytes(bytes_)
                        torch.manual_seed(1)
                        outs.append(step(x, r, w, b))
                    for a, e in zip(*outs):
                        assert torch.equal(a, e), (shape, dtype, cl, residual)
                        assert a.stride() == e.stride()
    print("ok")
""")


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_streaming_stores_give_the_plain_stores_bits(capability):
    """Outputs stored streaming (non-temporal stores, from a size on:
    fastres._C._cpu_stream_store_min_bytes) are the plain stores' bit for bit, in every
    capability build, dtype, layout and alignment case (the builds this machine can run:
    above its capability PyTorch's own kernels, torch.sign's at AVX512 on an AVX2 machine,
    execute instructions it lacks)."""
    order, supported = CAPABILITIES, torch.backends.cpu.get_cpu_capability()
    if supported not in order or order.index(capability.upper()) > order.index(supported):
        pytest.skip(f"this machine's CPU runs {supported}, not {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", STREAM_SCRIPT], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[1] == "ok"


def test_stream_store_threshold_is_set_and_restored():
    from fastres._extension import _C

    default = _C._cpu_stream_store_min_bytes(123)
    try:
        assert default == 5 << 20
        assert _C._cpu_stream_store_min_bytes(456) == 123
    finally:
        _C._cpu_stream_store_min_bytes(default)
    assert _C._cpu_stream_store_min_bytes(default) == default


# ------------------------------------------------------------------- folded CPU inference

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_folded_cpu_inference_matches_plain_and_keeps_nan(channels_last):
    """Eval under no_grad: oneDNN's convolution with the folded weights prepacked (bias and
    residual in its epilogue, ReLU in place) gives the plain model's result, NaN exactly where
    the plain model has it, and repacks when the input shape or the weights change."""
    from fastres.nn import conv_bn as cb

    torch.manual_seed(0)
    fused = fastres.models.resnet20().eval()
    for m in fused.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.3)
            m.bias.data.normal_(0, 0.3)
    plain = fastres.models.resnet20(fused=False).eval()
    plain.load_state_dict(fused.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused, plain = fused.to(memory_format=fmt), plain.to(memory_format=fmt)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=fmt)
    x[1, 0, 5, 5] = float("nan")
    x[2, 1, 9, 9] = float("inf")
    with torch.no_grad():
        a, b = fused(x), plain(x)
        assert fused.layer1[0].bn2 in cb._PACKED  # the oneDNN path ran
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
        assert torch.equal(a.isnan(), b.isnan())
        x2 = torch.randn(3, 3, 32, 32).contiguous(memory_format=fmt)  # another batch size
        torch.testing.assert_close(fused(x2), plain(x2), rtol=1e-4, atol=1e-5)
        for model in (fused, plain):  # new weights are seen
            model.layer2[1].conv1.weight.mul_(-1.5)
            model.layer3[0].bn1.running_var.mul_(3.0)
        torch.testing.assert_close(fused(x2), plain(x2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(1, 1), (2, 1), (3, 3)], ids=["1x1", "2x1", "3x3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_folded_cpu_inference_residual_at_small_outputs(hw, channels_last):
    """A bottleneck's last convolution with the residual, at the output sizes of a ResNet-50's
    last stage on small images (torch 2.11's oneDNN binary post-op could not take a 1x1 output),
    an NCHW residual beside the channels-last convolution output included: the folded result is
    the plain block's, NaN included."""
    from fastres.nn import conv_bn as cb

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, 1, bias=False)
    bn = torch.nn.BatchNorm2d(40).eval()
    bn.running_mean.normal_(0, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 24, *hw).contiguous(memory_format=fmt)
    r = torch.randn(3, 40, *hw).contiguous(memory_format=fmt)
    r[1, 2, 0, 0] = float("nan")
    # two threads at least: on one thread PyTorch (and so the folded path) runs an unstrided
    # 1x1 convolution below a batch of 16 natively, not with oneDNN (as under pytest -n 2)
    with _threads(max(2, torch.get_num_threads())), torch.no_grad():
        got = cb.conv_bn_act(conv, bn, x, r, relu=True)
        assert bn in cb._PACKED  # the oneDNN path ran
        want = torch.relu(bn(conv(x)) + r)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_folded_cpu_inference_of_one_small_image_uses_the_native_convolution(channels_last):
    """Where PyTorch runs a small convolution natively instead of through oneDNN (one image of
    at most 20480 elements, 3x3 kernel), the folded inference does too (no packed oneDNN
    weight is made), channels-last whatever the input's layout (measured faster), with the
    plain block's result, NaN included; a batch of two goes through oneDNN again."""
    from fastres.nn import conv_bn as cb

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(16).eval()
    bn.running_mean.normal_(0, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 16, 32, 32).contiguous(memory_format=fmt)  # 16384 elements
    r = torch.randn(1, 16, 32, 32).contiguous(memory_format=fmt)
    r[0, 2, 3, 4] = float("nan")
    assert cb._native_cpu_conv(conv, x)
    with torch.no_grad():
        got = cb.conv_bn_act(conv, bn, x, r, relu=True)
        assert bn not in cb._PACKED
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        want = torch.relu(bn(conv(x)) + r)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
        assert torch.equal(got.isnan(), want.isnan())
        x2 = torch.cat([x, x]).contiguous(memory_format=fmt)
        assert not cb._native_cpu_conv(conv, x2)
        torch.testing.assert_close(cb.conv_bn_act(conv, bn, x2, None, relu=True),
                                   torch.relu(bn(conv(x2))), rtol=1e-4, atol=1e-5)
        assert bn in cb._PACKED


def test_folded_cpu_inference_model_copies_and_pickles(tmp_path):
    """The packed oneDNN weights live beside the modules: deepcopy and torch.save of a model that
    ran inference work, and the copy computes the same."""
    import copy

    model = fastres.models.resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        clone = copy.deepcopy(model)
        torch.save(model, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        torch.testing.assert_close(clone(x), y)
        torch.testing.assert_close(loaded(x), y)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_folded_cpu_inference_plan_is_reused_only_while_it_holds(channels_last, monkeypatch):
    """A layer's second folded CPU call with the same inputs runs by the plan its first call
    left (the decision path is not taken again) and returns the same tensor bit for bit; a
    plan is not used once the weights change in place, the running statistics are reloaded,
    the batch grows from one image (native convolution) to two (oneDNN), the residual's dtype,
    the BatchNorm's eps or the convolution's padding change, under autocast, inside torch.jit.trace (standard operators), or with gradients
    enabled: each result is the plain layer's, NaN included."""
    from fastres.nn import conv_bn as cb

    calls = []
    slow = cb.folded_conv_bn_act
    monkeypatch.setattr(cb, "folded_conv_bn_act",
                        lambda *a, **k: calls.append(1) or slow(*a, **k))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(8).eval()
    bn.running_mean.normal_(0, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 8, 10, 10).contiguous(memory_format=fmt)
    r = torch.randn(1, 8, 10, 10).contiguous(memory_format=fmt)
    r[0, 3, 2, 2] = float("nan")

    def want(x, r=None):
        y = bn(conv(x))
        return torch.relu(y if r is None else y + r)

    def check(got, x, r=None):
        torch.testing.assert_close(got, want(x, r), rtol=1e-4, atol=1e-5, equal_nan=True)
        assert torch.equal(got.isnan(), want(x, r).isnan())

    with torch.no_grad():
        first = cb.conv_bn_act(conv, bn, x, r)
        assert len(calls) == 1 and bn in cb._PLANS
        again = cb.conv_bn_act(conv, bn, x, r)
        assert len(calls) == 1, "the second call ran by the plan"
        assert torch.equal(again.isnan(), first.isnan())
        assert torch.equal(again.nan_to_num(), first.nan_to_num())
        assert again.stride() == first.stride()
        check(again, x, r)
        conv.weight.mul_(-1.5)  # in place, as an optimizer step
        check(cb.conv_bn_act(conv, bn, x, r), x, r)
        assert len(calls) == 2
        bn.load_state_dict({**bn.state_dict(), "running_var": torch.full((8,), 3.0)})
        check(cb.conv_bn_act(conv, bn, x, r), x, r)
        assert len(calls) == 3
        cb.conv_bn_act(conv, bn, x, r)
        assert len(calls) == 3
        x2 = torch.randn(2, 8, 10, 10).contiguous(memory_format=fmt)
        full = cb.conv_bn_act(conv, bn, x2)
        check(full, x2)
        assert len(calls) == 4 and cb._PLANS[bn][2], "two images: a oneDNN plan"
        # the plan skips the layout checks only where its input needed no change: the NCHW
        # input is copied to channels-last again on every planned call
        assert cb._PLANS[bn][5] == channels_last
        copies = []
        to_cl = cb.cpu_channels_last
        monkeypatch.setattr(cb, "cpu_channels_last", lambda t: copies.append(1) or to_cl(t))
        planned = cb.conv_bn_act(conv, bn, x2)
        monkeypatch.setattr(cb, "cpu_channels_last", to_cl)
        assert len(calls) == 4 and len(copies) == (0 if channels_last else 1)
        assert torch.equal(planned, full) and planned.stride() == full.stride()
        other = x2.contiguous(memory_format=torch.contiguous_format if channels_last
                              else torch.channels_last)
        check(cb.conv_bn_act(conv, bn, other), other)  # the same shape in the other layout
        assert len(calls) == 5 and cb._PLANS[bn][5] != channels_last
        check(cb.conv_bn_act(conv, bn, x2, r.double()), x2, r)
        assert len(calls) == 6
        bn.eps = 0.5  # the folded weights depend on it
        check(cb.conv_bn_act(conv, bn, x2), x2)
        conv.padding = (0, 0)  # the packed oneDNN weight too
        check(cb.conv_bn_act(conv, bn, x2), x2)
        assert len(calls) == 8
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cb.conv_bn_act(conv, bn, x2)
        assert len(calls) == 9
        layer = torch.nn.Module()
        layer.conv, layer.bn = conv, bn
        layer.forward = lambda t: cb.conv_bn_act(layer.conv, layer.bn, t)
        traced = torch.jit.trace(layer, (x2,), check_trace=False)
        assert "batch_norm" in str(traced.graph)
    assert len(calls) == 9
    out = cb.conv_bn_act(conv, bn, x2)  # gradients: not folded, no plan
    assert out.requires_grad and len(calls) == 9
    with torch.no_grad():
        check(out, x2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_folded_cpu_inference_plan_keeps_the_layout_of_other_dtypes(dtype):
    """Outside float32 the folded CPU inference runs PyTorch's convolution on a channels-last
    copy of an NCHW input: the planned call does the same (same strides, same values bit for
    bit) as the call that made the plan."""
    from fastres.nn import conv_bn as cb

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, 3, padding=1, bias=False).to(dtype)
    bn = torch.nn.BatchNorm2d(10).to(dtype).eval()
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 9, 9, dtype=dtype)
    with torch.no_grad():
        first = cb.conv_bn_act(conv, bn, x)
        assert bn in cb._PLANS and not cb._PLANS[bn][1]
        again = cb.conv_bn_act(conv, bn, x)
        want = torch.relu(bn(conv(x)))
    assert again.stride() == first.stride()
    assert torch.equal(again, first)
    # (the folded weights are computed in float32: README, "Inference")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(again, want, **tol)

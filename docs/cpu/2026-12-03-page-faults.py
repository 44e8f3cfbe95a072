"""Minor page faults per call and time per call of one fused CPU op (the backward of
bn_act at 2x512x28x28 channels-last with the residual, 1.6 MB per tensor, two new output
tensors per call) and of eager PyTorch's separate ops for the same step, in this process.
Run it several times: whether glibc gives the freed outputs back to the kernel (and every
call faults them in again) is decided per process by its heap's layout.
Usage: python docs/cpu/2026-12-03-page-faults.py CALLS"""
import sys, time, torch, fastres  # noqa: F401 (registers torch.ops.fastres)
from fastres.bench.heap import minor_page_faults
from fastres.bench.workloads import OpCase, make_op_step
calls = int(sys.argv[1])
F = torch.ops.fastres.bn_act_forward; B = torch.ops.fastres.bn_act_backward
g0 = torch.Generator().manual_seed(0)
n, c, h = 2, 512, 28
x = torch.randn(n, c, h, h, generator=g0).contiguous(memory_format=torch.channels_last)
r = torch.randn(x.shape, generator=g0).contiguous(memory_format=torch.channels_last)
dy = torch.randn(x.shape, generator=g0).contiguous(memory_format=torch.channels_last)
w = torch.rand(c, generator=g0) + .5; b = torch.randn(c, generator=g0)
out, mean, var = F(x, r, w, b, torch.zeros(c), torch.ones(c), True, 1e-5, True)
steps = {"fastres backward": lambda: B(dy, x, out, w, b, mean, var, True, 1e-5, True, True),
         "eager op step": make_op_step(OpCase("bn_add_relu", c, h, 1), n, torch.float32, True,
                                       "cpu", "eager", True),
         "fastres op step": make_op_step(OpCase("bn_add_relu", c, h, 1), n, torch.float32, True,
                                         "cpu", "fastres:cpu", True)}
line = []
for name, step in steps.items():
    for _ in range(10): step()
    f0 = minor_page_faults()
    ts = []
    for _ in range(calls):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    faults = (minor_page_faults() - f0) / calls
    ts.sort()
    line.append(f"{name}: {ts[len(ts) // 2] * 1e6:.0f} us, {faults:.0f} faults/call")
print("; ".join(line), flush=True)

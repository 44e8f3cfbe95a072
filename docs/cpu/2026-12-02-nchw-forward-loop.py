"""The NCHW training forward kernel at 2x512x7x7, fp32, on one thread, called in a loop:
microseconds per call (the op's Python call included). Run under `perf record` to see where
the kernel's time goes. Usage: python docs/cpu/2026-12-02-nchw-forward-loop.py CALLS"""
import torch, fastres, sys  # noqa: F401 (registers torch.ops.fastres)
torch.set_num_threads(1)
F = torch.ops.fastres.bn_act_forward
x = torch.randn(2,512,7,7)
w = torch.rand(512)+.5; b = torch.randn(512); rm = torch.zeros(512); rv = torch.ones(512)
import time
for _ in range(200): F(x, None, w, b, rm, rv, True, 1e-5, True)
t=time.perf_counter()
for _ in range(int(sys.argv[1])): F(x, None, w, b, rm, rv, True, 1e-5, True)
print("us/call", (time.perf_counter()-t)/int(sys.argv[1])*1e6)

"""The fused op's CPU backward alone (torch.ops.fastres.bn_act_backward, training, with the ReLU
and the residual's gradient) on channels-last ResNet-50 shapes with the add: median and 10th
percentile of N calls in a tight loop, per shape. Two builds cannot share a process (one
operator library each): run it once per build, alternately. Run it with glibc's freed memory
kept in the process (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=8589934592): without,
a process either reuses the outputs' memory or page-faults it in afresh on every call, and
the two modes differ by up to 8x (docs/cpu/2026-12-03-page-faults.md).
Usage: python docs/cpu/2026-12-03-save-residual-grad.py CALLS THREADS TAG"""
import sys, time, torch, fastres  # noqa: F401 (registers torch.ops.fastres)
calls, threads, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)
F = torch.ops.fastres.bn_act_forward; B = torch.ops.fastres.bn_act_backward
for n, c, h in [(2, 256, 56), (2, 512, 28), (2, 1024, 14), (2, 2048, 7), (64, 16, 32)]:
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g0).contiguous(memory_format=torch.channels_last)
    r = torch.randn(x.shape, generator=g0).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g0).contiguous(memory_format=torch.channels_last)
    w = torch.rand(c, generator=g0) + .5; b = torch.randn(c, generator=g0)
    out, mean, var = F(x, r, w, b, torch.zeros(c), torch.ones(c), True, 1e-5, True)
    k = max(20, calls * 200_000 // x.numel())
    for _ in range(20): B(dy, x, out, w, b, mean, var, True, 1e-5, True, True)
    ts = []
    for _ in range(k):
        t = time.perf_counter(); B(dy, x, out, w, b, mean, var, True, 1e-5, True, True)
        ts.append(time.perf_counter() - t)
    ts.sort()
    print(f"{tag} {threads}t {n}x{c}x{h}x{h} ({x.numel() / 2**19:.2f} x 2^19 elements): "
          f"median {ts[len(ts) // 2] * 1e6:.0f} us, p10 {ts[len(ts) // 10] * 1e6:.0f} us", flush=True)

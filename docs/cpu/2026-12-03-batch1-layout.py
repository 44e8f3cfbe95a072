"""PyTorch's native CPU convolution (the one fastres's folded inference runs for a single image
of at most 20480 elements, fastres.nn.conv_bn._native_cpu_conv) on ResNet-20's 3x3 layers at
batch 1, with the input and the weight each NCHW or channels-last, with and without the bias;
then the 1x1 convolutions a single thread runs natively below a batch of 16 (ResNet-50's at
112 px), NCHW against channels-last. Best of 7 timings of 20 calls (of 9 single calls for the
1x1 layers).

    python docs/cpu/2026-12-03-batch1-layout.py
"""
import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for shape, co in (((1, 16, 32, 32), 16), ((1, 32, 16, 16), 32), ((1, 64, 8, 8), 64)):
    x = torch.randn(*shape)
    for wcl in (False, True):
        for xcl in (False, True):
            for bias in (False, True):
                w = torch.randn(co, shape[1], 3, 3)
                if wcl:
                    w = w.contiguous(memory_format=torch.channels_last)
                xx = x.contiguous(memory_format=torch.channels_last) if xcl else x
                b = torch.randn(co) if bias else None

                def fn():
                    return F.conv2d(xx, w, b, 1, 1)
                for _ in range(10):
                    fn()
                ts = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    for _ in range(20):
                        fn()
                    ts.append((time.perf_counter() - t0) / 20)
                print(shape, "weight", "CL" if wcl else "NCHW", "input", "CL" if xcl else "NCHW",
                      "bias" if bias else "no bias", f"{min(ts) * 1e6:.1f} us")
threads = torch.get_num_threads()
torch.set_num_threads(1)
for n, ci, co, hw in ((8, 64, 256, 28), (8, 256, 64, 28), (8, 512, 128, 14), (8, 1024, 256, 7),
                      (1, 64, 256, 28), (1, 512, 2048, 4)):
    x, w, b = torch.randn(n, ci, hw, hw), torch.randn(co, ci, 1, 1), torch.randn(co)
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = w.contiguous(memory_format=torch.channels_last)
    fs = {"NCHW": lambda: F.conv2d(x, w, b), "CL": lambda: F.conv2d(xc, wc, b)}
    t = {k: [] for k in fs}
    for _ in range(3):
        for f in fs.values():
            f()
    for _ in range(9):
        for k, f in fs.items():
            t0 = time.perf_counter()
            f()
            t[k].append((time.perf_counter() - t0) * 1e6)
    print("1x1, 1 thread", (n, ci, co, hw), {k: f"{sorted(v)[4]:.0f} us" for k, v in t.items()})
torch.set_num_threads(threads)

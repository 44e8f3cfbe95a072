"""Run a ResNet basic block with fused BatchNorm ops next to the same block in plain PyTorch.

    python -m fastres.demo                 # CPU, a few seconds
    python -m fastres.demo --device cuda --dtype bf16 --batch-size 256

conv3x3 -> BN+ReLU (fused) -> conv3x3 -> BN+add+ReLU (fused), with the weights of the plain
block; trains both for a few SGD steps on the same batch and prints how far apart their loss,
gradients and running statistics are, and the time per step of each.
"""
import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres.functional import batch_norm_add_relu, batch_norm_relu


class PlainBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


def bn_args(bn, training):
    return dict(running_mean=bn.running_mean, running_var=bn.running_var, weight=bn.weight,
                bias=bn.bias, training=training, momentum=bn.momentum, eps=bn.eps)


class FusedBlock(PlainBlock):
    def forward(self, x):
        out = batch_norm_relu(self.conv1(x), **bn_args(self.bn1, self.training))
        return batch_norm_add_relu(self.conv2(out), x, **bn_args(self.bn2, self.training))


def train(block, x, steps, sync):
    opt = torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses, start = [], None
    for step in range(steps):
        if step == 1:  # first step is warm-up
            sync()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = block(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    sync()
    return losses, (time.perf_counter() - start) / max(steps - 1, 1) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    fastres.set_backend(args.backend)
    torch.manual_seed(0)
    plain = PlainBlock(args.channels).to(device)
    fused = FusedBlock(args.channels).to(device)
    fused.load_state_dict(plain.state_dict())
    if dtype != torch.float32:
        for m in (plain, fused):  # convolutions in low precision, BN parameters stay fp32
            m.conv1.to(dtype)
            m.conv2.to(dtype)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    plain = plain.to(memory_format=torch.channels_last)
    fused = fused.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"fastres {fastres.__version__}: {fastres.build_info()}")
    print(f"backend {fastres.get_backend()!r} on {device}, {dtype}, input {tuple(x.shape)} channels_last")
    ref_losses, ref_ms = train(plain, x, args.steps, sync)
    losses, ms = train(fused, x, args.steps, sync)
    print(f"{'step':>4} {'plain loss':>12} {'fused loss':>12}")
    for i, (a, b) in enumerate(zip(ref_losses, losses)):
        print(f"{i:>4} {a:12.6f} {b:12.6f}")
    diff = max((p1 - p2).abs().max().item() for p1, p2 in
               zip(plain.state_dict().values(), fused.state_dict().values()) if p1.is_floating_point())
    print(f"largest difference in weights and running statistics after {args.steps} steps: {diff:.2e}")
    print(f"time per training step: plain PyTorch {ref_ms:.2f} ms, fused {ms:.2f} ms")
    rel = abs(losses[-1] - ref_losses[-1]) / max(abs(ref_losses[-1]), 1e-12)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    print("OK: fused and plain blocks agree" if rel < tol else f"MISMATCH: relative loss difference {rel:.2e}")
    return 0 if rel < tol else 1


if __name__ == "__main__":
    raise SystemExit(main())

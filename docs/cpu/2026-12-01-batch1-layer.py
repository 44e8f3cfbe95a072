"""One fused layer at batch 1 on the CPU (eval, no_grad): fastres.nn.conv_bn.conv_bn_act and its
parts against the bare folded convolution + ReLU; medians in us (used in
docs/cpu/2026-12-01-onednn-residual.md)."""
import torch, time, statistics
import torch.nn as nn, torch.nn.functional as F
import fastres.nn.conv_bn as cb
torch.manual_seed(0)
conv=nn.Conv2d(64,64,3,padding=1,bias=False); bn=nn.BatchNorm2d(64).eval()
x=torch.randn(1,64,8,8).contiguous(memory_format=torch.channels_last)
w,b=cb._folded(conv,bn,torch.float32,torch.channels_last)
def t(f,n=4000):
    for _ in range(300): f()
    ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return round(statistics.median(ts)*1e6,2)
def strip():
    weight, bias = cb._folded(conv, bn, torch.float32, torch.channels_last)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.relu(y)
with torch.no_grad():
  for _ in range(3):
    print("conv_bn_act", t(lambda: cb.conv_bn_act(conv,bn,x,relu=True)),
      "folded_conv_bn_act", t(lambda: cb.folded_conv_bn_act(conv,bn,x,None,True)),
      "strip", t(strip),
      "F.conv2d+relu", t(lambda: F.relu(F.conv2d(x,w,b,1,1))),
      "F.conv2d tuples", t(lambda: F.conv2d(x,w,b,conv.stride,conv.padding,conv.dilation,conv.groups)),
      "F.conv2d", t(lambda: F.conv2d(x,w,b,1,1)))

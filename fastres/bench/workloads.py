"""What the benchmarks time: BatchNorm op shapes, residual blocks and whole models, each as a
ready-to-call step, for fastres and for the PyTorch baselines.

Ops: every distinct BatchNorm of ResNet-50 (torchvision v1.5) as ``OpCase``; the
implementations are ``"eager"`` (unfused PyTorch: batch_norm, add, relu), ``"compile"``
(torch.compile of that sequence) and ``"fastres:<backend>"``.
Convolutions: every distinct convolution of ResNet-50 as ``ConvCase``; the implementations are
``"cudnn"`` (PyTorch's convolution alone: cuDNN on a GPU), ``"cudnn+bn_relu"`` (that convolution,
then fastres' fused training-mode BatchNorm+ReLU of its output) and ``"triton"``
(``fastres.ops.conv_bn``: the previous BatchNorm+ReLU in the prologue, the output's batch
statistics from the epilogue).
Blocks: ResNet-18's first BasicBlock and ResNet-50's first Bottleneck (56x56); ``"unfused"``
(fused=False), ``"fused"`` and ``"fused compile"`` / ``"unfused compile"``.
Models: ``"torchvision"``, ``"fastres"`` (fused), ``"plain"`` (fastres with ``fused=False``), each
optionally ``" compile"``; a training
step is forward + cross-entropy + backward + SGD (momentum 0.9, weight decay 1e-4), inference
is a forward under ``torch.no_grad()``; low precision runs under autocast (parameters fp32).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres.functional import batch_norm_add_relu, batch_norm_relu

__all__ = [
    "DTYPES", "OpCase", "RESNET50_BN_SHAPES", "BLOCKS", "op_bytes", "make_op_step",
    "make_block_step", "make_model", "make_model_step", "fastres_backends", "ConvCase",
    "RESNET50_CONV_SHAPES", "CONV_IMPLS", "conv_flops", "make_conv_step",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class OpCase:
    op: str        # "bn_relu" or "bn_add_relu"
    channels: int
    hw: int        # height = width
    count: int     # how many BatchNorms of ResNet-50 have this shape

    @property
    def name(self) -> str:
        return f"{self.op}-c{self.channels}-{self.hw}x{self.hw}"


# every distinct BatchNorm of ResNet-50 (the downsample BNs have no ReLU and stay unfused)
RESNET50_BN_SHAPES = [
    OpCase("bn_relu", 64, 112, 1), OpCase("bn_relu", 64, 56, 6),
    OpCase("bn_add_relu", 256, 56, 3), OpCase("bn_relu", 128, 56, 1),
    OpCase("bn_relu", 128, 28, 7), OpCase("bn_add_relu", 512, 28, 4),
    OpCase("bn_relu", 256, 28, 1), OpCase("bn_relu", 256, 14, 11),
    OpCase("bn_add_relu", 1024, 14, 6), OpCase("bn_relu", 512, 14, 1),
    OpCase("bn_relu", 512, 7, 5), OpCase("bn_add_relu", 2048, 7, 3),
]

# tensor-sized memory passes of a training-mode fused op: forward reads x for the statistics,
# then reads x (and the residual) and writes y; backward reads the gradient, x (and the output,
# whose sign is the ReLU mask) for the two reductions, then reads them again and writes
# grad_input (and grad_residual). The same count is used for every implementation, so
# bytes / time is the useful bandwidth each achieves.
_PASSES = {("bn_relu", False): 3, ("bn_add_relu", False): 4,
           ("bn_relu", True): 3 + 5, ("bn_add_relu", True): 4 + 8}


def op_bytes(case: OpCase, batch: int, dtype: torch.dtype, backward: bool) -> int:
    """Bytes a training-mode step of `case` must move at least (see _PASSES)."""
    numel = batch * case.channels * case.hw * case.hw
    return _PASSES[(case.op, backward)] * numel * torch.empty((), dtype=dtype).element_size()


def fastres_backends(device: torch.device) -> List[str]:
    """The fastres backends that run on `device` here."""
    if device.type == "cpu":
        return ["cpu"]
    return [b for b in ("cuda", "triton") if b in fastres.available_backends()]


def _unfused(x, r, rm, rv, w, b):
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    if r is not None:
        y = y + r
    return F.relu(y)


def _fused(x, r, rm, rv, w, b):
    if r is None:
        return batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5)
    return batch_norm_add_relu(x, r, rm, rv, w, b, True, 0.1, 1e-5)


def _with_backend(name: str, fn: Callable, device) -> Callable:
    """`fn` run with fastres' backend `name`: directly where that is the backend the current
    selection resolves to on `device` (a user selects a backend once, not per call; the
    context manager costs microseconds that a small CPU op would be charged), else inside
    ``fastres.backend(name)``."""
    if fastres.backends.resolve(torch.device(device)) == name:
        return fn

    def run():
        with fastres.backend(name):
            return fn()
    return run


def make_op_step(case: OpCase, batch: int, dtype: torch.dtype, channels_last: bool,
                 device, impl: str, backward: bool) -> Callable[[], None]:
    """A step that runs `case` once with `impl` ("eager", "compile", "fastres:<backend>"):
    forward in training mode, and with `backward` the gradients of every input."""
    device = torch.device(device)
    c = case.channels
    x = torch.randn(batch, c, case.hw, case.hw, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if case.op == "bn_add_relu" else None
    w = torch.ones(c, device=device, requires_grad=backward)
    b = torch.zeros(c, device=device, requires_grad=backward)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    if backward:
        x.requires_grad_(True)
        if r is not None:
            r.requires_grad_(True)
    leaves = [t for t in (x, r, w, b) if t is not None]
    g = torch.randn_like(x)

    if impl == "eager":
        fn = _unfused
    elif impl == "compile":
        # a fresh, shape-specialised compile per case: without the reset, the many shapes of
        # one code object would hit Dynamo's recompile limit or turn dynamic (slower kernels)
        torch._dynamo.reset()
        fn = torch.compile(_unfused, dynamic=False)
    elif impl.startswith("fastres:"):
        fn = _fused
    else:
        raise ValueError(f"unknown op implementation {impl!r}")

    def step():
        if backward:
            torch.autograd.grad(fn(x, r, rm, rv, w, b), leaves, g)
        else:
            with torch.no_grad():
                fn(x, r, rm, rv, w, b)

    return _with_backend(impl.split(":", 1)[1], step, device) if impl.startswith("fastres:") else step


@dataclass(frozen=True)
class ConvCase:
    cin: int
    cout: int
    kernel: int    # square kernel; padding kernel // 2 (ResNet's 7x7/3, 3x3/1, 1x1/0)
    stride: int
    hw: int        # input height = width
    count: int     # how many convolutions of ResNet-50 have this shape
    prologue: bool = True  # a BatchNorm+ReLU precedes it (all but the stem, whose input is
    #                        the image) and runs in the Triton convolution's prologue

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def name(self) -> str:
        return (f"conv{self.kernel}x{self.kernel}-c{self.cin}-{self.cout}-s{self.stride}-"
                f"{self.hw}x{self.hw}")


# every distinct convolution of ResNet-50 (torchvision v1.5, 224 px): 23 shapes, 53 layers
RESNET50_CONV_SHAPES = [
    ConvCase(3, 64, 7, 2, 224, 1, prologue=False),
    ConvCase(64, 64, 1, 1, 56, 1), ConvCase(64, 64, 3, 1, 56, 3), ConvCase(64, 256, 1, 1, 56, 4),
    ConvCase(256, 64, 1, 1, 56, 2), ConvCase(256, 128, 1, 1, 56, 1),
    ConvCase(128, 128, 3, 2, 56, 1), ConvCase(128, 512, 1, 1, 28, 4),
    ConvCase(256, 512, 1, 2, 56, 1), ConvCase(512, 128, 1, 1, 28, 3),
    ConvCase(128, 128, 3, 1, 28, 3), ConvCase(512, 256, 1, 1, 28, 1),
    ConvCase(256, 256, 3, 2, 28, 1), ConvCase(256, 1024, 1, 1, 14, 6),
    ConvCase(512, 1024, 1, 2, 28, 1), ConvCase(1024, 256, 1, 1, 14, 5),
    ConvCase(256, 256, 3, 1, 14, 5), ConvCase(1024, 512, 1, 1, 14, 1),
    ConvCase(512, 512, 3, 2, 14, 1), ConvCase(512, 2048, 1, 1, 7, 3),
    ConvCase(1024, 2048, 1, 2, 14, 1), ConvCase(2048, 512, 1, 1, 7, 2),
    ConvCase(512, 512, 3, 1, 7, 2),
]

CONV_IMPLS = ["cudnn", "cudnn+bn_relu", "triton"]


def conv_flops(case: ConvCase, batch: int, backward: bool) -> int:
    """2*N*P*Q*COUT*CIN*KH*KW for the forward; three times that with backward (data and
    weight gradients)."""
    fwd = 2 * batch * case.out_hw ** 2 * case.cout * case.cin * case.kernel ** 2
    return 3 * fwd if backward else fwd


def make_conv_step(case: ConvCase, batch: int, dtype: torch.dtype, channels_last: bool, device,
                   impl: str, backward: bool) -> Callable[[], None]:
    """A step that runs the convolution `case` once with `impl` (CONV_IMPLS) in training mode:
    forward, and with `backward` the gradients of the input, the weight and the BatchNorm
    affine parameters.

    "cudnn": F.conv2d. "cudnn+bn_relu": F.conv2d, then fastres.functional.batch_norm_relu of
    the output (batch statistics, running statistics updated; the fastres backend that
    ``fastres.backend`` selects). "triton": fastres.ops.conv_bn with the previous BatchNorm+ReLU
    in its prologue (when ``case.prologue``; the input's batch statistics are given, as the
    previous convolution's epilogue would give them) and ``stats=True``."""
    from fastres.ops import conv_bn

    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution implementation {impl!r}; choose one of "
                         f"{', '.join(CONV_IMPLS)}")
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    k, s, pad = case.kernel, case.stride, case.padding
    x = torch.randn(batch, case.cin, case.hw, case.hw, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    w = torch.randn(case.cout, case.cin, k, k, device=device) * (2.0 / (case.cin * k * k)) ** 0.5
    w = w.to(dtype).contiguous(memory_format=fmt)
    x.requires_grad_(backward)
    w.requires_grad_(backward)
    leaves = [x, w]
    if impl == "cudnn+bn_relu":
        gamma = torch.ones(case.cout, device=device, requires_grad=backward)
        beta = torch.zeros(case.cout, device=device, requires_grad=backward)
        rm, rv = torch.zeros(case.cout, device=device), torch.ones(case.cout, device=device)
        leaves += [gamma, beta]

        def fn():
            return batch_norm_relu(F.conv2d(x, w, None, s, pad), rm, rv, gamma, beta, True,
                                   0.1, 1e-5)
    elif impl == "cudnn":
        def fn():
            return F.conv2d(x, w, None, s, pad)
    else:
        prologue = {}
        if case.prologue:
            with torch.no_grad():
                xf = x.float()
                mean, var = xf.mean((0, 2, 3)), xf.var((0, 2, 3), unbiased=False)
            gamma = torch.ones(case.cin, device=device, requires_grad=backward)
            beta = torch.zeros(case.cin, device=device, requires_grad=backward)
            leaves += [gamma, beta]
            prologue = dict(in_weight=gamma, in_bias=beta, in_mean=mean, in_var=var,
                            in_eps=1e-5, in_relu=True, in_training=True)

        def fn():
            return conv_bn(x, w, s, pad, stats=True, **prologue)[0]
    g = torch.randn(batch, case.cout, case.out_hw, case.out_hw, device=device, dtype=dtype)
    g = g.contiguous(memory_format=fmt)

    def step():
        if backward:
            torch.autograd.grad(fn(), leaves, g)
        else:
            with torch.no_grad():
                fn()

    return step


# (name, block class name, inplanes, planes, feature map size): the first block of a stage
BLOCKS = [("basic-64-56", "BasicBlock", 64, 64, 56),
          ("bottleneck-256-56", "Bottleneck", 256, 64, 56)]


def make_block_step(block: str, batch: int, dtype: torch.dtype, channels_last: bool, device,
                    impl: str, train: bool, size: Optional[int] = None) -> Callable[[], None]:
    """A step of one residual block from BLOCKS: `impl` is "fused", "unfused", "fused compile"
    or "unfused compile"; training = forward + backward, inference = no_grad forward."""
    from fastres.nn import BasicBlock, Bottleneck

    device = torch.device(device)
    _, cls_name, inplanes, planes, hw = next(b for b in BLOCKS if b[0] == block)
    hw = size or hw
    cls = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}[cls_name]
    fused = impl.split()[0] == "fused"
    if impl.split()[0] not in ("fused", "unfused") or impl.split()[1:] not in ([], ["compile"]):
        raise ValueError(f"unknown block implementation {impl!r}")
    model = cls(inplanes, planes, fused=fused).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train(train)
    x = torch.randn(batch, inplanes, hw, hw, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if train:
        x.requires_grad_(True)
    if impl.endswith("compile"):
        torch._dynamo.reset()
    run = torch.compile(model, dynamic=False) if impl.endswith("compile") else model
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        if train:
            with torch.autocast(**amp):
                out = run(x)
            out.float().sum().backward()
        else:
            with torch.no_grad(), torch.autocast(**amp):
                run(x)

    return step


def make_model(name: str, variant: str, device, channels_last: bool,
               state_dict: Optional[dict] = None) -> nn.Module:
    """`variant` is "torchvision", "fastres" (fused) or "plain" (the fastres model built with
    ``fused=False``: plain PyTorch ops), optionally followed by " compile".

    "torchvision" is torchvision's model where it has one (the ImageNet ResNets) and otherwise
    the plain fastres model (same network). `state_dict`: weights to load (every variant has
    torchvision's keys), so variants can be compared with the same weights."""
    base = variant.split()[0]
    if base not in ("torchvision", "fastres", "plain") or \
            variant.split()[1:] not in ([], ["compile"]):
        raise ValueError(f"unknown model variant {variant!r}")
    if base == "torchvision":
        import torchvision

        if hasattr(torchvision.models, name):
            model = getattr(torchvision.models, name)()
        else:  # CIFAR and plain nets: the same network from unfused PyTorch ops
            model = fastres.models.get_model(name, fused=False)
    else:
        model = fastres.models.get_model(name, fused=base == "fastres")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if variant.endswith("compile"):
        model = torch.compile(model)
    return model


def make_model_step(model: nn.Module, mode: str, batch: int, image_size: int, dtype: torch.dtype,
                    channels_last: bool, device, num_classes: Optional[int] = None
                    ) -> Tuple[Callable[[], None], nn.Module]:
    """A training step (mode "train": forward, loss, backward, SGD) or an inference forward
    (mode "infer", no_grad) of `model` on a random batch; returns (step, model)."""
    device = torch.device(device)
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if num_classes is None:  # the classifier's width (ImageNet 1000, CIFAR 10)
        num_classes = getattr(getattr(model, "fc", None), "out_features", 1000)
    y = torch.randint(0, num_classes, (batch,), device=device)
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train(mode == "train")

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def infer_step():
        with torch.no_grad(), torch.autocast(**amp):
            model(x)

    return (train_step if mode == "train" else infer_step), model

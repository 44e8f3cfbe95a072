"""Synchronized fused BatchNorm (fastres.nn.sync_batch_norm) across processes, on CPU with gloo.

Two processes are spawned once (module fixture `ranks`); each runs every distributed scenario
on its share of fixed global batches and saves what it computed, and the tests compare that,
in this process, with the *unsynchronised* modules run on the whole batch:

* a small ResNet (stem conv + BatchNormReLU2d + two fused BasicBlocks, one with stride 2)
  converted with convert_sync_batchnorm and wrapped in DistributedDataParallel, against the
  unconverted network: loss, every parameter gradient, three SGD steps, running statistics;
* a SyncBatchNormAddReLU2d alone (momentum=None, channels_last, ranks of unequal batch size,
  gradients of input, residual, weight and bias; fused, unfused and Triton kernels);
* a Bottleneck on the Triton conv chain in DDP (plain BatchNorm), against the mean of the
  halves' gradients;
* bfloat16, a rank with an empty batch, too few values per channel over all ranks, a group of
  one rank, bad residuals.
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fastres
from fastres.nn import (BasicBlock, BatchNormAct2d, BatchNormAddReLU2d, BatchNormReLU2d,
                        Bottleneck)
from fastres.nn.sync_batch_norm import (SyncBatchNormAct2d, SyncBatchNormAddReLU2d,
                                        SyncBatchNormReLU2d, convert_sync_batchnorm)
from numerics import assert_close_rule

WORLD = 2
NET_BATCH = 8          # split 4 + 4 (DDP averages gradients: equal local batches)
MODULE_SPLIT = (3, 5)  # ranks of unequal batch size for the module scenarios
C = 6
STEPS = 3
HAS_TRITON = "triton" in fastres.available_backends()


def assert_close_scaled(a, b, rtol=1e-5, msg=None):
    """Close within rtol of the larger of 1 and b's largest magnitude (fp32 summation noise)."""
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale, msg=msg)


# ---------------------------------------------------------------------------------------------
# Models and data, built identically in the workers and in this process
# ---------------------------------------------------------------------------------------------
def make_net() -> nn.Sequential:
    """Stem conv + BatchNormReLU2d (momentum=None), BasicBlock 8->8, BasicBlock 8->16 stride 2
    with a projection shortcut (option B: its plain BatchNorm2d becomes a fastres sync BN),
    pooling, linear. BatchNorm affine parameters are randomised."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BatchNormReLU2d(8, momentum=None),
        BasicBlock(8, 8, fused=True),
        BasicBlock(8, 16, stride=2, fused=True, shortcut="B"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def net_data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(NET_BATCH, 3, 12, 12, generator=g) * 2 + 0.5
    y = torch.randint(0, 10, (NET_BATCH,), generator=g)
    return x, y


def module_data(step: int, n: int = sum(MODULE_SPLIT), hw: int = 5, dtype=torch.float32):
    """Input (channels_last, per-channel offsets/scales), residual, and the loss weights G
    (loss = sum(out * G), so every rank's loss adds up to the whole batch's)."""
    g = torch.Generator().manual_seed(200 + step)
    shift = (torch.randn(C, generator=g) * 2).view(1, C, 1, 1)
    spread = (torch.rand(C, generator=g) * 3 + 0.1).view(1, C, 1, 1)
    x = torch.randn(n, C, hw, hw, generator=g) * spread + shift
    r = torch.randn(n, C, hw, hw, generator=g)
    grad = torch.randn(n, C, hw, hw, generator=g)
    cl = torch.channels_last
    return (x.to(dtype).contiguous(memory_format=cl), r.to(dtype).contiguous(memory_format=cl),
            grad.to(dtype).contiguous(memory_format=cl))


def init_bn(m: nn.BatchNorm2d) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(300)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return m


def run_module(m, slices, steps=STEPS, residual=True, dtype=torch.float32, n=sum(MODULE_SPLIT)):
    """Train-mode forward/backward of a BatchNorm module on `slices` of each step's batch.

    Returns per-step out, x.grad, r.grad, weight.grad, bias.grad, then the final buffers.
    """
    rec = {"out": [], "gx": [], "gr": [], "gw": [], "gb": []}
    for step in range(steps):
        x, r, grad = module_data(step, n=n, dtype=dtype)
        x = x[slices].detach().requires_grad_()
        r = r[slices].detach().requires_grad_()
        out = m(x, r) if residual else m(x)
        (out.float() * grad[slices].float()).sum().backward()
        rec["out"].append(out.detach())
        rec["gx"].append(x.grad)
        rec["gr"].append(r.grad if residual else None)
        rec["gw"].append(m.weight.grad.clone())
        rec["gb"].append(m.bias.grad.clone())
        m.zero_grad()
    rec["buffers"] = {k: v.clone() for k, v in m.named_buffers()}
    return rec


# ---------------------------------------------------------------------------------------------
# The worker (one per rank)
# ---------------------------------------------------------------------------------------------
def _worker(rank: int, port: int, tmpdir: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's connections on loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = {}
        res["ddp"] = _ddp_scenario(rank)
        if HAS_TRITON:
            res["ddp_triton_conv"] = _ddp_triton_conv_scenario(rank)
        lo = 0 if rank == 0 else MODULE_SPLIT[0]
        mine = slice(lo, lo + MODULE_SPLIT[rank])
        for fused in (True, False):
            m = init_bn(SyncBatchNormAddReLU2d(C, momentum=None, fused=fused))
            res[f"module_fused={fused}"] = run_module(m, mine)
        if HAS_TRITON:
            with fastres.backend("triton"):
                m = init_bn(SyncBatchNormAddReLU2d(C))
                res["module_triton"] = run_module(m, mine, steps=1)
        m = init_bn(SyncBatchNormReLU2d(C))
        res["bf16"] = run_module(m, slice(4 * rank, 4 * rank + 4), steps=1, residual=False,
                                 dtype=torch.bfloat16, n=8)
        m = init_bn(SyncBatchNormAddReLU2d(C))
        res["empty_rank"] = run_module(m, slice(0, 0) if rank == 0 else slice(0, 4), steps=2,
                                       n=4)
        m = init_bn(SyncBatchNormReLU2d(C))
        res["one_value_each"] = _one_value_each(m, rank)
        res["too_few"] = _too_few(rank)
        res["bad_residual"] = _bad_residual()
        res["group_of_one"] = _group_of_one(rank)
        torch.save(res, os.path.join(tmpdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_scenario(rank: int):
    net = convert_sync_batchnorm(make_net())
    types = sorted({type(m).__name__ for m in net.modules() if isinstance(m, nn.BatchNorm2d)})
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    mine = slice(rank * NET_BATCH // WORLD, (rank + 1) * NET_BATCH // WORLD)
    losses, grads = [], []
    for step in range(STEPS):
        x, y = net_data(step)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x[mine]), y[mine])  # mean over the local batch
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        opt.step()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ddp.eval()
    with torch.no_grad():
        eval_out = ddp(net_data(0)[0][mine])
    return dict(types=types, losses=losses, grads=grads, state=state, eval_out=eval_out)


def _ddp_triton_conv_scenario(rank: int):
    """A Bottleneck (plain BatchNorm: per-rank statistics) in DDP with the Triton conv chain,
    and, computed here on both halves without DDP on the default (cuDNN/PyTorch conv) path,
    the mean of the two halves' gradients, which DDP's averaged gradient must equal."""
    torch.manual_seed(0)
    block = Bottleneck(8, 2, stride=2)
    reference = Bottleneck(8, 2, stride=2)
    reference.load_state_dict(block.state_dict())
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(3))
    ddp = DistributedDataParallel(block)
    with fastres.conv_backend("triton"):
        ddp(x[2 * rank:2 * rank + 2]).square().mean().backward()
    for half in (x[:2], x[2:]):
        reference(half).square().mean().backward()
    return dict(grads={n: p.grad.clone() for n, p in block.named_parameters()},
                expected={n: p.grad / 2 for n, p in reference.named_parameters()},
                running_var=block.bn2.running_var.clone())


def _one_value_each(m, rank):
    """One value per channel on each rank: only the global batch has more than one."""
    x = module_data(0, n=2, hw=1)[0][rank:rank + 1].detach().requires_grad_()
    out = m(x)
    out.sum().backward()
    return dict(out=out.detach(), gx=x.grad, buffers={k: v.clone() for k, v in m.named_buffers()})


def _too_few(rank):
    """One value per channel over all ranks (rank 0 is empty): every rank must raise."""
    m = SyncBatchNormReLU2d(C)
    x = torch.randn(rank, C, 1, 1)
    try:
        m(x)
    except ValueError as e:
        return str(e)
    return None


def _bad_residual():
    m = SyncBatchNormAddReLU2d(C)
    try:
        m(torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 4))
    except ValueError as e:
        return str(e)
    return None


def _group_of_one(rank):
    """A group of one rank behaves exactly like the non-sync parent."""
    group = dist.new_group([0])  # every rank must call new_group
    if rank != 0:
        return None
    sync = init_bn(SyncBatchNormAddReLU2d(C, process_group=group))
    plain = init_bn(BatchNormAddReLU2d(C))
    return dict(sync=run_module(sync, slice(0, 4), steps=2),
                plain=run_module(plain, slice(0, 4), steps=2))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank computed: [rank0, rank1]."""
    tmpdir = str(tmp_path_factory.mktemp("sync_bn"))
    mp.spawn(_worker, args=(_free_port(), tmpdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# Distributed tests
# ---------------------------------------------------------------------------------------------
def test_ddp_resnet_matches_single_process_on_whole_batch(ranks):
    results = [r["ddp"] for r in ranks]
    assert results[0]["types"] == ["SyncBatchNormAct2d", "SyncBatchNormAddReLU2d", "SyncBatchNormReLU2d"]

    ref = make_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = net_data(step)
        opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        mean_loss = sum(r["losses"][step] for r in results) / WORLD
        assert_close_scaled(mean_loss, loss.detach(), msg=f"loss, step {step}")
        for name, p in ref.named_parameters():
            for rank, r in enumerate(results):
                assert_close_scaled(r["grads"][step][name], p.grad,
                                    msg=f"grad of {name}, step {step}, rank {rank}")
        opt.step()
    ref_state = ref.state_dict()
    for rank, r in enumerate(results):
        assert list(r["state"]) == list(ref_state)
        for k, v in ref_state.items():
            if k.endswith("num_batches_tracked"):
                assert r["state"][k].item() == v.item() == STEPS, k
            else:
                assert_close_scaled(r["state"][k], v, msg=f"{k}, rank {rank}")
    # the statistics moved: this is not a comparison of initial buffers
    assert not torch.allclose(ref_state["1.running_mean"], torch.zeros(8))
    ref.eval()
    with torch.no_grad():
        assert_close_scaled(torch.cat([r["eval_out"] for r in results]), ref(net_data(0)[0]))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_ddp_with_triton_conv_chain(ranks):
    """DDP averages the Triton chain's gradients like any module's; BatchNorm statistics stay
    per rank (plain BatchNorm2d), so the two ranks' running statistics differ."""
    results = [r["ddp_triton_conv"] for r in ranks]
    for rank, r in enumerate(results):
        for name, g in r["grads"].items():
            assert_close_scaled(g, r["expected"][name], 1e-4, msg=f"{name}, rank {rank}")
    assert not torch.allclose(results[0]["running_var"], results[1]["running_var"])


def _whole_batch_reference(m, steps=STEPS, residual=True, dtype=torch.float32,
                           n=sum(MODULE_SPLIT)):
    return run_module(m, slice(0, n), steps=steps, residual=residual, dtype=dtype, n=n)


def _compare_with_whole_batch(per_rank, ref, steps, rtol=1e-5, residual=True):
    for step in range(steps):
        for key in ("out", "gx") + (("gr",) if residual else ()):
            got = torch.cat([r[key][step] for r in per_rank])
            assert_close_scaled(got, ref[key][step], rtol, msg=f"{key}, step {step}")
        # parameter gradients are local sums: added over ranks they are the whole batch's
        for key in ("gw", "gb"):
            assert_close_scaled(sum(r[key][step] for r in per_rank), ref[key][step], rtol,
                                msg=f"{key}, step {step}")
    for rank, r in enumerate(per_rank):
        for k, v in ref["buffers"].items():
            assert_close_scaled(r["buffers"][k], v, rtol, msg=f"{k}, rank {rank}")


@pytest.mark.parametrize("fused", [True, False])
def test_sync_module_unequal_ranks_momentum_none(ranks, fused):
    per_rank = [r[f"module_fused={fused}"] for r in ranks]
    assert [o["out"][0].shape[0] for o in per_rank] == list(MODULE_SPLIT)
    assert per_rank[0]["out"][0].is_contiguous(memory_format=torch.channels_last)
    ref = _whole_batch_reference(init_bn(BatchNormAddReLU2d(C, momentum=None)))
    _compare_with_whole_batch(per_rank, ref, STEPS)
    assert ref["buffers"]["num_batches_tracked"].item() == STEPS
    # a local batch's own statistics would differ: the synchronisation is what makes this pass
    local = run_module(init_bn(BatchNormAddReLU2d(C, momentum=None)), slice(0, MODULE_SPLIT[0]))
    assert not torch.allclose(local["out"][0], ref["out"][0][:MODULE_SPLIT[0]], atol=1e-3)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreter on CPU)")
def test_sync_module_triton_backend(ranks):
    per_rank = [r["module_triton"] for r in ranks]
    ref = _whole_batch_reference(init_bn(BatchNormAddReLU2d(C)), steps=1)
    _compare_with_whole_batch(per_rank, ref, 1)


def test_sync_bfloat16_within_numerics_rule(ranks):
    per_rank = [r["bf16"] for r in ranks]
    x, _, grad = module_data(0, n=8)
    xb, gb = x.bfloat16(), grad.bfloat16()
    w = init_bn(nn.BatchNorm2d(C))

    def torch_result(dtype):
        xi = xb.to(dtype).detach().requires_grad_()
        wi = w.weight.detach().to(torch.float32 if dtype == torch.bfloat16 else dtype)
        bi = w.bias.detach().to(wi.dtype)
        out = F.relu(F.batch_norm(xi, None, None, wi, bi, True))
        loss_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # as run_module
        (out.to(loss_dtype) * gb.to(loss_dtype)).sum().backward()
        return out.detach(), xi.grad

    ref_out, ref_gx = torch_result(torch.float64)
    same_out, same_gx = torch_result(torch.bfloat16)
    out = torch.cat([r["out"][0] for r in per_rank])
    gx = torch.cat([r["gx"][0] for r in per_rank])
    assert out.dtype == gx.dtype == torch.bfloat16
    assert_close_rule(out, same_out, ref_out, torch.bfloat16, "sync bf16 output")
    assert_close_rule(gx, same_gx, ref_gx, torch.bfloat16, "sync bf16 grad_input",
                      mask_flips=True)


def test_sync_with_an_empty_rank(ranks):
    per_rank = [r["empty_rank"] for r in ranks]
    assert per_rank[0]["out"][0].shape[0] == 0
    assert torch.equal(per_rank[0]["gw"][0], torch.zeros(C))
    ref = _whole_batch_reference(init_bn(BatchNormAddReLU2d(C)), steps=2, n=4)
    _compare_with_whole_batch(per_rank, ref, 2)


def test_sync_one_value_per_rank_and_too_few_values(ranks):
    # one value per channel on each rank is allowed: two over the global batch
    x = module_data(0, n=2, hw=1)[0].detach().requires_grad_()
    m = init_bn(BatchNormReLU2d(C))
    out = m(x)
    out.sum().backward()
    assert_close_scaled(torch.cat([r["one_value_each"]["out"] for r in ranks]), out.detach())
    assert_close_scaled(torch.cat([r["one_value_each"]["gx"] for r in ranks]), x.grad)
    assert_close_scaled(ranks[0]["one_value_each"]["buffers"]["running_var"], m.running_var)
    # one value over all ranks: both ranks raise (neither waits on the other)
    for r in ranks:
        assert r["too_few"] is not None and "more than 1 value per channel" in r["too_few"]


def test_sync_bad_residual_raises(ranks):
    for r in ranks:
        assert r["bad_residual"] is not None and "does not match input shape" in r["bad_residual"]


def test_sync_group_of_one_rank_is_the_parent(ranks):
    res = ranks[0]["group_of_one"]
    for key in ("out", "gx", "gr", "gw", "gb"):
        for a, b in zip(res["sync"][key], res["plain"][key]):
            assert torch.equal(a, b), key
    for k, v in res["plain"]["buffers"].items():
        assert torch.equal(res["sync"]["buffers"][k], v), k


# ---------------------------------------------------------------------------------------------
# Single-process tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["relu", "add_relu"])
def test_without_process_group_equals_parent(kind, momentum):
    assert not dist.is_initialized()
    sync_cls, plain_cls = {"relu": (SyncBatchNormReLU2d, BatchNormReLU2d),
                           "add_relu": (SyncBatchNormAddReLU2d, BatchNormAddReLU2d)}[kind]
    sync = init_bn(sync_cls(C, momentum=momentum))
    plain = init_bn(plain_cls(C, momentum=momentum))
    a = run_module(sync, slice(0, 5), residual=kind == "add_relu")
    b = run_module(plain, slice(0, 5), residual=kind == "add_relu")
    for key in ("out", "gx", "gw", "gb"):
        for step, (u, v) in enumerate(zip(a[key], b[key])):
            assert torch.equal(u, v), f"{key}, step {step}"
    for k, v in b["buffers"].items():
        assert torch.equal(a["buffers"][k], v), k
    assert b["buffers"]["num_batches_tracked"].item() == STEPS
    sync.eval(), plain.eval()
    x, r, _ = module_data(0)
    args = (x, r) if kind == "add_relu" else (x,)
    assert torch.equal(sync(*args), plain(*args))


def test_sync_module_input_errors():
    with pytest.raises(ValueError, match="expected 4D input"):
        SyncBatchNormReLU2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs a residual"):
        SyncBatchNormAddReLU2d(3)(torch.randn(2, 3, 4, 4), None)


def test_convert_sync_batchnorm_keeps_types_and_state():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        BatchNormReLU2d(8, momentum=None),
        BasicBlock(8, 16, stride=2, fused=True),   # downsample: conv + plain nn.BatchNorm2d
        BatchNormAct2d(16, relu=False, fused=False),
    ).double()
    for step in range(2):  # non-trivial buffers
        net(torch.randn(4, 3, 12, 12, dtype=torch.float64))
    net[2].bn1.bias.requires_grad_(False)
    net[2].bn2.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    bn2_before = net[2].bn2

    group = object()  # stands in for a process group: conversion only stores it
    out = convert_sync_batchnorm(net, process_group=group)
    assert out is net
    assert type(net[1]) is SyncBatchNormReLU2d and isinstance(net[1], BatchNormReLU2d)
    assert net[1].momentum is None and net[1].relu and net[1].fused
    assert type(net[2].bn1) is SyncBatchNormReLU2d
    assert type(net[2].bn2) is SyncBatchNormAddReLU2d
    assert isinstance(net[2].bn2, BatchNormAddReLU2d) and isinstance(net[2].bn2, nn.BatchNorm2d)
    assert type(net[2].downsample[1]) is SyncBatchNormAct2d and not net[2].downsample[1].relu
    assert type(net[3]) is SyncBatchNormAct2d and not net[3].relu and not net[3].fused
    for m in (net[1], net[2].bn1, net[2].bn2, net[3], net[2].downsample[1]):
        assert m.process_group is group
    # training modes, requires_grad, and the very same parameters and buffers
    assert net[1].training and not net[2].bn2.training
    assert not net[2].bn1.bias.requires_grad and net[2].bn1.weight.requires_grad
    assert net[2].bn2.running_mean is bn2_before.running_mean
    for name, p in net.named_parameters():
        assert p is params[name], name
    after = net.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    # a BatchNorm at the top is replaced and returned
    top = convert_sync_batchnorm(BatchNormAddReLU2d(4, fused=False))
    assert type(top) is SyncBatchNormAddReLU2d and not top.fused and top.process_group is None
    plain = convert_sync_batchnorm(nn.BatchNorm2d(4))
    assert type(plain) is SyncBatchNormAct2d and not plain.relu and plain.fused
    assert type(convert_sync_batchnorm(nn.BatchNorm1d(4))) is nn.SyncBatchNorm
    # without a process group the converted network computes what the original did
    net.eval()
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchNormReLU2d(8),
                        BasicBlock(8, 16, stride=2, fused=True),
                        BatchNormAct2d(16, relu=False, fused=False)).double().eval()
    ref.load_state_dict(before)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))

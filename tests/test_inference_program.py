"""The fused models' CPU inference program (fastres.nn.inference_program): the same output as
the ordinary forward bit for bit, and run only while everything it was made from holds."""
import copy
import threading

import pytest
import torch

import fastres
import fastres.nn.inference_program as ip
from fastres.nn.blocks import BasicBlock, Bottleneck


@pytest.fixture
def runs(monkeypatch):
    """The number of calls that ran by a program."""
    count = []
    run = ip._Program.run
    monkeypatch.setattr(ip._Program, "run", lambda self, x: count.append(1) or run(self, x))
    return count


def _randomised(model):
    """Non-trivial BatchNorm statistics and affine parameters (a fresh model's fold to 1, 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model.eval()


def _plain_twin(model, fn, **kwargs):
    plain = fn(fused=False, **kwargs).eval()
    plain.load_state_dict(model.state_dict())
    mods = dict(model.named_modules())
    for name, m in plain.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = mods[name].eps  # (not in the state dict)
    return plain


def _resnet20_with_program(runs):
    """A randomised fused resnet20, an input, the ordinary forward's output, and the program
    made and run once."""
    torch.manual_seed(0)
    model = _randomised(fastres.models.resnet20())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model._forward(x)
        model(x)
        assert torch.equal(model(x), want) and len(runs) == 1
    return model, x, want


@pytest.mark.parametrize("name,px,kwargs", [
    ("resnet20", 32, {}), ("resnet20", 32, {"shortcut": "B"}), ("resnet20", 32, {"shortcut": "C"}),
    ("plain20", 32, {}), ("resnet18", 48, {}), ("resnet50", 48, {}),
    ("resnet18", 48, {"shortcut": "A"})])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_program_equals_the_ordinary_forward(name, px, kwargs, batch, channels_last, runs):
    fn = getattr(fastres.models, name)
    model = _randomised(fn(**kwargs))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, px, px).contiguous(memory_format=fmt)
    x[0, 1, 2, 3] = float("nan")  # NaN stays NaN through the folded layers
    with torch.no_grad():
        ordinary = model._forward(x)
        first = model(x)  # the ordinary forward, which makes the program
        assert not runs and model in ip._PROGRAMS
        second = model(x)
        assert len(runs) == 1
        want = _plain_twin(model, fn, **kwargs)(x)
    for got in (first, second):
        assert torch.equal(got.nan_to_num(), ordinary.nan_to_num())
        assert torch.equal(got.isnan(), ordinary.isnan())
        assert got.stride() == ordinary.stride()
    torch.testing.assert_close(second, want, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_program_is_remade_when_what_it_was_made_from_changes(runs):
    """Each change below makes the next call take the ordinary forward (and make a program
    again), and every result equals the plain model's with the same weights."""
    torch.manual_seed(0)
    model = _randomised(fastres.models.resnet20())
    x = torch.randn(2, 3, 32, 32)

    def check(expect_run):
        before = len(runs)
        got = model(x)
        assert len(runs) == before + expect_run
        want = _plain_twin(model, fastres.models.resnet20)(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return got

    with torch.no_grad():
        check(0)
        check(1)
        conv = model.layer2[1].conv1
        conv.weight.mul_(-1.5)  # in place, as an optimizer step
        check(0)
        check(1)
        conv.weight.data = torch.randn_like(conv.weight)  # new data, same tensor, same version
        check(0)
        check(1)
        bn = model.layer3[2].bn2
        bn.load_state_dict({**bn.state_dict(), "running_var": torch.full_like(bn.running_var, 3)})
        check(0)
        check(1)
        bn.eps = 0.25
        check(0)
        check(1)
        model.layer1[1] = copy.deepcopy(model.layer1[1])  # a block replaced
        model.layer1[1].conv2.weight.mul_(0.5)
        check(0)
        check(1)
        model.layer1[2].bn1 = _randomised(torch.nn.BatchNorm2d(16))  # a plain BatchNorm
        check(0)
        check(1)
        model.train()  # a training-mode forward updates the running statistics
        model(x * 2 + 1)
        model.eval()
        check(0)
        check(1)
        plain_bn = model.layer1[2].bn1  # PyTorch's kernel updates them without bumping their
        plain_bn.train()  # version: its num_batches_tracked tells
        plain_bn(torch.randn(4, 16, 8, 8) * 3 + 2)
        plain_bn.eval()
        check(0)
        check(1)
        x = torch.randn(3, 3, 32, 32)  # another batch
        check(0)
        check(1)
        x = x.contiguous(memory_format=torch.channels_last)  # another layout
        check(0)
        check(1)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2 if threads == 1 else 1)
            check(0)
            check(1)
        finally:
            torch.set_num_threads(threads)
        check(0)


def test_hooks_modes_and_tracers_take_the_ordinary_forward(runs):
    model, x, want = _resnet20_with_program(runs)
    with torch.no_grad():
        seen = []
        handle = model.layer2[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert torch.equal(model(x), want) and seen == [torch.Size([2, 32, 16, 16])]
        assert torch.equal(model(x), want) and len(seen) == 2 and len(runs) == 1
        handle.remove()
        model(x)
        assert torch.equal(model(x), want) and len(runs) == 2
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(type(m)))
        try:
            assert torch.equal(model(x), want)
            assert BasicBlock in seen and len(runs) == 2
        finally:
            handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        assert len(runs) == 2
        model.layer3[0].bn1.momentum = 0.0  # (its running statistics stay as they are)
        model.layer3[0].bn1.train()  # one BatchNorm in training mode: batch statistics
        model(x)
        model(x)
        assert len(runs) == 2
        model.layer3[0].bn1.eval()
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), want, rtol=1e-4, atol=1e-4)
        assert len(runs) == 2
    out = model(x)  # gradients enabled: not folded
    assert out.requires_grad and len(runs) == 2
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-4)


def test_own_forwards_of_blocks_stages_and_model_take_the_ordinary_forward(runs):
    # a forward set on an instance (as accelerate's hooks and debugging patches do) is what the
    # ordinary forward calls; the program, which inlines the stages and blocks, must not run
    model, x, want = _resnet20_with_program(runs)
    with torch.no_grad():
        for module in (model.layer2[1], model.layer3):
            original = module.forward
            module.forward = lambda t, f=original: f(t) * 0.5
            patched = model._forward(x)
            assert not torch.equal(patched, want)
            assert torch.equal(model(x), patched) and torch.equal(model(x), patched)
            assert len(runs) == 1
            del module.forward
            model(x)  # the program made again
            assert torch.equal(model(x), want) and len(runs) == 2
            runs.pop()
        # option A's shortcut is called as a module by the program too: its own forward runs
        shortcut = model.layer2[0].downsample
        original = shortcut.forward
        shortcut.forward = lambda t, fused=False: original(t, fused=fused) * 0.5
        patched = model._forward(x)
        assert not torch.equal(patched, want)
        assert torch.equal(model(x), patched) and torch.equal(model(x), patched)
        assert len(runs) == 3  # (the same program)
        del shortcut.forward
        assert torch.equal(model(x), want) and len(runs) == 4
        del runs[1:]
        ordinary = model._forward
        model._forward = lambda t: ordinary(t) * 2
        assert torch.equal(model(x), want * 2) and torch.equal(model(x), want * 2)
        assert len(runs) == 1
        del model._forward
        model(x)
        assert torch.equal(model(x), want) and len(runs) == 2


def test_a_batchnorm_shared_by_two_layers_takes_the_ordinary_forward(runs):
    # plans are kept per BatchNorm: one in two layers holds its last layer's folded weights
    torch.manual_seed(0)
    model = _randomised(fastres.models.resnet20())
    model.layer1[1].bn1 = model.layer1[0].bn1
    x = torch.randn(2, 3, 32, 32)
    unfolded = model(x).detach()  # (gradients enabled: BatchNorm not folded)
    with torch.no_grad():
        want = model._forward(x)
        torch.testing.assert_close(want, unfolded, rtol=1e-4, atol=1e-4)
        for _ in range(3):
            assert torch.equal(model(x), want)
    assert not runs


@pytest.mark.parametrize("name,px,cls", [("resnet20", 32, BasicBlock),
                                         ("resnet50", 32, Bottleneck),
                                         ("resnet20", 32, torch.nn.Sequential)])
def test_patched_class_forwards_take_the_ordinary_forward(name, px, cls, monkeypatch, runs):
    torch.manual_seed(0)
    model = _randomised(getattr(fastres.models, name)())
    x = torch.randn(1, 3, px, px)
    with torch.no_grad():
        want = model._forward(x)
        model(x)
        assert torch.equal(model(x), want) and len(runs) == 1
        original = cls.forward
        with monkeypatch.context() as patch:
            patch.setattr(cls, "forward", lambda self, t: original(self, t) + 1)
            patched = model._forward(x)
            assert not torch.equal(patched, want)
            assert torch.equal(model(x), patched) and torch.equal(model(x), patched)
            assert len(runs) == 1
        model(x)
        assert torch.equal(model(x), want) and len(runs) == 2


def test_program_under_torch_compile_copies_and_threads(tmp_path, runs):
    model, x, want = _resnet20_with_program(runs)
    with torch.no_grad():
        clone = copy.deepcopy(model)
        torch.save(model, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        for m in (clone, loaded):
            m(x)
            assert torch.equal(m(x), want)
        assert len(runs) == 3
        results = []

        def infer():  # (grad mode is per thread)
            with torch.no_grad():
                for _ in range(3):
                    results.append(model(x))

        workers = [threading.Thread(target=infer) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert len(results) == 12 and all(torch.equal(r, want) for r in results)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)


def test_a_model_with_a_program_is_freed():
    """The program sits beside the model (a weak-keyed table) and does not refer to it: a model
    dropped after inference is freed, with its program."""
    import gc
    import weakref

    model = fastres.models.resnet20().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert model in ip._PROGRAMS
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_program_adds_into_its_own_intermediates_only(monkeypatch, runs):
    """A block's last layer writes conv + bias + shortcut into the shortcut's buffer (oneDNN's
    add post-op in place) only where the program made that tensor: never into the caller's
    input nor into a module's output that a forward hook kept (ResNet-18's first block adds
    the max-pool's output)."""
    import fastres.nn.conv_bn as cb

    into = []
    add_into = cb._onednn_conv_bn_add_into
    monkeypatch.setattr(cb, "_onednn_conv_bn_add_into",
                        lambda conv, x, p, b, r, relu: into.append(r.shape) or
                        add_into(conv, x, p, b, r, relu))
    torch.manual_seed(0)
    model = _randomised(fastres.models.resnet18())
    kept = []
    model.maxpool.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    x = torch.randn(2, 3, 64, 64)
    x0 = x.clone()
    with torch.no_grad():
        want = model._forward(x)
        model(x)
        kept.clear()
        got = model(x)
    assert len(runs) == 1 and torch.equal(got, want) and torch.equal(x, x0)
    assert len(kept) == 1 and torch.equal(kept[0][0], kept[0][1]), "the hook's tensor changed"
    # every block adds into its own tensors but the first (the max-pool's output)
    assert len(into) == 7 and torch.Size([2, 64, 16, 16]) in into


@pytest.mark.parametrize("name,px", [("resnet20", 32), ("resnet18", 48)])
def test_inference_mode_with_normal_and_inference_tensor_parameters(name, px):
    """Under torch.inference_mode the fused models infer as under no_grad (the folded weights
    made there are inference tensors, which have no version counter). A model made under
    inference_mode has inference-tensor parameters, whose in-place changes nothing can see:
    nothing is cached for it, and a change is never answered with stale folded weights."""
    fn = getattr(fastres.models, name)
    torch.manual_seed(0)
    model = _randomised(fn())
    plain = _plain_twin(model, fn)
    x = torch.randn(2, 3, px, px)
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the weights folded under inference_mode, used outside it
        torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        made = _randomised(fn())
        assert made.conv1.weight.is_inference()
        twin = _plain_twin(made, fn)
        for _ in range(2):
            torch.testing.assert_close(made(x), twin(x), rtol=1e-4, atol=1e-4)
        bn = made.layer1[0].bn1
        bn.running_var.mul_(4)  # in place, no version counter to tell
        twin.layer1[0].bn1.running_var.mul_(4)
        torch.testing.assert_close(made(x), twin(x), rtol=1e-4, atol=1e-4)


def test_tensor_state_sees_in_place_changes_new_data_and_inference_tensors():
    """fastres._C.tensor_state, what the program's and the plans' keys hold of the tensors:
    it changes with an in-place update, with new data under the same tensor (`.data =`, no
    version bump) and with a replaced parameter; a None (a conv without bias) is a value of
    its own; None where a tensor has no version counter; a clear error for anything else."""
    from fastres._extension import _C

    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    bn = torch.nn.BatchNorm2d(4)
    dicts = [conv._parameters, bn._parameters, bn._buffers]
    first = _C.tensor_state(dicts)
    assert isinstance(first, bytes) and len(first) == 2 * 8 * 7  # 7 values, bias None too
    assert _C.tensor_state(dicts) == first
    with torch.no_grad():
        bn.running_var.mul_(2)
    second = _C.tensor_state(dicts)
    assert second != first
    version = conv.weight._version
    conv.weight.data = torch.randn(4, 3, 3, 3)
    third = _C.tensor_state(dicts)
    assert third != second and conv.weight._version == version
    conv.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    assert _C.tensor_state(dicts) != third
    assert _C.tensor_state([{"a": None}]) != _C.tensor_state([{}])
    with torch.inference_mode():
        made = torch.nn.Conv2d(3, 4, 3)
    assert _C.tensor_state([made._parameters]) is None
    with pytest.raises(TypeError, match="neither a tensor nor None"):
        _C.tensor_state([{"w": 1.0}])
    with pytest.raises(TypeError, match="list of dicts"):
        _C.tensor_state((conv._parameters,))


@pytest.mark.parametrize("batch", [1, 2], ids=["native", "onednn"])
def test_frozen_model_folds_and_gives_the_input_its_gradient(batch, runs):
    """Eval with gradients enabled but frozen parameters still folds (nothing of the model
    needs a gradient), with the add and ReLU in place on the convolution's output, and no
    program (gradients enabled): the input's gradient is the plain model's."""
    torch.manual_seed(0)
    model = _randomised(fastres.models.resnet20())
    plain = _plain_twin(model, fastres.models.resnet20)
    for p in list(model.parameters()) + list(plain.parameters()):
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 32, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, want = model(x), plain(x2)
    y.sum().backward()
    want.sum().backward()
    assert not runs
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)

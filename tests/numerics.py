"""The numerics rule of the project, shared by the tests.

A fused result's error against a high-precision reference (float64 for float32/float64
inputs, float32 for float16/bfloat16) must be at most 2x the error of unfused PyTorch in the
same dtype, plus a small absolute floor scaled by the reference's magnitude. Errors are RMS
over the tensor (robust to the odd ReLU-mask flip at a rounding boundary) and max-abs is
checked too, against a looser bound.
"""
import torch
import torch.nn.functional as F

FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def reference_dtype(dtype):
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def unfused(x, residual, running_mean, running_var, weight, bias, training, momentum, eps):
    """What a user runs today: F.batch_norm, then add, then ReLU."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y)


def rms(t):
    return t.double().pow(2).mean().sqrt().item() if t.numel() else 0.0


def assert_rms_rule(fused, torch_same_dtype, reference, dtype, what, allowance=0.0):
    """The RMS half of the rule: RMS error of `fused` <= 2x that of `torch_same_dtype` +
    floor (+ `allowance`, an extra absolute RMS slack). Returns the floor's scale."""
    assert fused.shape == reference.shape, f"{what}: shape {fused.shape} != {reference.shape}"
    ref = reference.double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    floor = FLOOR[dtype] * scale
    err_fused = rms(fused.double() - ref)
    err_torch = rms(torch_same_dtype.double() - ref)
    assert err_fused <= 2 * err_torch + floor + allowance, (
        f"{what} ({dtype}): RMS error {err_fused:.3e} > 2 x unfused PyTorch {err_torch:.3e} "
        f"+ floor {floor:.1e}" + (f" + allowance {allowance:.1e}" if allowance else ""))
    return scale


def assert_close_rule(fused, torch_same_dtype, reference, dtype, what, mask_flips=False):
    """fused and torch_same_dtype are results in `dtype`; reference is high precision.

    mask_flips: a gradient, where one ReLU-mask flip at a rounding boundary legitimately
    moves one element by a whole gradient value in low precision.
    """
    scale = assert_rms_rule(fused, torch_same_dtype, reference, dtype, what)
    ref = reference.double()
    floor = FLOOR[dtype] * scale
    max_fused = (fused.double() - ref).abs().max().item() if ref.numel() else 0.0
    max_torch = (torch_same_dtype.double() - ref).abs().max().item() if ref.numel() else 0.0
    low = dtype in (torch.float16, torch.bfloat16)
    slack = scale if (mask_flips and low) else 0.0
    assert max_fused <= 2 * max_torch + 4 * floor + slack, (
        f"{what} ({dtype}): max error {max_fused:.3e} vs unfused PyTorch {max_torch:.3e}")

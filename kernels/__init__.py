"""Triton kernels of fastres (installed as ``fastres.kernels``).

Import the kernel modules explicitly (e.g. ``fastres.kernels.batch_norm_act``): triton is an
optional dependency, and under ``TRITON_INTERPRET=1`` it must be configured before its first
import, so this package imports nothing on its own.
"""

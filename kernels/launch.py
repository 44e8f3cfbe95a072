"""How fastres launches its Triton kernels: ``launch(kernel)[grid](*args, **kwargs)``.

* On a GPU the kernel goes through ``torch.library.wrap_triton``, so that torch.compile sees
  it inside the ``triton_op`` bodies of ``fastres.ops``.
* Under ``TRITON_INTERPRET=1`` (CPU tensors) the ops are opaque custom ops and the interpreted
  kernel is called directly: torch 2.11's ``wrap_triton`` refuses the interpreter's function
  objects (torch 2.14 accepts them), and nothing needs to trace it.
* Inside :func:`record_launches` every launch is handed to a recorder instead (what the
  static kernel report, ``python -m fastres.kernels.report``, compiles); with
  ``passthrough=True`` the kernel still runs.
"""
import contextlib
import os
from typing import Callable, List

__all__ = ["launch", "record_launches", "Launch"]

_recorders: List["_Recorder"] = []


class Launch:
    """One recorded launch: the kernel object (JITFunction, Autotuner or interpreted
    function), the grid, and the arguments exactly as the launcher passed them."""

    __slots__ = ("kernel", "grid", "args", "kwargs")

    def __init__(self, kernel, grid, args, kwargs):
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        fn = getattr(fn, "fn", fn)
        return getattr(fn, "__name__", repr(fn))


class _Recorder:
    def __init__(self, passthrough: bool):
        self.passthrough = passthrough
        self.launches: List[Launch] = []


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _direct_or_wrapped(kernel):
    if _interpret():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


class _Recording:
    def __init__(self, kernel, recorder: _Recorder):
        self.kernel, self.recorder = kernel, recorder

    def __getitem__(self, grid) -> Callable:
        def run(*args, **kwargs):
            self.recorder.launches.append(Launch(self.kernel, grid, args, kwargs))
            if self.recorder.passthrough:
                return _direct_or_wrapped(self.kernel)[grid](*args, **kwargs)
            return None
        return run


def launch(kernel):
    """The launchable form of `kernel`: ``launch(kernel)[grid](*args, **kwargs)``."""
    if _recorders:
        return _Recording(kernel, _recorders[-1])
    return _direct_or_wrapped(kernel)


@contextlib.contextmanager
def record_launches(passthrough: bool = False):
    """Record every kernel launch made inside the block; yields the list of :class:`Launch`.
    Without `passthrough` nothing runs (outputs stay uninitialised), so the launchers can be
    driven with meta tensors."""
    recorder = _Recorder(passthrough)
    _recorders.append(recorder)
    try:
        yield recorder.launches
    finally:
        _recorders.remove(recorder)

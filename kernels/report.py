"""Static kernel report: what every fastres GPU kernel compiles to on sm_90 and sm_80, without a
GPU.

    python -m fastres.kernels.report [--arch sm90,sm80] [--json PATH] [--kernels NAME ...]
                                     [--dtypes bf16,fp16,fp32] [--fp32-conv] [--list]

1. **What fastres launches.** ResNet-18 and ResNet-50 (batch 256, 224 px) run one training
   step and one inference forward on the *meta* device (the models' BatchNorm parameters stay
   fp32, as under autocast), once per path a user can pick: the Triton convolutions (conv
   backend "triton", channels-last), cuDNN convolutions with the Triton BatchNorm kernels in
   channels-last, and the same in NCHW. The Triton operators' Python bodies run on the meta
   tensors, so their launchers make exactly the decisions they make on a GPU (block sizes,
   splits, flags), and every launch is recorded (kernels.launch) instead of run, once per
   target arch for launchers that choose per GPU generation (the convolutions use tensor
   descriptors, TMA, on sm_90 only). An autotuned kernel contributes one launch per config of
   its autotune list. Dtypes: bf16 and fp32 by
   default (the fp32 run covers the BatchNorm kernels; the fp32/TF32 Triton convolutions, an
   opt-in at run time, with ``--fp32-conv``); ``--dtypes bf16,fp16,fp32`` adds fp16.
2. **Compile.** Each distinct launch is specialised as Triton's JIT would specialise it
   (argument types, 16-byte alignment and divisibility by 16, integers equal to 1) and compiled
   with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` in a process pool. Launches
   that differ only in which integer arguments are divisible by 16 are compiled once (they gave
   identical registers, spills and shared memory wherever compared; ``--int-variants`` compiles
   each).
3. **Read the machine code** with the ``cuobjdump`` shipped in the triton wheel: registers,
   stack, spill stores/loads (``STL``/``LDL`` in the SASS), tensor-core instructions
   (``HGMMA`` on sm_90, ``HMMA``), and the dynamic shared memory Triton asks for. The CUDA C++
   kernels of the built ``fastres._C`` are read the same way (``-res-usage``: registers,
   stack, local memory).

Output: a markdown table per kernel, and with ``--json`` one record per row with the keys of
:data:`RECORD_KEYS`. The exit status is 1 when any kernel failed to compile (its row says
``compiled: false`` with the compiler's message), 2 on bad arguments or a missing cuobjdump.

Needs the real (not interpreted) Triton kernels: TRITON_INTERPRET must be unset or 0.
FASTRES_CONV_AUTOTUNE=0 shrinks the convolutions' autotune lists to one config, and the report
follows what fastres would launch.
"""
import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["RECORD_KEYS", "ARCHS", "LaunchSpec", "collect_launches", "compile_specs",
           "cuda_cpp_records", "find_cuobjdump", "main"]

ARCHS = {"sm90": 90, "sm80": 80}
DTYPES = ("bf16", "fp16", "fp32")
#: the default: bf16 (fastres' AMP dtype: training, benchmarks and GPU checks) and the fp32
#: BatchNorm kernels (a fused model trained without autocast). fp16 and the fp32 (TF32) Triton
#: convolutions on request (--dtypes bf16,fp16,fp32 --fp32-conv): about 1,000 compilations,
#: some 6 minutes on 2 cores, against about 3 for the default.
DEFAULT_DTYPES = ("bf16", "fp32")
MODELS = ("resnet18", "resnet50")
#: the keys of every JSON record (one per table row)
RECORD_KEYS = ("kernel", "source", "config", "arch", "dtype", "specialisation", "registers",
               "spill_stores", "spill_loads", "stack_bytes", "local_bytes", "shared_bytes",
               "mma_instructions", "compiled", "error", "workloads", "int_variants")
# constexpr arguments that are tile sizes or scheduling, shown as the config, not the
# specialisation
_CONFIG_NAMES = re.compile(r"^(BLOCK_\w+|GROUP_M)$")


class ReportError(RuntimeError):
    """A problem with the report's own environment (interpreter on, cuobjdump missing, ...)."""


# ---------------------------------------------------------------------------------------------
# cuobjdump
# ---------------------------------------------------------------------------------------------
def find_cuobjdump() -> str:
    """The cuobjdump of the triton wheel (triton/backends/nvidia/bin), else $CUDA_HOME's."""
    import triton

    looked = [Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"]
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    looked.append(Path(cuda_home) / "bin" / "cuobjdump")
    for path in looked:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ReportError("cuobjdump not found: looked at " + ", ".join(str(p) for p in looked)
                      + " (a triton wheel without its bundled NVIDIA tools, and no CUDA toolkit)")


def _run(cmd: Sequence[str]) -> str:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _count(sass: str, opcode: str) -> int:
    return len(re.findall(r"\b%s\b" % opcode, sass))


def _mma(sass: str) -> Dict[str, int]:
    return {op: n for op in ("HGMMA", "HMMA") if (n := _count(sass, op))}


def analyse_cubin(cubin: bytes, cuobjdump: str) -> dict:
    """Registers, stack, local, spills and tensor-core instructions of one Triton cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = _RES.search(_run([cuobjdump, "-res-usage", f.name]))
        sass = _run([cuobjdump, "-sass", f.name])
    if res is None:
        raise RuntimeError("cuobjdump -res-usage printed no resource line")
    regs, stack, _static_shared, local = (int(v) for v in res.groups())
    return dict(registers=regs, stack_bytes=stack, local_bytes=local,
                spill_stores=_count(sass, "STL"), spill_loads=_count(sass, "LDL"),
                mma_instructions=_mma(sass))


# ---------------------------------------------------------------------------------------------
# 1. What fastres launches: models on the meta device, launches recorded
# ---------------------------------------------------------------------------------------------
@dataclass
class LaunchSpec:
    """One compile job: a kernel specialised as the JIT would, for one arch."""
    module: str                  # e.g. "fastres.kernels.conv"
    attr: str                    # e.g. "_conv_fwd_kernel"
    kernel: str                  # the kernel function's name
    arch: str                    # "sm90"
    signature: Dict[str, str]
    constexprs: Dict[tuple, object]
    attrs: Dict[tuple, list]
    options: Dict[str, object]   # num_warps, num_stages, ...
    dtype: str
    specialisation: str
    config: str
    workloads: List[str] = field(default_factory=list)
    int_variants: int = 1        # integer-divisibility variants merged into this spec

    def key(self, int_variants: bool = False) -> tuple:
        """Identity of the compilation. Without `int_variants`, launches that differ only in
        which integer arguments are divisible by 16 share a key (they compiled to the same
        registers, spills and shared memory in every case measured; the first one seen is
        compiled)."""
        attrs = self.attrs if int_variants else {
            k: v for k, v in self.attrs.items() if self.signature[self._arg(k)].startswith("*")}
        return (self.module, self.attr, self.arch, tuple(self.signature.items()),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in attrs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.options.items())))

    def _arg(self, path: tuple) -> str:
        return list(self.signature)[path[0]]


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ReportError("the static kernel report compiles the real kernels: unset "
                          "TRITON_INTERPRET (it is 1 here)")


def _dispatch_mode():
    """A TorchDispatchMode that runs fastres' Triton operators' Python bodies (so their
    launchers run on meta tensors, recorded) instead of their fake kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastres.ops.batch_norm_act import TRITON_BODIES

    import torch

    convolutions = (torch.ops.aten.convolution.default,
                    torch.ops.aten.convolution_backward.default)

    def channels_last(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous() \
            and t.is_contiguous(memory_format=torch.channels_last)

    class RunTritonBodies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            body = TRITON_BODIES.get(func._schema.name)
            if body is not None:
                return body(*args, **(kwargs or {}))
            out = func(*args, **(kwargs or {}))
            if func in convolutions and channels_last(args[0]):
                # cuDNN keeps channels-last; the meta kernels answer contiguous
                if isinstance(out, torch.Tensor):
                    return out.contiguous(memory_format=torch.channels_last)
                return tuple(o.contiguous(memory_format=torch.channels_last)
                             if isinstance(o, torch.Tensor) and o.dim() == 4 else o for o in out)
            return out

    return RunTritonBodies()


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _meta_model(name: str, dtype: str, channels_last: bool):
    import torch

    import fastres.models

    with torch.device("meta"):
        model = getattr(fastres.models, name)()
    model.to(getattr(torch, _TORCH_DTYPES[dtype]))
    for m in model.modules():  # BatchNorm parameters and running stats stay fp32 (autocast)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.float()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# (name, conv backend, channels_last): the paths a user can pick
PATHS = (("triton-conv", "triton", True), ("cudnn-conv", "cudnn", True),
         ("cudnn-conv-nchw", "cudnn", False))


def run_workload(model_name: str, dtype: str, conv: str, channels_last: bool, batch: int = 256,
                 size: int = 224):
    """Run one training step and one inference forward of `model_name` on the meta device with
    every fastres Triton launch recorded; returns [(phase, Launch)]."""
    import torch

    from fastres import backends

    from .launch import record_launches

    model = _meta_model(model_name, dtype, channels_last)
    x = torch.empty((batch, 3, size, size), device="meta",
                    dtype=getattr(torch, _TORCH_DTYPES[dtype]))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = []
    with backends.launches_on_meta(conv), _dispatch_mode():
        with record_launches() as launches:
            model.train()
            model(x).float().sum().backward()
        out += [("train", launch) for launch in launches]
        with record_launches() as launches, torch.no_grad():
            model.eval()
            model(x)
        out += [("infer", launch) for launch in launches]
    return out


def _jit_function(kernel):
    """(JITFunction, autotune configs or None) of a launched kernel object."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        return kernel.fn, list(kernel.configs)
    return kernel, None


def _config_kwargs(config) -> dict:
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    kw = dict(config.kwargs)
    kw.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return kw


_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _format_config(constexprs: dict, options: dict) -> str:
    parts = [f"{k}={v}" for k, v in constexprs.items() if _CONFIG_NAMES.match(k)]
    parts.append(f"w{options.get('num_warps', 4)}")
    parts.append(f"s{options.get('num_stages', 3)}")
    return " ".join(parts)


def _format_specialisation(jit, signature: dict, named_constexprs: dict, attrs: dict) -> str:
    """The constexpr flags (True ones by name), other constexprs as k=v, integers the JIT
    specialised to a constant as k==v, and the integer arguments known divisible by 16."""
    declared = _declared_constexprs(jit)
    parts = []
    for k, v in named_constexprs.items():
        if _CONFIG_NAMES.match(k):
            continue
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif k not in declared:
            parts.append(f"{k}=={v}")
        else:
            parts.append(f"{k}={v}")
    div = [name for i, name in enumerate(jit.arg_names)
           if signature[name][0] in "iu"
           and any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))]
    if div:
        parts.append("16|" + ",".join(div))
    return " ".join(parts) or "-"


def _declared_constexprs(jit) -> set:
    return {p.name for p in jit.params if p.is_constexpr}


def specs_of_launch(launch, arch: str, workload: str) -> List[LaunchSpec]:
    """The compile jobs of one recorded launch on `arch` (one per autotune config)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit, configs = _jit_function(launch.kernel)
    backend = make_backend(GPUTarget("cuda", ARCHS[arch], 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    specs = []
    for config in (configs if configs is not None else [None]):
        kwargs = dict(launch.kwargs)
        if config is not None:
            kwargs.update(_config_kwargs(config))
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in _OPTION_NAMES}
        _jit_run_options(jit, kwargs)
        bound, specialization, opts = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound,
                                                               specialization, opts)
        named = {jit.arg_names[path[0]]: value for path, value in constexprs.items()}
        chosen = dict(options.__dict__)  # exactly what JITFunction.run compiles with
        first_ptr = next((t for t in signature.values() if t.startswith("*")), "*?")
        module = jit.fn.__module__
        specs.append(LaunchSpec(
            module=module, attr=_attr_name(module, launch.kernel), kernel=jit.fn.__name__,
            arch=arch, signature=dict(signature), constexprs=dict(constexprs),
            attrs=dict(attrs), options=chosen, dtype=first_ptr[1:],
            specialisation=_format_specialisation(jit, signature, named, attrs),
            config=_format_config(named, chosen), workloads=[workload]))
    return specs


def _jit_run_options(jit, kwargs: dict) -> None:
    """The options JITFunction.run adds before compiling (same cache key as a real launch)."""
    from triton import knobs

    kwargs["debug"] = kwargs.get("debug", getattr(jit, "debug", None)) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode


def _attr_name(module: str, kernel) -> str:
    mod = sys.modules[module]
    for name, value in vars(mod).items():
        if value is kernel:
            return name
    raise ReportError(f"kernel {kernel!r} is not a module-level name of {module}")


@contextlib.contextmanager
def _target(arch: str):
    """Meta-device launches inside the block choose as on a GPU of `arch`."""
    from . import conv

    capability = ARCHS[arch]
    with conv.meta_target((capability // 10, capability % 10)):
        yield


def collect_launches(archs: Sequence[str], models: Sequence[str] = MODELS,
                     dtypes: Sequence[str] = DEFAULT_DTYPES, batch: int = 256, size: int = 224,
                     kernels: Optional[Sequence[str]] = None,
                     int_variants: bool = False, fp32_conv: bool = False) -> List[LaunchSpec]:
    """Every distinct compile job of the workloads (see LaunchSpec.key for `int_variants`).
    fp32 runs the Triton convolutions only with `fp32_conv` (an opt-in at run time too: conv
    backend "triton" without autocast)."""
    _check_not_interpreted()
    merged: Dict[tuple, LaunchSpec] = {}
    variants: Dict[tuple, set] = {}
    for model in models:
        for dtype in dtypes:
            for path, conv, channels_last in PATHS:
                if dtype == "fp32" and conv == "triton" and not fp32_conv:
                    continue
                for arch in archs:
                    # launchers that choose per GPU generation (the convolutions' tensor
                    # descriptors on sm_90) see this arch
                    with _target(arch):
                        launches = run_workload(model, dtype, conv, channels_last, batch, size)
                    for phase, launch in launches:
                        if kernels and not any(k in launch.name for k in kernels):
                            continue
                        workload = f"{model} {dtype} {path} {phase}"
                        for spec in specs_of_launch(launch, arch, workload):
                            key = spec.key(int_variants)
                            seen = merged.get(key)
                            if seen is None:
                                merged[key] = spec
                                variants[key] = {spec.key(True)}
                                continue
                            if workload not in seen.workloads:
                                seen.workloads.append(workload)
                            variants[key].add(spec.key(True))
                            seen.int_variants = len(variants[key])
    return list(merged.values())


# ---------------------------------------------------------------------------------------------
# 2. Compile (in worker processes)
# ---------------------------------------------------------------------------------------------
def _compile_one(spec: LaunchSpec, cuobjdump: Optional[str]) -> dict:
    """Compile `spec`; with a cuobjdump, read its cubin into the record."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = _empty_record(spec)
    try:
        jit, _ = _jit_function(getattr(importlib.import_module(spec.module), spec.attr))
        src = ASTSource(jit, spec.signature, spec.constexprs, spec.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[spec.arch], 32),
                                  options=dict(spec.options))
        if cuobjdump is not None:
            record.update(analyse_cubin(compiled.asm["cubin"], cuobjdump))
        record["shared_bytes"] = int(compiled.metadata.shared)
        record["compiled"] = True
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a row, not a crash
        record["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
    return record


def _empty_record(spec: LaunchSpec) -> dict:
    return dict(kernel=spec.kernel, source="triton", config=spec.config, arch=spec.arch,
                dtype=spec.dtype, specialisation=spec.specialisation, registers=None,
                spill_stores=None, spill_loads=None, stack_bytes=None, local_bytes=None,
                shared_bytes=None, mma_instructions={}, compiled=False, error=None,
                workloads=list(spec.workloads), int_variants=spec.int_variants)


def _init_worker():
    os.environ["TRITON_INTERPRET"] = "0"


def compile_specs(specs: Sequence[LaunchSpec], jobs: Optional[int] = None,
                  progress=None, analyse: bool = True) -> List[dict]:
    """Compile every spec (in `jobs` processes) and, with `analyse`, read its cubin; one
    record each. Compiled kernels land in Triton's cache, where a later launch of the same
    specialisation on a GPU finds them."""
    import multiprocessing

    cuobjdump = find_cuobjdump() if analyse else None
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(specs) <= 1:
        records = []
        for i, spec in enumerate(specs):
            records.append(_compile_one(spec, cuobjdump))
            if progress:
                progress(i + 1, len(specs))
        return records
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(_compile_one, spec, cuobjdump) for spec in specs]
        records = []
        for i, future in enumerate(futures):
            records.append(future.result())
            if progress:
                progress(i + 1, len(specs))
    return records


# ---------------------------------------------------------------------------------------------
# 3. The CUDA C++ kernels of fastres._C
# ---------------------------------------------------------------------------------------------
def _extension_path() -> Optional[str]:
    import importlib.util

    spec = importlib.util.find_spec("fastres._C")
    return spec.origin if spec is not None else None


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def _split_demangled(name: str) -> Tuple[str, str]:
    """("kernel name", "template arguments") of a demangled CUDA symbol, e.g.
    ``void fastres::(anonymous namespace)::fwd_kernel<c10::Half, float, 4>(...)``."""
    text = re.sub(r"^void ", "", name.replace("(anonymous namespace)::", ""))
    m = re.match(r"([\w:]+)(?:<(.*)>)?\(", text)
    if m is None:
        return text, "-"
    return m.group(1).split("::")[-1], m.group(2) or "-"


def _cpp_dtype(args: str) -> str:
    for token, name in (("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("__nv_bfloat16", "bf16"),
                        ("__half", "fp16"), ("double", "fp64"), ("float", "fp32")):
        if token in args:
            return name
    return "-"


def cuda_cpp_records(so_path: str, archs: Sequence[str], cuobjdump: str) -> List[dict]:
    """One record per (CUDA C++ kernel, arch) of the built extension `so_path`; a single
    failed record (compiled: false) when cuobjdump cannot read its device code."""
    try:
        res = _run([cuobjdump, "-res-usage", so_path])
        sass = _run([cuobjdump, "-sass", so_path])
    except RuntimeError as e:
        return [dict(kernel="fastres._C", source="cuda-c++", config="-", arch=",".join(archs),
                     dtype="-", specialisation="-", registers=None, spill_stores=None,
                     spill_loads=None, stack_bytes=None, local_bytes=None, shared_bytes=None,
                     mma_instructions={}, compiled=False, error=str(e)[-500:], workloads=[],
                     int_variants=1)]
    spills = collections.Counter()  # (arch, mangled) -> [stores, loads]
    arch = None
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1).replace("_", "")
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = (arch, m.group(1))
            continue
        if current is not None:
            spills[current + ("STL",)] += _count(line, "STL")
            spills[current + ("LDL",)] += _count(line, "LDL")
            mma = _mma(line)
            for op, n in mma.items():
                spills[current + (op,)] += n
    rows = []
    arch = None
    for line in res.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1).replace("_", "")
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            rows.append([arch, m.group(1), None])
            continue
        m = _RES.search(line)
        if m and rows and rows[-1][2] is None:
            rows[-1][2] = tuple(int(v) for v in m.groups())
    names = _demangle(sorted({r[1] for r in rows}))
    records = []
    for arch, mangled, usage in rows:
        if arch not in archs or usage is None:
            continue
        regs, stack, shared, local = usage
        kernel, args = _split_demangled(names[mangled])
        records.append(dict(
            kernel=kernel, source="cuda-c++", config="-", arch=arch, dtype=_cpp_dtype(args),
            specialisation=args, registers=regs,
            spill_stores=spills[(arch, mangled, "STL")], spill_loads=spills[(arch, mangled, "LDL")],
            stack_bytes=stack, local_bytes=local, shared_bytes=shared,
            mma_instructions={op: spills[(arch, mangled, op)] for op in ("HGMMA", "HMMA")
                              if spills[(arch, mangled, op)]},
            compiled=True, error=None, workloads=[], int_variants=1))
    return records


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _mma_text(mma: dict) -> str:
    return " ".join(f"{op} {n}" for op, n in sorted(mma.items())) or "-"


def _cell(v) -> str:
    return "-" if v is None else str(v)


def summary_table(records: Sequence[dict]) -> str:
    """One line per (kernel, arch): rows, rows that compiled, rows that spill, registers."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r["source"], r["kernel"], r["arch"])].append(r)
    lines = ["| kernel | source | arch | rows | compiled | spilling rows | max STL / LDL | "
             "registers | rows with MMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (source, kernel, arch), rows in sorted(groups.items()):
        ok = [r for r in rows if r["compiled"]]
        spilling = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
        regs = [r["registers"] for r in ok]
        lines.append(
            f"| {kernel} | {source} | {arch} | {len(rows)} | {len(ok)} | {len(spilling)} | "
            f"{max((r['spill_stores'] for r in ok), default=0)} / "
            f"{max((r['spill_loads'] for r in ok), default=0)} | "
            f"{min(regs, default='-')}-{max(regs, default='-')} | "
            f"{sum(1 for r in ok if r['mma_instructions'])} |")
    return "\n".join(lines)


def kernel_tables(records: Sequence[dict]) -> str:
    by_kernel = collections.defaultdict(list)
    for r in records:
        by_kernel[(r["source"], r["kernel"])].append(r)
    out = []
    for (source, kernel), rows in sorted(by_kernel.items()):
        out.append(f"\n### {kernel} ({source})\n")
        out.append("| specialisation | dtype | config | arch | regs | STL / LDL | stack | "
                   "local | shared | MMA | compiled |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["specialisation"], r["dtype"], r["config"],
                                             r["arch"])):
            ok = "yes" if r["compiled"] else f"**no**: {r['error']}"
            out.append(
                f"| {r['specialisation']} | {r['dtype']} | {r['config']} | {r['arch']} | "
                f"{_cell(r['registers'])} | {_cell(r['spill_stores'])} / "
                f"{_cell(r['spill_loads'])} | {_cell(r['stack_bytes'])} | "
                f"{_cell(r['local_bytes'])} | {_cell(r['shared_bytes'])} | "
                f"{_mma_text(r['mma_instructions'])} | {ok} |")
    return "\n".join(out)


def markdown(records: Sequence[dict], header: str) -> str:
    return "\n".join([header, "", "## Summary", "", summary_table(records), "",
                      "## Every row", kernel_tables(records), ""])


def environment() -> dict:
    import torch
    import triton

    return dict(torch=torch.__version__, triton=triton.__version__,
                python=sys.version.split()[0], date=time.strftime("%Y-%m-%d"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _parse_list(text: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or text!r}; choose "
                                         f"from {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastres.kernels.report",
        description="Compile every fastres Triton kernel for sm_90/sm_80 (no GPU needed) and "
                    "report registers, spills, shared memory and tensor-core instructions; "
                    "read the CUDA C++ kernels of fastres._C the same way.")
    p.add_argument("--arch", default="sm90,sm80",
                   type=lambda t: _parse_list(t, list(ARCHS), "arch"),
                   help="comma-separated targets (default sm90,sm80)")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    p.add_argument("--kernels", nargs="+", metavar="NAME",
                   help="only kernels whose name contains one of these (e.g. conv_fwd "
                        "_stats_nhwc_kernel); CUDA C++ kernels likewise")
    p.add_argument("--models", default=",".join(MODELS),
                   type=lambda t: _parse_list(t, list(MODELS), "model"))
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                   type=lambda t: _parse_list(t, list(DTYPES), "dtype"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fp32-conv", action="store_true",
                   help="with fp32 in --dtypes, also the fp32 (TF32) Triton convolutions")
    p.add_argument("--int-variants", action="store_true",
                   help="compile launches that differ only in which integer arguments are "
                        "divisible by 16 separately (default: the first one seen)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: cores)")
    p.add_argument("--no-cuda-cpp", action="store_true",
                   help="skip the CUDA C++ kernels of fastres._C")
    p.add_argument("--quiet", action="store_true", help="print the summary table only")
    p.add_argument("--warm-cache", action="store_true",
                   help="compile every launch (integer variants included) into Triton's cache "
                        "and stop: on a GPU machine, the launches that follow (autotuning "
                        "included) then skip their compilations")
    p.add_argument("--list", action="store_true",
                   help="list the distinct compilations (kernel, specialisation, config, arch) "
                        "without compiling")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.size < 32:
        print("error: --batch must be >= 1 and --size >= 32", file=sys.stderr)
        return 2
    try:
        _check_not_interpreted()
        cuobjdump = None if (args.warm_cache or args.list) else find_cuobjdump()
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    specs = collect_launches(args.arch, args.models, args.dtypes, args.batch, args.size,
                             args.kernels, args.int_variants or args.warm_cache,
                             args.fp32_conv)
    if args.list:
        for spec in specs:
            print(f"{spec.kernel} | {spec.dtype} | {spec.specialisation} | {spec.config} | "
                  f"{spec.arch} | {len(spec.workloads)} workloads")
        print(f"{len(specs)} distinct kernel compilations", file=sys.stderr)
        return 0
    print(f"{len(specs)} distinct kernel compilations ({', '.join(args.arch)}); compiling...",
          file=sys.stderr)

    def progress(done, total):
        if done == total or done % 50 == 0:
            print(f"  {done}/{total} compiled ({time.time() - start:.0f} s)", file=sys.stderr)

    records = compile_specs(specs, args.jobs, progress, analyse=not args.warm_cache)
    if args.warm_cache:
        failed = [r for r in records if not r["compiled"]]
        print(f"warmed Triton's cache with {len(records) - len(failed)} kernels in "
              f"{time.time() - start:.0f} s ({len(failed)} failed)")
        for r in failed[:10]:
            print(f"  failed: {r['kernel']} {r['specialisation']} {r['config']}: {r['error']}")
        return 1 if failed else 0
    cpp_note = ""
    if not args.no_cuda_cpp:
        so = _extension_path()
        import fastres

        if so is None or not fastres.build_info().get("cuda"):
            cpp_note = "fastres._C was built without CUDA: no CUDA C++ kernels to read."
        else:
            cpp = cuda_cpp_records(so, args.arch, cuobjdump)
            if args.kernels:
                cpp = [r for r in cpp if any(k in r["kernel"] for k in args.kernels)]
            records += cpp
    env = environment()
    header = (f"# fastres static kernel report\n\n{env['date']}, torch {env['torch']}, triton "
              f"{env['triton']}, Python {env['python']}; archs {', '.join(args.arch)}; "
              f"workloads: {', '.join(args.models)} batch {args.batch} at {args.size} px, "
              f"{', '.join(args.dtypes)}, paths {', '.join(p[0] for p in PATHS)}; "
              f"{len(records)} rows in {time.time() - start:.0f} s." + (f" {cpp_note}" if cpp_note
                                                                        else ""))
    text = markdown(records, header)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(summary_table(records) if args.quiet else text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": env, "archs": args.arch, "records": records}, indent=1))
    failed = [r for r in records if not r["compiled"]]
    if failed:
        print(f"{len(failed)} kernel compilations failed, e.g. {failed[0]['kernel']} "
              f"{failed[0]['config']} {failed[0]['arch']}: {failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Static GPU-readiness gate, no GPU needed: every Triton kernel fastres can launch, compiled for
sm_90 and sm_80 by ``python -m fastres.kernels.report``, and the CUDA C++ kernels of the built
``fastres._C``, read with cuobjdump.

The report runs in a subprocess: it compiles the real kernels, and this test session runs
Triton through its interpreter (tests/conftest.py). Scope: ResNet-18/50 at batch 256, bf16,
fp16 and the fp32 BatchNorm kernels, both archs.

Rules:
* everything compiles, on both archs;
* the BatchNorm kernels (Triton) and the CUDA C++ kernels never spill and use no local memory;
* the convolution kernels use the tensor cores for fp16/bf16 (HGMMA on sm_90, HMMA on sm_80),
  never spill (no STL/LDL, no local memory) in any config of their autotune lists, and their
  main loops are software-pipelined on sm_90 (shared memory holds num_stages tiles).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastres

pytest.importorskip("triton")

CONV_KERNELS = ("_conv_fwd_kernel", "_conv_fwd_fold_kernel", "_conv_dgrad_kernel",
                "_conv_wgrad_kernel")
ARCHS = ("sm90", "sm80")
# FASTRES_KERNEL_GATE_DTYPES narrows the dtypes. CI gates fp16,fp32 in its first environment
# (triton 3.8) and bf16,fp32 in the second (the GPU machine's triton 3.6): the fp16 kernels
# differ from the bf16 ones only in their element type, so each dtype is gated once
GATE_DTYPES = os.environ.get("FASTRES_KERNEL_GATE_DTYPES", "bf16,fp16,fp32")
# the 16-bit dtype the hand-compiled comparison uses: bf16 where gated, else fp16
TC_DTYPE = "bf16" if "bf16" in GATE_DTYPES.split(",") else "fp16"
REPORT_ARGS = ["--arch", "sm90,sm80", "--dtypes", GATE_DTYPES]


def _compiler_env():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env["FASTRES_CONV_AUTOTUNE"] = "1"  # every config of the autotune lists
    return env


def _run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_compiler_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernel_report") / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "fastres.kernels.report", *REPORT_ARGS, "--json", str(path),
         "--quiet"], env=_compiler_env(), capture_output=True, text=True, timeout=1800)
    assert path.exists(), f"the report wrote no JSON (exit {done.returncode}):\n{done.stderr}"
    data = json.loads(path.read_text())
    data["returncode"], data["stderr"] = done.returncode, done.stderr
    print(done.stdout)  # the summary table, visible with -s / in the CI log on failure
    return data


def _rows(report, source=None, kernels=None):
    return [r for r in report["records"]
            if (source is None or r["source"] == source)
            and (kernels is None or r["kernel"] in kernels)]


def _where(r):
    return f"{r['kernel']} [{r['specialisation']}] {r['dtype']} {r['config']} {r['arch']}"


def _launchable_triton_kernels():
    """Names of every module-level Triton kernel of fastres.kernels.{batch_norm_act,conv},
    read from the source (this process imports them interpreted)."""
    import ast
    import pathlib

    import fastres.kernels

    names = set()
    for module in ("batch_norm_act.py", "conv.py"):
        tree = ast.parse(pathlib.Path(fastres.kernels.__path__[0], module).read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list) and \
                    node.name.endswith("_kernel"):
                names.add(node.name)
    return names


def test_report_compiles_every_kernel_on_both_archs(report):
    assert report["returncode"] == 0, report["stderr"][-3000:]
    failed = [f"{_where(r)}: {r['error']}" for r in report["records"] if not r["compiled"]]
    assert not failed, "\n".join(failed[:20])
    triton_rows = _rows(report, "triton")
    for arch in ARCHS:
        seen = {r["kernel"] for r in triton_rows if r["arch"] == arch}
        missing = _launchable_triton_kernels() - seen
        assert not missing, f"kernels never launched by the report's workloads on {arch}: " \
                            f"{sorted(missing)}"
    for r in report["records"]:
        assert set(r) >= {"kernel", "config", "arch", "dtype", "specialisation", "registers",
                          "spill_stores", "spill_loads", "stack_bytes", "shared_bytes",
                          "mma_instructions", "compiled", "error"}


def test_every_conv_config_of_the_autotune_lists_is_compiled(report):
    from fastres.kernels import report as report_module  # noqa: F401  (importable)

    done = _run_python(f"""
        from fastres.kernels import conv
        print(*(len(getattr(conv, name).configs) for name in {list(CONV_KERNELS)!r}))
    """)
    assert done.returncode == 0, done.stderr
    expected = dict(zip(CONV_KERNELS, (int(n) for n in done.stdout.split())))
    for kernel, n in expected.items():
        for arch in ARCHS:
            by_spec = {}
            for r in _rows(report, "triton", {kernel}):
                if r["arch"] == arch:
                    by_spec.setdefault((r["specialisation"], r["dtype"]), set()).add(r["config"])
            assert by_spec, f"{kernel} has no rows on {arch}"
            short = {k: len(v) for k, v in by_spec.items() if len(v) != n}
            assert not short, f"{kernel} on {arch}: expected {n} configs per specialisation, " \
                              f"got {short}"


def test_batch_norm_triton_kernels_never_spill(report):
    rows = [r for r in _rows(report, "triton") if r["kernel"] not in CONV_KERNELS]
    assert rows
    spilling = [f"{_where(r)}: STL {r['spill_stores']} LDL {r['spill_loads']} stack "
                f"{r['stack_bytes']} local {r['local_bytes']}" for r in rows
                if r["spill_stores"] or r["spill_loads"] or r["local_bytes"]]
    assert not spilling, "\n".join(spilling)


def test_cuda_cpp_kernels_use_no_local_memory(report):
    if not fastres.build_info()["cuda"]:
        pytest.skip("fastres._C was built without its CUDA kernels (no CUDA toolkit): "
                    "nothing to read")
    built = {"sm" + a.strip().replace(".", "") for a in
             fastres.build_info()["cuda_archs"].replace(",", ";").split(";") if a.strip()}
    built &= set(ARCHS)  # CI builds 8.0;9.0, the torch-2.11 environment 9.0 like the GPU
    assert built, f"fastres._C was built for {fastres.build_info()['cuda_archs']!r}"
    rows = _rows(report, "cuda-c++")
    assert {r["arch"] for r in rows} == built, "the report did not read the CUDA kernels of " \
                                               f"every arch the extension was built for ({built})"
    bad = [f"{_where(r)}: local {r['local_bytes']} stack {r['stack_bytes']} STL "
           f"{r['spill_stores']} LDL {r['spill_loads']}" for r in rows
           if r["local_bytes"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad, "\n".join(bad)


def test_conv_kernels_use_the_tensor_cores(report):
    rows = [r for r in _rows(report, "triton", CONV_KERNELS) if r["dtype"] in ("bf16", "fp16")]
    assert {r["arch"] for r in rows} == set(ARCHS)
    want = {"sm90": "HGMMA", "sm80": "HMMA"}
    bad = [f"{_where(r)}: {r['mma_instructions'] or 'no MMA'}" for r in rows
           if not r["mma_instructions"].get(want[r["arch"]])]
    assert not bad, "\n".join(bad)


def test_conv_kernels_never_spill(report):
    rows = _rows(report, "triton", CONV_KERNELS)
    assert rows
    spilling = [f"{_where(r)}: STL {r['spill_stores']} LDL {r['spill_loads']}" for r in rows
                if r["spill_stores"] or r["spill_loads"] or r["local_bytes"]]
    assert not spilling, f"{len(spilling)} of {len(rows)} rows spill:\n" + "\n".join(spilling[:30])


def _config_values(config: str) -> dict:
    """{"BLOCK_M": 128, ..., "num_warps": 8, "num_stages": 3} of a report's config column."""
    values = {k: int(v) for k, v in (part.split("=") for part in config.split() if "=" in part)}
    values["num_warps"] = int(next(p[1:] for p in config.split() if p.startswith("w")))
    values["num_stages"] = int(next(p[1:] for p in config.split() if p.startswith("s")))
    return values


def test_conv_main_loops_are_software_pipelined(report):
    """On sm_90 the K loop of the forward, data- and weight-gradient kernels keeps num_stages
    operand tiles in shared memory (the pipeliner took the loop: asynchronous copies of the
    next tiles overlap the HGMMAs); a loop it refuses keeps one or two. Not for the stem's
    folded taps (FOLD): its 2-byte gathers of 3-channel pixels cannot be asynchronous copies.
    With a BatchNorm prologue the activation tile passes through registers (scale, shift, ReLU)
    on its way to the MMA, so the pipeliner keeps num_stages - 1 of its tiles in shared memory
    (one stage is in registers; triton 3.6 then feeds the HGMMA from registers, triton 3.8
    stores the tile back to an operand buffer) and num_stages of the weight or gradient tiles."""
    rows = [r for r in _rows(report, "triton", {"_conv_fwd_kernel", "_conv_dgrad_kernel",
                                                "_conv_wgrad_kernel"})
            if r["arch"] == "sm90" and r["dtype"] in ("bf16", "fp16")
            and "FOLD" not in r["specialisation"].split()]
    assert rows
    bad = []
    for r in rows:
        c = _config_values(r["config"])
        a_rows = c["BLOCK_CO"] if r["kernel"] == "_conv_wgrad_kernel" else c["BLOCK_M"]
        stage = (a_rows + c["BLOCK_N"]) * c["BLOCK_K"] * 2
        need = c["num_stages"] * stage
        if "PROLOGUE" in r["specialisation"].split():
            # the activation: A (BLOCK_M rows) of the forward, B (BLOCK_N) of the weight gradient
            act_rows = c["BLOCK_N"] if r["kernel"] == "_conv_wgrad_kernel" else c["BLOCK_M"]
            need -= act_rows * c["BLOCK_K"] * 2
        if r["shared_bytes"] < need:
            bad.append(f"{_where(r)}: shared {r['shared_bytes']} < {need} "
                       f"({c['num_stages']} stages of {stage})")
    assert not bad, "\n".join(bad[:30])


def test_report_agrees_with_a_separate_compile(report):
    """Compile one convolution and one BatchNorm kernel by hand (triton.compile on a
    hand-written signature, read with cuobjdump) and compare with the report's rows."""
    conv = next(r for r in _rows(report, "triton", {"_conv_fwd_kernel"})
                if r["arch"] == "sm90" and r["dtype"] == TC_DTYPE
                and r["specialisation"].startswith("KH=3 KW=3 STRIDE=1 PAD=1 PROLOGUE PRO_RELU "
                                                   "STATS")
                and r["config"].endswith("BLOCK_N=128 BLOCK_K=64 w8 s3"))
    stats = next(r for r in _rows(report, "triton", {"_stats_nhwc_kernel"})
                 if r["arch"] == "sm80" and r["dtype"] == TC_DTYPE)
    done = _run_python(f"""
        import json, re, subprocess, tempfile, os, pathlib
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastres.kernels import batch_norm_act, conv
        tool = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"

        def read(kernel, signature, constexprs, div, arch, warps, stages, **options):
            fn = getattr(kernel, "fn", kernel)
            fn = fn if hasattr(fn, "arg_names") else kernel
            names = fn.arg_names
            sig = {{n: signature.get(n, "constexpr") for n in names}}
            attrs = {{(names.index(n),): [["tt.divisibility", 16]] for n in div}}
            k = triton.compile(ASTSource(fn, sig, constexprs, attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=warps, num_stages=stages, **options))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"]); f.flush()
                res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True,
                                     text=True).stdout
                sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True,
                                      text=True).stdout
            regs = int(re.search(r"REG:(\\d+)", res).group(1))
            return dict(registers=regs, spill_stores=len(re.findall(r"\\bSTL\\b", sass)),
                        spill_loads=len(re.findall(r"\\bLDL\\b", sass)),
                        shared_bytes=k.metadata.shared,
                        hgmma=len(re.findall(r"\\bHGMMA\\b", sass)))

        ptrs = ["x_ptr", "w_ptr", "out_ptr", "bias_ptr", "res_ptr"]
        f32 = ["scale_ptr", "shift_ptr", "cnt_ptr", "smean_ptr", "sm2_ptr"]
        sig = {{**{{p: "*{TC_DTYPE}" for p in ptrs}}, **{{p: "*fp32" for p in f32}},
               **{{n: "i32" for n in ["M", "H", "W", "CIN", "P", "Q", "COUT"]}}}}
        flags = dict(KH=3, KW=3, STRIDE=1, PAD=1, PROLOGUE=True, PRO_RELU=True, HAS_BIAS=False,
                     HAS_RES=False, RELU=False, STATS=True, IEEE=False, INT64=False, TMA=False,
                     GROUP_M=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
        div = ptrs + f32 + {json.dumps(conv["specialisation"].split("16|")[1].split(","))}
        a = read(conv._conv_fwd_kernel, sig, flags, div, 90, 8, 3, maxnreg=conv._MAXNREG)

        cfg = dict(kv.split("=") for kv in {json.dumps(stats["config"])}.split() if "=" in kv)
        sig = dict(x_ptr="*{TC_DTYPE}", cnt_ptr="*fp32", mean_ptr="*fp32", m2_ptr="*fp32",
                   M="i32", C="i32", n_cblocks="i32", ITERS="i32")
        spec = {json.dumps(stats["specialisation"])}
        consts = {{k: int(v) for k, v in cfg.items()}}
        for part in spec.split():
            if "==" in part:
                name, value = part.split("==")
                consts[name] = int(value)
                sig[name] = "constexpr"
        div = ["x_ptr", "cnt_ptr", "mean_ptr", "m2_ptr"] + \\
            (spec.split("16|")[1].split(",") if "16|" in spec else [])
        warps = int(re.search(r"w(\\d+)", {json.dumps(stats["config"])}).group(1))
        stages = int(re.search(r"s(\\d+)$", {json.dumps(stats["config"])}).group(1))
        b = read(batch_norm_act._stats_nhwc_kernel, sig, consts, div, 80, warps, stages)
        print(json.dumps([a, b]))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    separate_conv, separate_stats = json.loads(done.stdout.strip().splitlines()[-1])
    for row, separate in ((conv, separate_conv), (stats, separate_stats)):
        for key in ("registers", "spill_stores", "spill_loads", "shared_bytes"):
            assert row[key] == separate[key], f"{_where(row)}: {key} {row[key]} in the report, " \
                                              f"{separate[key]} compiled separately"
    assert separate_conv["hgmma"] == conv["mma_instructions"].get("HGMMA", 0)


def test_report_rejects_bad_arguments_and_the_interpreter():
    env = _compiler_env()
    done = subprocess.run([sys.executable, "-m", "fastres.kernels.report", "--arch", "sm75"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown arch 'sm75'" in done.stderr
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "fastres.kernels.report"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr


def test_missing_cuobjdump_names_the_paths_looked_at(tmp_path, monkeypatch):
    import triton

    from fastres.kernels import report as report_module

    monkeypatch.setattr(triton, "__file__", str(tmp_path / "triton" / "__init__.py"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(report_module.ReportError) as info:
        report_module.find_cuobjdump()
    message = str(info.value)
    assert str(tmp_path / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump") in message
    assert str(tmp_path / "no-cuda" / "bin" / "cuobjdump") in message


def test_a_kernel_that_does_not_compile_is_a_row_not_a_crash():
    done = _run_python("""
        import json
        from fastres.kernels import report
        good = [s for s in report.collect_launches(["sm90"], ["resnet18"], ["bf16"], 8, 64,
                                                   kernels=["_merge_stats_kernel"])]
        bad = good[0]
        bad.constexprs[(list(bad.signature).index("BLOCK_C"),)] = 24  # tl.arange refuses it
        records = report.compile_specs([bad], jobs=1)
        print(json.dumps(records[0]))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["compiled"] is False
    assert record["error"] and "power of 2" in record["error"].lower().replace("two", "2")
    assert record["registers"] is None


def test_launch_recorder_passes_through_under_the_interpreter():
    """record_launches(passthrough=True) sees every launch of an op and still runs it."""
    import torch

    from fastres import functional
    from fastres.kernels.launch import record_launches

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors through the interpreter")
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    with fastres.backend("triton"):
        expected = functional.batch_norm_relu(x, None, None, training=True)
        with record_launches(passthrough=True) as launches:
            got = functional.batch_norm_relu(x, None, None, training=True)
    torch.testing.assert_close(got, expected)
    names = [launch.name for launch in launches]
    assert "_merge_stats_kernel" in names and any(n.startswith("_fwd_") for n in names)


def test_warm_cache_is_what_the_jit_compiles(tmp_path):
    """`--warm-cache` only saves GPU time if its compilations are the very ones Triton's JIT
    looks up at launch. With a stand-in active driver (sm_90, no GPU), JITFunction.warmup of the
    same launches finds everything the report compiled: no new cache entries; with a cold
    cache the same warm-up writes entries (so the check can fail)."""
    code = f"""
        import glob, json, os, sys
        os.environ["TRITON_CACHE_DIR"] = sys.argv[1]
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from fastres.kernels import batch_norm_act, conv, report
        from fastres.kernels.launch import record_launches

        meta = dict(device="meta")
        x = torch.empty(256, 64, 56, 56, **meta).contiguous(memory_format=torch.channels_last)
        w = torch.empty(64, 64, 3, 3, **meta).contiguous(memory_format=torch.channels_last)
        with record_launches() as launches:
            batch_norm_act.bn_act_forward(x, None, None, None, None, None, True, 1e-5, True)
            conv.conv_forward(x.bfloat16(), w.bfloat16(), 1, 1, stats=True)
        if sys.argv[2] == "warm":
            specs = [s for l in launches for s in report.specs_of_launch(l, "sm90", "test")]
            assert all(r["compiled"] for r in report.compile_specs(specs, jobs=1, analyse=False))
        before = set(glob.glob(os.path.join(sys.argv[1], "*")))

        class StandInDriver:  # what JITFunction.run asks of the active driver
            def get_current_target(self): return GPUTarget("cuda", 90, 32)
            def get_current_device(self): return 0
            def get_current_stream(self, device=None): return 0

        driver.set_active(StandInDriver())
        for launch in launches:
            launch.kernel.warmup(*launch.args, grid=(1,), **launch.kwargs)
        new = set(glob.glob(os.path.join(sys.argv[1], "*"))) - before
        print(json.dumps({{"launches": len(launches), "new": len(new)}}))
    """
    results = {}
    for mode in ("warm", "cold"):
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code),
                               str(tmp_path / mode), mode], env=_compiler_env(),
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["warm"]["launches"] >= 4
    assert results["warm"]["new"] == 0, results
    assert results["cold"]["new"] > 0, results

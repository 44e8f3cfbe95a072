"""Build fastres: the Python package, the Triton kernels (installed as fastres.kernels) and
the C++/CUDA extension fastres._C.

    pip install -e . --no-build-isolation      # builds against the torch you have installed

Environment:
    CUDA_HOME              CUDA toolkit (default: /usr/local/cuda when it holds bin/nvcc)
    FASTRES_NO_CUDA=1      build the C++ CPU kernels only
    TORCH_CUDA_ARCH_LIST   GPU archs (default "8.0;9.0" when no GPU is visible)
    MAX_JOBS               parallel compile jobs for ninja
"""
import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()

try:
    import torch
except ImportError:  # pragma: no cover - only hit on a broken install
    sys.exit(
        "fastres compiles against the torch you have installed, and none was found.\n"
        "Install torch first, then build without pip's isolated build environment:\n"
        "    pip install torch && pip install -e . --no-build-isolation"
    )

# torch.utils.cpp_extension reads CUDA_HOME when it is imported: point it at a real toolkit.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastres/version.py").read_text()).group(1)


def want_cuda() -> bool:
    if os.environ.get("FASTRES_NO_CUDA", "0") == "1":
        print("fastres: FASTRES_NO_CUDA=1, building the CPU kernels only")
        return False
    if torch.version.cuda is None:
        print("fastres: this torch has no CUDA, building the CPU kernels only")
        return False
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        print("fastres: no CUDA toolkit found (set CUDA_HOME), building the CPU kernels only")
        return False
    return True


def extension():
    with_cuda = want_cuda()
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    torch_version = torch.__version__.split("+")[0]
    defines = [
        ("FASTRES_VERSION", f'"{VERSION}"'),
        ("FASTRES_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs the CPU kernels on torch's OpenMP threads only when the extension
        # itself is compiled with OpenMP (else it runs them serially); the libgomp.so.1 that
        # torch loads serves both. No -march: the vectorised kernels are compiled per CPU
        # capability with target pragmas (csrc/cpu/bn_act_kernel_*.cpp) and picked at run time.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not with_cuda:
        return CppExtension(
            "fastres._C", sources, include_dirs=[str(ROOT / "csrc")],
            define_macros=defines, extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPU")
    print(f"fastres: building CUDA kernels with {CUDA_HOME} for archs {archs} (torch {torch_version})")
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu"))
    defines += [("FASTRES_WITH_CUDA", None), ("FASTRES_CUDA_ARCHS", f'"{archs}"')]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    return CUDAExtension(
        "fastres._C", sources, include_dirs=[str(ROOT / "csrc")],
        define_macros=defines, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    name="fastres",
    version=VERSION,
    description="Fused BatchNorm/ReLU/residual kernels and ResNets for PyTorch",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastres", "fastres.ops", "fastres.nn", "fastres.models", "fastres.bench",
              "fastres.data", "fastres.train", "fastres.kernels"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.6", "torchvision", "numpy", "scikit-learn", "matplotlib", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "hypothesis",
                                                    "timm", "onnx", "onnxscript", "onnxruntime"]},
    entry_points={"console_scripts": [
        "fastres-train=fastres.train.cli:main",
        "fastres-eval=fastres.train.evaluate:main",
        "fastres-plot=fastres.train.plot:main",
        "fastres-bench=fastres.bench.cli:main",
    ]},
    zip_safe=False,
)

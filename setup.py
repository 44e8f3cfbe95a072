"""Build fastres: the Python package, the Triton kernels (installed as fastres.kernels) and
the C++/CUDA extension fastres._C.

    pip install -e . --no-build-isolation      # builds against the torch you have installed

Environment:
    CUDA_HOME              CUDA toolkit (default: /usr/local/cuda when it holds bin/nvcc)
    FASTRES_NO_CUDA=1      build the C++ CPU kernels only
    TORCH_CUDA_ARCH_LIST   GPU archs (default "8.0;9.0" when no GPU is visible)
    MAX_JOBS               parallel compile jobs for ninja
    FASTRES_NO_CUDNN_FUSION=1          build without the "cudnn-fused" conv backend
    FASTRES_CUDNN_FRONTEND_INCLUDE     folder holding cudnn_frontend.h (default: the installed
                                       nvidia-cudnn-frontend wheel's include/)
    FASTRES_CUDNN_ROOT                 folder with cuDNN 9's include/cudnn.h and lib/libcudnn.so.9
                                       (default: torch's nvidia-cudnn wheel, nvidia/cudnn)
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


def cudnn_fusion():
    """(include dirs, library dir, None) for the "cudnn-fused" conv backend, or (None, None,
    why not: "disabled", "no_frontend", "no_cudnn" or "no_nvrtc", which build_info() explains). It needs
    the cuDNN frontend's headers (the nvidia-cudnn-frontend wheel) and cuDNN 9's headers and
    library (torch's nvidia-cudnn wheel)."""
    if os.environ.get("FASTRES_NO_CUDNN_FUSION", "0") == "1":
        return None, None, "disabled"
    frontend = os.environ.get("FASTRES_CUDNN_FRONTEND_INCLUDE")
    if not frontend:
        try:
            from importlib.metadata import PackageNotFoundError, distribution
            header = Path(distribution("nvidia-cudnn-frontend").locate_file(
                "include/cudnn_frontend.h"))
            frontend = str(header.parent)
        except PackageNotFoundError:
            return None, None, "no_frontend"
    if not Path(frontend, "cudnn_frontend.h").exists():
        return None, None, "no_frontend"
    root = os.environ.get("FASTRES_CUDNN_ROOT")
    if not root:
        try:
            import nvidia.cudnn
            root = str(Path(list(nvidia.cudnn.__path__)[0]))
        except ImportError:
            return None, None, "no_cudnn"
    include, lib = Path(root, "include"), Path(root, "lib")
    if not (include / "cudnn.h").exists() or not (lib / "libcudnn.so.9").exists():
        return None, None, "no_cudnn"
    includes = [frontend, str(include)]
    if not Path(CUDA_HOME, "include", "nvrtc.h").exists():
        # the frontend's headers include nvrtc.h; a minimal toolkit lacks it, torch's CUDA
        # wheels have it (nvidia/cu13/include, nvidia/cuda_nvrtc/include on CUDA 12)
        nvidia = Path(root).parent
        found = [p for p in (nvidia / "cu13/include", nvidia / "cuda_nvrtc/include")
                 if (p / "nvrtc.h").exists()]
        if not found:
            return None, None, "no_nvrtc"
        includes.append("-idirafter" + str(found[0]))  # after the toolkit's own headers
    return includes, str(lib), None


def nvrtc_link(cudnn_lib):
    """Link arguments for NVRTC, which the frontend's headers call (nvrtcGetProgramLogSize, ...):
    torch 2.14 happens to load it, torch 2.11 does not, so the extension names it itself. From
    torch's CUDA wheels next to cuDNN (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib), else the
    toolkit's lib64."""
    nvidia = Path(cudnn_lib).parent.parent
    for folder in (nvidia / "cu13/lib", nvidia / "cuda_nvrtc/lib", Path(CUDA_HOME or "", "lib64")):
        libs = sorted(folder.glob("libnvrtc.so.*")) if folder.is_dir() else []
        libs = [p for p in libs if p.name.count(".") == 2]  # libnvrtc.so.13, not builtins/alt
        if libs:
            return [f"-L{folder}", f"-l:{libs[0].name}", f"-Wl,-rpath,{folder}"]
    return []


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
        defines.append(("FASTRES_CUDNN_FUSION_WHY_NO_CUDA", None))
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
    include_dirs = [str(ROOT / "csrc")]
    fusion_includes, cudnn_lib, why = cudnn_fusion()
    if why is None:
        # one host-compiled translation unit (g++, not nvcc): the frontend is host C++
        print(f"fastres: building the cudnn-fused conv backend (frontend {fusion_includes[0]}, "
              f"cuDNN {cudnn_lib})")
        sources.append("csrc/cuda/conv_bn_cudnn.cpp")
        include_dirs += [d for d in fusion_includes if not d.startswith("-")]
        cxx += [d for d in fusion_includes if d.startswith("-")]
        defines.append(("FASTRES_WITH_CUDNN_FUSION", None))
        link += [f"-L{cudnn_lib}", "-l:libcudnn.so.9", f"-Wl,-rpath,{cudnn_lib}"]
        link += nvrtc_link(cudnn_lib)
    else:
        print(f"fastres: building without the cudnn-fused conv backend ({why})")
        defines.append(("FASTRES_CUDNN_FUSION_WHY_" + why.upper(), None))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    return CUDAExtension(
        "fastres._C", sources, include_dirs=include_dirs,
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
    extras_require={"triton": ["triton"],
                    "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "timm",
                             "onnx", "onnxscript", "onnxruntime"]},
    entry_points={"console_scripts": [
        "fastres-train=fastres.train.cli:main",
        "fastres-eval=fastres.train.evaluate:main",
        "fastres-plot=fastres.train.plot:main",
        "fastres-bench=fastres.bench.cli:main",
    ]},
    zip_safe=False,
)

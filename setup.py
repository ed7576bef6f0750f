"""Build bertfast and its extension bertfast._C.

The CPU part of the extension is always built. The CUDA part is built when the toolchain can build it
(an nvcc and a CUDA build of torch), decided from the toolchain and never from a visible GPU, so a GPU-less
build machine with nvcc and CUDA torch still produces the CUDA kernels.

Environment switches:
  BERTFAST_SKIP_CUDA_BUILD=1   never build the CUDA sources
  BERTFAST_FORCE_CUDA=1        build them or fail with the reason (instead of building CPU only)
  BERTFAST_CUDA_ARCHS          semicolon-separated compute capabilities, default "80;90"
  MAX_JOBS                     parallel compile jobs for ninja (default 4)
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_path():
    found = shutil.which("nvcc")
    if found:
        return found
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return None


def cuda_build_decision():
    """(build_cuda: bool, reason: str), from the toolchain and the switches only."""
    if os.environ.get("BERTFAST_SKIP_CUDA_BUILD", "0") == "1":
        return False, "BERTFAST_SKIP_CUDA_BUILD=1"
    missing = []
    if _nvcc_path() is None:
        missing.append("no nvcc on PATH or under CUDA_HOME")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if missing:
        if os.environ.get("BERTFAST_FORCE_CUDA", "0") == "1":
            raise SystemExit("bertfast: BERTFAST_FORCE_CUDA=1 but the CUDA extension cannot be built: "
                             + "; ".join(missing))
        return False, "; ".join(missing)
    return True, f"nvcc at {_nvcc_path()}, torch CUDA {torch.version.cuda}"


def cuda_arch_flags():
    archs = os.environ.get("BERTFAST_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        if not arch.isdigit():
            raise SystemExit(f"bertfast: BERTFAST_CUDA_ARCHS entry {arch!r} is not a compute capability like 80")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _mapped_libstdcxx():
    """The libstdc++.so.6 this process has loaded (torch, imported above, needs it), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) > 5}
    except OSError:
        return None
    found = sorted(p for p in paths if os.path.basename(p).startswith("libstdc++.so.6") and os.path.exists(p))
    return found[0] if found else None


def shared_libstdcxx_args():
    """The C++ runtime the process already has (libstdc++.so.6), named on the link line by its path.

    The link runs the compiler Python was configured with, which adds -lstdc++ at the end. On the GPU machines'
    image that is /opt/gcc/bin/g++, and the extension got its own static copy of the C++ runtime from it
    (2026-11-26, H200). Two copies in one process share no locale: the first number written into a TORCH_CHECK
    message (an ostringstream) crashed with SIGSEGV in the copy's codecvt, so every input error of bertfast._C
    killed the process (benchmarks/NOTES.md). The shared object named here resolves every C++ runtime symbol
    before -lstdc++ is reached: the libstdc++.so.6 torch loaded into this process (the one the extension will run
    with), else the one the C++ compiler ($CXX or c++) reports. Empty where neither is found (then the driver
    decides)."""
    if not sys.platform.startswith("linux"):
        return []
    found = _mapped_libstdcxx()
    if found is None:
        cxx = shlex.split(os.environ.get("CXX", "c++"))
        try:
            found = subprocess.run(cxx + ["-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                                   timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        if not os.path.isabs(found) or not os.path.exists(found):
            print(f"bertfast: no libstdc++.so.6 loaded or reported by {' '.join(cxx)}; the link uses the "
                  "driver's default C++ runtime")
            return []
    print(f"bertfast: linking the shared C++ runtime {os.path.realpath(found)}")
    return [found]


def extensions():
    build_cuda, reason = cuda_build_decision()
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(
        glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # -fno-trapping-math lets GCC if-convert the selects of the activation math (x > 0 ? 1 : 0, the clamps of
    # exp): with the default -ftrapping-math only AVX-512 (masked ops) vectorised them, the AVX2 and baseline
    # variants ran scalar. Neither flag changes results: they drop FP exception flags and errno only.
    # No -std: torch's cpp_extension adds the standard its headers need when none is given (C++17 up to torch 2.12,
    # C++20 from 2.13; torch 2.14's headers refuse C++17 with an #error), so a pinned one breaks newer torch.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    link = ["-fopenmp"] + shared_libstdcxx_args()
    print(f"bertfast: building bertfast._C with CUDA: {'yes' if build_cuda else 'no'} ({reason})")
    if build_cuda:
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + cuda_arch_flags()
        print(f"bertfast: CUDA targets: {' '.join(cuda_arch_flags())}")
        return [CUDAExtension("bertfast._C", cpp + cu,
                              extra_compile_args={"cxx": cxx + ["-DBERTFAST_WITH_CUDA"],
                                                  "nvcc": nvcc + ["-DBERTFAST_WITH_CUDA"]},
                              extra_link_args=link, libraries=["cublasLt", "cublas"])]
    return [CppExtension("bertfast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


os.environ.setdefault("MAX_JOBS", "4")

setup(
    name="bertfast",
    version="0.1.0",
    description="Fast BERT-family encoders: padding-free execution, fused Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    packages=["bertfast", "bertfast.models", "bertfast.kernels"],
    # the Triton kernels live in kernels/ but are installed as bertfast.kernels, never as a top-level
    # `kernels` (that name belongs to Hugging Face's kernels package, which transformers probes for).
    package_dir={"bertfast": "bertfast", "bertfast.models": "bertfast/models", "bertfast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.11", "transformers>=4.50", "safetensors", "numpy"],
    extras_require={"triton": ["triton>=3.4"], "bench": ["matplotlib", "pytest-benchmark", "rich"]},
    entry_points={"console_scripts": ["bertfast=bertfast.cli:main"]},
)

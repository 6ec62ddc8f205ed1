"""Builds eclip_kernels._C from csrc/.

    pip install --no-build-isolation -e .      # the build must see the installed torch

Environment:
    FORCE_CUDA=1      compile the CUDA sources even when no GPU is visible (needs nvcc and a CUDA torch)
    ECLIP_NO_CUDA=1   never compile the CUDA sources
    MAX_JOBS=N        parallel compile jobs (ninja); capped by free memory when unset
    TORCH_CUDA_ARCH_LIST  CUDA targets; default "8.0;9.0" (A100, H100/H200) when no GPU is visible
"""

from __future__ import annotations

import glob
import os
import site
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths
except ImportError:  # pragma: no cover - explained to the user
    sys.exit(
        "eclip-kernels builds against the installed PyTorch: install torch first, then "
        "`pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _with_cuda() -> bool:
    if _flag("ECLIP_NO_CUDA"):
        return False
    toolchain = CUDA_HOME is not None and torch.version.cuda is not None
    if _flag("FORCE_CUDA"):
        if not toolchain:
            sys.exit(
                "FORCE_CUDA=1 needs nvcc (CUDA_HOME) and a CUDA build of torch; found "
                f"CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
            )
        return True
    return toolchain and torch.cuda.is_available()


def _cuda_library_includes() -> list[str]:
    """Header folders of the NVIDIA wheels that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...)."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages(), os.path.dirname(os.path.dirname(torch.__file__))]
    found = []
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


def _cuda_runtime_dirs() -> list[str]:
    """Folder of libcudart.so to link against, when CUDA_HOME does not hold it.

    CUDA_HOME is found from `which nvcc` when unset; where nvcc is a wrapper outside the toolkit (for
    example /usr/local/bin/nvcc), that folder has no lib64: look in the usual toolkit folders instead.
    """
    candidates = [os.path.join(CUDA_HOME or "", d) for d in ("lib64", "lib")]
    candidates += ["/usr/local/cuda/lib64"] + sorted(glob.glob("/usr/local/cuda-*/lib64"), reverse=True)
    for path in candidates:
        if os.path.exists(os.path.join(path, "libcudart.so")):
            return [path]
    return []


def _default_max_jobs() -> None:
    # A torch translation unit needs about 1.5 GB of memory to compile: cap the jobs by free memory.
    if "MAX_JOBS" in os.environ:
        return
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        by_memory = max(1, info["MemAvailable"] // (1536 * 1024))
    except (OSError, KeyError, ValueError):
        by_memory = 1
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, by_memory)))


def _extension():
    cpu_sources = ["csrc/python_module.cpp", "csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch's headers as system headers: -Wall -Wextra then report this project's code only.
    system_includes = [f"-isystem{path}" for path in include_paths()]
    # -fopenmp: at::parallel_for is an OpenMP pragma in the ATen headers; without the flag it runs serially.
    # Compile-only: GOMP_* resolve at load time to the OpenMP runtime libtorch_cpu already links.
    cxx_flags = ["-O3", "-Wall", "-Wextra", "-fno-math-errno", "-fopenmp"] + system_includes
    if not _with_cuda():
        return CppExtension("eclip_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Wall"]
    return CUDAExtension(
        "eclip_kernels._C",
        cpu_sources + cuda_sources,
        include_dirs=_cuda_library_includes(),
        library_dirs=_cuda_runtime_dirs(),
        define_macros=[("ECLIP_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


_default_max_jobs()
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

"""Builds eclip_kernels._C from csrc/.

    pip install --no-build-isolation -e .      # the build must see the installed torch

Writes eclip_kernels/_build_info.json next to the extension (the torch release, CXX11 ABI and CUDA version it
was compiled against), which the package compares with the running torch at import. An isolated build (pip
without --no-build-isolation, `python -m build`) stops with a message: it cannot see the installed torch.

Environment:
    FORCE_CUDA=1      compile the CUDA sources even when no GPU is visible (needs nvcc and a CUDA torch)
    ECLIP_NO_CUDA=1   never compile the CUDA sources
    MAX_JOBS=N        parallel compile jobs (ninja); capped by free memory when unset
    TORCH_CUDA_ARCH_LIST  CUDA targets; default "8.0;9.0" (A100, H100/H200) when no GPU is visible
    CXX=clang++       build with clang (links libomp when installed, else compiles without OpenMP)
    ECLIP_PTXAS_VERBOSE=1  ptxas prints every kernel's registers, stack and spills (-Xptxas=-v); without it
                      a register spill is still a compiler warning (-Xptxas=-warn-spills). The same numbers
                      from the built library: `python scripts/cuda_resources.py` (cuobjdump).
"""

from __future__ import annotations

import glob
import json
import os
import site
import subprocess
import sys
import tempfile

from setuptools import setup

# pip's (and `python -m build`'s) build isolation runs this file in a fresh environment holding only
# pyproject.toml's [build-system] requires, which on purpose does not list torch: there torch is either missing
# or (when a front end installs one) not the torch the package will run with. Either way, refuse with the fix.
ISOLATION_MESSAGE = (
    "eclip-kernels compiles against the torch installed in your environment: install torch first, then run "
    "`pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .`; `bash scripts/install.sh` "
    "does both). {why}"
)


def _isolated_torch_path(path: str) -> bool:
    # pip creates its isolated build environments in folders named pip-build-env-*; build and uv in build-env-*.
    parts = os.path.normpath(path).split(os.sep)
    return any(p.startswith(("pip-build-env-", "build-env-")) for p in parts)


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths
except ImportError as exc:  # pragma: no cover - explained to the user
    isolated = os.environ.get("PYTHONNOUSERSITE") == "1" and any(_isolated_torch_path(p) for p in sys.path)
    sys.exit(ISOLATION_MESSAGE.format(
        why=("This build runs in an isolated build environment, which has no torch." if isolated
             else f"(import torch failed: {exc})")))
if _isolated_torch_path(torch.__file__):
    sys.exit(ISOLATION_MESSAGE.format(
        why=f"This build runs in an isolated build environment with its own torch {torch.__version__} "
            f"({os.path.dirname(torch.__file__)}), not the one the package will run with."))

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_FILE = "_build_info.json"


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


def _compiler_is_clang() -> bool:
    cxx = os.environ.get("CXX", "c++").split()
    try:
        out = subprocess.run(cxx + ["--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in out.lower()


def _clang_openmp_works() -> bool:
    """Whether clang can compile and link an OpenMP program (needs libomp: omp.h and libomp.so)."""
    cxx = os.environ.get("CXX", "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n"
                    "{ n = omp_get_num_threads(); }\nreturn n > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run(cxx + ["-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                    capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0


def _openmp_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) that make at::parallel_for (an OpenMP pragma in the ATen headers) parallel.

    GCC: -fopenmp at compile time only; the GOMP_* calls resolve at load time to the libgomp that libtorch_cpu
    already links. clang's -fopenmp emits calls to libomp's __kmpc_* entry points instead, which libgomp does not
    provide: with clang the module links libomp when it is installed (Debian: libomp-dev), and is compiled
    without OpenMP otherwise; at::parallel_for then runs the batch on the calling thread.
    """
    if not _compiler_is_clang():
        return ["-fopenmp"], []
    if _clang_openmp_works():
        return ["-fopenmp"], ["-fopenmp"]
    print("eclip-kernels: clang without libomp (omp.h / libomp.so): compiling without OpenMP; the CPU kernels "
          "run each call on one thread (install libomp-dev for the parallel batch loop)", file=sys.stderr)
    return [], []


def _extension():
    cpu_sources = ["csrc/python_module.cpp", "csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch's headers as system headers: -Wall -Wextra then report this project's code only.
    system_includes = [f"-isystem{path}" for path in include_paths()]
    # OpenMP: at::parallel_for is an OpenMP pragma in the ATen headers; without the flag it runs serially.
    omp_compile, omp_link = _openmp_flags()
    cxx_flags = ["-O3", "-Wall", "-Wextra", "-fno-math-errno"] + omp_compile + system_includes
    if not _with_cuda():
        return CppExtension("eclip_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=omp_link)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # -warn-spills: a register spill in a kernel is a build warning (the build is kept free of warnings)
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Wall",
                  "-Xptxas=-warn-spills"]
    if _flag("ECLIP_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    return CUDAExtension(
        "eclip_kernels._C",
        cpu_sources + cuda_sources,
        include_dirs=_cuda_library_includes(),
        library_dirs=_cuda_runtime_dirs(),
        define_macros=[("ECLIP_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=omp_link,
    )


def build_info(with_cuda: bool) -> dict:
    """What the extension's binary depends on; eclip_kernels/_extension.py compares it with the running torch."""
    return {
        "torch": torch.__version__,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "python": ".".join(map(str, sys.version_info[:3])),
    }


class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
    """Writes eclip_kernels/_build_info.json next to the built extension (in the build folder, so that wheels
    carry it, and in the source tree for in-place and editable builds)."""

    def run(self):
        super().run()
        ext = self.extensions[0]
        info = json.dumps(build_info(any(s.endswith(".cu") for s in ext.sources)), indent=1) + "\n"
        folders = {os.path.dirname(self.get_ext_fullpath(ext.name))}
        if self.inplace or getattr(self, "editable_mode", False):
            folders.add(os.path.join(ROOT, "eclip_kernels"))
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BUILD_INFO_FILE), "w") as f:
                f.write(info)


_default_max_jobs()
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionWithInfo},
)

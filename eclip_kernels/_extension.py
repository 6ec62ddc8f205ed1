"""Loading of the compiled extension ``eclip_kernels._C``.

The package works without it (the ``reference`` backend, and ``triton`` where usable); this module records
why it could not be loaded so that :func:`eclip_kernels.available_backends` can say so.

setup.py writes ``_build_info.json`` next to the extension: the torch release, C++ ABI and CUDA version it was
compiled against. At import they are compared with the running torch:

* no extension file (not built): nothing is said at import; ``available_backends()`` reports it;
* built against another torch: the extension is not loaded (a module compiled against other torch headers
  fails with an undefined symbol at best, and may crash at worst), and one :class:`ExtensionLoadWarning` names
  both releases and the command that rebuilds it;
* the file is there but fails to load (undefined symbol, missing library): one :class:`ExtensionLoadWarning`
  with the loader's message and the fix.

``ECLIP_KERNELS_REQUIRE_EXTENSION=1`` turns each of these three cases into an ImportError (for CI, and for
anyone who would rather fail than run the reference kernels).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import sys
import warnings

import torch  # noqa: F401  (loads libtorch, which eclip_kernels._C links against)

MODULE = "eclip_kernels._C"
BUILD_INFO_FILE = "_build_info.json"
REBUILD = "pip install --no-build-isolation -e ."
REQUIRE_ENV = "ECLIP_KERNELS_REQUIRE_EXTENSION"


class ExtensionLoadWarning(UserWarning):
    """``eclip_kernels._C`` is installed but cannot be used with the running torch (built against another
    release, or fails to load): the C++ kernels fall back to the reference implementation."""


_C = None
LOAD_ERROR: str | None = None
# What setup.py recorded about the build ({"torch", "cxx11_abi", "cuda", "with_cuda", ...}), or None.
BUILD_INFO: dict | None = None

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def running_torch() -> dict:
    """The properties of the running torch that the extension's binary depends on (as setup.py records them)."""
    return {
        "torch": torch.__version__,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "cuda": torch.version.cuda,
    }


def read_build_info(package_dir: str = _PACKAGE_DIR) -> dict | None:
    try:
        with open(os.path.join(package_dir, BUILD_INFO_FILE)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def extension_files(package_dir: str = _PACKAGE_DIR) -> list[str]:
    """The compiled ``_C`` files in the package folder (empty when the extension is not built)."""
    try:
        names = os.listdir(package_dir)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("_C.") and any(n.endswith(s) for s in importlib.machinery.EXTENSION_SUFFIXES))


def _describe(info: dict) -> str:
    abi = info.get("cxx11_abi")
    return (f"torch {info.get('torch')} (CXX11 ABI {'?' if abi is None else int(bool(abi))}, "
            f"CUDA {info.get('cuda') or 'none'})")


def mismatch(built: dict | None, running: dict) -> str | None:
    """Why an extension built as ``built`` describes cannot run under ``running``, or None when it can."""
    if not built:
        return None
    differs = [key for key in ("torch", "cxx11_abi", "cuda") if key in built and built[key] != running[key]]
    if not differs:
        return None
    return (f"eclip_kernels._C was built against {_describe(built)}, running {_describe(running)}: "
            f"not loaded; rebuild with `{REBUILD}` in the source tree (or `bash scripts/install.sh`)")


def _report(message: str) -> None:
    if os.environ.get(REQUIRE_ENV, "0") not in ("", "0"):
        raise ImportError(f"{message} [{REQUIRE_ENV} is set]")
    warnings.warn(f"{message}. The cpu (and cuda) slot-attention kernels fall back to the reference "
                  "implementation.", ExtensionLoadWarning, stacklevel=2)


def _load() -> None:
    global _C, LOAD_ERROR, BUILD_INFO
    BUILD_INFO = read_build_info()
    blocked = MODULE in sys.modules and sys.modules[MODULE] is None  # the documented way to hide a module
    if blocked or not extension_files():
        LOAD_ERROR = "ModuleNotFoundError: eclip_kernels._C is not built"
        if os.environ.get(REQUIRE_ENV, "0") not in ("", "0"):
            raise ImportError(f"eclip_kernels._C is not built: build it with `{REBUILD}` "
                              f"[{REQUIRE_ENV} is set]")
        return
    why = mismatch(BUILD_INFO, running_torch())
    if why is not None:
        LOAD_ERROR = why
        _report(why)
        return
    try:
        _C = importlib.import_module(MODULE)
    except ImportError as exc:  # an undefined symbol (built against another torch), a missing library
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        built = f" (built against {_describe(BUILD_INFO)})" if BUILD_INFO else ""
        _report(f"eclip_kernels._C{built} fails to load under {_describe(running_torch())}: {exc}; "
                f"rebuild with `{REBUILD}` in the source tree (or `bash scripts/install.sh`)")


_load()


def is_loaded() -> bool:
    """True when ``eclip_kernels._C`` was imported and its operators are registered."""
    return _C is not None


def cuda_sources_built() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    return bool(_C is not None and getattr(_C, "cuda_built", 0))

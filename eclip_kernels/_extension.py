"""Loading of the compiled extension ``eclip_kernels._C``.

The package works without it (the ``reference`` backend, and ``triton`` where usable); this module records
why it could not be loaded so that :func:`eclip_kernels.available_backends` can say so.
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch, which eclip_kernels._C links against)

_C = None
LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("eclip_kernels._C")
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def is_loaded() -> bool:
    """True when ``eclip_kernels._C`` was imported and its operators are registered."""
    return _C is not None


def cuda_sources_built() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    return bool(_C is not None and getattr(_C, "cuda_built", 0))

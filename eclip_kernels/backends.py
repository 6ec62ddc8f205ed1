"""Which kernel backends exist, which can run here, and which one a call uses.

Backends:

* ``reference`` — plain PyTorch autograd (``eclip_kernels.reference``): any device, any floating dtype.
  The oracle of the tests. It materializes the (B, N, T) attention.
* ``cpu`` — CPU tensors. Slot attention: C++ kernels in ``eclip_kernels._C`` (float32, float64, bfloat16).
  Contrastive losses: tiled ATen matrix products (``eclip_kernels/aten``; any floating dtype).
* ``cuda`` — CUDA C++ kernels in ``eclip_kernels._C``: CUDA tensors (no kernel written yet).
* ``triton`` — Triton kernels: CUDA tensors; float32, float16, bfloat16. CPU tensors only when the
  environment has ``TRITON_INTERPRET=1`` set before Triton is imported (the Triton interpreter, slow; used by
  the tests on machines without a GPU).

``"auto"`` picks, for the tensor's device, the fastest backend that can run the call: ``cpu`` on CPU
tensors when the extension is built, ``triton`` on CUDA tensors when Triton is importable; otherwise
``reference``. A named backend that cannot run the call raises an error that says why; it never falls
back silently.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Largest number of queries T a fused backend supports; absent = no limit (reference, cpu).
MAX_QUERIES = {"cuda": 64, "triton": 64}

_DTYPES = {
    "reference": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cpu": (torch.float64, torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}

# Per operator family: input dtypes of each backend (absent = the backend has no kernel for it).
OPS = ("slot_attention", "contrastive")
_OP_DTYPES = {
    "slot_attention": _DTYPES,
    "contrastive": {
        "reference": _DTYPES["reference"],
        # tiled ATen matrix products (eclip_kernels/aten): any floating dtype, accumulated in float32/float64
        "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
        "triton": _DTYPES["triton"],
    },
}
# Whether a backend's kernels for the family live in the compiled extension eclip_kernels._C.
_IN_EXTENSION = {"slot_attention": ("cpu", "cuda"), "contrastive": ()}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """What :func:`available_backends` reports for one backend.

    Attributes:
        built: the code of the backend is present (compiled into ``_C``, or the package is importable).
        usable: it can run on this machine now, for at least one device.
        devices: device types it accepts tensors on.
        dtypes: input dtypes it accepts.
        reason: a sentence on why it is or is not usable.
    """

    built: bool
    usable: bool
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    reason: str


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_kernel_registered(op: str) -> bool:
    return _extension.is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def available_backends() -> dict[str, BackendStatus]:
    """Report every backend: built or not, usable here or not, and why.

    Returns:
        ``{"reference": BackendStatus, "cpu": ..., "cuda": ..., "triton": ...}``.
    """
    has_gpu = torch.cuda.is_available()
    loaded = _extension.is_loaded()
    missing = f"eclip_kernels._C is not built or failed to load ({_extension.LOAD_ERROR})"

    status = {
        "reference": BackendStatus(True, True, ("cpu", "cuda"), _DTYPES["reference"], "plain PyTorch"),
        # usable = the compiled slot-attention kernels; the contrastive losses' cpu path (tiled ATen) needs
        # no extension and always runs on CPU tensors.
        "cpu": BackendStatus(
            loaded, loaded, ("cpu",), _DTYPES["cpu"],
            "C++ kernels in eclip_kernels._C (contrastive losses: tiled ATen, always available)"
            if loaded else f"{missing} (contrastive losses still run on the cpu backend: tiled ATen)",
        ),
    }

    cuda_built = _extension.cuda_sources_built()
    if not cuda_built:
        reason = missing if not loaded else "eclip_kernels._C was built without its CUDA sources"
        status["cuda"] = BackendStatus(False, False, ("cuda",), _DTYPES["cuda"], reason)
    elif not _cuda_kernel_registered("eclip_kernels::slot_attention_fwd"):
        reason = "built, but the slot_attention CUDA kernel is not implemented yet (use backend='triton')"
        if not has_gpu:
            reason = "built; no CUDA GPU visible, and the slot_attention CUDA kernel is not implemented yet"
        status["cuda"] = BackendStatus(True, False, ("cuda",), _DTYPES["cuda"], reason)
    else:
        status["cuda"] = BackendStatus(
            True, has_gpu, ("cuda",), _DTYPES["cuda"], "CUDA kernels" if has_gpu else "built, no CUDA GPU visible"
        )

    if not _triton_importable():
        status["triton"] = BackendStatus(False, False, ("cuda",), _DTYPES["triton"], "triton is not installed")
    else:
        devices = ("cuda", "cpu") if triton_interpreter_enabled() else ("cuda",)
        if has_gpu:
            reason = "Triton kernels on CUDA GPUs"
        elif triton_interpreter_enabled():
            reason = "no CUDA GPU; CPU tensors run through the Triton interpreter (TRITON_INTERPRET=1, slow)"
        else:
            reason = "needs a CUDA GPU, or TRITON_INTERPRET=1 to run CPU tensors through the Triton interpreter"
        status["triton"] = BackendStatus(
            True, has_gpu or triton_interpreter_enabled(), devices, _DTYPES["triton"], reason
        )
    return status


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, num_queries: int = 1, op: str = "slot_attention"
) -> str:
    """Return the backend that runs a call, or raise an error saying why it cannot.

    Args:
        backend: "auto" or one of :data:`BACKENDS`.
        device: device of the inputs.
        dtype: dtype of the inputs.
        num_queries: T (slot attention only).
        op: the operator family, one of :data:`OPS`.
    """
    dtypes = _OP_DTYPES[op]
    if backend == "auto":
        backend = _auto_backend(device, dtype, num_queries, op)
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    else:
        _check_usable(backend, device, op)
    if dtype not in dtypes[backend]:
        supported = ", ".join(str(d).replace("torch.", "") for d in dtypes[backend])
        raise TypeError(
            f"backend {backend!r} does not support {str(dtype).replace('torch.', '')} inputs "
            f"(supported: {supported})"
        )
    limit = MAX_QUERIES.get(backend) if op == "slot_attention" else None
    if limit is not None and num_queries > limit:
        raise ValueError(
            f"backend {backend!r} supports at most {limit} queries (T), got T={num_queries}; "
            "use backend='reference' for more"
        )
    return backend


def _auto_backend(device: torch.device, dtype: torch.dtype, num_queries: int, op: str) -> str:
    if device.type == "cpu":
        candidates = ("cpu",)
    elif device.type == "cuda":
        candidates = ("cuda", "triton")
    else:
        candidates = ()
    for name in candidates:
        limit = MAX_QUERIES.get(name, num_queries) if op == "slot_attention" else num_queries
        if _is_usable(name, device, op) and dtype in _OP_DTYPES[op].get(name, ()) and num_queries <= limit:
            return name
    return "reference"


def _is_usable(backend: str, device: torch.device, op: str) -> bool:
    try:
        _check_usable(backend, device, op)
    except (RuntimeError, ValueError):
        return False
    return True


def _check_usable(backend: str, device: torch.device, op: str) -> None:
    if backend == "reference":
        return
    if backend not in _OP_DTYPES[op]:
        raise RuntimeError(f"backend {backend!r} has no {op.replace('_', '-')} kernels; use 'triton', 'cpu' or 'auto'")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
        if backend in _IN_EXTENSION[op] and not _extension.is_loaded():
            raise RuntimeError(
                "backend 'cpu' is not available: eclip_kernels._C is not built or failed to load "
                f"({_extension.LOAD_ERROR}); reinstall with `pip install --no-build-isolation -e .`"
            )
        return
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if not _extension.cuda_sources_built():
            raise RuntimeError(
                "backend 'cuda' is not available: eclip_kernels._C was built without CUDA sources "
                f"({_extension.LOAD_ERROR or 'rebuild with FORCE_CUDA=1'})"
            )
        if not _cuda_kernel_registered("eclip_kernels::slot_attention_fwd"):
            raise RuntimeError(
                "backend 'cuda' has no slot_attention kernel yet; use backend='triton' or 'auto'"
            )
        return
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("backend 'triton' is not available: the triton package is not installed")
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise ValueError(
                "backend 'triton' runs on CUDA tensors; CPU tensors only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'triton' does not run on {device.type} tensors")
        return
    raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")

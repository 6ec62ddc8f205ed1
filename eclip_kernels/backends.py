"""Which kernel backends exist, which can run here, and which one a call uses.

Backends:

* ``reference`` — plain PyTorch autograd (``eclip_kernels.reference``): any device, any floating dtype.
  The oracle of the tests. It materializes the (B, N, T) attention and the (B, B) logits.
* ``cpu`` — CPU tensors. Slot attention: C++ kernels in ``eclip_kernels._C`` (float32, float64, bfloat16).
  Contrastive losses: tiled ATen matrix products (``eclip_kernels/aten``; any floating dtype; no extension).
* ``cuda`` — CUDA tensors. Slot attention: CUDA C++ kernels in ``eclip_kernels._C`` (float32, float64,
  float16, bfloat16; at most 64 queries), compiled with FORCE_CUDA=1 or where a GPU is visible at build time.
  EXPERIMENTAL: written and resource-checked without a GPU (scripts/cuda_resources.py); they run only when
  named (``backend="cuda"``), ``auto`` does not pick them until a GPU has verified them
  (:data:`CUDA_SLOT_ATTENTION_VERIFIED`). Contrastive losses: the same tiled ATen kernels as ``cpu`` (any
  floating dtype; no extension needed), so this family's ``cuda`` backend runs whenever the tensors are on a
  CUDA device.
* ``triton`` — Triton kernels: CUDA tensors; float32, float16, bfloat16. CPU tensors only when the
  environment has ``TRITON_INTERPRET=1`` set before Triton is imported (the Triton interpreter, slow; used by
  the tests on machines without a GPU). Needs ``import triton`` to succeed, a GPU of compute capability
  >= 7.5 (:data:`TRITON_MIN_CAPABILITY`) and >= 8.0 for bfloat16 (:data:`BF16_MIN_CAPABILITY`).

``"auto"`` picks, for the tensor's device, the fastest backend that can run the call:

* CPU tensors: ``cpu`` (slot attention: when the extension is loaded and the dtype is not float16);
* CUDA tensors: slot attention ``triton`` (the experimental ``cuda`` kernels only once verified on a GPU,
  :data:`CUDA_SLOT_ATTENTION_VERIFIED`); contrastive losses ``triton``, else the tiled ATen kernels
  (``cuda``), never the B x B reference;
* any other device: ``reference``.

When ``auto`` cannot use the fused backend it would pick for that device (Triton not importable, a GPU too
old for the dtype, T > 64 queries, a dtype without a kernel, the extension not loaded), it takes the next
one and says so with a :class:`BackendFallbackWarning`, once per distinct reason per process. Devices with
no fused backend at all (MPS, XPU, meta, ...) take ``reference`` without a warning: nothing better existed.
A named backend that cannot run the call raises an error that says why; it never falls back.

Under ``torch.autocast`` see :func:`resolve_call`: the fused paths take their inputs in the autocast dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Largest number of queries T a fused backend supports; absent = no limit (reference, cpu).
MAX_QUERIES = {"cuda": 64, "triton": 64}

# Compute capability (major, minor) a CUDA GPU needs for the Triton kernels, and for bfloat16 inputs to them
# (bfloat16 tensor-core products appeared with Ampere, sm_80).
TRITON_MIN_CAPABILITY = (7, 5)
BF16_MIN_CAPABILITY = (8, 0)

# The slot-attention CUDA C++ kernels (csrc/cuda) were written and resource-checked on a machine without a
# GPU. Until the GPU tests (tests/test_slot_attention_cuda.py, scripts/gpu_check.sh) have passed on a GPU they
# are experimental: they run when named (backend="cuda"), and "auto" keeps choosing Triton on CUDA tensors.
CUDA_SLOT_ATTENTION_VERIFIED = False
CUDA_EXPERIMENTAL_NOTE = ("experimental CUDA C++ kernels, not yet verified on a GPU: backend='cuda' runs them, "
                          "auto uses triton")

_DTYPES = {
    "reference": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cpu": (torch.float64, torch.float32, torch.bfloat16),
    "cuda": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}

# Per operator family: input dtypes of each backend (absent = the backend has no kernel for it).
OPS = ("slot_attention", "contrastive")
_ANY_FLOAT = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_OP_DTYPES = {
    "slot_attention": _DTYPES,
    "contrastive": {
        "reference": _DTYPES["reference"],
        # tiled ATen matrix products (eclip_kernels/aten): any floating dtype, accumulated in float32/float64,
        # on CPU tensors (`cpu`) and on CUDA tensors (`cuda`)
        "cpu": _ANY_FLOAT,
        "cuda": _ANY_FLOAT,
        "triton": _DTYPES["triton"],
    },
}
# Whether a backend's kernels for the family live in the compiled extension eclip_kernels._C.
_IN_EXTENSION = {"slot_attention": ("cpu", "cuda"), "contrastive": ()}


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` could not use the fused backend it would pick for the device and took a slower one.

    The message names the reason (for example Triton not importable, a GPU too old for bfloat16, more than 64
    queries). Each distinct reason is reported once per process. Silence it with
    ``warnings.filterwarnings("ignore", category=eclip_kernels.BackendFallbackWarning)``, or name a backend.
    """


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """What :func:`available_backends` reports for one backend.

    Attributes:
        built: the code of the backend is present (compiled into ``_C``, or the package is importable).
        usable: it can run on this machine now, for at least one device.
        devices: device types it accepts tensors on.
        dtypes: input dtypes it accepts.
        reason: a sentence on why it is or is not usable, per operator family where they differ.
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
def _triton_import_error() -> str | None:
    """None when ``import triton`` succeeds, else why not (cached: imported at most once per process)."""
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "triton":
            return "the triton package is not installed"
        return f"the triton package is installed but `import triton` fails ({type(exc).__name__}: {exc})"
    except Exception as exc:  # a broken install can raise anything, not only ImportError
        return f"the triton package is installed but `import triton` fails ({type(exc).__name__}: {exc})"
    return None


def _triton_importable() -> bool:
    """True when ``import triton`` succeeds (the check for any module that needs triton)."""
    return _triton_import_error() is None


@functools.lru_cache(maxsize=None)
def _capability_of_index(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability (major, minor) of a CUDA device, cached per device index (tests replace this)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of_index(index)


def _fmt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cap(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def _cuda_kernel_registered(op: str) -> bool:
    return _extension.is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def _cuda_slot_attention_registered() -> bool:
    """Both slot-attention operators have a CUDA kernel in the loaded extension."""
    return all(_cuda_kernel_registered(f"eclip_kernels::slot_attention_{d}") for d in ("fwd", "bwd"))


# --- warnings ---------------------------------------------------------------------------------------------

_WARNED: set[str] = set()


def _warn_fallback(reason: str) -> None:
    """Warn once per distinct reason that ``auto`` fell back."""
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"eclip_kernels backend='auto': {reason}", BackendFallbackWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """stacklevel of the first frame outside this package (and torch), so the warning names the user's line."""
    package = os.path.dirname(os.path.abspath(__file__))
    skip = (package, os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2  # 1 = _warn_fallback
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


# --- report -----------------------------------------------------------------------------------------------


def available_backends() -> dict[str, BackendStatus]:
    """Report every backend: built or not, usable here or not, and why (per operator family).

    ``usable`` of ``cpu`` and ``cuda`` is about their compiled slot-attention kernels; the contrastive losses
    of those two backends are tiled ATen matrix products that need no extension and always run on tensors of
    the backend's device (the ``reason`` says so).

    Returns:
        ``{"reference": BackendStatus, "cpu": ..., "cuda": ..., "triton": ...}``.
    """
    has_gpu = torch.cuda.is_available()
    loaded = _extension.is_loaded()
    missing = f"eclip_kernels._C is not built or failed to load ({_extension.LOAD_ERROR})"
    tiled = "contrastive losses: tiled ATen, no extension needed"

    status = {
        "reference": BackendStatus(
            True, True, ("cpu", "cuda"), _DTYPES["reference"],
            "plain PyTorch (slot attention and contrastive losses; materializes B x N x T and B x B)",
        ),
        "cpu": BackendStatus(
            loaded, loaded, ("cpu",), _DTYPES["cpu"],
            f"slot attention: C++ kernels in eclip_kernels._C; {tiled}, always available" if loaded
            else f"slot attention: {missing}; {tiled}, always available",
        ),
    }

    gpu_note = "runs on CUDA tensors" if has_gpu else "no CUDA GPU visible"
    cuda_built = _extension.cuda_sources_built()
    if not cuda_built:
        reason = missing if not loaded else "eclip_kernels._C was built without its CUDA sources"
        status["cuda"] = BackendStatus(
            False, False, ("cuda",), _DTYPES["cuda"], f"slot attention: {reason}; {tiled}, {gpu_note}"
        )
    elif not _cuda_slot_attention_registered():
        reason = "eclip_kernels._C has CUDA sources but no CUDA slot-attention kernel is registered"
        status["cuda"] = BackendStatus(
            True, False, ("cuda",), _DTYPES["cuda"], f"slot attention: {reason}; {tiled}, {gpu_note}"
        )
    else:
        reason = "CUDA C++ kernels" if CUDA_SLOT_ATTENTION_VERIFIED else CUDA_EXPERIMENTAL_NOTE
        status["cuda"] = BackendStatus(
            True, has_gpu, ("cuda",), _DTYPES["cuda"], f"slot attention: {reason}; {tiled}, {gpu_note}"
        )

    error = _triton_import_error()
    if error is not None:
        status["triton"] = BackendStatus(False, False, ("cuda",), _DTYPES["triton"], error)
        return status
    devices = ("cuda", "cpu") if triton_interpreter_enabled() else ("cuda",)
    usable = has_gpu or triton_interpreter_enabled()
    if has_gpu:
        capability = _device_capability(torch.device("cuda"))
        if capability < TRITON_MIN_CAPABILITY:
            usable = triton_interpreter_enabled()
            reason = (f"the CUDA GPU has compute capability {_cap(capability)}; the Triton kernels need "
                      f">= {_cap(TRITON_MIN_CAPABILITY)}")
        elif capability < BF16_MIN_CAPABILITY:
            reason = (f"Triton kernels on CUDA GPUs (slot attention and contrastive losses); compute capability "
                      f"{_cap(capability)}: float32 and float16 only (bfloat16 needs >= {_cap(BF16_MIN_CAPABILITY)})")
        else:
            reason = (f"Triton kernels on CUDA GPUs (slot attention and contrastive losses); compute capability "
                      f"{_cap(capability)}")
    elif triton_interpreter_enabled():
        reason = "no CUDA GPU; CPU tensors run through the Triton interpreter (TRITON_INTERPRET=1, slow)"
    else:
        reason = "needs a CUDA GPU, or TRITON_INTERPRET=1 to run CPU tensors through the Triton interpreter"
    status["triton"] = BackendStatus(True, usable, devices, _DTYPES["triton"], reason)
    return status


# --- choice -----------------------------------------------------------------------------------------------


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    num_queries: int = 1,
    op: str = "slot_attention",
    *,
    warn: bool = True,
) -> str:
    """Return the backend that runs a call, or raise an error saying why it cannot.

    Args:
        backend: "auto" or one of :data:`BACKENDS`.
        device: device of the inputs.
        dtype: dtype the backend receives the inputs in.
        num_queries: T (slot attention only).
        op: the operator family, one of :data:`OPS`.
        warn: issue a :class:`BackendFallbackWarning` when ``auto`` falls back (once per reason).
    """
    if op not in OPS:
        raise ValueError(f"unknown operator family {op!r}; expected one of {OPS}")
    if backend == "auto":
        backend, cause = _auto_backend(device, dtype, num_queries, op)
        if cause is not None and warn:
            _warn_fallback(_fallback_message(cause, backend, device, dtype, op))
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    else:
        _check_usable(backend, device, op)
    _check_call(backend, device, dtype, num_queries, op)
    return backend


def resolve_call(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    num_queries: int = 1,
    op: str = "slot_attention",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[str, torch.dtype]:
    """The backend of a call and the dtype it takes its floating inputs in: the precision policy.

    Outside autocast (``autocast_dtype=None``): ``(resolve_backend(...), dtype)``, the inputs as they are.

    Inside ``torch.autocast(device.type, autocast_dtype)``, for float32/float16/bfloat16 inputs (float64 is
    left alone, as autocast does), a call is a matmul-like op: it takes its inputs in ``autocast_dtype``.

    * ``auto``: the backend :func:`resolve_backend` picks for ``autocast_dtype``. When that is a fallback to
      ``reference`` while a fused backend of the device runs the inputs' own dtype (cpu slot attention has no
      float16 kernel; a GPU of compute capability < 8.0 has no bfloat16 Triton path), the fused backend runs
      in the inputs' own dtype instead; both with a :class:`BackendFallbackWarning`.
    * a named backend: ``autocast_dtype`` when it has a kernel for it on the device, else the inputs' own
      dtype (as an op on autocast's float32 list); it raises only if it cannot run that either.
    * ``reference`` (named or by fallback) gets ``autocast_dtype``: the callers round the inputs to it and
      compute in float32 with autocast disabled, as the fused kernels accumulate, so that it stays their
      oracle and an eps of 1e-8 does not vanish.
    """
    if autocast_dtype is None or dtype == torch.float64 or dtype == autocast_dtype:
        return resolve_backend(backend, device, dtype, num_queries, op), dtype
    if backend != "auto":
        try:
            return resolve_backend(backend, device, autocast_dtype, num_queries, op), autocast_dtype
        except TypeError:  # no kernel for the autocast dtype: the inputs' own dtype
            return resolve_backend(backend, device, dtype, num_queries, op), dtype
    chosen, cause = _auto_backend(device, autocast_dtype, num_queries, op)
    if chosen == "reference" and cause is not None:
        own, own_cause = _auto_backend(device, dtype, num_queries, op)
        if own_cause is None and own != "reference":
            _warn_fallback(f"{cause}; under {_fmt(autocast_dtype)} autocast, auto runs {_family(op)} on "
                           f"{device.type} tensors on backend '{own}' in {_fmt(dtype)}")
            _check_call(own, device, dtype, num_queries, op)
            return own, dtype
    if cause is not None:
        _warn_fallback(_fallback_message(cause, chosen, device, autocast_dtype, op))
    _check_call(chosen, device, autocast_dtype, num_queries, op)
    return chosen, autocast_dtype


def _family(op: str) -> str:
    return "slot attention" if op == "slot_attention" else "contrastive losses"


def _fallback_message(cause: str, backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    target = "the tiled ATen kernels (backend 'cuda')" if (op, backend) == ("contrastive", "cuda") \
        else f"backend '{backend}'"
    return f"{cause}; auto uses {target} for {_family(op)} on {device.type} {_fmt(dtype)} tensors"


def _auto_backend(device: torch.device, dtype: torch.dtype, num_queries: int, op: str) -> tuple[str, str | None]:
    """``(backend, cause)``: the backend ``auto`` takes and, when it is not the fused one ``auto`` takes on
    that device, why (None when it is, and on devices that have no fused backend at all)."""
    if device.type == "cpu":
        if op == "contrastive" or (_extension.is_loaded() and dtype in _DTYPES["cpu"]):
            return "cpu", None
        if not _extension.is_loaded():
            return "reference", (f"eclip_kernels._C is not loaded ({_extension.LOAD_ERROR}; reinstall with "
                                 "`pip install --no-build-isolation -e .`)")
        return "reference", f"the cpu slot-attention kernels have no {_fmt(dtype)} kernel"
    if device.type != "cuda":
        return "reference", None

    if op == "slot_attention" and CUDA_SLOT_ATTENTION_VERIFIED and _cuda_slot_attention_registered() and \
            dtype in _DTYPES["cuda"] and num_queries <= MAX_QUERIES["cuda"]:
        return "cuda", None
    cause = _triton_unfit(device, dtype)
    if cause is None and op == "slot_attention" and num_queries > MAX_QUERIES["triton"]:
        cause = f"the triton kernels take at most {MAX_QUERIES['triton']} queries, got T={num_queries}"
    if cause is None:
        return "triton", None
    return ("reference" if op == "slot_attention" else "cuda"), cause


def _triton_unfit(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take ``dtype`` inputs on this CUDA device, or None."""
    error = _triton_import_error()
    if error is not None:
        return error
    capability = _device_capability(device)
    if capability < TRITON_MIN_CAPABILITY:
        return (f"the Triton kernels need compute capability >= {_cap(TRITON_MIN_CAPABILITY)}, "
                f"{device} has {_cap(capability)}")
    if dtype not in _DTYPES["triton"]:
        return f"the triton kernels have no {_fmt(dtype)} kernel"
    if dtype == torch.bfloat16 and capability < BF16_MIN_CAPABILITY:
        return (f"bfloat16 needs compute capability >= {_cap(BF16_MIN_CAPABILITY)}, "
                f"{device} has {_cap(capability)}")
    return None


def _check_call(backend: str, device: torch.device, dtype: torch.dtype, num_queries: int, op: str) -> None:
    dtypes = _OP_DTYPES[op]
    if dtype not in dtypes[backend]:
        supported = ", ".join(_fmt(d) for d in dtypes[backend])
        raise TypeError(f"backend {backend!r} does not support {_fmt(dtype)} inputs (supported: {supported})")
    if backend == "triton" and device.type == "cuda" and dtype == torch.bfloat16:
        capability = _device_capability(device)
        if capability < BF16_MIN_CAPABILITY:
            raise TypeError(
                f"backend 'triton' does not support bfloat16 inputs on {device} (compute capability "
                f"{_cap(capability)}; bfloat16 needs >= {_cap(BF16_MIN_CAPABILITY)}): use float16 or float32"
            )
    limit = MAX_QUERIES.get(backend) if op == "slot_attention" else None
    if limit is not None and num_queries > limit:
        raise ValueError(
            f"backend {backend!r} supports at most {limit} queries (T), got T={num_queries}; "
            "use backend='reference' for more"
        )


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
        if backend not in _IN_EXTENSION[op]:
            return  # contrastive losses: tiled ATen kernels, no extension needed
        if not _extension.cuda_sources_built():
            raise RuntimeError(
                "backend 'cuda' is not available: eclip_kernels._C was built without CUDA sources "
                f"({_extension.LOAD_ERROR or 'rebuild with FORCE_CUDA=1'})"
            )
        if not _cuda_slot_attention_registered():
            raise RuntimeError(
                "backend 'cuda' has no slot-attention kernel in this build of eclip_kernels._C; use "
                "backend='triton' or 'auto'"
            )
        return
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            raise RuntimeError(f"backend 'triton' is not available: {error}")
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise ValueError(
                "backend 'triton' runs on CUDA tensors; CPU tensors only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'triton' does not run on {device.type} tensors")
        if device.type == "cuda":
            capability = _device_capability(device)
            if capability < TRITON_MIN_CAPABILITY:
                raise RuntimeError(
                    f"backend 'triton' needs a GPU of compute capability >= {_cap(TRITON_MIN_CAPABILITY)}; "
                    f"{device} has {_cap(capability)}"
                )
        return
    raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")

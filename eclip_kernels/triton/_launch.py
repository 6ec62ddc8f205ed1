"""Launch plumbing shared by the Triton launchers: device geometry, device guard, dot precision, wrapping.

Geometry. A launcher sizes its grid from two facts about the device: whether to use the GPU block sizes
(tiles sized for registers and tensor cores) and how many programs keep the device busy (about two per
multiprocessor). On a CUDA device both are read from the device. Elsewhere (the Triton interpreter on CPU
tensors, meta tensors) the launchers use small tiles and a handful of programs. Two ways to override:

* ``override_geometry(...)``, a context manager: the ahead-of-time check (``eclip_kernels.triton.aot``)
  uses it to capture, on meta tensors and without a GPU, exactly the launches an A100 or H100 would get.
* the environment variable ``ECLIP_KERNELS_TRITON_GEOMETRY=TILES:PROGRAMS`` (``TILES`` is ``gpu`` or
  ``small``), read at every launch: a test hook. ``gpu:2`` runs the GPU block sizes with a target of two
  programs, so that at small shapes every program walks several tiles (the multi-tile paths: dq slabs,
  column partials, split reductions) even under the interpreter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

try:  # torch >= 2.6: kernels launched through wrap_triton are visible to torch.compile inside triton_op
    from torch.library import wrap_triton as _torch_wrap_triton
except ImportError:  # pragma: no cover - older torch: plain launches
    _torch_wrap_triton = None


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` for a compiled Triton kernel (so that tracing inside a
    ``triton_op`` records the launch); the kernel itself under the Triton interpreter (TRITON_INTERPRET=1
    turns kernels into interpreted functions, which only run eagerly) or on a torch without it."""
    from triton.runtime.jit import JITFunction

    if _torch_wrap_triton is None or not isinstance(kernel, JITFunction):
        return kernel
    return _torch_wrap_triton(kernel)


__all__ = ["MAXNREG", "Geometry", "device_guard", "dot_precision", "geometry", "override_geometry", "wrap_triton"]

GEOMETRY_ENV = "ECLIP_KERNELS_TRITON_GEOMETRY"

# Register ceiling of the slot-attention kernels (the PTX .maxnreg). Left unset, ptxas sometimes caps them at
# 128 registers on its own and spills (seen at 4 and 8 warps with triton 3.6 and 3.8); 255 lets it use what
# the kernel needs. Not set for the contrastive kernels, where it made ptxas spill instead; set for the sigmoid
# loss's forward, which ptxas otherwise capped at 128 registers with exact float32 products (16 bytes of
# spills at sm_80 and sm_90). The ahead-of-time check verifies the outcome at every headline launch.
MAXNREG = 255


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a launcher needs to know about the device it launches on.

    Attributes:
        gpu_tiles: use the GPU block sizes (False: small tiles for the interpreter).
        programs: how many programs fill the device (about 2 per multiprocessor on a GPU).
    """

    gpu_tiles: bool
    programs: int


_OVERRIDE: list[Geometry] = []
_SM_COUNT: dict[int, int] = {}


@contextlib.contextmanager
def override_geometry(gpu_tiles: bool, programs: int):
    """Launches inside the block use this geometry whatever the tensors' device (for the AOT check)."""
    _OVERRIDE.append(Geometry(bool(gpu_tiles), int(programs)))
    try:
        yield
    finally:
        _OVERRIDE.pop()


def _from_env(value: str) -> Geometry:
    tiles, _, programs = value.partition(":")
    if tiles not in ("gpu", "small") or not programs.isdigit() or int(programs) < 1:
        raise ValueError(
            f"{GEOMETRY_ENV} must look like 'gpu:2' or 'small:4' (TILES:PROGRAMS, TILES gpu or small), got {value!r}"
        )
    return Geometry(tiles == "gpu", int(programs))


def geometry(device: torch.device) -> Geometry:
    """The geometry launches on ``device`` use (see the module docstring for the overrides)."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    env = os.environ.get(GEOMETRY_ENV)
    if env:
        return _from_env(env)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return Geometry(True, 2 * _SM_COUNT[idx])
    return Geometry(False, 8)


def device_guard(device: torch.device):
    """Makes ``device`` current for a launch: Triton launches on the current device and stream, so tensors on
    cuda:1 while cuda:0 is current would otherwise be read through the wrong context."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx]


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of the float32 products: exact ("ieee") when torch's float32 matmul precision is
    "highest" (its default), TF32 tensor cores otherwise ("high", "medium"), as torch's own matmuls do, on
    GPUs that have TF32 (compute capability >= 8.0). Other dtypes ignore it (bf16 / fp16 always use tensor
    cores)."""
    if dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    capability = _capability(device)
    return "ieee" if capability is not None and capability < (8, 0) else "tf32"

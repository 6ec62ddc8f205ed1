"""Shapes (SPEC section 7) and the measured steps shared by the pytest-benchmark suite and the table script."""

from __future__ import annotations

import dataclasses
import platform

import torch

import eclip_kernels as ek


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    queries: int
    dim: int
    dtype: torch.dtype
    device: str

    def describe(self) -> str:
        return f"B={self.batch} N={self.tokens} T={self.queries} D={self.dim} {str(self.dtype).replace('torch.', '')}"


SHAPES = {
    "eclip-b": Shape("eclip-b", 200, 196, 20, 512, torch.bfloat16, "cuda"),
    "eclip-b-large-batch": Shape("eclip-b-large-batch", 1024, 196, 20, 512, torch.bfloat16, "cuda"),
    "object-centric": Shape("object-centric", 64, 4096, 11, 256, torch.bfloat16, "cuda"),
    "cpu-small": Shape("cpu-small", 64, 196, 20, 256, torch.float32, "cpu"),
}

MODES = ("forward", "backward", "forward+backward")


def shapes_for_this_machine() -> list[Shape]:
    """The SPEC shapes whose device is present here."""
    return [s for s in SHAPES.values() if s.device == "cpu" or torch.cuda.is_available()]


def variants_for(shape: Shape) -> list[str]:
    """Implementations to compare at a shape: the eager reference, torch.compile of it, and every usable
    fused backend for the shape's device and dtype."""
    names = ["reference", "reference+compile"]
    for backend, status in ek.available_backends().items():
        if backend != "reference" and status.usable and shape.device in status.devices and shape.dtype in status.dtypes:
            if shape.device == "cpu" and backend == "triton":
                continue  # the Triton interpreter is not a benchmark
            names.append(backend)
    return names


def make_inputs(shape: Shape, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.batch, shape.queries, shape.dim, generator=gen)
    k = torch.randn(shape.batch, shape.tokens, shape.dim, generator=gen)
    v = torch.randn(shape.batch, shape.tokens, shape.dim, generator=gen)
    q, k, v = (t.to(shape.device, shape.dtype).requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(shape.batch, shape.queries, shape.dim, generator=gen).to(shape.device, shape.dtype)
    stat = torch.float32
    grad_ent = torch.randn(shape.batch, shape.queries, generator=gen).to(shape.device, stat)
    return q, k, v, grad_out, grad_ent


class Case:
    """One implementation at one shape: ``forward()`` returns (out, ent); ``backward(out, ent)`` runs autograd
    with fixed random upstream gradients of both outputs."""

    def __init__(self, variant: str, shape: Shape, seed: int = 0):
        self.variant, self.shape = variant, shape
        self.q, self.k, self.v, self.grad_out, self.grad_ent = make_inputs(shape, seed)
        backend = "reference" if variant.startswith("reference") else variant

        def attention(q, k, v):
            return ek.slot_attention(q, k, v, eps=1e-8, return_entropy=True, backend=backend)

        self._attention = torch.compile(attention, fullgraph=True) if variant.endswith("+compile") else attention

    def forward(self):
        return self._attention(self.q, self.k, self.v)

    def forward_no_grad(self):
        with torch.no_grad():
            return self._attention(self.q, self.k, self.v)

    def backward(self, out, ent):
        torch.autograd.backward((out, ent), (self.grad_out, self.grad_ent.to(ent.dtype)))
        for t in (self.q, self.k, self.v):
            t.grad = None

    def forward_backward(self):
        self.backward(*self.forward())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def environment() -> dict:
    """Device name and versions, recorded next to every number."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "eclip_kernels": ek.__version__,
        "backends": {name: {"usable": s.usable, "reason": s.reason} for name, s in ek.available_backends().items()},
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info

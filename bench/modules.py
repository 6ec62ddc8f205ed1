"""Module cases shared by the module benchmarks: eclip_kernels.nn.SlotAttention against the PyPI
slot-attention module (same weights, same initial slots)."""

from __future__ import annotations

import dataclasses

import torch

from eclip_kernels.nn import SlotAttention


@dataclasses.dataclass(frozen=True)
class ModuleShape:
    name: str
    batch: int
    tokens: int
    slots: int
    dim: int
    iters: int
    device: str

    def describe(self) -> str:
        return f"B={self.batch} N={self.tokens} slots={self.slots} dim={self.dim} iters={self.iters}"


MODULE_SHAPES = {
    "object-centric-cpu": ModuleShape("object-centric-cpu", 32, 1024, 7, 64, 3, "cpu"),
    "object-centric-gpu": ModuleShape("object-centric-gpu", 64, 4096, 11, 256, 3, "cuda"),
}


def pypi_slot_attention():
    """The PyPI module class, or None when slot-attention is not installed."""
    try:
        from slot_attention import SlotAttention as PyPISlotAttention
    except ImportError:
        return None
    return PyPISlotAttention


def make_modules(shape: ModuleShape, seed: int = 0) -> dict:
    """{"eclip_kernels": ours, "slot-attention (PyPI)": theirs} with identical weights."""
    torch.manual_seed(seed)
    ours = SlotAttention(shape.slots, shape.dim, iters=shape.iters).to(shape.device)
    modules = {"eclip_kernels": ours}
    cls = pypi_slot_attention()
    if cls is not None:
        theirs = cls(shape.slots, shape.dim, iters=shape.iters).to(shape.device)
        theirs.load_state_dict(ours.state_dict())
        modules["slot-attention (PyPI)"] = theirs
    return modules


def make_inputs(shape: ModuleShape, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape.batch, shape.tokens, shape.dim, generator=gen).to(shape.device)
    grad = torch.randn(shape.batch, shape.slots, shape.dim, generator=gen).to(shape.device)
    return inputs.requires_grad_(), grad


def forward_backward(module, inputs, grad, seed: int = 0):
    torch.manual_seed(seed)  # the same initial-slot draw for every module
    module(inputs).backward(grad)
    inputs.grad = None
    module.zero_grad(set_to_none=True)


def saved_bytes(module, inputs, seed: int = 0) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward (parameters included)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(inputs)
    del out
    return sum(storages.values())

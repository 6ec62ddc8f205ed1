"""Module cases shared by the module benchmarks: eclip_kernels.nn.SlotAttention and MultiHeadSlotAttention
against the PyPI slot-attention modules (same weights, same initial slots)."""

from __future__ import annotations

import dataclasses

import torch

from eclip_kernels.nn import MultiHeadSlotAttention, SlotAttention


@dataclasses.dataclass(frozen=True)
class ModuleShape:
    name: str
    batch: int
    tokens: int
    slots: int
    dim: int
    iters: int
    device: str
    heads: int | None = None  # None: SlotAttention; else MultiHeadSlotAttention with this many heads
    dim_head: int | None = None

    def describe(self) -> str:
        heads = "" if self.heads is None else f" heads={self.heads} dim_head={self.dim_head}"
        return f"B={self.batch} N={self.tokens} slots={self.slots} dim={self.dim}{heads} iters={self.iters}"


MODULE_SHAPES = {
    "object-centric-cpu": ModuleShape("object-centric-cpu", 32, 1024, 7, 64, 3, "cpu"),
    "object-centric-gpu": ModuleShape("object-centric-gpu", 64, 4096, 11, 256, 3, "cuda"),
    # the same shapes with 4 heads of dim / 4 features (q, k, v as wide as in the single-head rows)
    "object-centric-cpu-4heads": ModuleShape("object-centric-cpu-4heads", 32, 1024, 7, 64, 3, "cpu", 4, 16),
    "object-centric-gpu-4heads": ModuleShape("object-centric-gpu-4heads", 64, 4096, 11, 256, 3, "cuda", 4, 64),
}


def pypi_slot_attention(multi_head: bool = False):
    """The PyPI module class (SlotAttention, or MultiHeadSlotAttention), or None when slot-attention is not
    installed."""
    try:
        import slot_attention
    except ImportError:
        return None
    return slot_attention.MultiHeadSlotAttention if multi_head else slot_attention.SlotAttention


def make_modules(shape: ModuleShape, seed: int = 0) -> dict:
    """{"eclip_kernels": ours, "slot-attention (PyPI)": theirs} with identical weights."""
    kwargs = {"iters": shape.iters}
    if shape.heads is not None:
        kwargs.update(heads=shape.heads, dim_head=shape.dim_head)
    torch.manual_seed(seed)
    ours_cls = SlotAttention if shape.heads is None else MultiHeadSlotAttention
    ours = ours_cls(shape.slots, shape.dim, **kwargs).to(shape.device)
    modules = {"eclip_kernels": ours}
    cls = pypi_slot_attention(multi_head=shape.heads is not None)
    if cls is not None:
        theirs = cls(shape.slots, shape.dim, **kwargs).to(shape.device)
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

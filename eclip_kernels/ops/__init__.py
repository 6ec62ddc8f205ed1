"""Registered PyTorch operators (torch.library): fake kernels and autograd of every fused op."""

from . import contrastive, siglip, slot_attention  # noqa: F401

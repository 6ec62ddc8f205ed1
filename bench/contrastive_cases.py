"""The clip_loss variants shared by the contrastive benchmarks."""

from __future__ import annotations

import torch
from torch.nn import functional as F

import eclip_kernels as ek


def make_features(batch: int, dim: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """L2-normalized (batch, dim) image and text features (leaves requiring grad) and a logit scale."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device, dtype).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device, dtype).requires_grad_()
    return image, text, torch.tensor(14.3, device=device, requires_grad=True)


def make_loss_fn(variant: str, image, text, scale):
    """A no-argument callable returning the loss: "open_clip" (ClipLoss) or an eclip_kernels backend."""
    if variant == "open_clip":
        from open_clip.loss import ClipLoss

        loss_module = ClipLoss()
        return lambda: loss_module(image, text, scale)
    return lambda: ek.clip_loss(image, text, scale, backend=variant)

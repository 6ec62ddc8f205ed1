"""The clip_loss and siglip_loss variants shared by the contrastive benchmarks."""

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


def inf_cl_head_dim(dim: int) -> int:
    """Inf-CL splits D into heads of 16, 32, 64, 128 or 256 features (the sum over heads is the dot product)."""
    for head in (256, 128, 64, 32, 16):
        if dim % head == 0:
            return head
    raise ValueError(f"Inf-CL needs D to be a multiple of 16, got {dim}")


def make_loss_fn(variant: str, image, text, scale):
    """A no-argument callable returning the loss: "open_clip" (ClipLoss), "inf_cl" (Inf-CL) or an
    eclip_kernels backend."""
    if variant == "open_clip":
        from open_clip.loss import ClipLoss

        loss_module = ClipLoss()
        return lambda: loss_module(image, text, scale)
    if variant == "inf_cl":
        # cal_inf_loss without torch.distributed is cal_flash_loss on scale * q, but its scale passes through
        # an all_reduce in backward that needs a process group: call the single-process form directly.
        # It returns the per-row losses of one direction (image -> text columns); the symmetric loss averages
        # both directions, as ClipLoss does.
        from inf_cl import cal_flash_loss

        head = inf_cl_head_dim(image.shape[1])
        return lambda: (cal_flash_loss(image, text, scale=scale, head_dim=head).mean()
                        + cal_flash_loss(text, image, scale=scale, head_dim=head).mean()) / 2
    return lambda: ek.clip_loss(image, text, scale, backend=variant)


def make_siglip_features(batch: int, dim: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """L2-normalized (batch, dim) image and text features (leaves requiring grad), and open_clip's SigLIP
    initialization of the logit scale and bias (exp(log 10) = 10 and -10) as leaves."""
    image, text, _ = make_features(batch, dim, dtype, device, seed)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return image, text, scale, bias


def make_siglip_loss_fn(variant: str, image, text, scale, bias):
    """A no-argument callable returning the sigmoid loss: "open_clip" (SigLipLoss, one process) or an
    eclip_kernels backend."""
    if variant == "open_clip":
        from open_clip.loss import SigLipLoss

        loss_module = SigLipLoss()
        return lambda: loss_module(image, text, scale, bias)
    return lambda: ek.siglip_loss(image, text, scale, bias, backend=variant)

"""Registered sigmoid (SigLIP) loss operators: fake kernels and autograd (math in docs/contrastive.md).

One operator pair per backend, same schemas:

* ``siglip_loss_fwd(image (M, D), text (N, D), logit_scale, logit_bias, image_ids?, text_ids?, offset)``
  returns the loss SUM over the M x N pairs (0-d, float32; float64 for float64 features). Positives: pairs of
  equal ids when both id tensors are given, else text ``i + offset`` for image ``i``.
* ``siglip_loss_bwd(grad_loss_sum, ..., output_mask)`` returns the gradients of image, text, logit_scale and
  logit_bias; only those ``output_mask`` (``ctx.needs_input_grad``) asks for are computed, an empty tensor
  stands in for the others.

Backend ``cpu``: ``eclip_kernels::siglip_loss_fwd`` with the tiled ATen kernels of ``eclip_kernels/aten``
(also the ``cuda`` backend); backend ``triton``: ``eclip_kernels::siglip_loss_fwd_triton`` with
``eclip_kernels/triton/siglip.py``. Autograd saves the inputs only: the sigmoid loss has no per-row
normalizer, and the backward recomputes the logit tiles. Nothing of size M x N is saved.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Optional

import torch

from ._define import define_op

SIGLIP_FWD = (
    "(Tensor image, Tensor text, Tensor logit_scale, Tensor logit_bias, Tensor? image_ids, Tensor? text_ids, "
    "int offset) -> Tensor"
)
SIGLIP_BWD = (
    "(Tensor grad_loss_sum, Tensor image, Tensor text, Tensor logit_scale, Tensor logit_bias, Tensor? image_ids, "
    "Tensor? text_ids, int offset, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)

_KERNEL_MODULES = {"cpu": "eclip_kernels.aten.siglip", "triton": "eclip_kernels.triton.siglip"}


def _kernel(backend: str, name: str) -> Callable:
    # imported at call time: the Triton module needs triton, which the package does not require
    return getattr(importlib.import_module(_KERNEL_MODULES[backend]), name)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(image, text, logit_scale, logit_bias, image_ids, text_ids, offset):
    return image.new_empty((), dtype=_acc(image.dtype))


def _grad_like(t: torch.Tensor, shape, needed: bool) -> torch.Tensor:
    return t.new_empty(shape if needed else (0,))


def _bwd_fake(grad_loss_sum, image, text, logit_scale, logit_bias, image_ids, text_ids, offset, output_mask):
    return (_grad_like(image, image.shape, output_mask[0]), _grad_like(text, text.shape, output_mask[1]),
            _grad_like(logit_scale, (), output_mask[2]), _grad_like(logit_bias, (), output_mask[3]))


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, image_ids, text_ids, offset = inputs
    ctx.save_for_backward(image, text, logit_scale, logit_bias, image_ids, text_ids)
    ctx.offset = offset


def _implementations(backend: str) -> dict[str, Callable]:
    """The kernel entry points of a backend as annotated functions (triton_op infers its schema from the
    annotations on some torch releases)."""
    def call(name, *args):
        if backend == "triton":
            return _kernel(backend, name)(*args)
        # the tiled ATen kernels accumulate in float32 with torch matmuls: autocast (still on when backward
        # runs inside an autocast region) would round them to bf16 / fp16
        with torch.autocast(args[1].device.type, enabled=False):
            return _kernel(backend, name)(*args)

    def fwd(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
            image_ids: Optional[torch.Tensor], text_ids: Optional[torch.Tensor], offset: int) -> torch.Tensor:
        return call("siglip_loss_fwd", image, text, logit_scale, logit_bias, image_ids, text_ids, offset)

    def bwd(grad_loss_sum: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
            logit_bias: torch.Tensor, image_ids: Optional[torch.Tensor], text_ids: Optional[torch.Tensor],
            offset: int, output_mask: list[bool]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return call("siglip_loss_bwd", grad_loss_sum, image, text, logit_scale, logit_bias, image_ids, text_ids,
                    offset, output_mask)

    return {"siglip_fwd": fwd, "siglip_bwd": bwd}


def _register(suffix: str, backend: str) -> dict[str, Callable]:
    ns = "eclip_kernels::"
    triton = backend == "triton"
    fns = _implementations(backend)
    fwd = define_op(ns + "siglip_loss_fwd" + suffix, fns["siglip_fwd"], SIGLIP_FWD, _fwd_fake, triton)
    bwd = define_op(ns + "siglip_loss_bwd" + suffix, fns["siglip_bwd"], SIGLIP_BWD, _bwd_fake, triton)

    def backward(ctx, grad_loss_sum):
        image, text, logit_scale, logit_bias, image_ids, text_ids = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:4])
        grads = bwd(grad_loss_sum, image, text, logit_scale, logit_bias, image_ids, text_ids, ctx.offset, mask)
        return (*(g if need else None for g, need in zip(grads, mask)), None, None, None)

    fwd.register_autograd(backward, setup_context=_setup_context)
    return {"siglip_fwd": fwd, "siglip_bwd": bwd}


OPS = {"cpu": _register("", "cpu"), "triton": _register("_triton", "triton")}
# The tiled ATen kernels run on any device: on CUDA tensors they are the `cuda` backend of the loss.
OPS["cuda"] = OPS["cpu"]

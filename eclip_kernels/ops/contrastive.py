"""Registered contrastive-loss operators: fake kernels and autograd (math in docs/contrastive.md).

Two operator pairs per backend, same schemas:

* ``clip_loss_fwd`` / ``clip_loss_bwd``: the symmetric loss of one process, both directions from one pass
  over the (B, B) tiles. Forward returns ``(loss, row_lse, col_lse)``.
* ``contrastive_rows_fwd`` / ``contrastive_rows_bwd``: one-directional InfoNCE rows (``info_nce``, and each
  direction of the distributed CLIP loss). Forward returns ``(loss_sum, lse)``.

Backend ``cpu``: ``eclip_kernels::<name>`` with the tiled ATen kernels of ``eclip_kernels/aten``;
backend ``triton``: ``eclip_kernels::<name>_triton`` with ``eclip_kernels/triton/contrastive.py``.
Autograd saves the inputs and the (B,) log-sum-exps only: nothing of size B x B. The backward operators take
``output_mask`` (``ctx.needs_input_grad``) and compute only the gradients asked for; an empty tensor stands in
for the others. The Triton operators are ``torch.library.triton_op`` where torch has it (torch.compile sees
their kernels), plain custom ops otherwise.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Optional

import torch

from ._define import define_op

CLIP_FWD = "(Tensor image, Tensor text, Tensor logit_scale, Tensor? ids) -> (Tensor, Tensor, Tensor)"
CLIP_BWD = (
    "(Tensor grad_loss, Tensor image, Tensor text, Tensor logit_scale, Tensor? ids, Tensor row_lse, "
    "Tensor col_lse, bool[] output_mask) -> (Tensor, Tensor, Tensor)"
)
ROWS_FWD = (
    "(Tensor query, Tensor positive, Tensor keys, Tensor logit_scale, Tensor? query_ids, Tensor? key_ids) "
    "-> (Tensor, Tensor)"
)
ROWS_BWD = (
    "(Tensor grad_loss_sum, Tensor query, Tensor positive, Tensor keys, Tensor logit_scale, Tensor? query_ids, "
    "Tensor? key_ids, Tensor lse, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)

_KERNEL_MODULES = {"cpu": "eclip_kernels.aten.contrastive", "triton": "eclip_kernels.triton.contrastive"}


def _kernel(backend: str, name: str) -> Callable:
    # imported at call time: the Triton module needs triton, which the package does not require
    return getattr(importlib.import_module(_KERNEL_MODULES[backend]), name)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _clip_fwd_fake(image, text, logit_scale, ids):
    vec = image.new_empty(image.shape[:1], dtype=_acc(image.dtype))
    return image.new_empty((), dtype=_acc(image.dtype)), vec, vec.clone()


def _grad_like(t: torch.Tensor, shape, needed: bool) -> torch.Tensor:
    return t.new_empty(shape if needed else (0,))


def _clip_bwd_fake(grad_loss, image, text, logit_scale, ids, row_lse, col_lse, output_mask):
    return (_grad_like(image, image.shape, output_mask[0]), _grad_like(text, text.shape, output_mask[1]),
            _grad_like(logit_scale, (), output_mask[2]))


def _rows_fwd_fake(query, positive, keys, logit_scale, query_ids, key_ids):
    acc = _acc(query.dtype)
    return query.new_empty((), dtype=acc), query.new_empty(query.shape[:1], dtype=acc)


def _rows_bwd_fake(grad_loss_sum, query, positive, keys, logit_scale, query_ids, key_ids, lse, output_mask):
    return (_grad_like(query, query.shape, output_mask[0]), _grad_like(positive, positive.shape, output_mask[1]),
            _grad_like(keys, keys.shape, output_mask[2]), _grad_like(logit_scale, (), output_mask[3]))


def _clip_setup_context(ctx, inputs, output):
    image, text, logit_scale, ids = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(image, text, logit_scale, ids, row_lse, col_lse)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _rows_setup_context(ctx, inputs, output):
    query, positive, keys, logit_scale, query_ids, key_ids = inputs
    ctx.save_for_backward(query, positive, keys, logit_scale, query_ids, key_ids, output[1])
    ctx.mark_non_differentiable(output[1])


def _implementations(backend: str) -> dict[str, Callable]:
    """The four kernel entry points of a backend as annotated functions (triton_op infers its schema from
    the annotations on some torch releases, which ignore ``schema=``)."""
    def call(name, *args):
        if backend == "triton":
            return _kernel(backend, name)(*args)
        # The tiled ATen kernels accumulate in float32 with torch matmuls: autocast (still on when backward
        # runs inside an autocast region) would round them to bf16 / fp16.
        with torch.autocast(args[1].device.type, enabled=False):
            return _kernel(backend, name)(*args)

    def clip_fwd(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return call("clip_loss_fwd", image, text, logit_scale, ids)

    def clip_bwd(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 ids: Optional[torch.Tensor], row_lse: torch.Tensor, col_lse: torch.Tensor,
                 output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return call("clip_loss_bwd", grad_loss, image, text, logit_scale, ids, row_lse, col_lse, output_mask)

    def rows_fwd(query: torch.Tensor, positive: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                 query_ids: Optional[torch.Tensor], key_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return call("contrastive_rows_fwd", query, positive, keys, logit_scale, query_ids, key_ids)

    def rows_bwd(grad_loss_sum: torch.Tensor, query: torch.Tensor, positive: torch.Tensor, keys: torch.Tensor,
                 logit_scale: torch.Tensor, query_ids: Optional[torch.Tensor], key_ids: Optional[torch.Tensor],
                 lse: torch.Tensor, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return call("contrastive_rows_bwd", grad_loss_sum, query, positive, keys, logit_scale, query_ids, key_ids,
                    lse, output_mask)

    return {"clip_fwd": clip_fwd, "clip_bwd": clip_bwd, "rows_fwd": rows_fwd, "rows_bwd": rows_bwd}


def _register(suffix: str, backend: str) -> dict[str, Callable]:
    ns = "eclip_kernels::"
    triton = backend == "triton"
    fns = _implementations(backend)
    clip_fwd = define_op(ns + "clip_loss_fwd" + suffix, fns["clip_fwd"], CLIP_FWD, _clip_fwd_fake, triton)
    clip_bwd = define_op(ns + "clip_loss_bwd" + suffix, fns["clip_bwd"], CLIP_BWD, _clip_bwd_fake, triton)
    rows_fwd = define_op(ns + "contrastive_rows_fwd" + suffix, fns["rows_fwd"], ROWS_FWD, _rows_fwd_fake, triton)
    rows_bwd = define_op(ns + "contrastive_rows_bwd" + suffix, fns["rows_bwd"], ROWS_BWD, _rows_bwd_fake, triton)

    def clip_backward(ctx, grad_loss, _grad_row_lse, _grad_col_lse):
        image, text, logit_scale, ids, row_lse, col_lse = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grads = clip_bwd(grad_loss, image, text, logit_scale, ids, row_lse, col_lse, mask)
        return (*(g if need else None for g, need in zip(grads, mask)), None)

    def rows_backward(ctx, grad_loss_sum, _grad_lse):
        query, positive, keys, logit_scale, query_ids, key_ids, lse = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:4])
        grads = rows_bwd(grad_loss_sum, query, positive, keys, logit_scale, query_ids, key_ids, lse, mask)
        return (*(g if need else None for g, need in zip(grads, mask)), None, None)

    clip_fwd.register_autograd(clip_backward, setup_context=_clip_setup_context)
    rows_fwd.register_autograd(rows_backward, setup_context=_rows_setup_context)
    return {"clip_fwd": clip_fwd, "clip_bwd": clip_bwd, "rows_fwd": rows_fwd, "rows_bwd": rows_bwd}


OPS = {"cpu": _register("", "cpu"), "triton": _register("_triton", "triton")}
# The tiled ATen kernels run on any device: on CUDA tensors they are the `cuda` backend of the losses.
OPS["cuda"] = OPS["cpu"]

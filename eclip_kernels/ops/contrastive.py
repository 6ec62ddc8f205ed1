"""Registered contrastive-loss operators: fake kernels and autograd (math in docs/contrastive.md).

Two operator pairs per backend, same schemas:

* ``clip_loss_fwd`` / ``clip_loss_bwd``: the symmetric loss of one process, both directions from one pass
  over the (B, B) tiles. Forward returns ``(loss, row_lse, col_lse)``.
* ``contrastive_rows_fwd`` / ``contrastive_rows_bwd``: one-directional InfoNCE rows (``info_nce``, and each
  direction of the distributed CLIP loss). Forward returns ``(loss_sum, lse)``.

Backend ``cpu``: ``eclip_kernels::<name>`` with the tiled ATen kernels of ``eclip_kernels/aten``;
backend ``triton``: ``eclip_kernels::<name>_triton`` with ``eclip_kernels/triton/contrastive.py``.
Autograd saves the inputs and the (B,) log-sum-exps only: nothing of size B x B.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

CLIP_FWD = "(Tensor image, Tensor text, Tensor logit_scale, Tensor? ids) -> (Tensor, Tensor, Tensor)"
CLIP_BWD = (
    "(Tensor grad_loss, Tensor image, Tensor text, Tensor logit_scale, Tensor? ids, Tensor row_lse, "
    "Tensor col_lse) -> (Tensor, Tensor, Tensor)"
)
ROWS_FWD = (
    "(Tensor query, Tensor positive, Tensor keys, Tensor logit_scale, Tensor? query_ids, Tensor? key_ids) "
    "-> (Tensor, Tensor)"
)
ROWS_BWD = (
    "(Tensor grad_loss_sum, Tensor query, Tensor positive, Tensor keys, Tensor logit_scale, Tensor? query_ids, "
    "Tensor? key_ids, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor)"
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


def _clip_bwd_fake(grad_loss, image, text, logit_scale, ids, row_lse, col_lse):
    return image.new_empty(image.shape), text.new_empty(text.shape), logit_scale.new_empty(())


def _rows_fwd_fake(query, positive, keys, logit_scale, query_ids, key_ids):
    acc = _acc(query.dtype)
    return query.new_empty((), dtype=acc), query.new_empty(query.shape[:1], dtype=acc)


def _rows_bwd_fake(grad_loss_sum, query, positive, keys, logit_scale, query_ids, key_ids, lse):
    return (query.new_empty(query.shape), positive.new_empty(positive.shape), keys.new_empty(keys.shape),
            logit_scale.new_empty(()))


def _clip_setup_context(ctx, inputs, output):
    image, text, logit_scale, ids = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(image, text, logit_scale, ids, row_lse, col_lse)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _rows_setup_context(ctx, inputs, output):
    query, positive, keys, logit_scale, query_ids, key_ids = inputs
    ctx.save_for_backward(query, positive, keys, logit_scale, query_ids, key_ids, output[1])
    ctx.mark_non_differentiable(output[1])


def _register(suffix: str, backend: str) -> dict[str, Callable]:
    ns = "eclip_kernels::"

    def impl(name):
        return lambda *args: _kernel(backend, name)(*args)

    clip_fwd = torch.library.custom_op(ns + "clip_loss_fwd" + suffix, impl("clip_loss_fwd"), mutates_args=(),
                                       schema=CLIP_FWD)
    clip_bwd = torch.library.custom_op(ns + "clip_loss_bwd" + suffix, impl("clip_loss_bwd"), mutates_args=(),
                                       schema=CLIP_BWD)
    rows_fwd = torch.library.custom_op(ns + "contrastive_rows_fwd" + suffix, impl("contrastive_rows_fwd"),
                                       mutates_args=(), schema=ROWS_FWD)
    rows_bwd = torch.library.custom_op(ns + "contrastive_rows_bwd" + suffix, impl("contrastive_rows_bwd"),
                                       mutates_args=(), schema=ROWS_BWD)
    clip_fwd.register_fake(_clip_fwd_fake)
    clip_bwd.register_fake(_clip_bwd_fake)
    rows_fwd.register_fake(_rows_fwd_fake)
    rows_bwd.register_fake(_rows_bwd_fake)

    def clip_backward(ctx, grad_loss, _grad_row_lse, _grad_col_lse):
        image, text, logit_scale, ids, row_lse, col_lse = ctx.saved_tensors
        grad_image, grad_text, grad_scale = clip_bwd(grad_loss, image, text, logit_scale, ids, row_lse, col_lse)
        return grad_image, grad_text, grad_scale, None

    def rows_backward(ctx, grad_loss_sum, _grad_lse):
        query, positive, keys, logit_scale, query_ids, key_ids, lse = ctx.saved_tensors
        grads = rows_bwd(grad_loss_sum, query, positive, keys, logit_scale, query_ids, key_ids, lse)
        return (*grads, None, None)

    clip_fwd.register_autograd(clip_backward, setup_context=_clip_setup_context)
    rows_fwd.register_autograd(rows_backward, setup_context=_rows_setup_context)
    return {"clip_fwd": clip_fwd, "clip_bwd": clip_bwd, "rows_fwd": rows_fwd, "rows_bwd": rows_bwd}


OPS = {"cpu": _register("", "cpu"), "triton": _register("_triton", "triton")}

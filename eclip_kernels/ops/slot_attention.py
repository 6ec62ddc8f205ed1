"""Registered slot-attention operators: fake kernels and autograd.

Two operator pairs share one schema and one autograd formula (SPEC section 2):

* ``eclip_kernels::slot_attention_fwd`` / ``slot_attention_bwd`` — schemas in ``csrc/ops.cpp``, kernels
  in C++ per dispatch key (CPU now; CUDA later). Present only when ``eclip_kernels._C`` is loaded.
* ``eclip_kernels::slot_attention_fwd_triton`` / ``slot_attention_bwd_triton`` — defined here, kernels in
  ``eclip_kernels/triton/slot_attention.py``.

Forward returns ``(out, ent, S, lse)``; only ``out`` and ``ent`` are differentiable. The backward operator
recomputes the softmax from q, k and lse, so autograd saves q, k, v, out, ent, S (B, T) and lse (B, N):
nothing of size B x N x T.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _extension

FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor grad_ent, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor ent, "
    "Tensor S, Tensor lse, float scale, float eps) -> (Tensor, Tensor, Tensor)"
)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(q, k, v, mask, scale, eps):
    batch, num_queries, _ = q.shape
    num_tokens = k.shape[1]
    stat = _stat_dtype(q.dtype)
    out = q.new_empty((batch, num_queries, v.shape[2]))
    ent = q.new_empty((batch, num_queries), dtype=stat)
    col_sum = q.new_empty((batch, num_queries), dtype=stat)
    lse = q.new_empty((batch, num_tokens), dtype=stat)
    return out, ent, col_sum, lse


def _bwd_fake(grad_out, grad_ent, q, k, v, mask, out, ent, col_sum, lse, scale, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, eps = inputs
    out, ent, col_sum, lse = output
    ctx.save_for_backward(q, k, v, mask, out, ent, col_sum, lse)
    ctx.scale = scale
    ctx.eps = eps
    ctx.mark_non_differentiable(col_sum, lse)


def _make_backward(bwd_op: Callable) -> Callable:
    def backward(ctx, grad_out, grad_ent, _grad_col_sum, _grad_lse):
        q, k, v, mask, out, ent, col_sum, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = bwd_op(
            grad_out, grad_ent, q, k, v, mask, out, ent, col_sum, lse, ctx.scale, ctx.eps
        )
        return grad_q, grad_k, grad_v, None, None, None

    return backward


# --- C++ operators (csrc/) ---------------------------------------------------------------------------

if _extension.is_loaded():
    torch.library.register_fake("eclip_kernels::slot_attention_fwd")(_fwd_fake)
    torch.library.register_fake("eclip_kernels::slot_attention_bwd")(_bwd_fake)
    torch.library.register_autograd(
        "eclip_kernels::slot_attention_fwd",
        _make_backward(torch.ops.eclip_kernels.slot_attention_bwd.default),
        setup_context=_setup_context,
    )


# --- Triton operators ---------------------------------------------------------------------------------


@torch.library.custom_op("eclip_kernels::slot_attention_fwd_triton", mutates_args=(), schema=FWD_SCHEMA)
def slot_attention_fwd_triton(q, k, v, mask, scale, eps):
    from ..triton.slot_attention import slot_attention_fwd

    return slot_attention_fwd(q, k, v, mask, scale, eps)


@torch.library.custom_op("eclip_kernels::slot_attention_bwd_triton", mutates_args=(), schema=BWD_SCHEMA)
def slot_attention_bwd_triton(grad_out, grad_ent, q, k, v, mask, out, ent, col_sum, lse, scale, eps):
    from ..triton.slot_attention import slot_attention_bwd

    return slot_attention_bwd(grad_out, grad_ent, q, k, v, mask, out, ent, col_sum, lse, scale, eps)


slot_attention_fwd_triton.register_fake(_fwd_fake)
slot_attention_bwd_triton.register_fake(_bwd_fake)
slot_attention_fwd_triton.register_autograd(
    _make_backward(slot_attention_bwd_triton), setup_context=_setup_context
)


def forward_op(backend: str) -> Callable:
    """The registered forward operator of a fused backend ("cpu", "cuda" or "triton")."""
    if backend == "triton":
        return slot_attention_fwd_triton
    return torch.ops.eclip_kernels.slot_attention_fwd.default


def backward_op(backend: str) -> Callable:
    """The registered backward operator of a fused backend (for tests and benchmarks)."""
    if backend == "triton":
        return slot_attention_bwd_triton
    return torch.ops.eclip_kernels.slot_attention_bwd.default

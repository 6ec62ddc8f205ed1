"""Registered slot-attention operators: fake kernels and autograd.

Two operator pairs share one schema and one autograd formula (SPEC section 2):

* ``eclip_kernels::slot_attention_fwd`` / ``slot_attention_bwd`` — schemas in ``csrc/ops.cpp``, kernels
  in C++ per dispatch key (CPU: csrc/cpu; CUDA: csrc/cuda, experimental until verified on a GPU). Present
  only when ``eclip_kernels._C`` is loaded (the CUDA kernel only in builds with the CUDA sources).
* ``eclip_kernels::slot_attention_fwd_triton`` / ``slot_attention_bwd_triton`` — defined here, kernels in
  ``eclip_kernels/triton/slot_attention.py``; ``torch.library.triton_op`` where torch has it (torch.compile
  traces into the launcher and sees the kernels). The Triton backward takes ``output_mask``
  (``ctx.needs_input_grad``) and computes only those gradients; the C++ backward computes all three (its
  per-sample pass shares the softmax recomputation among them).

Forward returns ``(out, ent, S, lse)``; only ``out`` and ``ent`` are differentiable. The backward operator
recomputes the softmax from q, k and lse, so autograd saves q, k, v, out, ent, S (B, T) and lse (B, N):
nothing of size B x N x T.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from .. import _extension
from ._define import define_op

FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor grad_ent, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor ent, "
    "Tensor S, Tensor lse, float scale, float eps) -> (Tensor, Tensor, Tensor)"
)
# The Triton backward also takes ctx.needs_input_grad and computes only those gradients (an empty tensor
# stands in for the others).
BWD_MASKED_SCHEMA = BWD_SCHEMA.replace("float eps)", "float eps, bool[] output_mask)")


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


def _bwd_fake(grad_out, grad_ent, q, k, v, mask, out, ent, col_sum, lse, scale, eps, output_mask=(True,) * 3):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((q, k, v), output_mask))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, eps = inputs
    out, ent, col_sum, lse = output
    ctx.save_for_backward(q, k, v, mask, out, ent, col_sum, lse)
    ctx.scale = scale
    ctx.eps = eps
    ctx.mark_non_differentiable(col_sum, lse)


def _make_backward(bwd_op: Callable, takes_mask: bool) -> Callable:
    def backward(ctx, grad_out, grad_ent, _grad_col_sum, _grad_lse):
        q, k, v, mask, out, ent, col_sum, lse = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        extra = (needs,) if takes_mask else ()
        grads = bwd_op(grad_out, grad_ent, q, k, v, mask, out, ent, col_sum, lse, ctx.scale, ctx.eps, *extra)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)

    return backward


# --- C++ operators (csrc/) ---------------------------------------------------------------------------

if _extension.is_loaded():
    torch.library.register_fake("eclip_kernels::slot_attention_fwd")(_fwd_fake)
    torch.library.register_fake("eclip_kernels::slot_attention_bwd")(_bwd_fake)
    torch.library.register_autograd(
        "eclip_kernels::slot_attention_fwd",
        _make_backward(torch.ops.eclip_kernels.slot_attention_bwd.default, takes_mask=False),
        setup_context=_setup_context,
    )


# --- Triton operators ---------------------------------------------------------------------------------


def _fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton.slot_attention import slot_attention_fwd

    return slot_attention_fwd(q, k, v, mask, scale, eps)


def _bwd_triton(grad_out: torch.Tensor, grad_ent: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor], out: torch.Tensor, ent: torch.Tensor, col_sum: torch.Tensor, lse: torch.Tensor,
                scale: float, eps: float, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton.slot_attention import slot_attention_bwd

    return slot_attention_bwd(grad_out, grad_ent, q, k, v, mask, out, ent, col_sum, lse, scale, eps, output_mask)


slot_attention_fwd_triton = define_op("eclip_kernels::slot_attention_fwd_triton", _fwd_triton, FWD_SCHEMA,
                                      _fwd_fake, triton=True)
slot_attention_bwd_triton = define_op("eclip_kernels::slot_attention_bwd_triton", _bwd_triton,
                                      BWD_MASKED_SCHEMA, _bwd_fake, triton=True)
slot_attention_fwd_triton.register_autograd(
    _make_backward(slot_attention_bwd_triton, takes_mask=True), setup_context=_setup_context
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

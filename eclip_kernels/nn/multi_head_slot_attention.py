"""Drop-in multi-head slot attention on the fused op."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._attention import (attend, attention_weights, check_eps, check_mask, check_positive_int, check_slots,
                         check_tokens, draw_slots)


class MultiHeadSlotAttention(nn.Module):
    """Multi-head slot attention, a drop-in replacement for ``slot_attention.MultiHeadSlotAttention`` (PyPI
    ``slot-attention``).

    Same constructor, same parameters (names, shapes, registration order: state_dicts load both ways, and
    the same weights for the same seed), same ``forward(inputs, num_slots=None)`` and the same numerics; the
    attention step of every iteration runs through :func:`eclip_kernels.slot_attention` once for all heads,
    with the heads folded into the batch (fused, nothing of size B x heads x N x num_slots kept for
    backward). To swap it into existing code, change the import::

        from eclip_kernels.nn import MultiHeadSlotAttention   # was: from slot_attention import MultiHeadSlotAttention

    Each forward draws the initial slots as ``mu + exp(logsigma) * randn`` (one draw, input dtype and
    device, the same draw as the PyPI module for the same seed); k and v (B, N, heads * dim_head) come from
    ``LayerNorm(inputs)`` once; each iteration computes q from ``LayerNorm(slots)``, and per head the softmax
    over the slots of ``q k^T * dim_head^-1/2``, adds ``eps`` to every weight, normalizes over the tokens and
    takes the weighted mean of v; the heads' results are concatenated and projected by ``combine_heads``
    (heads * dim_head -> dim), and the slots are updated with a GRU cell and a residual MLP (hidden
    ``max(dim, hidden_dim)``) on ``LayerNorm(slots)``.

    Layout: the op takes 3-d (batch, rows, features) tensors with one batch stride, and the projections
    return (B, N, heads, dim_head), where no single stride steps over (sample, head) pairs (that needs
    stride(B) == heads * stride(head), and N lies between them); so k and v are copied once per forward into
    (B * heads, N, dim_head) (their gradients once back in backward), and q and the updates once per
    iteration (small: num_slots rows). With heads == 1 the fold is a view. Strided views would not avoid
    the copy anyway: the C++ kernels (cpu, cuda) make their inputs contiguous on every call, forward and
    backward, so a strided fold would copy k and v in every iteration instead of once. Measured on a shared
    2-core CPU (1 thread, B=8 N=1024 dim=64, 4 heads of 16, iters=3, min of 15 calls): the copies of k, v
    and their gradients took 1.0 ms of the module's 21-27 ms forward+backward, about 4%; not yet measured
    on a GPU.

    Args:
        num_slots: default number of slots.
        dim: feature size of inputs and slots.
        heads: number of attention heads.
        dim_head: feature size of q, k and v per head (the logits are scaled by ``dim_head ** -0.5``).
        iters: number of attention iterations (0: the initial slots are returned).
        eps: added to the attention weights before the weighted mean.
        hidden_dim: MLP hidden size (the MLP uses ``max(dim, hidden_dim)``).
        backend: backend of the attention op ("auto", "cpu", "triton", "cuda", "reference"); keyword only.
    """

    def __init__(self, num_slots: int, dim: int, heads: int = 4, dim_head: int = 64, iters: int = 3,
                 eps: float = 1e-8, hidden_dim: int = 128, *, backend: str = "auto"):
        super().__init__()
        check_positive_int("num_slots", num_slots)
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        check_positive_int("dim_head", dim_head)
        check_positive_int("iters", iters, minimum=0)
        check_positive_int("hidden_dim", hidden_dim)
        check_eps(eps)
        self.dim = dim
        self.num_slots = num_slots
        self.heads = heads
        self.dim_head = dim_head
        self.iters = iters
        self.eps = eps
        self.scale = dim_head ** -0.5
        self.backend = backend

        # The order of the PyPI module: it fixes the state_dict order and which random draws each
        # parameter's initialization takes for a given seed.
        self.slots_mu = nn.Parameter(torch.randn(1, 1, dim))
        self.slots_logsigma = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.xavier_uniform_(self.slots_logsigma)

        self.norm_input = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_pre_ff = nn.LayerNorm(dim)

        dim_inner = heads * dim_head
        self.to_q = nn.Linear(dim, dim_inner)
        self.to_k = nn.Linear(dim, dim_inner)
        self.to_v = nn.Linear(dim, dim_inner)
        self.combine_heads = nn.Linear(dim_inner, dim)

        self.gru = nn.GRUCell(dim, dim)
        hidden_dim = max(dim, hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def initial_slots(self, batch: int, num_slots: int, device, dtype) -> torch.Tensor:
        """``mu + exp(logsigma) * randn`` of shape (batch, num_slots, dim): one draw from the global RNG."""
        return draw_slots(self.slots_mu, self.slots_logsigma, batch, num_slots, device, dtype)

    def fold_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, heads * dim_head) -> (B * heads, L, dim_head), sample-major (row b * heads + h). A copy
        unless heads == 1 (see the class docstring)."""
        batch, rows, _ = t.shape
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2).reshape(
            batch * self.heads, rows, self.dim_head)

    def unfold_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B * heads, L, dim_head) -> (B, L, heads * dim_head), the inverse of :meth:`fold_heads`."""
        rows = t.shape[1]
        return t.unflatten(0, (-1, self.heads)).transpose(1, 2).reshape(-1, rows, self.heads * self.dim_head)

    def forward(self, inputs: torch.Tensor, num_slots: int | None = None, *, mask: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, return_attn: bool = False, implicit_grad: bool = False):
        """Run ``iters`` iterations of multi-head slot attention.

        Args:
            inputs: (B, N, dim) features.
            num_slots: number of slots for this call (default: the constructor's).
            mask: optional (B, N) bool, True = valid token; masked tokens get no attention in any head
                (extra). A sample with every token masked gets zero updates (its slots still pass through
                the GRU and MLP).
            slots: optional (B, num_slots, dim) initial slots instead of the random draw (extra; no RNG used).
            return_attn: also return the attention of the last iteration, (B, heads, num_slots, N): each
                slot's weights over the tokens in each head (they sum to 1 over the valid tokens; detached,
                for visualisation); None when ``iters == 0``.
            implicit_grad: run the first ``iters - 1`` iterations without autograd and differentiate only the
                last one, from detached slots (implicit differentiation, Chang et al. 2022): backward memory
                does not grow with ``iters``; the initial slots (``slots_mu``, ``slots_logsigma``) then get no
                gradient.

        Returns:
            slots (B, num_slots, dim), or ``(slots, attn)`` with ``return_attn=True``.
        """
        check_tokens("inputs", inputs, self.dim)
        batch, _, dim = inputs.shape
        if num_slots is not None:
            check_positive_int("num_slots", num_slots)
        if slots is None:
            n_slots = self.num_slots if num_slots is None else num_slots
            slots = self.initial_slots(batch, n_slots, inputs.device, inputs.dtype)
        else:
            check_slots(slots, inputs, num_slots)
        heads_mask = None
        if mask is not None:
            check_mask(mask, inputs)
            heads_mask = mask.repeat_interleave(self.heads, dim=0)  # (B * heads, N), as fold_heads

        inputs = self.norm_input(inputs)
        k, v = self.fold_heads(self.to_k(inputs)), self.fold_heads(self.to_v(inputs))
        q = None
        for it in range(self.iters):
            last = it == self.iters - 1
            if implicit_grad and last:
                slots = slots.detach()
            no_grad = implicit_grad and not last
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                slots_prev = slots
                q = self.fold_heads(self.to_q(self.norm_slots(slots)))
                updates = attend(q, k, v, scale=self.scale, eps=self.eps, mask=heads_mask, backend=self.backend)
                updates = self.combine_heads(self.unfold_heads(updates))
                slots = self.gru(updates.reshape(-1, dim), slots_prev.reshape(-1, dim)).reshape(batch, -1, dim)
                slots = slots + self.mlp(self.norm_pre_ff(slots))

        if not return_attn:
            return slots
        attn = None
        if q is not None:
            with torch.no_grad():
                attn = attention_weights(q, k, scale=self.scale, eps=self.eps, mask=heads_mask)
                attn = attn.transpose(1, 2).unflatten(0, (batch, self.heads))
        return slots, attn

"""Drop-in slot attention module (Locatello et al. 2020) on the fused op."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._attention import (attend, attention_weights, check_eps, check_positive_int, check_slots, check_tokens,
                         draw_slots)


class SlotAttention(nn.Module):
    """Slot attention, a drop-in replacement for ``slot_attention.SlotAttention`` (PyPI ``slot-attention``).

    Same constructor, same parameters (names, shapes, registration order: state_dicts load both ways), same
    ``forward(inputs, num_slots=None)`` and the same numerics; the attention step of every iteration runs
    through :func:`eclip_kernels.slot_attention` (fused, nothing of size B x N x num_slots kept for backward).
    To swap it into existing code, change the import::

        from eclip_kernels.nn import SlotAttention   # was: from slot_attention import SlotAttention

    Each forward draws the initial slots as ``mu + exp(logsigma) * randn`` (one draw, input dtype and
    device, the same draw as the PyPI module for the same seed); k and v come from ``LayerNorm(inputs)``
    once; each iteration computes q from ``LayerNorm(slots)``, the softmax over the slots of
    ``q k^T * dim^-1/2``, adds ``eps`` to every weight, normalizes over the tokens, takes the weighted mean
    of v, and updates the slots with a GRU cell and a residual MLP (hidden ``max(dim, hidden_dim)``) on
    ``LayerNorm(slots)``.

    Args:
        num_slots: default number of slots.
        dim: feature size of inputs and slots.
        iters: number of attention iterations.
        eps: added to the attention weights before the weighted mean.
        hidden_dim: MLP hidden size (the MLP uses ``max(dim, hidden_dim)``).
        backend: backend of the attention op ("auto", "cpu", "triton", "cuda", "reference"); keyword only.
    """

    def __init__(self, num_slots: int, dim: int, iters: int = 3, eps: float = 1e-8, hidden_dim: int = 128,
                 *, backend: str = "auto"):
        super().__init__()
        check_positive_int("num_slots", num_slots)
        check_positive_int("dim", dim)
        check_positive_int("iters", iters, minimum=0)
        check_positive_int("hidden_dim", hidden_dim)
        check_eps(eps)
        self.dim = dim
        self.num_slots = num_slots
        self.iters = iters
        self.eps = eps
        self.scale = dim ** -0.5
        self.backend = backend

        self.slots_mu = nn.Parameter(torch.randn(1, 1, dim))
        self.slots_logsigma = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.xavier_uniform_(self.slots_logsigma)

        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.gru = nn.GRUCell(dim, dim)
        hidden_dim = max(dim, hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))
        self.norm_input = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_pre_ff = nn.LayerNorm(dim)

    def initial_slots(self, batch: int, num_slots: int, device, dtype) -> torch.Tensor:
        """``mu + exp(logsigma) * randn`` of shape (batch, num_slots, dim): one draw from the global RNG."""
        return draw_slots(self.slots_mu, self.slots_logsigma, batch, num_slots, device, dtype)

    def forward(self, inputs: torch.Tensor, num_slots: int | None = None, *, mask: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, return_attn: bool = False, implicit_grad: bool = False):
        """Run ``iters`` iterations of slot attention.

        Args:
            inputs: (B, N, dim) features.
            num_slots: number of slots for this call (default: the constructor's).
            mask: optional (B, N) bool, True = valid token; masked tokens get no attention (extra).
            slots: optional (B, num_slots, dim) initial slots instead of the random draw (extra; no RNG used).
            return_attn: also return the attention of the last iteration, (B, num_slots, N), each slot's
                weights over the tokens (they sum to 1 over the valid tokens; detached, for visualisation);
                None when ``iters == 0``.
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

        inputs = self.norm_input(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)
        q = None
        for it in range(self.iters):
            last = it == self.iters - 1
            if implicit_grad and last:
                slots = slots.detach()
            no_grad = implicit_grad and not last
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                slots_prev = slots
                q = self.to_q(self.norm_slots(slots))
                updates = attend(q, k, v, scale=self.scale, eps=self.eps, mask=mask, backend=self.backend)
                slots = self.gru(updates.reshape(-1, dim), slots_prev.reshape(-1, dim)).reshape(batch, -1, dim)
                slots = slots + self.mlp(self.norm_pre_ff(slots))

        if not return_attn:
            return slots
        attn = None
        if q is not None:
            with torch.no_grad():
                attn = attention_weights(q, k, scale=self.scale, eps=self.eps, mask=mask).transpose(1, 2)
        return slots, attn

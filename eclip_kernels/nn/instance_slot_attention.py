"""ECLIP's instance slot-attention layer (Eq. 2-5) on the fused op."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ._attention import attend, attention_weights, check_positive_int, check_tokens


class InstanceSlotAttentionOutput(NamedTuple):
    """What :class:`InstanceSlotAttention` returns when extras are requested.

    Attributes:
        hidden: (B, T, D) updated instance representations ``H + W_o delta``.
        entropy: (B, T) float32 entropy of each query's weights over the tokens (input of
            :func:`eclip_kernels.entropy_regularizer`), or None if not requested.
        attn: (B, N, T) attention weights A (each column sums to 1 over the valid tokens; for grounding
            maps, detached), or None if not requested.
    """

    hidden: torch.Tensor
    entropy: torch.Tensor | None
    attn: torch.Tensor | None


class InstanceSlotAttention(nn.Module):
    """The slot-attention layer of ECLIP's instance decoder (Eq. 2-5).

    With visual tokens Z (B, N, D), instance queries Q (B, T, D) and representations H (B, T, D)::

        M     = softmax over the T queries of (Z W_z) ((Q + H) W_q)^T / sqrt(D)        (Eq. 2-3)
        delta = sum_i M[i, t] (W_v z_i) / sum_i M[i, t]                                (Eq. 4)
        H'    = H + W_o delta                                                         (Eq. 5)

    The attention runs through :func:`eclip_kernels.slot_attention` (fused: one pass over tokens, nothing of
    size B x N x T kept for backward). A decoder of L layers can project Z once for all layers with
    :meth:`project_kv` and pass each layer its ``k`` and ``v``.

    Args:
        dim: D, the width of Z, Q and H.
        eps: added to the attention weights before the token sum (default 0, as Eq. 4).
        bias: whether W_z, W_q, W_v and W_o have biases.
        backend: backend of the attention op ("auto", "cpu", "triton", "cuda", "reference").

    Example::

        layer = InstanceSlotAttention(512)
        h = torch.zeros(B, T, 512)                                   # H^0 = 0
        h, ent, attn = layer(z, queries, h, mask=mask, return_entropy=True, return_attn=True)
    """

    def __init__(self, dim: int, *, eps: float = 0.0, bias: bool = True, backend: str = "auto"):
        super().__init__()
        check_positive_int("dim", dim)
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.dim = dim
        self.eps = eps
        self.scale = dim ** -0.5
        self.backend = backend
        self.to_k = nn.Linear(dim, dim, bias=bias)  # W_z
        self.to_q = nn.Linear(dim, dim, bias=bias)  # W_q
        self.to_v = nn.Linear(dim, dim, bias=bias)  # W_v
        self.to_out = nn.Linear(dim, dim, bias=bias)  # W_o

    @staticmethod
    def project_kv(layers: Sequence[InstanceSlotAttention], z: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """k = Z W_z and v = Z W_v of every layer in one matrix product over Z.

        Args:
            layers: the layers of a decoder (all of the same ``dim``).
            z: (B, N, D) visual tokens.

        Returns:
            ``[(k, v) for each layer]``, each (B, N, D), views into one (B, N, 2 L D) result.
        """
        weights = torch.cat([w for layer in layers for w in (layer.to_k.weight, layer.to_v.weight)])
        biases = [b for layer in layers for b in (layer.to_k.bias, layer.to_v.bias)]
        bias = None if any(b is None for b in biases) else torch.cat(biases)
        projected = F.linear(z, weights, bias)
        chunks = projected.split(layers[0].dim, dim=-1)
        return [(chunks[2 * i], chunks[2 * i + 1]) for i in range(len(layers))]

    def forward(self, z: torch.Tensor | None, queries: torch.Tensor, hidden: torch.Tensor, *,
                mask: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                return_entropy: bool = False, return_attn: bool = False):
        """Update the instance representations.

        Args:
            z: (B, N, D) visual tokens; may be None when both ``k`` and ``v`` are given.
            queries: (B, T, D) instance queries Q (prompt + position + type embeddings, Eq. 1).
            hidden: (B, T, D) instance representations H of the previous layer (zeros for the first).
            mask: optional (B, N) bool, True = valid token.
            k, v: optional precomputed ``Z W_z`` and ``Z W_v`` (B, N, D), e.g. from :meth:`project_kv`.
            return_entropy: also return the (B, T) entropies of the attention over the tokens.
            return_attn: also return the (B, N, T) attention weights (detached).

        Returns:
            H' (B, T, D), or an :class:`InstanceSlotAttentionOutput` when an extra is requested.
        """
        check_tokens("queries", queries, self.dim, "B, T")
        check_tokens("hidden", hidden, self.dim, "B, T")
        if hidden.shape != queries.shape:
            raise ValueError(f"queries and hidden must have the same shape, got {tuple(queries.shape)} and "
                             f"{tuple(hidden.shape)}")
        if z is not None:
            check_tokens("z", z, self.dim)
        if k is None or v is None:
            if z is None:
                raise ValueError("z is required unless both k and v are given")
            k = self.to_k(z) if k is None else k
            v = self.to_v(z) if v is None else v
        q = self.to_q(queries + hidden)
        result = attend(q, k, v, scale=self.scale, eps=self.eps, mask=mask, backend=self.backend,
                        return_entropy=return_entropy)
        delta, entropy = result if return_entropy else (result, None)
        new_hidden = hidden + self.to_out(delta)
        if not (return_entropy or return_attn):
            return new_hidden
        attn = None
        if return_attn:
            with torch.no_grad():
                attn = attention_weights(q, k, scale=self.scale, eps=self.eps, mask=mask)
        return InstanceSlotAttentionOutput(new_hidden, entropy, attn)

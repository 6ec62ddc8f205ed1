"""ECLIP's instance decoder (paper section 3.2): L blocks of slot attention, self-attention and FFN."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from eclip_kernels.nn import InstanceSlotAttention


class DecoderOutput(NamedTuple):
    """hidden (B, T, D): H^L; entropy (B, T): entropy of each query's attention over the tokens in the last
    block (Eq. 10); attn (B, N, T) or None: the last block's attention (grounding maps)."""

    hidden: torch.Tensor
    entropy: torch.Tensor
    attn: torch.Tensor | None


class QuerySelfAttention(nn.Module):
    """Multi-head self-attention over the T queries, through ``F.scaled_dot_product_attention`` (T is about
    20: the fused SDPA kernels are as fast as anything here, so no xformers path)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class DecoderBlock(nn.Module):
    """Slot attention (Eq. 2-5) -> Add & Norm -> self-attention -> Add & Norm -> FFN -> Add & Norm."""

    def __init__(self, dim: int, heads: int, mlp: int, backend: str):
        super().__init__()
        self.slot_attn = InstanceSlotAttention(dim, backend=backend)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = QuerySelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, queries, hidden, k, v, mask, return_attn: bool):
        out = self.slot_attn(None, queries, hidden, k=k, v=v, mask=mask, return_entropy=True, return_attn=return_attn)
        h = self.norm1(out.hidden)  # the slot-attention layer adds its residual (Eq. 5) itself
        h = self.norm2(h + self.self_attn(h))
        h = self.norm3(h + self.ffn(h))
        return h, out.entropy, out.attn


class InstanceDecoder(nn.Module):
    """Queries q_t = prompt_t + pos_t + type_t (Eq. 1), H^0 = 0, L blocks over the projected tokens Z.

    Args:
        dim: D. depth: L. num_queries: T. heads, mlp: self-attention heads and FFN width.
        backend: backend of the fused slot attention.
    """

    TEXT, IMAGE = 0, 1  # prompt types

    def __init__(self, dim: int, depth: int, num_queries: int, heads: int, mlp: int, backend: str = "auto"):
        super().__init__()
        self.num_queries = num_queries
        self.pos_embed = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.type_embed = nn.Embedding(2, dim)
        nn.init.normal_(self.type_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, mlp, backend) for _ in range(depth))

    def forward(self, z: torch.Tensor, prompts: torch.Tensor, prompt_types: torch.Tensor,
                mask: torch.Tensor | None = None, return_attn: bool = False) -> DecoderOutput:
        """
        Args:
            z: (B, N, D) projected visual tokens Z.
            prompts: (B, T, D) prompt embeddings (g_T(w_cls), g_I(v_cls), or random for transfer negatives).
            prompt_types: (B, T) int64, :data:`TEXT` or :data:`IMAGE`.
            mask: optional (B, N) bool, True = valid token.
            return_attn: also return the last block's attention (B, N, T).
        """
        if prompts.shape[1] != self.num_queries:
            raise ValueError(f"expected {self.num_queries} prompts per sample, got {prompts.shape[1]}")
        queries = prompts + self.pos_embed + self.type_embed(prompt_types)
        kv = InstanceSlotAttention.project_kv([block.slot_attn for block in self.blocks], z)
        hidden = torch.zeros_like(queries)
        entropy = attn = None
        for i, (block, (k, v)) in enumerate(zip(self.blocks, kv)):
            last = i == len(self.blocks) - 1
            hidden, entropy, attn = block(queries, hidden, k, v, mask, return_attn and last)
        return DecoderOutput(hidden, entropy, attn)

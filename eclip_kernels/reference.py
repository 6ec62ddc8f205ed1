"""Plain-PyTorch reference of every op: the oracle of the tests and the ``reference`` backend.

Written for clarity, not speed: it materializes the (B, N, T) attention and lets autograd differentiate it.
Computations run in the input dtype (run it on float64 inputs to get the oracle).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def slot_attention_weights(
    q: torch.Tensor, k: torch.Tensor, scale: float, eps: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Column-normalized slot-attention weights A (B, N, T) (SPEC section 2).

    ``M = softmax_t(scale * k q^T)`` (softmax over the T queries, per token), ``m = M + eps`` (0 on masked
    tokens), ``A = m / sum_i m`` (weighted mean over tokens). Where a query's column sum is 0 (all tokens
    masked), A is 0.
    """
    logits = torch.einsum("bnd,btd->bnt", k, q) * scale
    m = logits.softmax(dim=-1) + eps
    if mask is not None:
        m = torch.where(mask[:, :, None], m, torch.zeros((), dtype=m.dtype, device=m.device))
    col_sum = m.sum(dim=1, keepdim=True)
    safe_sum = torch.where(col_sum > 0, col_sum, torch.ones((), dtype=m.dtype, device=m.device))
    return m / safe_sum


def slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    eps: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot attention output (B, T, Dv) and per-query entropy (B, T) of A over the tokens.

    ``out[b, t] = sum_i A[b, i, t] v[b, i]``, ``ent[b, t] = -sum_i A log A`` with 0 log 0 = 0.
    """
    attn = slot_attention_weights(q, k, scale, eps, mask)
    out = torch.einsum("bnt,bnv->btv", attn, v)
    # 0 log 0 = 0 with a finite gradient: log is only taken of positive entries.
    positive = attn > 0
    safe_attn = torch.where(positive, attn, torch.ones((), dtype=attn.dtype, device=attn.device))
    ent = -torch.where(positive, attn * torch.log(safe_attn), torch.zeros_like(attn)).sum(dim=1)
    return out, ent


def entropy_regularizer(
    ent: torch.Tensor, positive_index: torch.Tensor, num_tokens: torch.Tensor | None
) -> torch.Tensor:
    """ECLIP Eq. 10 from per-query entropies ent (B, T); see :func:`eclip_kernels.entropy_regularizer`."""
    is_positive = torch.zeros_like(ent, dtype=torch.bool)
    is_positive.scatter_(1, positive_index[:, None], True)
    per_query = torch.where(is_positive, ent, -ent)
    if num_tokens is not None:
        # A sample with no valid token contributes log 1 = 0 (its entropies are 0 too).
        log_n = torch.log(num_tokens.to(ent.dtype).clamp_min(1))[:, None]
        per_query = per_query + torch.where(is_positive, torch.zeros_like(ent), log_n)
    return per_query.sum(dim=1).mean()


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, ids: torch.Tensor | None
) -> torch.Tensor:
    """Symmetric InfoNCE of one process (ECLIP Eq. 6-7), materializing the (B, B) logits.

    ``(CE(s I T^T, diag) + CE(s T I^T, diag)) / 2`` with the mean over samples; with ``ids``, pairs (i, j),
    j != i, of the same id are left out of both denominators.
    """
    logits = logit_scale * image @ text.T
    if ids is not None:
        same = ids[:, None] == ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def contrastive_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    query_ids: torch.Tensor | None,
    key_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Sum over rows of InfoNCE with one positive per query and a shared bank of keys (ECLIP Eq. 8).

    Row i: ``log(exp(s <q_i, p_i>) + sum_j exp(s <q_i, k_j>)) - s <q_i, p_i>`` over the keys j whose id differs
    from the query's (all keys when either id tensor is None).
    """
    pos = logit_scale * (query * positive).sum(-1, keepdim=True)
    logits = logit_scale * query @ keys.T
    if query_ids is not None and key_ids is not None:
        logits = logits.masked_fill(query_ids[:, None] == key_ids[None, :], float("-inf"))
    return (torch.logsumexp(torch.cat([pos, logits], dim=1), dim=1) - pos[:, 0]).sum()


def siglip_positive(rows: int, cols: int, image_ids: torch.Tensor | None, text_ids: torch.Tensor | None,
                    offset: int, device: torch.device) -> torch.Tensor:
    """(rows, cols) bool: the positive pairs of the sigmoid loss. With ids, the pairs of equal ids; without,
    text ``j`` is the positive of image ``i`` when ``j == i + offset`` (``offset`` is the global index of this
    rank's first row; 0 in one process: the diagonal)."""
    if image_ids is not None and text_ids is not None:
        return image_ids[:, None] == text_ids[None, :]
    r = torch.arange(rows, device=device) + offset
    return r[:, None] == torch.arange(cols, device=device)[None, :]


def siglip_loss_sum(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    image_ids: torch.Tensor | None,
    text_ids: torch.Tensor | None,
    offset: int = 0,
) -> torch.Tensor:
    """Sum over every (image i, text j) pair of ``-log sigmoid(l_ij (s <x_i, y_j> + b))`` (SigLIP),
    materializing the (B, N) logits; ``l_ij`` is +1 for the positives of :func:`siglip_positive`, -1 otherwise.
    The caller divides by the number of images (open_clip's ``SigLipLoss`` normalization)."""
    logits = logit_scale * image @ text.T + logit_bias
    positive = siglip_positive(image.shape[0], text.shape[0], image_ids, text_ids, offset, image.device)
    signed = torch.where(positive, logits, -logits)
    return -F.logsigmoid(signed).sum()

"""Tiled sigmoid (SigLIP) loss kernels written with ATen matrix products: the ``cpu`` (and ``cuda``) backend of
:func:`eclip_kernels.siglip_loss`. The math is in docs/contrastive.md.

Logits exist one (TILE x TILE) tile at a time; the sigmoid loss has no normalizer across a row, so the
forward keeps nothing but the loss sum, and the backward recomputes each tile from the features. Memory
beyond inputs and outputs: a few tiles.

Matrix-sized passes (B x N x D products) per forward+backward: 4 (forward 1; backward 3: recompute, gradient
of the images, gradient of the texts, both from the same tile). Tiles accumulate in float32 (float64 for
float64 features); the handful of per-tile sums (loss, logit-scale and logit-bias gradients) are added across
tiles in float64 and returned in the accumulation dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

TILE = 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(rows: int, cols: int):
    for i0 in range(0, rows, TILE):
        for j0 in range(0, cols, TILE):
            yield i0, min(i0 + TILE, rows), j0, min(j0 + TILE, cols)


def _positive_tile(image_ids, text_ids, offset, i0, i1, j0, j1, device):
    """The tile's positives: a (i1-i0, j1-j0) bool mask with ids, else the index range of the positive
    pairs (i, i + offset) inside the tile (an empty range when the tile holds none), as (rows, cols)."""
    if image_ids is not None and text_ids is not None:
        return image_ids[i0:i1, None] == text_ids[None, j0:j1]
    lo, hi = max(i0, j0 - offset), min(i1, j1 - offset)
    idx = torch.arange(lo, max(lo, hi), device=device)
    return idx - i0, idx + offset - j0


def _signed(z: torch.Tensor, positive) -> torch.Tensor:
    """l * z: the logits with the negatives' sign flipped (in place of ``z`` without ids)."""
    if isinstance(positive, torch.Tensor):
        return torch.where(positive, z, -z)
    rows, cols = positive
    diag = z[rows, cols].clone()
    z.neg_()
    z[rows, cols] = diag
    return z


def siglip_loss_fwd(image, text, logit_scale, logit_bias, image_ids, text_ids, offset):
    """Returns the loss sum ``sum_ij -log sigmoid(l_ij (s <x_i, y_j> + b))``, 0-d, accumulation dtype."""
    acc = _acc_dtype(image.dtype)
    img, txt = image.to(acc), text.to(acc)
    scale, bias = logit_scale.to(acc), logit_bias.to(acc)
    total = torch.zeros((), dtype=torch.float64, device=image.device)
    for i0, i1, j0, j1 in _tiles(img.shape[0], txt.shape[0]):
        z = (img[i0:i1] @ txt[j0:j1].T).mul_(scale).add_(bias)
        signed = _signed(z, _positive_tile(image_ids, text_ids, offset, i0, i1, j0, j1, z.device))
        total -= F.logsigmoid(signed).sum(dtype=acc)
    return total.to(acc)


def siglip_loss_bwd(grad_loss_sum, image, text, logit_scale, logit_bias, image_ids, text_ids, offset,
                    output_mask=(True, True, True, True)):
    """Gradients of the loss sum times ``grad_loss_sum`` w.r.t. (image, text, logit_scale, logit_bias); an
    entry of ``output_mask`` that is False is not computed (an empty tensor stands in its place).

    Per tile, ``G = d loss / d z = -l sigmoid(-l z)`` (sigmoid(z) for the negatives, -sigmoid(-z) for the
    positives, each without cancellation); grad_image = g s G @ text, grad_text = g s G^T @ image,
    grad_scale = g sum G * <x, y>, grad_bias = g sum G.
    """
    need_img, need_txt, need_scale, need_bias = (bool(x) for x in output_mask)
    acc = _acc_dtype(image.dtype)
    img, txt = image.to(acc), text.to(acc)
    scale, bias = logit_scale.to(acc), logit_bias.to(acc)
    coef = grad_loss_sum.to(acc)
    grad_img = torch.zeros_like(img, memory_format=torch.contiguous_format) if need_img else None
    grad_txt = torch.zeros_like(txt, memory_format=torch.contiguous_format) if need_txt else None
    grad_scale = torch.zeros((), dtype=torch.float64, device=image.device)
    grad_bias = torch.zeros((), dtype=torch.float64, device=image.device)
    if need_img or need_txt or need_scale or need_bias:
        for i0, i1, j0, j1 in _tiles(img.shape[0], txt.shape[0]):
            raw = img[i0:i1] @ txt[j0:j1].T
            positive = _positive_tile(image_ids, text_ids, offset, i0, i1, j0, j1, raw.device)
            g = torch.mul(raw, scale).add_(bias)
            if isinstance(positive, torch.Tensor):
                g = torch.where(positive, torch.sigmoid(g.neg()).neg_(), torch.sigmoid(g))
            else:
                rows, cols = positive
                diag = torch.sigmoid(-g[rows, cols]).neg_()
                g = g.sigmoid_()
                g[rows, cols] = diag
            if need_scale:
                grad_scale += (g * raw).sum(dtype=acc)
            if need_bias:
                grad_bias += g.sum(dtype=acc)
            if need_img:
                grad_img[i0:i1].addmm_(g, txt[j0:j1])
            if need_txt:
                grad_txt[j0:j1].addmm_(g.T, img[i0:i1])
    cs = coef * scale
    return (
        grad_img.mul_(cs).to(image.dtype) if need_img else image.new_empty((0,)),
        grad_txt.mul_(cs).to(text.dtype) if need_txt else text.new_empty((0,)),
        (grad_scale.to(acc) * coef).to(logit_scale.dtype) if need_scale else logit_scale.new_empty((0,)),
        (grad_bias.to(acc) * coef).to(logit_bias.dtype) if need_bias else logit_bias.new_empty((0,)),
    )

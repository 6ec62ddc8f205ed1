"""Tiled contrastive-loss kernels written with ATen matrix products: the ``cpu`` backend of the losses.

The math is in docs/contrastive.md. Logits exist one (TILE x TILE) tile at a time: the forward keeps an
online log-sum-exp per row (and per column for the symmetric loss), the backward recomputes each tile from
the features and the saved log-sum-exps. Memory beyond inputs and outputs: O(B) vectors plus a few tiles.

Matrix-sized passes (B x B x D products) per forward+backward: symmetric loss 4 (forward 1: both directions
from the same tile; backward 3: recompute, grad of image, grad of text); one-directional rows 4 (forward 1,
backward 3). Accumulation in float32 (float64 for float64 features); the loss and the log-sum-exps are
returned in that accumulation dtype.
"""

from __future__ import annotations

import torch

TILE = 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _online_update(m: torch.Tensor, total: torch.Tensor, tile: torch.Tensor, dim: int) -> None:
    """Fold a tile of logits into running (max m, sum of exp(x - m)) along ``dim``, in place."""
    tile_max = tile.amax(dim=dim)
    new_m = torch.maximum(m, tile_max)
    # rows/columns with nothing valid yet keep -inf: exp(-inf - -inf) is guarded by finite_m
    finite_m = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    shift = finite_m.unsqueeze(dim)
    total.mul_(torch.exp(m - finite_m)).add_(torch.exp(tile - shift).sum(dim=dim))
    m.copy_(new_m)


def _lse(m: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m)) + torch.log(total)


def _invalid_pairs(ids_a, ids_b, i0, i1, j0, j1, diagonal_valid):
    """Bool mask of the (i0:i1, j0:j1) tile's pairs left out of the denominators, or None without ids."""
    if ids_a is None or ids_b is None:
        return None
    invalid = ids_a[i0:i1, None] == ids_b[None, j0:j1]
    if diagonal_valid:
        rows = torch.arange(i0, i1, device=ids_a.device)
        cols = torch.arange(j0, j1, device=ids_a.device)
        invalid &= rows[:, None] != cols[None, :]
    return invalid


# --- symmetric CLIP loss ---------------------------------------------------------------------------------


def clip_loss_fwd(image, text, logit_scale, ids):
    batch = image.shape[0]
    acc = _acc_dtype(image.dtype)
    img, txt, scale = image.to(acc), text.to(acc), logit_scale.to(acc)
    row_m = torch.full((batch,), float("-inf"), dtype=acc, device=image.device)
    col_m = row_m.clone()
    row_sum = torch.zeros(batch, dtype=acc, device=image.device)
    col_sum = row_sum.clone()
    for i0 in range(0, batch, TILE):
        i1 = min(i0 + TILE, batch)
        a = img[i0:i1] * scale  # the scale folded into the smaller operand of the product
        for j0 in range(0, batch, TILE):
            j1 = min(j0 + TILE, batch)
            tile = a @ txt[j0:j1].T
            invalid = _invalid_pairs(ids, ids, i0, i1, j0, j1, diagonal_valid=True)
            if invalid is not None:
                tile.masked_fill_(invalid, float("-inf"))
            _online_update(row_m[i0:i1], row_sum[i0:i1], tile, dim=1)
            _online_update(col_m[j0:j1], col_sum[j0:j1], tile, dim=0)
    row_lse, col_lse = _lse(row_m, row_sum), _lse(col_m, col_sum)
    pos = scale * (img * txt).sum(-1)
    loss = ((row_lse - pos).sum() + (col_lse - pos).sum()) / (2 * batch)
    return loss, row_lse, col_lse


def clip_loss_bwd(grad_loss, image, text, logit_scale, ids, row_lse, col_lse, output_mask=(True, True, True)):
    need_img, need_txt, need_scale = (bool(x) for x in output_mask)
    batch = image.shape[0]
    acc = _acc_dtype(image.dtype)
    img, txt, scale = image.to(acc), text.to(acc), logit_scale.to(acc)
    row_lse, col_lse = row_lse.to(acc), col_lse.to(acc)
    coef = grad_loss.to(acc) / (2 * batch)
    grad_img = torch.zeros_like(img) if need_img else None
    grad_txt = torch.zeros_like(txt) if need_txt else None
    grad_scale = torch.zeros((), dtype=acc, device=image.device)
    for i0 in range(0, batch, TILE):
        i1 = min(i0 + TILE, batch)
        a = img[i0:i1] * scale
        for j0 in range(0, batch, TILE):
            j1 = min(j0 + TILE, batch)
            tile = a @ txt[j0:j1].T
            g = torch.exp(tile - row_lse[i0:i1, None]).add_(torch.exp(tile - col_lse[None, j0:j1]))
            invalid = _invalid_pairs(ids, ids, i0, i1, j0, j1, diagonal_valid=True)
            if invalid is not None:
                g.masked_fill_(invalid, 0.0)
            lo, hi = max(i0, j0), min(i1, j1)
            if lo < hi:  # the positives: -1 in each direction
                idx = torch.arange(lo, hi, device=image.device)
                g[idx - i0, idx - j0] -= 2.0
            g.mul_(coef)
            if need_scale:
                grad_scale += (g * tile).sum()
            if need_img:
                grad_img[i0:i1].addmm_(g, txt[j0:j1])
            if need_txt:
                grad_txt[j0:j1].addmm_(g.T, img[i0:i1])
    return (
        (grad_img * scale).to(image.dtype) if need_img else image.new_empty((0,)),
        (grad_txt * scale).to(text.dtype) if need_txt else text.new_empty((0,)),
        (grad_scale / scale).to(logit_scale.dtype) if need_scale else logit_scale.new_empty((0,)),
    )


# --- one-directional rows (info_nce, and each direction of the distributed CLIP loss) -------------------


def contrastive_rows_fwd(query, positive, keys, logit_scale, query_ids, key_ids):
    acc = _acc_dtype(query.dtype)
    q, p, k, scale = query.to(acc), positive.to(acc), keys.to(acc), logit_scale.to(acc)
    pos = scale * (q * p).sum(-1)
    lse = torch.empty_like(pos)
    for i0 in range(0, q.shape[0], TILE):
        i1 = min(i0 + TILE, q.shape[0])
        a = q[i0:i1] * scale
        m, total = pos[i0:i1].clone(), torch.ones_like(pos[i0:i1])  # the positive opens the sum
        for j0 in range(0, k.shape[0], TILE):
            j1 = min(j0 + TILE, k.shape[0])
            tile = a @ k[j0:j1].T
            invalid = _invalid_pairs(query_ids, key_ids, i0, i1, j0, j1, diagonal_valid=False)
            if invalid is not None:
                tile.masked_fill_(invalid, float("-inf"))
            _online_update(m, total, tile, dim=1)
        lse[i0:i1] = _lse(m, total)
    return (lse - pos).sum(), lse


def contrastive_rows_bwd(grad_loss_sum, query, positive, keys, logit_scale, query_ids, key_ids, lse,
                         output_mask=(True, True, True, True)):
    need_q, need_p, need_k, need_scale = (bool(x) for x in output_mask)
    acc = _acc_dtype(query.dtype)
    q, p, k, scale = query.to(acc), positive.to(acc), keys.to(acc), logit_scale.to(acc)
    g_out = grad_loss_sum.to(acc)
    lse = lse.to(acc)
    pos = scale * (q * p).sum(-1)
    coef_pos = (torch.exp(pos - lse) - 1) * g_out  # d loss / d pos
    grad_q = coef_pos[:, None] * p if need_q else None
    grad_k = torch.zeros_like(k) if need_k else None
    grad_scale = (coef_pos * pos).sum()
    # the positive's gradient needs no tile; the tiles are walked only for the query, keys or scale
    if need_q or need_k or need_scale:
        for i0 in range(0, q.shape[0], TILE):
            i1 = min(i0 + TILE, q.shape[0])
            a = q[i0:i1] * scale
            for j0 in range(0, k.shape[0], TILE):
                j1 = min(j0 + TILE, k.shape[0])
                tile = a @ k[j0:j1].T
                g = torch.exp(tile - lse[i0:i1, None])
                invalid = _invalid_pairs(query_ids, key_ids, i0, i1, j0, j1, diagonal_valid=False)
                if invalid is not None:
                    g.masked_fill_(invalid, 0.0)
                g.mul_(g_out)
                if need_scale:
                    grad_scale += (g * tile).sum()
                if need_q:
                    grad_q[i0:i1].addmm_(g, k[j0:j1])
                if need_k:
                    grad_k[j0:j1].addmm_(g.T, q[i0:i1])
    return (
        (grad_q * scale).to(query.dtype) if need_q else query.new_empty((0,)),
        (coef_pos[:, None] * q * scale).to(positive.dtype) if need_p else positive.new_empty((0,)),
        (grad_k * scale).to(keys.dtype) if need_k else keys.new_empty((0,)),
        (grad_scale / scale).to(logit_scale.dtype) if need_scale else logit_scale.new_empty((0,)),
    )

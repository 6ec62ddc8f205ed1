"""Triton forward / backward kernels of the contrastive losses.

The math, dtypes and edge cases follow the project's contrastive contract
(symmetric CLIP loss with same-id pairs removed from the denominators, and the
one-directional InfoNCE rows loss).  Nothing of size B x B (or M x K) is ever
written to memory: every kernel walks tiles S = s * A_blk @ B_blk^T (tl.dot,
float32 accumulation, looping over D in BLOCK_D chunks), keeps log-sum-exps
online with a running max, and the backward recomputes the tiles.

Cost in "matrix-sized passes" (one pass = one (B x B x D) matmul's worth of
tl.dot work, i.e. one sweep over all tiles with a full-D product):

    forward:   1 pass.  A single sweep over the tiles yields the row statistics
               (max, sum exp) and, for the symmetric loss, the column
               statistics of the same tile, so both directions share it.
    backward:  4 passes: one sweep per side.  The image sweep recomputes each
               tile (1) and accumulates G @ text into the image gradient (1);
               the text sweep does the same with the roles swapped (2).  A side
               that needs no gradient (a momentum bank, a frozen tower) costs no
               sweep.
    total:     5 passes per step, deterministic, no atomics.

Why two sweeps rather than one sweep that also adds G^T @ image into the text
gradient (4 passes): that single sweep must reduce the text gradient across
programs (float atomics of a (BLOCK_N x D) tile per tile) and, for D = 512, could
not keep the image gradient in registers either, so it streamed a (BLOCK_M x D)
float32 slab through global memory on every tile.  At B = 65,536, D = 512 that
is 0.5 MB of slab traffic and 128 KB of atomics per 33 MFLOP tile, about 50
FLOP per byte, far under the ~300 FLOP/byte at which an H100 stops being
memory-bound.  Each sweep here keeps a (BLOCK_M x BLOCK_DO) float32 slice of its
own gradient in registers for its whole range of tiles and writes it once.

Forward, kernel _fwd_tiles_kernel, grid (n_row_splits, n_col_splits):
    program (r, c) owns a contiguous range of row blocks and a contiguous
    range of column blocks.  For each of its row blocks it walks its column
    blocks, keeping the row (max, sum exp) in registers, and writes them once
    to the row-partial buffer slot c (shape (n_col_splits, M)).  For the
    symmetric loss it also merges each tile's column (max, sum exp) into the
    column-partial slot r (shape (n_row_splits, N)), read-modify-write across
    its row blocks (only this program touches that slot).
    _fwd_finalize_kernel (grid over index blocks) merges the partial slots
    into the final log-sum-exps in a fixed order (deterministic), computes the
    positives pos[i] = s <a_i, b_i> and per-block loss sums; the launcher adds
    those O(B / BLOCK) numbers.  The splits are bounded (about sqrt(#programs)
    rows by #programs / that columns, never more programs than one round of
    the device), so the partials are O(B * small constant).

Backward, kernel _bwd_kernel, grid (n_own_blocks, n_splits, n_d_slices):
    "own" is the side whose rows a program holds (image / query, or text /
    keys in the second sweep), "other" the side it walks.  Per tile it
    recomputes S, forms
        G = exp(S - lse_own) [+ exp(S - lse_other)] [- 2 on the diagonal]
    (the grad_loss / count and s factors are applied once at the end, so
    fp16 / bf16 operands of G stay in [-2, 2]) and accumulates G @ other[:, slice]
    in registers.  n_splits (other-side tile ranges per own block) is 1 unless
    own blocks and D slices leave the device under-filled; each split writes
    one float32 partial, summed by the launcher in a fixed order.
    grad_scale partials: one float per (own block, split), summed by the launcher.

All accumulation is float32.  fp16 / bf16 tiles are fed to tl.dot in the input
dtype with float32 accumulators; float32 tiles follow torch's float32 matmul
precision (exact IEEE products at "highest", TF32 otherwise; see _launch.py).
"""

import math
from collections import namedtuple

import torch
import triton
import triton.language as tl

from ._launch import device_guard, dot_precision, geometry, wrap_triton

__all__ = [
    "clip_loss_fwd",
    "clip_loss_bwd",
    "contrastive_rows_fwd",
    "contrastive_rows_bwd",
]


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _dot_tile(a_ptr, b_ptr, rows64, r_ok, cols64, c_ok, D,
              stride_am, stride_ad, stride_bn, stride_bd,
              PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """<a[i], b[j]> for a tile of rows i and columns j, (BLOCK_M, BLOCK_N) float32 (unscaled)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        a = tl.load(a_ptr + rows64[:, None] * stride_am + dd[None, :] * stride_ad,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        # b loaded transposed: (BLOCK_D, BLOCK_N)
        bt = tl.load(b_ptr + cols64[None, :] * stride_bn + dd[:, None] * stride_bd,
                     mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=PREC, out_dtype=tl.float32)
    return acc


@triton.jit
def _lse_merge(m, l, m2, l2):
    """Merge two (running max, sum exp(x - max)) pairs; -inf maxima (empty sets) are safe."""
    new_m = tl.maximum(m, m2)
    safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    new_l = l * tl.exp(m - safe) + l2 * tl.exp(m2 - safe)
    return new_m, new_l


@triton.jit
def _lse_from_slots(m, l, max_ptr, sum_ptr, idx64, ok, M, n_slots):
    """Fold the (max, sum) partials of n_slots slots of an (n_slots, M) buffer into (m, l) and return the
    log-sum-exp (0 where ``ok`` is False). Pointers advance by M per slot (64-bit pointer arithmetic)."""
    pm = max_ptr + idx64
    ps = sum_ptr + idx64
    for _ in range(0, n_slots):
        mk = tl.load(pm, mask=ok, other=float("-inf"))
        lk = tl.load(ps, mask=ok, other=0.0)
        m, l = _lse_merge(m, l, mk, lk)
        pm += M
        ps += M
    m = tl.where(ok, m, 0.0)
    l = tl.where(ok, l, 1.0)
    return m + tl.log(l)


@triton.jit
def _fwd_tiles_kernel(
    a_ptr, b_ptr, scale_ptr, ids_a_ptr, ids_b_ptr,
    rmax_ptr, rsum_ptr, cmax_ptr, csum_ptr,
    M, N, D, rblocks_per_split, cblocks_per_split,
    stride_am, stride_ad, stride_bn, stride_bd, stride_ida, stride_idb,
    HAS_IDS: tl.constexpr, SYM: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)

    n_rb = tl.cdiv(M, BLOCK_M)
    n_cb = tl.cdiv(N, BLOCK_N)
    rb_lo = pid_r * rblocks_per_split
    rb_hi = tl.minimum(rb_lo + rblocks_per_split, n_rb)
    cb_lo = pid_c * cblocks_per_split
    cb_hi = tl.minimum(cb_lo + cblocks_per_split, n_cb)

    # row partials of this column split: slot pid_c of (n_col_splits, M)
    rpart = pid_c.to(tl.int64) * M
    # column partials of this row split: slot pid_r of (n_row_splits, N)
    cpart = pid_r.to(tl.int64) * N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    for rb in range(rb_lo, rb_hi):
        rows = rb * BLOCK_M + offs_m
        r_ok = rows < M
        rows64 = rows.to(tl.int64)
        if HAS_IDS:
            ids_r = tl.load(ids_a_ptr + rows64 * stride_ida, mask=r_ok, other=0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # the first row block of this program initialises its column slot
        col_prev = rb > rb_lo

        for cb in range(cb_lo, cb_hi):
            cols = cb * BLOCK_N + offs_n
            c_ok = cols < N
            cols64 = cols.to(tl.int64)
            acc = _dot_tile(a_ptr, b_ptr, rows64, r_ok, cols64, c_ok, D,
                            stride_am, stride_ad, stride_bn, stride_bd,
                            PREC, BLOCK_M, BLOCK_N, BLOCK_D)
            valid = r_ok[:, None] & c_ok[None, :]
            if HAS_IDS:
                ids_c = tl.load(ids_b_ptr + cols64 * stride_idb, mask=c_ok, other=0)
                keep = ids_r[:, None] != ids_c[None, :]
                if SYM:
                    keep = keep | (rows[:, None] == cols[None, :])
                valid = valid & keep
            sm = tl.where(valid, acc * scale, float("-inf"))

            # row direction: online log-sum-exp over the columns
            m_new = tl.maximum(m_i, tl.max(sm, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # row with nothing valid yet
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sm - m_safe[:, None]), axis=1)
            m_i = m_new

            if SYM:
                # column direction from the same tile
                c_max = tl.max(sm, axis=0)
                c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
                c_sum = tl.sum(tl.exp(sm - c_safe[None, :]), axis=0)
                cptr = cpart + cols64
                old_max = tl.load(cmax_ptr + cptr, mask=c_ok & col_prev, other=float("-inf"))
                old_sum = tl.load(csum_ptr + cptr, mask=c_ok & col_prev, other=0.0)
                new_max, new_sum = _lse_merge(old_max, old_sum, c_max, c_sum)
                tl.store(cmax_ptr + cptr, new_max, mask=c_ok)
                tl.store(csum_ptr + cptr, new_sum, mask=c_ok)

        tl.store(rmax_ptr + rpart + rows64, m_i, mask=r_ok)
        tl.store(rsum_ptr + rpart + rows64, l_i, mask=r_ok)
        if SYM:
            # the column slot is re-read for the next row block, possibly by
            # other threads of this program than those that wrote it
            tl.debug_barrier()


@triton.jit
def _fwd_finalize_kernel(
    a_ptr, p_ptr, scale_ptr,
    rmax_ptr, rsum_ptr, n_row_slots, cmax_ptr, csum_ptr, n_col_slots,
    row_lse_ptr, col_lse_ptr, loss_part_ptr,
    M, D,
    stride_am, stride_ad, stride_pm, stride_pd,
    SYM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M
    idx64 = idx.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    # pos[i] = s <a_i, p_i>  (p = text for the symmetric loss, positive for rows)
    dot = tl.zeros((BLOCK,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        msk = ok[:, None] & (dd < D)[None, :]
        a = tl.load(a_ptr + idx64[:, None] * stride_am + dd[None, :] * stride_ad, mask=msk, other=0.0)
        p = tl.load(p_ptr + idx64[:, None] * stride_pm + dd[None, :] * stride_pd, mask=msk, other=0.0)
        dot += tl.sum(a.to(tl.float32) * p.to(tl.float32), axis=1)
    pos = dot * scale

    if SYM:
        # the diagonal term is already inside the tiles' sums
        m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK,), dtype=tl.float32)
    else:
        # lse = log(exp(pos) + sum_valid exp(L))
        m = pos
        l = tl.full((BLOCK,), 1.0, dtype=tl.float32)
    row_lse = _lse_from_slots(m, l, rmax_ptr, rsum_ptr, idx64, ok, M, n_row_slots)
    tl.store(row_lse_ptr + idx64, row_lse, mask=ok)
    contrib = row_lse - pos

    if SYM:
        col_lse = _lse_from_slots(tl.full((BLOCK,), float("-inf"), dtype=tl.float32),
                                  tl.zeros((BLOCK,), dtype=tl.float32), cmax_ptr, csum_ptr, idx64, ok, M,
                                  n_col_slots)
        tl.store(col_lse_ptr + idx64, col_lse, mask=ok)
        contrib += col_lse - pos

    tl.store(loss_part_ptr + pid, tl.sum(tl.where(ok, contrib, 0.0), axis=0))


@triton.jit
def _bwd_kernel(
    own_ptr, oth_ptr, posf_ptr, scale_ptr, g_ptr,
    lse_own_ptr, lse_oth_ptr, ids_own_ptr, ids_oth_ptr,
    down_ptr, dposf_ptr, gs_ptr,
    N_OWN, N_OTH, D, tiles_per_split, inv_count,
    stride_on, stride_od, stride_tn, stride_td, stride_pn, stride_pd,
    stride_dpn, stride_dpd, stride_ido, stride_idt,
    HAS_IDS: tl.constexpr, SYM: tl.constexpr, LSE_OWN: tl.constexpr, LSE_OTH: tl.constexpr,
    HAS_POS: tl.constexpr, NEED_OWN: tl.constexpr, NEED_POS: tl.constexpr, WRITE_GS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_split = tl.num_programs(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(g_ptr).to(tl.float32) * inv_count   # grad_loss / (2B) or grad_loss_sum
    cs = coef * scale
    op_ty = own_ptr.dtype.element_ty

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + offs_m
    r_ok = rows < N_OWN
    rows64 = rows.to(tl.int64)
    # this program's slice of the own gradient: columns [pid_d * BLOCK_DO, + BLOCK_DO) of D
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    out_msk = r_ok[:, None] & do_ok[None, :]
    first_slice = pid_d == 0

    if LSE_OWN:
        lse_r = tl.load(lse_own_ptr + rows64, mask=r_ok, other=0.0)
    if HAS_IDS:
        ids_r = tl.load(ids_own_ptr + rows64 * stride_ido, mask=r_ok, other=0)
    gs_vec = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # own gradient / cs, in registers for the whole sweep (no partial results through global memory)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)

    if HAS_POS:
        # rows loss, own = query: the positive column, handled by split 0. d_query starts at
        # (p_pos - 1) * positive, d_positive = cs (p_pos - 1) * query.
        if pid_s == 0:
            dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
            offs_d = tl.arange(0, BLOCK_D)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                msk = r_ok[:, None] & (dd < D)[None, :]
                q = tl.load(own_ptr + rows64[:, None] * stride_on + dd[None, :] * stride_od, mask=msk, other=0.0)
                p = tl.load(posf_ptr + rows64[:, None] * stride_pn + dd[None, :] * stride_pd, mask=msk, other=0.0)
                dot += tl.sum(q.to(tl.float32) * p.to(tl.float32), axis=1)
            e = tl.where(r_ok, tl.exp(dot * scale - lse_r) - 1.0, 0.0)   # p_pos - 1
            if first_slice:
                gs_vec += e * dot
            if NEED_OWN:
                p = tl.load(posf_ptr + rows64[:, None] * stride_pn + do[None, :] * stride_pd, mask=out_msk, other=0.0)
                acc += e[:, None] * p.to(tl.float32)
            if NEED_POS:
                q = tl.load(own_ptr + rows64[:, None] * stride_on + do[None, :] * stride_od, mask=out_msk, other=0.0)
                tl.store(dposf_ptr + rows64[:, None] * stride_dpn + do[None, :] * stride_dpd,
                         ((cs * e)[:, None] * q.to(tl.float32)).to(dposf_ptr.dtype.element_ty), mask=out_msk)

    n_tiles = tl.cdiv(N_OTH, BLOCK_N)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        cols = t * BLOCK_N + offs_n
        c_ok = cols < N_OTH
        cols64 = cols.to(tl.int64)
        s_raw = _dot_tile(own_ptr, oth_ptr, rows64, r_ok, cols64, c_ok, D,
                          stride_on, stride_od, stride_tn, stride_td,
                          PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        s_t = s_raw * scale
        valid = r_ok[:, None] & c_ok[None, :]
        if HAS_IDS:
            ids_c = tl.load(ids_oth_ptr + cols64 * stride_idt, mask=c_ok, other=0)
            keep = ids_r[:, None] != ids_c[None, :]
            if SYM:
                keep = keep | (rows[:, None] == cols[None, :])
            valid = valid & keep
        # G / coef: probabilities of the directions that use this tile
        gu = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LSE_OWN:
            gu += tl.exp(tl.where(valid, s_t - lse_r[:, None], float("-inf")))
        if LSE_OTH:
            lse_c = tl.load(lse_oth_ptr + cols64, mask=c_ok, other=0.0)
            gu += tl.exp(tl.where(valid, s_t - lse_c[None, :], float("-inf")))
        if SYM:
            gu = tl.where(valid & (rows[:, None] == cols[None, :]), gu - 2.0, gu)
        if WRITE_GS:
            if first_slice:
                # sum G * S / s = coef * sum gu * <own, oth>
                gs_vec += tl.sum(gu * s_raw, axis=1)
        if NEED_OWN:
            o_t = tl.load(oth_ptr + cols64[:, None] * stride_tn + do[None, :] * stride_td,
                          mask=c_ok[:, None] & do_ok[None, :], other=0.0)
            acc = tl.dot(gu.to(op_ty), o_t, acc, input_precision=PREC, out_dtype=tl.float32)

    if NEED_OWN:
        # float32 partial of this split: slot pid_s of (n_splits, N_OWN, D), summed by the launcher
        slab = down_ptr + pid_s.to(tl.int64) * N_OWN * D + rows64[:, None] * D + do[None, :]
        tl.store(slab, acc * cs, mask=out_msk)
    if WRITE_GS:
        if first_slice:
            tl.store(gs_ptr + pid_m * n_split + pid_s, coef * tl.sum(gs_vec, axis=0))


# --------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------

_Config = namedtuple(
    "_Config",
    "fwd_m fwd_n fwd_d warps_fwd bwd_m bwd_n bwd_d bwd_do warps_bwd fin_block fin_d target max_bwd_splits",
)


def _pick_config(D: int, dtype: torch.dtype, prec: str, device: torch.device) -> _Config:
    """Block sizes, warp counts and split targets of all kernels (every tl.dot dim >= 16).

    GPU tiles are chosen so that ptxas reports no spills on sm_80 and sm_90 at the shapes the project is built
    for, with triton 3.6 and 3.8 (``python -m eclip_kernels.triton.aot --check``): bf16 / fp16 and TF32 tiles go to tensor cores;
    exact float32 products (FMA) need their operands in registers, hence smaller tiles. The backward keeps
    a (bwd_m x bwd_do) float32 slice of the own gradient in registers for its whole sweep; D wider than
    bwd_do is covered by more programs, each recomputing the logits.
    """
    def dblock(cap):
        return min(cap, max(16, triton.next_power_of_2(D)))

    geo = geometry(device)
    if not geo.gpu_tiles:
        # interpreter: small tiles, few programs, but still several splits and D slices so the multi-block /
        # multi-split paths run in tests
        return _Config(fwd_m=32, fwd_n=16, fwd_d=dblock(32), warps_fwd=4,
                       bwd_m=32, bwd_n=16, bwd_d=dblock(16), bwd_do=dblock(16), warps_bwd=4,
                       fin_block=32, fin_d=dblock(16), target=min(4, geo.programs), max_bwd_splits=4)
    if dtype == torch.float32 and prec == "ieee":
        return _Config(fwd_m=128, fwd_n=64, fwd_d=dblock(16), warps_fwd=8,
                       bwd_m=32, bwd_n=32, bwd_d=dblock(16), bwd_do=dblock(64), warps_bwd=4,
                       fin_block=128, fin_d=dblock(32), target=geo.programs, max_bwd_splits=16)
    # tensor cores (bf16 / fp16 operands, or float32 as TF32): the backward holds a 32 x 512 slice of the own
    # gradient (64 registers a thread at 8 warps), so at D <= 512 each sweep computes the logits once
    tf32 = dtype == torch.float32
    return _Config(fwd_m=128, fwd_n=64, fwd_d=dblock(64), warps_fwd=8,
                   bwd_m=32, bwd_n=32 if tf32 else 64, bwd_d=dblock(32 if tf32 else 64), bwd_do=dblock(512),
                   warps_bwd=8, fin_block=128, fin_d=dblock(32), target=geo.programs, max_bwd_splits=16)


def _splits(n_blocks: int, want: int):
    """(blocks per split, number of splits) with every split non-empty and at most ``want`` splits."""
    want = max(1, min(n_blocks, want))
    per = triton.cdiv(n_blocks, want)
    return per, triton.cdiv(n_blocks, per)


def _fwd_grid(M: int, N: int, cfg: _Config):
    """(row blocks per split, row splits, column blocks per split, column splits), at most cfg.target programs
    (one round of the device: a program more would run a whole extra round)."""
    n_rb = triton.cdiv(M, cfg.fwd_m)
    n_cb = triton.cdiv(N, cfg.fwd_n)
    rper, n_r = _splits(n_rb, min(n_rb, max(1, math.isqrt(cfg.target))))
    cper, n_c = _splits(n_cb, max(1, cfg.target // n_r))
    return rper, n_r, cper, n_c


def _bwd_grid(n_own: int, n_oth: int, D: int, cfg: _Config):
    """(own blocks, other-side tiles per split, splits, D slices): the splits fill what own blocks and D
    slices leave of cfg.target, so the grid never exceeds it unless own blocks x slices alone do."""
    n_ob = triton.cdiv(n_own, cfg.bwd_m)
    n_dr = triton.cdiv(D, cfg.bwd_do)
    n_tb = triton.cdiv(n_oth, cfg.bwd_n)
    tper, n_s = _splits(n_tb, min(cfg.max_bwd_splits, cfg.target // (n_ob * n_dr)))
    return n_ob, tper, n_s, n_dr


def _ids_args(ids, fallback):
    if ids is None:
        return fallback, 0
    return ids, ids.stride(0)


def _forward(a, b, p, scale, ids_a, ids_b, sym: bool):
    """Shared forward: tiles of s * a @ b^T; p gives the positives s <a_i, p_i>."""
    M, D = a.shape
    N = b.shape[0]
    dev = a.device
    prec = dot_precision(a.dtype, dev)
    cfg = _pick_config(D, a.dtype, prec, dev)
    has_ids = ids_a is not None and ids_b is not None
    ids_a_t, sida = _ids_args(ids_a if has_ids else None, a)
    ids_b_t, sidb = _ids_args(ids_b if has_ids else None, a)

    rper, n_r, cper, n_c = _fwd_grid(M, N, cfg)
    f32 = torch.float32
    rmax = torch.empty((n_c, M), dtype=f32, device=dev)
    rsum = torch.empty((n_c, M), dtype=f32, device=dev)
    if sym:
        cmax = torch.empty((n_r, N), dtype=f32, device=dev)
        csum = torch.empty((n_r, N), dtype=f32, device=dev)
    else:
        cmax, csum = rmax, rsum  # unused
    row_lse = torch.empty((M,), dtype=f32, device=dev)
    col_lse = torch.empty((M,), dtype=f32, device=dev) if sym else row_lse
    n_fin = triton.cdiv(M, cfg.fin_block)
    loss_part = torch.empty((n_fin,), dtype=f32, device=dev)
    with device_guard(dev):
        wrap_triton(_fwd_tiles_kernel)[(n_r, n_c)](
            a, b, scale, ids_a_t, ids_b_t,
            rmax, rsum, cmax, csum,
            M, N, D, rper, cper,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), sida, sidb,
            HAS_IDS=has_ids, SYM=sym, PREC=prec,
            BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=cfg.fwd_d,
            num_warps=cfg.warps_fwd,
        )
        wrap_triton(_fwd_finalize_kernel)[(n_fin,)](
            a, p, scale,
            rmax, rsum, n_c, cmax, csum, n_r if sym else 0,
            row_lse, col_lse, loss_part,
            M, D,
            a.stride(0), a.stride(1), p.stride(0), p.stride(1),
            SYM=sym, BLOCK=cfg.fin_block, BLOCK_D=cfg.fin_d,
            num_warps=4,
        )
    return loss_part, row_lse, col_lse


def _backward(g, own, oth, posf, scale, lse_own, lse_oth, ids_own, ids_oth, inv_count, sym,
              need_own, need_pos, write_gs):
    """One sweep with `own` rows per program, over every tile of `oth`.

    Returns (grad of own in own's dtype or None, grad of posf or None, grad_scale partials or None).
    lse_own / lse_oth: the log-sum-exps whose probabilities form G (None: that direction is not in G).
    """
    n_own, D = own.shape
    n_oth = oth.shape[0]
    dev = own.device
    prec = dot_precision(own.dtype, dev)
    cfg = _pick_config(D, own.dtype, prec, dev)
    if not need_own and not need_pos:
        cfg = cfg._replace(bwd_do=cfg.bwd_d)  # only the scale's gradient: one D slice, no own accumulator
    has_ids = ids_own is not None and ids_oth is not None
    ids_o_t, sido = _ids_args(ids_own if has_ids else None, own)
    ids_t_t, sidt = _ids_args(ids_oth if has_ids else None, own)
    n_ob, tper, n_s, n_dr = _bwd_grid(n_own, n_oth, D, cfg)

    f32 = torch.float32
    slab = torch.empty((n_s, n_own, D), dtype=f32, device=dev) if need_own else None
    has_pos = posf is not None
    d_posf = torch.empty((n_own, D), dtype=posf.dtype, device=dev) if has_pos and need_pos else None
    pf, spn, spd = (posf, posf.stride(0), posf.stride(1)) if has_pos else (own, 0, 0)
    dpf, sdpn, sdpd = (d_posf, d_posf.stride(0), d_posf.stride(1)) if d_posf is not None else (own, 0, 0)
    gs = torch.empty((n_ob * n_s,), dtype=f32, device=dev) if write_gs else None
    placeholder = own  # pointer arguments a mode does not read or write
    with device_guard(dev):
        wrap_triton(_bwd_kernel)[(n_ob, n_s, n_dr)](
            own, oth, pf, scale, g,
            lse_own if lse_own is not None else placeholder, lse_oth if lse_oth is not None else placeholder,
            ids_o_t, ids_t_t,
            slab if slab is not None else placeholder, dpf, gs if gs is not None else placeholder,
            n_own, n_oth, D, tper, float(inv_count),
            own.stride(0), own.stride(1), oth.stride(0), oth.stride(1), spn, spd,
            sdpn, sdpd, sido, sidt,
            HAS_IDS=has_ids, SYM=sym, LSE_OWN=lse_own is not None, LSE_OTH=lse_oth is not None,
            HAS_POS=has_pos, NEED_OWN=need_own, NEED_POS=d_posf is not None, WRITE_GS=write_gs, PREC=prec,
            BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, BLOCK_D=cfg.bwd_d, BLOCK_DO=cfg.bwd_do,
            num_warps=cfg.warps_bwd,
        )
    d_own = None
    if need_own:
        d_own = (slab[0] if n_s == 1 else slab.sum(dim=0)).to(own.dtype)
    return d_own, d_posf, gs


def _scalar(x):
    """0-d device tensor used only as a value (its data pointer)."""
    return x.detach()


def _empty_grad(like):
    """Placeholder returned for a gradient that was not asked for (the op's autograd returns None for it)."""
    return like.new_empty((0,))


# --------------------------------------------------------------------------
# Public launchers
# --------------------------------------------------------------------------


def clip_loss_fwd(image, text, logit_scale, ids):
    """Returns (loss 0-d f32, row_lse (B,) f32, col_lse (B,) f32)."""
    B = image.shape[0]
    scale = _scalar(logit_scale)
    loss_part, row_lse, col_lse = _forward(image, text, text, scale, ids, ids, sym=True)
    loss = loss_part.sum() / (2 * B)
    return loss, row_lse, col_lse


def clip_loss_bwd(grad_loss, image, text, logit_scale, ids, row_lse, col_lse, output_mask=(True, True, True)):
    """Returns (grad_image, grad_text in the feature dtype, grad_scale 0-d in logit_scale's dtype); a gradient
    whose ``output_mask`` entry is False is not computed (an empty tensor stands in its place).

    Two sweeps, one per side, each holding its own gradient in registers: G @ text with image rows per
    program, then G^T @ image with text rows per program (no atomics: deterministic).
    """
    need_img, need_txt, need_scale = (bool(x) for x in output_mask)
    B = image.shape[0]
    scale = _scalar(logit_scale)
    g = _scalar(grad_loss)
    row_lse = row_lse.to(torch.float32).contiguous()
    col_lse = col_lse.to(torch.float32).contiguous()
    inv = 1.0 / (2 * B)
    d_img = d_txt = gs = None
    if need_img or (need_scale and not need_txt):
        d_img, _, gs = _backward(g, image, text, None, scale, row_lse, col_lse, ids, ids, inv, True,
                                 need_img, False, need_scale)
    if need_txt:
        d_txt, _, gs_t = _backward(g, text, image, None, scale, col_lse, row_lse, ids, ids, inv, True,
                                   True, False, need_scale and gs is None)
        gs = gs if gs is not None else gs_t
    return (d_img if need_img else _empty_grad(image),
            d_txt if need_txt else _empty_grad(text),
            gs.sum().to(logit_scale.dtype) if need_scale else _empty_grad(logit_scale))


def contrastive_rows_fwd(query, positive, keys, logit_scale, query_ids, key_ids):
    """Returns (loss_sum 0-d f32, lse (M,) f32)."""
    scale = _scalar(logit_scale)
    loss_part, lse, _ = _forward(query, keys, positive, scale, query_ids, key_ids, sym=False)
    return loss_part.sum(), lse


def contrastive_rows_bwd(grad_loss_sum, query, positive, keys, logit_scale, query_ids, key_ids, lse,
                         output_mask=(True, True, True, True)):
    """Returns (grad_query, grad_positive, grad_keys in the feature dtype, grad_scale 0-d); a gradient whose
    ``output_mask`` entry is False is not computed (an empty tensor stands in its place). A bank of keys
    that needs no gradient (a momentum queue) costs no sweep of its own."""
    need_q, need_p, need_k, need_scale = (bool(x) for x in output_mask)
    scale = _scalar(logit_scale)
    g = _scalar(grad_loss_sum)
    lse = lse.to(torch.float32).contiguous()
    d_q = d_p = d_k = gs = None
    if need_q or need_p or need_scale:
        d_q, d_p, gs = _backward(g, query, keys, positive, scale, lse, None, query_ids, key_ids, 1.0, False,
                                 need_q, need_p, need_scale)
    if need_k:
        d_k, _, _ = _backward(g, keys, query, None, scale, None, lse, key_ids, query_ids, 1.0, False,
                              True, False, False)
    return (d_q if need_q else _empty_grad(query),
            d_p if need_p else _empty_grad(positive),
            d_k if need_k else _empty_grad(keys),
            gs.sum().to(logit_scale.dtype) if need_scale else _empty_grad(logit_scale))

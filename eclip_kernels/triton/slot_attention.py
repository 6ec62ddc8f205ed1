"""Triton forward / backward kernels of the fused slot-attention op.

The math, dtypes and edge cases follow the project's slot-attention contract
(softmax over the T queries per token, m = M + eps, A = m / S, out = A^T v,
ent = log S - (1/S) sum m log m).  Nothing of size B x N x T is written to
memory: both kernels walk the tokens in tiles of BLOCK_N tokens and keep
every (token tile) x T quantity in registers.

Forward, grid (B, n_splits, n_dv_slices):
    each program owns one sample, a contiguous range of token tiles (its
    split) and one BLOCK_DV slice of the value dim.  For every token tile it
    builds logits (BLOCK_N x BLOCK_T) with tl.dot, looping over D in BLOCK_D
    chunks, takes the per-token log-sum-exp over the queries, forms M and m,
    and accumulates S, sum m log m and the un-normalised output m^T v
    (BLOCK_T x BLOCK_DV) with tl.dot.  BLOCK_DV covers all of Dv where the
    accumulator fits in registers (bf16 / fp16 / TF32: Dv <= 512 at T <= 32),
    so k is read and the logits are computed once; otherwise programs on other
    Dv slices recompute them.  Only slice-0 programs write ent, S and lse.
    When the batch alone cannot fill the device (B x slices < 2 programs per
    multiprocessor: small B, long N) the tokens are split: each split writes
    its partial sums (S, sum m log m, m^T v) in float32 and a merge kernel adds
    them in a fixed order (deterministic) and normalises.

Backward, grid (B, n_splits):
    each program owns one sample and a contiguous range of token tiles.  It
    recomputes M from q, k and the saved lse, uses the identity
    c[t] = <g_out[t], out[t]> + g_ent[t] (ent[t] - 1) (= sum_i A dA) so no
    extra pass over tokens is needed, and writes dk and dv of its tokens
    directly.  dq is a reduction over tokens, see the comment in the kernel.
    Gradients that autograd does not need (ctx.needs_input_grad) are not
    computed: their stores and the products that only they use are compiled
    out (NEED_DQ / NEED_DK / NEED_DV).

Offsets within a sample are 64-bit (rows * row stride can pass 2^31).
All accumulation is float32.  fp16 / bf16 tiles are fed to tl.dot in the
input dtype (probabilities cast down, as FlashAttention does) with float32
accumulators; float32 tiles follow torch's float32 matmul precision (exact
IEEE products at "highest", TF32 otherwise; see _launch.py).
"""

from collections import namedtuple

import torch
import triton
import triton.language as tl

from ._launch import MAXNREG, device_guard, dot_precision, geometry, wrap_triton

__all__ = ["slot_attention_fwd", "slot_attention_bwd"]


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _logits_tile(q_base, k_base, rows64, n_ok, offs_t, t_ok, offs_d, D,
                 stride_qt, stride_qd, stride_kn, stride_kd,
                 ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """<k[i], q[t]> for a tile of tokens (rows64) and all queries, shape (BLOCK_N, BLOCK_T); also
    <v[i], g_out[t]> in the backward (the g_out in the role of q, v in the role of k)."""
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        d_ok = cols < D
        k_tile = tl.load(k_base + rows64[:, None] * stride_kn + cols[None, :] * stride_kd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        # q loaded transposed: (BLOCK_D, BLOCK_T)
        q_tile = tl.load(q_base + offs_t[None, :] * stride_qt + cols[:, None] * stride_qd,
                         mask=d_ok[:, None] & t_ok[None, :], other=0.0)
        acc = tl.dot(k_tile, q_tile.to(k_tile.dtype), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _token_valid(mask_base, rows64, n_ok, stride_mn, HAS_MASK: tl.constexpr):
    valid = n_ok
    if HAS_MASK:
        mv = tl.load(mask_base + rows64 * stride_mn, mask=n_ok, other=0)
        valid = valid & (mv != 0)
    return valid


@triton.jit
def _entropy_update(s_acc, h_acc, ref, m):
    """Fold a tile of m (BLOCK_N x BLOCK_T) into the per-query sums S and h = sum m (log m - ref), where ref is
    a running max of log m. The entropy is then (log S - ref) - h / S, both terms of the size of log N: the
    plain log S - (sum m log m) / S subtracts two numbers of the size of |log m| (up to 87 nats for sharp
    logits) and loses that many ulps."""
    pos = m > 0
    log_m = tl.log(tl.where(pos, m, 1.0))
    new_ref = tl.maximum(ref, tl.max(tl.where(pos, log_m, float("-inf")), axis=0))
    finite = new_ref > float("-inf")
    shift = tl.where(finite, new_ref, 0.0)
    # re-reference what is accumulated (nothing yet where ref = -inf: S = h = 0 there)
    h_acc += s_acc * (tl.where(ref > float("-inf"), ref, shift) - shift)
    h_acc += tl.sum(tl.where(pos, m * (log_m - shift[None, :]), 0.0), axis=0)
    s_acc += tl.sum(m, axis=0)
    return s_acc, h_acc, new_ref


@triton.jit
def _finish(s_acc, h_acc, ref, o_acc, out_ptrs, out_msk, ent_ptrs, s_ptrs, stat_msk):
    """out = o / S, ent = (log S - ref) - h / S (0 where S = 0: no valid token), stored with S."""
    s_pos = s_acc > 0
    s_safe = tl.where(s_pos, s_acc, 1.0)
    inv_s = tl.where(s_pos, 1.0 / s_safe, 0.0)
    ent = tl.where(s_pos, tl.log(s_safe) - tl.where(s_pos, ref, 0.0) - h_acc * inv_s, 0.0)
    tl.store(out_ptrs, (o_acc * inv_s[:, None]).to(out_ptrs.dtype.element_ty), mask=out_msk)
    tl.store(ent_ptrs, ent.to(ent_ptrs.dtype.element_ty), mask=stat_msk)
    tl.store(s_ptrs, s_acc.to(s_ptrs.dtype.element_ty), mask=stat_msk)


@triton.jit
def _slot_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr,
    out_ptr, ent_ptr, s_ptr, lse_ptr, po_ptr, pst_ptr,
    T, N, D, DV, tiles_per_split,
    stride_qb, stride_qt, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_ot, stride_od,
    scale, eps,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, TINY: tl.constexpr, RESCALE: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    n_batch = tl.num_programs(0)
    b64 = pid_b.to(tl.int64)

    q_base = q_ptr + b64 * stride_qb
    k_base = k_ptr + b64 * stride_kb
    v_base = v_ptr + b64 * stride_vb
    mask_base = mask_ptr + b64 * stride_mb

    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    writes_stats = pid_v == 0

    s_acc = tl.zeros((BLOCK_T,), dtype=ACC)        # S[t]
    h_acc = tl.zeros((BLOCK_T,), dtype=ACC)        # sum_i m (log m - ref)
    ref = tl.full((BLOCK_T,), float("-inf"), dtype=ACC)  # running max_i log m
    o_acc = tl.zeros((BLOCK_T, BLOCK_DV), dtype=ACC)  # sum_i m v  (/ col_max if RESCALE)
    col_max = tl.zeros((BLOCK_T,), dtype=ACC)       # running max_i m (RESCALE only)

    n_tiles = tl.cdiv(N, BLOCK_N)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    for tile in range(tile_lo, tile_hi):
        rows = tile * BLOCK_N + offs_n
        n_ok = rows < N
        rows64 = rows.to(tl.int64)
        logits = _logits_tile(q_base, k_base, rows64, n_ok, offs_t, t_ok, offs_d, D,
                              stride_qt, stride_qd, stride_kn, stride_kd,
                              ACC, PREC, BLOCK_N, BLOCK_T, BLOCK_D)
        logits = tl.where(t_ok[None, :], logits * scale, float("-inf"))
        # per-token log-sum-exp over the queries (t = 0 always exists, so the max is finite)
        row_max = tl.max(logits, axis=1)
        p_sum = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)
        lse = row_max + tl.log(p_sum)

        valid = _token_valid(mask_base, rows64, n_ok, stride_mn, HAS_MASK)
        keep = valid[:, None] & t_ok[None, :]
        big_m = tl.exp(logits - lse[:, None])
        # M below the smallest normal float counts as underflowed (0), see _tiny
        big_m = tl.where(keep & (big_m >= TINY), big_m, 0.0)
        m = tl.where(keep, big_m + eps, 0.0)

        # 0 log 0 = 0: masked and underflowed entries add nothing
        s_acc, h_acc, ref = _entropy_update(s_acc, h_acc, ref, m)

        v_tile = tl.load(v_base + rows64[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                         mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        if RESCALE:
            # float16 operands: m is not normalised per query until the final
            # division by S, and a query that no token picks (eps = 0, sharp
            # logits) has all its m far below float16's range.  Keep a running
            # per-query max of m and feed m / max (in [0, 1]) to tl.dot,
            # rescaling the accumulator when the max grows.
            new_max = tl.maximum(col_max, tl.max(m, axis=0))
            inv_max = tl.where(new_max > 0, 1.0 / tl.where(new_max > 0, new_max, 1.0), 0.0)
            o_acc = o_acc * (col_max * inv_max)[:, None]
            p = m * inv_max[None, :]
            col_max = new_max
        else:
            p = m
        o_acc = tl.dot(tl.trans(p.to(v_tile.dtype)), v_tile, o_acc, input_precision=PREC, out_dtype=ACC)

        tl.store(lse_ptr + b64 * N + rows64, tl.where(valid, lse, 0.0).to(lse_ptr.dtype.element_ty),
                 mask=n_ok & writes_stats)

    if RESCALE:
        o_acc = o_acc * col_max[:, None]
    if SPLIT:
        # partial sums of this token range, float32: (n_splits, B, T, Dv) and (n_splits, B, 3, T)
        part = pid_s.to(tl.int64) * n_batch + b64
        po = po_ptr + part * T * DV + offs_t[:, None] * DV + offs_v[None, :]
        tl.store(po, o_acc, mask=t_ok[:, None] & v_ok[None, :])
        tl.store(pst_ptr + part * 3 * T + offs_t, s_acc, mask=t_ok & writes_stats)
        tl.store(pst_ptr + (part * 3 + 1) * T + offs_t, h_acc, mask=t_ok & writes_stats)
        tl.store(pst_ptr + (part * 3 + 2) * T + offs_t, ref, mask=t_ok & writes_stats)
    else:
        _finish(s_acc, h_acc, ref, o_acc,
                out_ptr + b64 * stride_ob + offs_t[:, None] * stride_ot + offs_v[None, :] * stride_od,
                t_ok[:, None] & v_ok[None, :],
                ent_ptr + b64 * T + offs_t, s_ptr + b64 * T + offs_t, t_ok & writes_stats)


@triton.jit
def _slot_attn_fwd_merge_kernel(
    po_ptr, pst_ptr, out_ptr, ent_ptr, s_ptr,
    n_splits, T, DV,
    stride_ob, stride_ot, stride_od,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Adds the token splits' partial sums in split order (deterministic) and normalises."""
    pid_b = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_batch = tl.num_programs(0)
    b64 = pid_b.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    o_msk = t_ok[:, None] & v_ok[None, :]
    s_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    h_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    ref = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    o_acc = tl.zeros((BLOCK_T, BLOCK_DV), dtype=tl.float32)
    for sp in range(0, n_splits):
        part = sp * n_batch + b64
        s_p = tl.load(pst_ptr + part * 3 * T + offs_t, mask=t_ok, other=0.0)
        h_p = tl.load(pst_ptr + (part * 3 + 1) * T + offs_t, mask=t_ok, other=0.0)
        ref_p = tl.load(pst_ptr + (part * 3 + 2) * T + offs_t, mask=t_ok, other=float("-inf"))
        # both sums to the larger reference (a split with S = 0 adds nothing)
        new_ref = tl.maximum(ref, ref_p)
        shift = tl.where(new_ref > float("-inf"), new_ref, 0.0)
        h_acc += s_acc * (tl.where(ref > float("-inf"), ref, shift) - shift)
        h_acc += h_p + s_p * (tl.where(ref_p > float("-inf"), ref_p, shift) - shift)
        s_acc += s_p
        ref = new_ref
        o_acc += tl.load(po_ptr + part * T * DV + offs_t[:, None] * DV + offs_v[None, :], mask=o_msk, other=0.0)
    _finish(s_acc, h_acc, ref, o_acc,
            out_ptr + b64 * stride_ob + offs_t[:, None] * stride_ot + offs_v[None, :] * stride_od, o_msk,
            ent_ptr + b64 * T + offs_t, s_ptr + b64 * T + offs_t, t_ok & (pid_v == 0))


@triton.jit
def _slot_attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr,
    gout_ptr, gent_ptr, out_ptr, ent_ptr, s_ptr, lse_ptr,
    dqp_ptr, dk_ptr, dv_ptr,
    T, N, D, DV, tiles_per_split,
    stride_qb, stride_qt, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_gb, stride_gt, stride_gd,
    stride_ob, stride_ot, stride_od,
    stride_dkb, stride_dkn, stride_dkd,
    stride_dvb, stride_dvn, stride_dvd,
    scale, eps,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, TINY: tl.constexpr, PREC: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_batch = tl.num_programs(0)
    b64 = pid_b.to(tl.int64)

    q_base = q_ptr + b64 * stride_qb
    k_base = k_ptr + b64 * stride_kb
    v_base = v_ptr + b64 * stride_vb
    mask_base = mask_ptr + b64 * stride_mb
    g_base = gout_ptr + b64 * stride_gb
    o_base = out_ptr + b64 * stride_ob
    dk_base = dk_ptr + b64 * stride_dkb
    dv_base = dv_ptr + b64 * stride_dvb
    # dq partial slab owned by this (split, sample): contiguous (T, D) float32
    dqp_base = dqp_ptr + (pid_s.to(tl.int64) * n_batch + b64) * T * D

    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # ---- per-query constants: S, log S, 1/S, g_ent and c = sum_i A dA (from forward outputs)
    s_val = tl.load(s_ptr + b64 * T + offs_t, mask=t_ok, other=0.0).to(ACC)
    s_pos = s_val > 0
    s_safe = tl.where(s_pos, s_val, 1.0)
    inv_s = tl.where(s_pos, 1.0 / s_safe, 0.0)
    log_s = tl.log(s_safe)
    g_ent = tl.load(gent_ptr + b64 * T + offs_t, mask=t_ok, other=0.0).to(ACC)
    c = tl.zeros((BLOCK_T,), dtype=ACC)
    if NEED_DQ or NEED_DK:
        ent = tl.load(ent_ptr + b64 * T + offs_t, mask=t_ok, other=0.0).to(ACC)
        c = g_ent * (ent - 1.0)
        for e0 in range(0, DV, BLOCK_DV):
            cols = e0 + offs_dv
            msk = t_ok[:, None] & (cols < DV)[None, :]
            g = tl.load(g_base + offs_t[:, None] * stride_gt + cols[None, :] * stride_gd, mask=msk, other=0.0)
            o = tl.load(o_base + offs_t[:, None] * stride_ot + cols[None, :] * stride_od, mask=msk, other=0.0)
            c += tl.sum(g.to(ACC) * o.to(ACC), axis=1)

    n_tiles = tl.cdiv(N, BLOCK_N)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)

    for tile in range(tile_lo, tile_hi):
        rows = tile * BLOCK_N + offs_n
        n_ok = rows < N
        rows64 = rows.to(tl.int64)
        logits = _logits_tile(q_base, k_base, rows64, n_ok, offs_t, t_ok, offs_d, D,
                              stride_qt, stride_qd, stride_kn, stride_kd,
                              ACC, PREC, BLOCK_N, BLOCK_T, BLOCK_D)
        lse = tl.load(lse_ptr + b64 * N + rows64, mask=n_ok, other=0.0).to(ACC)
        valid = _token_valid(mask_base, rows64, n_ok, stride_mn, HAS_MASK)
        keep = valid[:, None] & t_ok[None, :]
        # M recomputed from the saved lse; zero on masked tokens / padded queries
        big_m = tl.exp(tl.where(keep, logits * scale - lse[:, None], float("-inf")))
        big_m = tl.where(big_m >= TINY, big_m, 0.0)   # same underflow rule as the forward
        m = tl.where(keep, big_m + eps, 0.0)

        if NEED_DV:
            # dv[i] = sum_t A[i, t] g_out[t]
            a_in = (m * inv_s[None, :]).to(v_ptr.dtype.element_ty)
            for e0 in range(0, DV, BLOCK_DV):
                cols = e0 + offs_dv
                e_ok = cols < DV
                g = tl.load(g_base + offs_t[:, None] * stride_gt + cols[None, :] * stride_gd,
                            mask=t_ok[:, None] & e_ok[None, :], other=0.0)
                dv_tile = tl.dot(a_in, g.to(a_in.dtype), input_precision=PREC, out_dtype=ACC)
                tl.store(dv_base + rows64[:, None] * stride_dvn + cols[None, :] * stride_dvd,
                         dv_tile.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & e_ok[None, :])

        if NEED_DQ or NEED_DK:
            # gv[i, t] = <g_out[t], v[i]>: the same (token tile) x (queries) product as the logits
            gv = _logits_tile(g_base, v_base, rows64, n_ok, offs_t, t_ok, offs_dv, DV,
                              stride_gt, stride_gd, stride_vn, stride_vd,
                              ACC, PREC, BLOCK_N, BLOCK_T, BLOCK_DV)
            # log A, replaced by 0 where m == 0 (its factor M is 0 there). log(m / S) rather than log m - log S:
            # for a query no token picks, m and S are both tiny and their logs large (the difference would lose
            # that many ulps); m / S is a normal number unless it underflows, then the difference is used.
            a_val = m * inv_s[None, :]
            log_a = tl.where(a_val >= TINY, tl.log(tl.where(a_val >= TINY, a_val, 1.0)),
                             tl.log(tl.where(m > 0, m, 1.0)) - log_s[None, :])
            log_a = tl.where(m > 0, log_a, 0.0)
            d_a = gv - g_ent[None, :] * (log_a + 1.0)
            # dm = (dA - c) / S can overflow for tiny S, but M / S <= 1 and m / S <= 1
            # (S sums them), so the products are formed as (M / S) (dA - c) instead:
            #   M dm = r (dA - c),  dlogit = M dm - M sum_t' M dm,  with r = M / S.
            r = big_m * inv_s[None, :]
            m_dm = tl.where(keep, r * (d_a - c[None, :]), 0.0)
            d_logit = m_dm - big_m * tl.sum(m_dm, axis=1)[:, None]

            # dk[i] = scale sum_t dlogit q[t];  dq[t] += scale sum_i dlogit k[i]
            #
            # dq is a reduction over all N tokens.  Instead of float atomics (order
            # dependent, so not bit-reproducible) every (split, sample) program owns
            # a private float32 slab of shape (T, D) in a (n_splits, B, T, D) buffer
            # and accumulates its token tiles into it (read-add-write; the first
            # tile of the range skips the read).  The launcher sums the slabs over
            # the split axis afterwards, which is deterministic.  n_splits is
            # bounded by the launcher so the buffer stays ~ max(B, a few x #SMs) x T x D.
            dl_in = (d_logit * scale).to(k_ptr.dtype.element_ty)
            not_first = tile > tile_lo
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs_d
                d_ok = cols < D
                if NEED_DK:
                    q_tile = tl.load(q_base + offs_t[:, None] * stride_qt + cols[None, :] * stride_qd,
                                     mask=t_ok[:, None] & d_ok[None, :], other=0.0)
                    dk_tile = tl.dot(dl_in, q_tile.to(dl_in.dtype), input_precision=PREC, out_dtype=ACC)
                    tl.store(dk_base + rows64[:, None] * stride_dkn + cols[None, :] * stride_dkd,
                             dk_tile.to(dk_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
                if NEED_DQ:
                    k_tile = tl.load(k_base + rows64[:, None] * stride_kn + cols[None, :] * stride_kd,
                                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                    slab_ptrs = dqp_base + offs_t[:, None] * D + cols[None, :]
                    slab_msk = t_ok[:, None] & d_ok[None, :]
                    prev = tl.load(slab_ptrs, mask=slab_msk & not_first, other=0.0).to(ACC)
                    acc = tl.dot(tl.trans(dl_in), k_tile, prev, input_precision=PREC, out_dtype=ACC)
                    tl.store(slab_ptrs, acc.to(dqp_ptr.dtype.element_ty), mask=slab_msk)
            if NEED_DQ:
                # The slab is re-read on the next tile, possibly by other threads of
                # this program than the ones that wrote it: make the writes visible.
                tl.debug_barrier()


# --------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------

_Config = namedtuple(
    "_Config",
    "block_t block_d block_n_fwd block_dv_fwd warps_fwd block_n_bwd block_d_bwd block_dv_bwd warps_bwd",
)


def _pick_config(T: int, D: int, Dv: int, dtype: torch.dtype, prec: str, gpu_tiles: bool) -> _Config:
    """Block sizes and warp counts of both kernels (every tl.dot dim >= 16).

    GPU tiles are chosen so that ptxas reports no spills on sm_80 and sm_90 at the shapes the project is built
    for, with triton 3.6 and 3.8 (``python -m eclip_kernels.triton.aot --check``). bf16 / fp16 tiles keep the
    forward's (BLOCK_T x BLOCK_DV) float32 accumulator over all of Dv up to 16K elements (64 registers a
    thread at 8 warps): at T <= 32 and Dv <= 512, k is read and the logits computed once. TF32 operands are
    twice as large (Dv slices of up to 8K elements). Exact float32 products (FMA) hold their operands in
    registers: small tiles, and the forward splits Dv across programs.
    """
    def p2(x, lo, hi):
        return min(hi, max(lo, triton.next_power_of_2(x)))

    block_t = p2(T, 16, 64)
    if not gpu_tiles:
        # interpreter: small tiles so that the token loops, Dv slices and D chunks all take several steps
        return _Config(block_t, p2(D, 16, 32), 32, p2(Dv, 16, 32), 4, 32, p2(D, 16, 32), p2(Dv, 16, 32), 4)
    if dtype == torch.float32 and prec == "ieee":
        block_dv_fwd = p2(Dv, 16, 2048 // block_t)
        return _Config(block_t, p2(D, 16, 16), 32, block_dv_fwd, 8, 32, p2(D, 16, 16), p2(Dv, 16, 16), 4)
    if dtype == torch.float32:  # TF32: operands twice the size of bf16 ones
        block_dv_fwd = p2(Dv, 16, 8192 // block_t)
        return _Config(block_t, p2(D, 16, 32), 32, block_dv_fwd, 4, 64 if block_t <= 32 else 32, p2(D, 16, 64),
                       p2(Dv, 16, 32), 8 if block_t <= 32 else 4)
    block_dv_fwd = p2(Dv, 16, 16384 // block_t)
    return _Config(block_t, p2(D, 16, 64), 32, block_dv_fwd, 8, 64 if block_t <= 32 else 32, p2(D, 16, 64),
                   p2(Dv, 16, 32), 8 if block_t <= 32 else 4)


_MAX_SPLITS = 32


def _tiny(dtype: torch.dtype) -> float:
    """Smallest normal number of the accumulation type.

    M = exp(logit - lse) values below it are treated as underflowed to 0 in
    both kernels (the contract's "M underflowed" case).  This keeps every
    nonzero m, hence every nonzero S, a normal number, so 1/S stays finite and
    the result does not depend on how a GPU handles subnormals.
    """
    return 2.0 ** -1022 if dtype == torch.float64 else 2.0 ** -126


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _mask_args(mask, fallback):
    if mask is None:
        return fallback, 0, 0, False
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1), True


def _token_splits(n_tiles: int, want: int):
    """(tiles per split, number of splits), every split non-empty, at most ``want`` splits."""
    want = max(1, min(n_tiles, want))
    per = triton.cdiv(n_tiles, want)
    return per, triton.cdiv(n_tiles, per)


# --------------------------------------------------------------------------
# Public launchers
# --------------------------------------------------------------------------


def slot_attention_fwd(q, k, v, mask, scale: float, eps: float):
    """Returns (out (B,T,Dv) input dtype, ent (B,T) f32, S (B,T) f32, lse (B,N) f32)."""
    B, T, D = q.shape
    N = k.shape[1]
    Dv = v.shape[2]
    dev = q.device
    sdt = _stat_dtype(q.dtype)
    out = torch.empty((B, T, Dv), dtype=q.dtype, device=dev)
    ent = torch.empty((B, T), dtype=sdt, device=dev)
    S = torch.empty((B, T), dtype=sdt, device=dev)
    lse = torch.empty((B, N), dtype=sdt, device=dev)
    if B == 0 or T == 0:
        lse.zero_()
        return out, ent, S, lse

    geo = geometry(dev)
    prec = dot_precision(q.dtype, dev)
    cfg = _pick_config(T, D, Dv, q.dtype, prec, geo.gpu_tiles)
    n_dv = triton.cdiv(Dv, cfg.block_dv_fwd)
    # split the tokens only when the batch and Dv slices leave the device under-filled (no grid overshoot)
    tiles_per_split, n_splits = _token_splits(triton.cdiv(N, cfg.block_n_fwd), geo.programs // (B * n_dv))
    split = n_splits > 1
    if split:
        po = torch.empty((n_splits, B, T, Dv), dtype=torch.float32, device=dev)
        pst = torch.empty((n_splits, B, 3, T), dtype=torch.float32, device=dev)
    else:
        po = pst = S  # unused
    mask_t, smb, smn, has_mask = _mask_args(mask, k)
    with device_guard(dev):
        wrap_triton(_slot_attn_fwd_kernel)[(B, n_splits, n_dv)](
            q, k, v, mask_t,
            out, ent, S, lse, po, pst,
            T, N, D, Dv, tiles_per_split,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            smb, smn,
            out.stride(0), out.stride(1), out.stride(2),
            float(scale), float(eps),
            HAS_MASK=has_mask, ACC=_acc_dtype(q.dtype), TINY=_tiny(q.dtype),
            RESCALE=q.dtype == torch.float16, SPLIT=split, PREC=prec,
            BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n_fwd,
            BLOCK_D=cfg.block_d, BLOCK_DV=cfg.block_dv_fwd,
            num_warps=cfg.warps_fwd, maxnreg=MAXNREG,
        )
        if split:
            block_dv = min(cfg.block_dv_fwd, max(16, 4096 // cfg.block_t))
            wrap_triton(_slot_attn_fwd_merge_kernel)[(B, triton.cdiv(Dv, block_dv))](
                po, pst, out, ent, S,
                n_splits, T, Dv,
                out.stride(0), out.stride(1), out.stride(2),
                BLOCK_T=cfg.block_t, BLOCK_DV=block_dv,
                num_warps=4,
            )
    return out, ent, S, lse


def slot_attention_bwd(grad_out, grad_ent, q, k, v, mask, out, ent, S, lse, scale: float, eps: float,
                       output_mask=(True, True, True)):
    """Returns (grad_q, grad_k, grad_v) in the input dtype; a gradient whose ``output_mask`` entry is False is
    not computed (an empty tensor stands in its place)."""
    need_dq, need_dk, need_dv = (bool(x) for x in output_mask)
    B, T, D = q.shape
    N = k.shape[1]
    Dv = v.shape[2]
    dev = q.device
    sdt = _stat_dtype(q.dtype)
    grad_k = torch.empty((B, N, D) if need_dk else (0,), dtype=k.dtype, device=dev)
    grad_v = torch.empty((B, N, Dv) if need_dv else (0,), dtype=v.dtype, device=dev)
    if B == 0 or T == 0 or N == 0 or not (need_dq or need_dk or need_dv):
        grad_k.zero_()
        grad_v.zero_()
        return q.new_zeros(q.shape if need_dq else (0,)), grad_k, grad_v

    if grad_ent is None:
        grad_ent = torch.zeros((B, T), dtype=sdt, device=dev)
    # (B, T) sized, cheap to normalise
    grad_ent = grad_ent.to(sdt).contiguous()
    ent = ent.to(sdt).contiguous()
    S = S.to(sdt).contiguous()
    lse = lse.to(sdt).contiguous()

    geo = geometry(dev)
    prec = dot_precision(q.dtype, dev)
    cfg = _pick_config(T, D, Dv, q.dtype, prec, geo.gpu_tiles)
    n_tiles = triton.cdiv(N, cfg.block_n_bwd)
    tiles_per_split, n_splits = _token_splits(n_tiles, min(_MAX_SPLITS, max(1, geo.programs // B)))
    dq_part = torch.empty((n_splits, B, T, D) if need_dq else (0,), dtype=sdt, device=dev)

    mask_t, smb, smn, has_mask = _mask_args(mask, k)
    dk_t = grad_k if need_dk else k  # placeholders for what is not written
    dv_t = grad_v if need_dv else v
    with device_guard(dev):
        wrap_triton(_slot_attn_bwd_kernel)[(B, n_splits)](
            q, k, v, mask_t,
            grad_out, grad_ent, out, ent, S, lse,
            dq_part if need_dq else S, dk_t, dv_t,
            T, N, D, Dv, tiles_per_split,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            smb, smn,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            dk_t.stride(0), dk_t.stride(1), dk_t.stride(2),
            dv_t.stride(0), dv_t.stride(1), dv_t.stride(2),
            float(scale), float(eps),
            HAS_MASK=has_mask, ACC=_acc_dtype(q.dtype), TINY=_tiny(q.dtype), PREC=prec,
            NEED_DQ=need_dq, NEED_DK=need_dk, NEED_DV=need_dv,
            BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n_bwd,
            BLOCK_D=cfg.block_d_bwd, BLOCK_DV=cfg.block_dv_bwd,
            num_warps=cfg.warps_bwd, maxnreg=MAXNREG,
        )
    if need_dq:
        grad_q = (dq_part[0] if n_splits == 1 else dq_part.sum(dim=0)).to(q.dtype)
    else:
        grad_q = q.new_empty((0,))
    return grad_q, grad_k, grad_v

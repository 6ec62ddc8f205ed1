"""Triton forward / backward kernels of the sigmoid (SigLIP) loss.

The math is in docs/contrastive.md: z = s <x_i, y_j> + b over every image i (M rows) and text j (N rows),
``l_ij = +1`` on the positives (equal ids, or j == i + offset) and -1 elsewhere, loss sum
``sum_ij softplus(-l_ij z_ij)``, and ``G = d loss / d z = -l sigmoid(-l z)``. Nothing of size M x N is ever
written to memory: every kernel walks tiles of ``A_blk @ B_blk^T`` (``_dot_tile`` of the contrastive
kernels: tl.dot, float32 accumulation, looping over D in BLOCK_D chunks), and the backward recomputes them.
The sigmoid loss has no per-row normalizer, so the forward saves nothing: no log-sum-exp, no second pass.

Cost in matrix-sized passes (one pass = one M x N x D product's worth of tl.dot work), as for the CLIP loss:

    forward:   1 pass, _siglip_fwd_kernel, grid (row splits, column splits) of the CLIP forward (at most one
               round of the device): program (r, c) walks its column blocks for each of its row blocks and
               writes one float32 partial loss per (row block, column split); the launcher adds the partials
               in float64, in a fixed order.
    backward:  4 passes: one sweep per side (_siglip_bwd_kernel). The image sweep recomputes each tile (1)
               and accumulates G @ text into a (BLOCK_M x BLOCK_DO) float32 slice of the image gradient held
               in registers (1); the text sweep does the same with the roles swapped (2). Grid (own blocks,
               splits of the other side, D slices), splits only where own blocks and D slices leave the
               device under-filled; each split writes one float32 partial, summed by the launcher in a fixed
               order. The logit-scale and logit-bias gradients (sum G <x, y> and sum G) are written as one
               partial per (own block, split) by the first sweep that runs. A side that needs no gradient
               costs no sweep.
    total:     5 passes, deterministic, no atomics.

Block sizes, warps and grids are the contrastive kernels' (``_pick_config``, ``_fwd_grid``, ``_bwd_grid``):
the tiles and register slices are the same shapes, and ``python -m eclip_kernels.triton.aot --check`` covers
these launches too (cases siglip-8192, siglip-65536, siglip-512x65536). The forward is launched with
``maxnreg=MAXNREG`` on both kernels: left to itself ptxas held the exact-float32 forward to 128 registers and spilled, and under triton 3.6 the fp16 / bf16 backward to 64 registers with 8 bytes of stack (sm_80); the exact-float32 forward takes 64-row tiles (:func:`_pick_config`). fp16 / bf16 tiles go to tl.dot in the input dtype (G, in [-1, 1], is rounded to it for the
second product, as the CLIP backward does) with float32 accumulators; float32 tiles follow torch's float32
matmul precision (exact at "highest", TF32 otherwise).

Numerics: softplus(u) = max(u, 0) + log1p(exp(-|u|)) with an accurate log1p (Goldberg's
``log(w) * e / (w - 1)``, w = 1 + e: a few ulps; plain log(1 + e) would lose the relative precision of the
many negatives' tiny terms exp(z) ~ e^-10); G = -l sigmoid(-l z) from exp(-|z|) (no overflow), no cancellation
for either label.
"""

import torch
import triton
import triton.language as tl

from ._launch import MAXNREG, device_guard, dot_precision, wrap_triton
from .contrastive import _bwd_grid, _dot_tile, _fwd_grid, _pick_config as _contrastive_config

__all__ = ["siglip_loss_fwd", "siglip_loss_bwd"]


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _positive_pairs(rows, cols, ids_r, ids_c, diag, HAS_IDS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: equal ids, or cols == rows + diag without ids."""
    if HAS_IDS:
        return ids_r[:, None] == ids_c[None, :]
    return cols[None, :] == rows[:, None] + diag


@triton.jit
def _softplus(u):
    """log(1 + exp(u)) in float32, accurate to a few ulps for every u (no overflow, no lost small terms)."""
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    # log1p(e) = log(w) * e / (w - 1), exact to rounding; e itself where it vanishes against 1
    log1p = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.maximum(u, 0.0) + log1p


@triton.jit
def _siglip_fwd_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, ids_a_ptr, ids_b_ptr, part_ptr,
    M, N, D, diag, rblocks_per_split, cblocks_per_split, n_col_splits,
    stride_am, stride_ad, stride_bn, stride_bd, stride_ida, stride_idb,
    HAS_IDS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)

    n_rb = tl.cdiv(M, BLOCK_M)
    n_cb = tl.cdiv(N, BLOCK_N)
    rb_lo = pid_r * rblocks_per_split
    rb_hi = tl.minimum(rb_lo + rblocks_per_split, n_rb)
    cb_lo = pid_c * cblocks_per_split
    cb_hi = tl.minimum(cb_lo + cblocks_per_split, n_cb)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    for rb in range(rb_lo, rb_hi):
        rows = rb * BLOCK_M + offs_m
        r_ok = rows < M
        rows64 = rows.to(tl.int64)
        ids_r = rows64
        if HAS_IDS:
            ids_r = tl.load(ids_a_ptr + rows64 * stride_ida, mask=r_ok, other=0)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for cb in range(cb_lo, cb_hi):
            cols = cb * BLOCK_N + offs_n
            c_ok = cols < N
            cols64 = cols.to(tl.int64)
            ids_c = cols64
            if HAS_IDS:
                ids_c = tl.load(ids_b_ptr + cols64 * stride_idb, mask=c_ok, other=0)
            raw = _dot_tile(a_ptr, b_ptr, rows64, r_ok, cols64, c_ok, D,
                            stride_am, stride_ad, stride_bn, stride_bd,
                            PREC, BLOCK_M, BLOCK_N, BLOCK_D)
            z = raw * scale + bias
            # -log sigmoid(l z) = softplus(-l z): softplus(z) for a negative, softplus(-z) for a positive
            u = tl.where(_positive_pairs(rows, cols, ids_r, ids_c, diag, HAS_IDS), -z, z)
            term = tl.where(r_ok[:, None] & c_ok[None, :], _softplus(u), 0.0)
            total += tl.sum(term, axis=1)
        tl.store(part_ptr + rb * n_col_splits + pid_c, tl.sum(total, axis=0))  # O(M / BLOCK_M) partials


@triton.jit
def _siglip_bwd_kernel(
    own_ptr, oth_ptr, scale_ptr, bias_ptr, g_ptr, ids_own_ptr, ids_oth_ptr,
    down_ptr, gs_ptr, gb_ptr,
    N_OWN, N_OTH, D, diag, tiles_per_split,
    stride_on, stride_od, stride_tn, stride_td, stride_ido, stride_idt,
    HAS_IDS: tl.constexpr, NEED_OWN: tl.constexpr, WRITE_SB: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """One sweep with ``own`` rows per program over the tiles of ``oth``: the own gradient
    g s G @ oth (one D slice per program) and, with WRITE_SB, the partial sums g sum G <own, oth> and g sum G.
    Positives: equal ids, or oth index == own index + diag."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_split = tl.num_programs(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    coef = tl.load(g_ptr).to(tl.float32)
    op_ty = own_ptr.dtype.element_ty

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + offs_m
    r_ok = rows < N_OWN
    rows64 = rows.to(tl.int64)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    first_slice = pid_d == 0

    ids_r = rows64
    if HAS_IDS:
        ids_r = tl.load(ids_own_ptr + rows64 * stride_ido, mask=r_ok, other=0)
    gs_vec = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gb_vec = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)

    n_tiles = tl.cdiv(N_OTH, BLOCK_N)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        cols = t * BLOCK_N + offs_n
        c_ok = cols < N_OTH
        cols64 = cols.to(tl.int64)
        ids_c = cols64
        if HAS_IDS:
            ids_c = tl.load(ids_oth_ptr + cols64 * stride_idt, mask=c_ok, other=0)
        raw = _dot_tile(own_ptr, oth_ptr, rows64, r_ok, cols64, c_ok, D,
                        stride_on, stride_od, stride_tn, stride_td,
                        PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        z = raw * scale + bias
        positive = _positive_pairs(rows, cols, ids_r, ids_c, diag, HAS_IDS)
        # G = -l sigmoid(-l z): sigmoid(z) for a negative, -sigmoid(-z) for a positive
        u = tl.where(positive, z, -z)
        e = tl.exp(-tl.abs(u))
        sig = tl.where(u > 0, e, 1.0) / (1.0 + e)  # sigmoid(-u), without overflow
        gt = tl.where(r_ok[:, None] & c_ok[None, :], tl.where(positive, -sig, sig), 0.0)
        if WRITE_SB:
            if first_slice:
                gs_vec += tl.sum(gt * raw, axis=1)
                gb_vec += tl.sum(gt, axis=1)
        if NEED_OWN:
            o_t = tl.load(oth_ptr + cols64[:, None] * stride_tn + do[None, :] * stride_td,
                          mask=c_ok[:, None] & do_ok[None, :], other=0.0)
            acc = tl.dot(gt.to(op_ty), o_t, acc, input_precision=PREC, out_dtype=tl.float32)

    if NEED_OWN:
        # float32 partial of this split: slot pid_s of (n_splits, N_OWN, D), summed by the launcher
        slab = down_ptr + pid_s.to(tl.int64) * N_OWN * D + rows64[:, None] * D + do[None, :]
        tl.store(slab, acc * (coef * scale), mask=r_ok[:, None] & do_ok[None, :])
    if WRITE_SB:
        if first_slice:
            tl.store(gs_ptr + pid_m * n_split + pid_s, coef * tl.sum(gs_vec, axis=0))
            tl.store(gb_ptr + pid_m * n_split + pid_s, coef * tl.sum(gb_vec, axis=0))


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _ids_args(ids, fallback):
    if ids is None:
        return fallback, 0
    return ids, ids.stride(0)


def _backward(g, own, oth, scale, bias, ids_own, ids_oth, diag, need_own, write_sb):
    """One sweep with ``own`` rows per program over every tile of ``oth``.

    Returns (grad of own in own's dtype or None, grad_scale partials or None, grad_bias partials or None).
    """
    n_own, D = own.shape
    n_oth = oth.shape[0]
    dev = own.device
    prec = dot_precision(own.dtype, dev)
    cfg = _pick_config(D, own.dtype, prec, dev)
    if not need_own:
        # only the scale and bias gradients: one program along D (the others would recompute the tiles for
        # nothing); the D slice is not read
        cfg = cfg._replace(bwd_do=max(cfg.bwd_do, triton.next_power_of_2(D)))
    has_ids = ids_own is not None and ids_oth is not None
    ids_o_t, sido = _ids_args(ids_own if has_ids else None, own)
    ids_t_t, sidt = _ids_args(ids_oth if has_ids else None, own)
    n_ob, tper, n_s, n_dr = _bwd_grid(n_own, n_oth, D, cfg)

    f32 = torch.float32
    slab = torch.empty((n_s, n_own, D), dtype=f32, device=dev) if need_own else None
    gs = torch.empty((n_ob * n_s,), dtype=f32, device=dev) if write_sb else None
    gb = torch.empty((n_ob * n_s,), dtype=f32, device=dev) if write_sb else None
    placeholder = own  # pointer arguments a mode does not read or write
    with device_guard(dev):
        wrap_triton(_siglip_bwd_kernel)[(n_ob, n_s, n_dr)](
            own, oth, scale, bias, g, ids_o_t, ids_t_t,
            slab if slab is not None else placeholder,
            gs if gs is not None else placeholder, gb if gb is not None else placeholder,
            n_own, n_oth, D, diag, tper,
            own.stride(0), own.stride(1), oth.stride(0), oth.stride(1), sido, sidt,
            HAS_IDS=has_ids, NEED_OWN=need_own, WRITE_SB=write_sb, PREC=prec,
            BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, BLOCK_D=cfg.bwd_d, BLOCK_DO=cfg.bwd_do,
            num_warps=cfg.warps_bwd, maxnreg=MAXNREG,
        )
    d_own = None
    if need_own:
        d_own = (slab[0] if n_s == 1 else slab.sum(dim=0)).to(own.dtype)
    return d_own, gs, gb


def _pick_config(D: int, dtype: torch.dtype, prec: str, device: torch.device):
    """The contrastive kernels' tiles, with a 64-row forward tile for exact float32: at 128 rows the sigmoid
    forward spills under triton 3.6 (24-32 bytes of stack at 255 registers, sm_80 and sm_90)."""
    cfg = _contrastive_config(D, dtype, prec, device)
    if cfg.fwd_m > 64 and dtype == torch.float32 and prec == "ieee":
        cfg = cfg._replace(fwd_m=64)
    return cfg


def siglip_loss_fwd(image, text, logit_scale, logit_bias, image_ids, text_ids, offset):
    """Returns the loss sum over the (M, N) pairs, 0-d float32."""
    M, D = image.shape
    N = text.shape[0]
    dev = image.device
    prec = dot_precision(image.dtype, dev)
    cfg = _pick_config(D, image.dtype, prec, dev)
    has_ids = image_ids is not None and text_ids is not None
    ids_a_t, sida = _ids_args(image_ids if has_ids else None, image)
    ids_b_t, sidb = _ids_args(text_ids if has_ids else None, image)
    rper, n_r, cper, n_c = _fwd_grid(M, N, cfg)
    part = torch.empty((triton.cdiv(M, cfg.fwd_m) * n_c,), dtype=torch.float32, device=dev)
    with device_guard(dev):
        wrap_triton(_siglip_fwd_kernel)[(n_r, n_c)](
            image, text, logit_scale.detach(), logit_bias.detach(), ids_a_t, ids_b_t, part,
            M, N, D, offset, rper, cper, n_c,
            image.stride(0), image.stride(1), text.stride(0), text.stride(1), sida, sidb,
            HAS_IDS=has_ids, PREC=prec,
            BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=cfg.fwd_d,
            num_warps=cfg.warps_fwd, maxnreg=MAXNREG,
        )
    return part.to(torch.float64).sum().to(torch.float32)


def siglip_loss_bwd(grad_loss_sum, image, text, logit_scale, logit_bias, image_ids, text_ids, offset,
                    output_mask=(True, True, True, True)):
    """Returns (grad_image, grad_text in the feature dtype, grad_scale, grad_bias 0-d in their own dtypes); a
    gradient whose ``output_mask`` entry is False is not computed (an empty tensor stands in its place).

    Two sweeps, one per side, each holding its own gradient in registers (no atomics: deterministic); the
    scale and bias gradients come from the first sweep that runs.
    """
    need_img, need_txt, need_scale, need_bias = (bool(x) for x in output_mask)
    need_sb = need_scale or need_bias
    scale, bias, g = logit_scale.detach(), logit_bias.detach(), grad_loss_sum.detach()
    d_img = d_txt = gs = gb = None
    if need_img or (need_sb and not need_txt):
        d_img, gs, gb = _backward(g, image, text, scale, bias, image_ids, text_ids, offset, need_img, need_sb)
    if need_txt:
        d_txt, gs_t, gb_t = _backward(g, text, image, scale, bias, text_ids, image_ids, -offset, True,
                                      need_sb and gs is None)
        if gs is None:
            gs, gb = gs_t, gb_t
    return (d_img if need_img else image.new_empty((0,)),
            d_txt if need_txt else text.new_empty((0,)),
            gs.to(torch.float64).sum().to(logit_scale.dtype) if need_scale else logit_scale.new_empty((0,)),
            gb.to(torch.float64).sum().to(logit_bias.dtype) if need_bias else logit_bias.new_empty((0,)))

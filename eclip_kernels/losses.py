"""Contrastive losses (ECLIP Eq. 6-8, and SigLIP's sigmoid loss): input checks, backend choice, the distributed
gather, documentation. The math is in docs/contrastive.md."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from . import reference
from .backends import resolve_call
from .functional import _autocast_dtype, _promote_under_autocast
from .ops.contrastive import OPS
from .ops.siglip import OPS as SIGLIP_OPS


@torch.compiler.assume_constant_result
def _resolve(
    backend: str, device: torch.device, dtype: torch.dtype, autocast: torch.dtype | None
) -> tuple[str, torch.dtype]:
    # constant under torch.compile; its fallback warnings are issued once, while tracing
    return resolve_call(backend, device, dtype, 1, "contrastive", autocast)


def _no_autocast(device: torch.device, autocast: torch.dtype | None):
    """Autocast off while a kernel runs: the tiled kernels pick their own accumulation dtype, and the
    reference under autocast computes in float32 (as the fused kernels accumulate)."""
    return torch.autocast(device.type, enabled=False) if autocast is not None else contextlib.nullcontext()


def _inputs(tensors, dtype: torch.dtype, chosen: str, autocast: torch.dtype | None):
    """The features as the chosen path takes them: in the call dtype, and in float32 for the reference
    under autocast (rounded to the autocast dtype first). Differentiable casts."""
    cast = [t if t.dtype == dtype else t.to(dtype) for t in tensors]
    if chosen == "reference" and autocast is not None and dtype != torch.float64:
        cast = [t.float() for t in cast]
    return cast


def _check_features(named: list[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, D), got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (B, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{first_name} and {name} are on different devices: {first.device} and {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{first_name} and {name} must have the same dtype, got {first.dtype} and {t.dtype}")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{first_name} and {name} feature sizes differ: {first.shape[1]} and {t.shape[1]}")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has no features (D = 0)")


def _check_ids(name: str, ids, length: int, device: torch.device) -> None:
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] != length:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a 1-d tensor of length {length}, got {shape}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device}, the features on {device}")


def _scale_tensor(value, device: torch.device, name: str = "logit_scale") -> torch.Tensor:
    """logit_scale (or logit_bias) as a 0-d float tensor on the features' device (differentiable when it
    requires grad)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a 1-element floating tensor, got {value!r:.60}")
        return value.reshape(()).to(device)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), device=device)
    raise TypeError(f"{name} must be a float or a 1-element tensor, got {type(value).__name__}")


def _row_counts(rows: int, group, device: torch.device) -> list[int]:
    """Every rank's number of rows, in rank order: one all_gather of a 1-element tensor, read on the host
    (the padding and slicing of :func:`_gather_rows` need the counts as Python ints)."""
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.cat(parts).tolist()


def _gather_rows(t: torch.Tensor, counts: list[int], group) -> list[torch.Tensor]:
    """All-gather ``t`` (..., n_r, D) along dim -2 when rank r holds ``counts[r]`` rows (0 allowed).

    Every rank pads its rows to the largest count, one all_gather moves the padded blocks, and the padding is
    sliced off: returns one tensor per leading index of ``t`` (a 2-d ``t`` gives a list of one), each the
    concatenation of every rank's real rows in rank order. When ``t`` requires grad the gather is
    differentiable (``torch.distributed.nn``): the backward sums every rank's gradient of this rank's block
    (one collective on every rank), and the padding rows receive none. With equal counts nothing is padded.
    """
    most = max(counts)
    stacked = t if t.dim() == 3 else t[None]
    if most == 0:  # every rank agrees: nothing to move
        return list(stacked)
    if stacked.shape[1] < most:
        pad = stacked.new_zeros(stacked.shape[:1] + (most - stacked.shape[1],) + stacked.shape[2:])
        stacked = torch.cat([stacked, pad], dim=1)
    if stacked.requires_grad and torch.is_grad_enabled():
        parts = dist.nn.functional.all_gather(stacked, group=group)
    else:
        parts = [torch.empty_like(stacked) for _ in counts]
        dist.all_gather(parts, stacked.contiguous(), group=group)
    return [torch.cat([part[i, :count] for part, count in zip(parts, counts)]) for i in range(stacked.shape[0])]


def row_share(rows: int, group: dist.ProcessGroup | None = None, *, device: torch.device | str | None = None
              ) -> torch.Tensor:
    """This rank's share ``B_r / B_total`` of the rows of the global batch: the weight of its loss.

    ``clip_loss`` and ``info_nce`` with ``group`` return the mean over this rank's own rows; the single-process
    loss of the concatenated batch is ``sum_r row_share_r * loss_r``. One all_gather of the counts (on
    ``device``: CPU tensors for gloo, CUDA for nccl), read on the host. Without a group (or a group of one
    rank) the share is 1. Returns a 0-d float64 tensor on ``device`` (0 for a rank with no rows).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if group is None or dist.get_world_size(group) == 1:
        return torch.tensor(1.0 if rows else 0.0, dtype=torch.float64, device=device)
    counts = _row_counts(rows, group, device)
    if sum(counts) == 0:
        raise ValueError("no rank holds any rows: the global batch is empty")
    return torch.tensor(rows / sum(counts), dtype=torch.float64, device=device)


def _loss_dtype(dtype: torch.dtype, chosen: str) -> torch.dtype:
    """The dtype the losses come back in: the accumulation dtype, or the features' for the reference."""
    if chosen == "reference":
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_loss(scale: torch.Tensor, dtype: torch.dtype, *tensors: torch.Tensor) -> torch.Tensor:
    """The loss of a rank without rows: exactly 0, yet a function of ``tensors`` (the gathered banks among
    them) and of the scale, so that its backward still runs the gather's collective and every input gets a
    zero gradient rather than none (DDP/FSDP expect the same parameters to get gradients on every rank)."""
    total = sum(t[:0].sum() for t in tensors)
    return (scale.to(dtype) * total.to(dtype))


def _paired_inputs(name: str, image_features, text_features, ids, group):
    """The checks shared by the image-text losses: features (promoted under autocast) of one shape (B, D),
    at least one row unless other ranks may hold some, ids of length B. Returns (image, text, B, device,
    world size)."""
    image_features, text_features = _promote_under_autocast(image_features, text_features)
    _check_features([("image_features", image_features), ("text_features", text_features)])
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (B, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    batch, device = image_features.shape[0], image_features.device
    world = dist.get_world_size(group) if group is not None else 1
    if batch == 0 and world == 1:
        raise ValueError(f"{name} needs at least one sample")
    _check_ids("ids", ids, batch, device)
    return image_features, text_features, batch, device, world


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Symmetric image-text InfoNCE (ECLIP Eq. 6-7) without the B x B logits.

    ``L = (L_i2t + L_t2i) / 2`` with ``L_i2t = mean_i -log softmax_j(s <x_i, y_j>)[i]`` and ``L_t2i`` the
    same with images and texts swapped; ``s = logit_scale`` (the multiplier 1/tau, already exponentiated, as
    in open_clip). Features are L2-normalized by the caller.

    Fused backends hold no (B, B) logits: tiles with an online log-sum-exp for both directions in one pass,
    tiles recomputed in backward; memory O(B D + B). Accumulation in float32 (float64 for float64 features).

    Args:
        image_features: (B, D) image embeddings of this process.
        text_features: (B, D) text embeddings, same dtype and device; row i is the positive of image i.
        logit_scale: float or 1-element tensor (differentiable).
        ids: optional (B,) integer product ids: pairs (i, j), j != i, with the same id are removed from both
            denominators (another image of the same product is not a negative).
        group: a process group for the global batch, as open_clip's ``ClipLoss(local_loss=True,
            gather_with_grad=True)``: features (and ids) are all-gathered with autograd and each rank returns
            the mean loss of its own B_r rows against all gathered columns. Ranks may hold different numbers
            of rows, zero included (a rank without rows returns 0 and still takes part in every collective,
            forward and backward). Weighted by the rank's share ``w_r = B_r / B_total``
            (:func:`row_share`), the losses add up to the single-process loss of the concatenated batch,
            ``sum_r w_r loss_r``, and backward of ``w_r loss_r`` on every rank gives each rank exactly the
            single-process gradient of its rows (the logit_scale gradients add up over ranks to the
            single-process one). Under DDP/FSDP, which average gradients over ranks, backpropagate
            ``world_size * w_r * loss_r``; with equal B_r that is ``loss_r`` itself (feature gradients
            world_size x the single-process ones, open_clip's semantics). Costs one all_gather of the row
            counts (read on the host) besides the gathers of the features and ids. None (default): the batch
            of this process only.
        backend: "auto", "cpu" (CPU tensors), "cuda" (CUDA tensors; the same tiled ATen kernels), "triton" or
            "reference" (materializes the logits; the test oracle). ``auto``: ``cpu`` on CPU tensors; on CUDA
            tensors ``triton``, else ``cuda`` with a :class:`~eclip_kernels.BackendFallbackWarning`.

    Under ``torch.autocast`` (enabled for the features' device type), float32/float16/bfloat16 features (of
    one dtype or not) are cast (differentiably) to the autocast dtype, as for a matrix product, so that
    features normalized in float32 (``F.normalize`` under autocast) still take the low-precision kernels; the
    kernels run with autocast disabled and accumulate in float32, and the ``reference`` computes in float32
    from the cast features.

    Returns:
        The scalar loss, float32 (float64 for float64 features; outside autocast, the dtype of the features
        for ``reference``).
    """
    image_features, text_features, batch, device, world = _paired_inputs("clip_loss", image_features, text_features,
                                                                         ids, group)
    scale = _scale_tensor(logit_scale, device)
    autocast = _autocast_dtype(device)
    chosen, dtype = _resolve(backend, device, image_features.dtype, autocast)
    image_features, text_features = _inputs((image_features, text_features), dtype, chosen, autocast)

    if world == 1:
        with _no_autocast(device, autocast):
            if chosen == "reference":
                return reference.clip_loss(image_features, text_features, scale.to(image_features.dtype), ids)
            return OPS[chosen]["clip_fwd"](image_features, text_features, scale, ids)[0]

    # ranks may hold different numbers of rows: exchange the counts, pad to the largest and slice (the
    # images and texts travel in one collective, so the backward is one collective too, whatever the rows)
    counts = _row_counts(batch, group, device)
    if sum(counts) == 0:
        raise ValueError("clip_loss needs at least one sample on some rank of the group")
    all_images, all_texts = _gather_rows(torch.stack([image_features, text_features]), counts, group)
    offset = sum(counts[:dist.get_rank(group)])
    if ids is None:  # each sample its own id: exactly the positive's copy in the bank leaves the denominator
        ids = torch.arange(offset, offset + batch, device=device)
        all_ids = torch.arange(sum(counts), device=device)
    else:
        (all_ids,) = _gather_rows(ids, counts, group)
    if batch == 0:
        out_dtype = _loss_dtype(image_features.dtype, chosen)
        return _empty_loss(scale, out_dtype, all_images, all_texts, image_features, text_features)
    with _no_autocast(device, autocast):
        if chosen == "reference":
            s = scale.to(image_features.dtype)
            i2t = reference.contrastive_rows(image_features, text_features, all_texts, s, ids, all_ids)
            t2i = reference.contrastive_rows(text_features, image_features, all_images, s, ids, all_ids)
        else:
            rows = OPS[chosen]["rows_fwd"]
            i2t = rows(image_features, text_features, all_texts, scale, ids, all_ids)[0]
            t2i = rows(text_features, image_features, all_images, scale, ids, all_ids)[0]
    return (i2t + t2i) / (2 * batch)


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    query_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    shared_negatives: torch.Tensor | None = None,
    shared_negative_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE with one positive per query and a shared bank of negatives (ECLIP Eq. 8).

    ``mean_i -log( exp(s <q_i, p_i>) / (exp(s <q_i, p_i>) + sum_k exp(s <q_i, n_k>)) )`` over the negatives
    k whose product id differs from the query's. In ECLIP, q_i is the base model's positive-query
    representation, p_i the momentum model's representation of another image of the same product, and the
    negatives the momentum representations of the global batch plus a queue
    (:class:`eclip_kernels.MomentumQueue`).

    Args:
        query: (M, D); positive: (M, D); negatives: (K, D); same dtype and device. L2-normalized by the caller.
        logit_scale: float or 1-element tensor (differentiable).
        query_ids: optional (M,) integer product ids; negative_ids: optional (K,) integer product ids. With
            both, negatives sharing the query's id are left out (the positive always stays).
        group: a process group for the global batch: ``negatives`` (and ``negative_ids``) are this rank's part
            of the bank, all-gathered in rank order (with autograd when they require grad: a negative's
            gradient reaches the rank that holds it, summed over every rank's loss). Ranks may hold different
            numbers of queries and of negatives, zero included: a rank without queries returns 0 and still
            takes part in every collective. The loss is the mean over this rank's M_r queries; weighted by
            ``M_r / M_total`` (:func:`row_share`) the losses add up to the single-process loss of all queries
            against the same bank, with the same rules as :func:`clip_loss` (under DDP/FSDP backpropagate
            ``world_size * M_r / M_total * loss_r``). One all_gather of the counts (read on the host) and
            one of the negatives. None (default): no communication.
        shared_negatives: optional (K', D) negatives every rank holds the same copy of (a
            :class:`~eclip_kernels.MomentumQueue`'s ``features``), appended after the (gathered) negatives and
            never gathered; ``shared_negative_ids`` (K',) their ids, required when ``query_ids`` is given.
        backend: "auto", "cpu", "cuda", "triton" or "reference", as for :func:`clip_loss`; under
            ``torch.autocast`` the features are taken in the autocast dtype, as there.

    Returns:
        The scalar loss (mean over queries), float32 (float64 for float64 features; outside autocast, the
        dtype of the features for ``reference``).
    """
    shared = () if shared_negatives is None else (shared_negatives,)
    query, positive, negatives, *shared = _promote_under_autocast(query, positive, negatives, *shared)
    _check_features([("query", query), ("positive", positive), ("negatives", negatives)]
                    + [("shared_negatives", t) for t in shared])
    if positive.shape != query.shape:
        raise ValueError(f"query and positive must have the same shape, got {tuple(query.shape)} and {tuple(positive.shape)}")
    world = dist.get_world_size(group) if group is not None else 1
    if query.shape[0] == 0 and world == 1:
        raise ValueError("info_nce needs at least one query")
    device = query.device
    _check_ids("query_ids", query_ids, query.shape[0], device)
    _check_ids("negative_ids", negative_ids, negatives.shape[0], device)
    if (query_ids is None) != (negative_ids is None):
        raise ValueError("pass both query_ids and negative_ids, or neither")
    if shared:
        _check_ids("shared_negative_ids", shared_negative_ids, shared[0].shape[0], device)
        if (query_ids is None) != (shared_negative_ids is None):
            raise ValueError("pass shared_negative_ids exactly when query_ids and negative_ids are given")
    elif shared_negative_ids is not None:
        raise ValueError("shared_negative_ids given without shared_negatives")
    scale = _scale_tensor(logit_scale, device)
    autocast = _autocast_dtype(device)
    chosen, dtype = _resolve(backend, device, query.dtype, autocast)
    query, positive, negatives, *shared = _inputs((query, positive, negatives, *shared), dtype, chosen, autocast)
    if world > 1:
        counts = _row_counts(negatives.shape[0], group, device)
        (negatives,) = _gather_rows(negatives, counts, group)
        if negative_ids is not None:
            (negative_ids,) = _gather_rows(negative_ids, counts, group)
    if shared:
        negatives = torch.cat([negatives, shared[0]])
        if negative_ids is not None:
            negative_ids = torch.cat([negative_ids, shared_negative_ids.to(negative_ids.dtype)])
    if query.shape[0] == 0:
        return _empty_loss(scale, _loss_dtype(query.dtype, chosen), negatives, query, positive)
    with _no_autocast(device, autocast):
        if chosen == "reference":
            total = reference.contrastive_rows(query, positive, negatives, scale.to(query.dtype), query_ids,
                                               negative_ids)
        else:
            total = OPS[chosen]["rows_fwd"](query, positive, negatives, scale, query_ids, negative_ids)[0]
    return total / query.shape[0]


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None,
    *,
    ids: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid image-text loss (SigLIP, Zhai et al. 2023) without the B x B logits; open_clip's ``SigLipLoss``.

    ``loss = -(1/B) sum_i sum_j log sigmoid(l_ij (s <x_i, y_j> + b))`` over every image i and text j, with
    ``l_ij = +1`` for the positive pairs and -1 for every other pair; B is the number of images of this
    process (open_clip normalizes by its local batch size, not by the number of pairs). ``s = logit_scale``
    is the multiplier, already exponentiated, and ``b = logit_bias`` is added as it is: open_clip's models
    return ``logit_scale.exp()`` and the raw ``logit_bias`` (initialized to log 10 and -10 for SigLIP), and
    ``SigLipLoss()(image, text, logit_scale, logit_bias)`` takes them so; pass them the same way here.
    Features are L2-normalized by the caller.

    Fused backends hold no (B, B) logits: tiles of logits, the loss summed tile by tile, tiles recomputed in
    backward (the sigmoid loss needs no log-sum-exp, so nothing but the features is saved); memory O(B D).
    Accumulation in float32 (float64 for float64 features).

    Args:
        image_features: (B, D) image embeddings of this process.
        text_features: (B, D) text embeddings, same dtype and device; without ids, row i is the positive of
            image i.
        logit_scale: float or 1-element tensor (differentiable), the multiplier s (not its log).
        logit_bias: float, 1-element tensor (differentiable) or None (no bias).
        ids: optional (B,) integer product ids: every pair (i, j) with ``ids[i] == ids[j]`` is a positive (a
            catalogue holds several images and titles of one product), every other pair a negative. None:
            the diagonal pairs (i, i) are the positives.
        group: a process group for the global batch, as open_clip's ``SigLipLoss(rank=r, world_size=W)``:
            each rank's images are scored against the texts of every rank; the other ranks' texts (and ids)
            are all-gathered with autograd (``torch.distributed.nn``), so a text's gradient from every rank's
            loss reaches the rank that holds it (open_clip exchanges them around a ring with the same
            result). Positives: without ids, only the rank's own diagonal (as open_clip's ``negative_only``
            blocks); with ids, every pair of equal ids in the global batch. Each rank returns its loss sum
            divided by its own B_r, open_clip's normalization. Ranks may hold different numbers of rows, zero
            included (a rank without rows returns 0 and still takes part in every collective, forward and
            backward); weighted by ``w_r = B_r / B_total`` (:func:`row_share`) the losses add up to the
            single-process loss of the concatenated batch, and backward of ``w_r loss_r`` on every rank gives
            each rank exactly the single-process gradients of its rows (logit_scale and logit_bias gradients
            add up over ranks). Under DDP/FSDP backpropagate ``world_size * w_r * loss_r``: with equal B_r,
            ``loss_r`` itself, open_clip's semantics (feature gradients world_size x the single-process ones).
            One all_gather of the row counts (read on the host) and one of the texts (and one of the ids).
            None (default): the batch of this process only.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (materializes the logits; the test oracle), as
            for :func:`clip_loss`; under ``torch.autocast`` the features are taken in the autocast dtype, as
            there.

    Returns:
        The scalar loss, float32 (float64 for float64 features; outside autocast, the dtype of the features
        for ``reference``).
    """
    image_features, text_features, batch, device, world = _paired_inputs("siglip_loss", image_features, text_features,
                                                                         ids, group)
    scale = _scale_tensor(logit_scale, device)
    bias = torch.zeros((), device=device) if logit_bias is None else _scale_tensor(logit_bias, device, "logit_bias")
    autocast = _autocast_dtype(device)
    chosen, dtype = _resolve(backend, device, image_features.dtype, autocast)
    image_features, text_features = _inputs((image_features, text_features), dtype, chosen, autocast)

    all_texts, all_ids, offset = text_features, ids, 0
    if world > 1:
        # the other ranks' texts, any number of rows each: counts first, then one (differentiable) gather
        counts = _row_counts(batch, group, device)
        if sum(counts) == 0:
            raise ValueError("siglip_loss needs at least one sample on some rank of the group")
        (all_texts,) = _gather_rows(text_features, counts, group)
        offset = sum(counts[:dist.get_rank(group)])
        if ids is not None:
            (all_ids,) = _gather_rows(ids, counts, group)
        if batch == 0:
            return _empty_loss(scale + bias, _loss_dtype(image_features.dtype, chosen), all_texts, image_features,
                               text_features)
    with _no_autocast(device, autocast):
        if chosen == "reference":
            total = reference.siglip_loss_sum(image_features, all_texts, scale.to(image_features.dtype),
                                              bias.to(image_features.dtype), ids, all_ids, offset)
        else:
            total = SIGLIP_OPS[chosen]["siglip_fwd"](image_features, all_texts, scale, bias, ids, all_ids, offset)
    return total / batch

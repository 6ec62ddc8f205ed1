"""Contrastive losses (ECLIP Eq. 6-8): input checks, backend choice, the distributed gather, documentation.
The math is in docs/contrastive.md."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from . import reference
from .backends import resolve_call
from .functional import _autocast_dtype, _promote_under_autocast
from .ops.contrastive import OPS


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


def _scale_tensor(logit_scale, device: torch.device) -> torch.Tensor:
    """logit_scale as a 0-d float tensor on the features' device (differentiable when it requires grad)."""
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
            raise ValueError(f"logit_scale must be a float or a 1-element floating tensor, got {logit_scale!r:.60}")
        return logit_scale.reshape(()).to(device)
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        return torch.tensor(float(logit_scale), device=device)
    raise TypeError(f"logit_scale must be a float or a 1-element tensor, got {type(logit_scale).__name__}")


def _gather_with_grad(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 with autograd: the backward sums every rank's gradient of its slice."""
    return torch.cat(dist.nn.functional.all_gather(t, group=group), dim=0)


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


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
            gather_with_grad=True)``: features (and ids) are all-gathered with autograd, each rank returns the
            loss of its own rows against all gathered columns, and feature gradients on a rank equal
            world_size x the gradient of the single-process loss on the concatenated batch (so that after
            DDP/FSDP gradient averaging, parameter gradients equal the single-process ones). Every rank must
            pass the same B. None (default): the batch of this process only.
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
    image_features, text_features = _promote_under_autocast(image_features, text_features)
    _check_features([("image_features", image_features), ("text_features", text_features)])
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (B, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    batch, device = image_features.shape[0], image_features.device
    if batch == 0:
        raise ValueError("clip_loss needs at least one sample")
    _check_ids("ids", ids, batch, device)
    scale = _scale_tensor(logit_scale, device)
    autocast = _autocast_dtype(device)
    chosen, dtype = _resolve(backend, device, image_features.dtype, autocast)
    image_features, text_features = _inputs((image_features, text_features), dtype, chosen, autocast)
    world = dist.get_world_size(group) if group is not None else 1

    if world == 1:
        with _no_autocast(device, autocast):
            if chosen == "reference":
                return reference.clip_loss(image_features, text_features, scale.to(image_features.dtype), ids)
            return OPS[chosen]["clip_fwd"](image_features, text_features, scale, ids)[0]

    rank = dist.get_rank(group)
    all_images = _gather_with_grad(image_features, group)
    all_texts = _gather_with_grad(text_features, group)
    if ids is None:  # each sample its own id: exactly the positive's copy in the bank leaves the denominator
        ids = torch.arange(rank * batch, (rank + 1) * batch, device=device)
        all_ids = torch.arange(world * batch, device=device)
    else:
        all_ids = _gather(ids, group)
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
        backend: "auto", "cpu", "cuda", "triton" or "reference", as for :func:`clip_loss`; under
            ``torch.autocast`` the features are taken in the autocast dtype, as there.

    Returns:
        The scalar loss (mean over queries), float32 (float64 for float64 features; outside autocast, the
        dtype of the features for ``reference``).
    """
    query, positive, negatives = _promote_under_autocast(query, positive, negatives)
    _check_features([("query", query), ("positive", positive), ("negatives", negatives)])
    if positive.shape != query.shape:
        raise ValueError(f"query and positive must have the same shape, got {tuple(query.shape)} and {tuple(positive.shape)}")
    if query.shape[0] == 0:
        raise ValueError("info_nce needs at least one query")
    device = query.device
    _check_ids("query_ids", query_ids, query.shape[0], device)
    _check_ids("negative_ids", negative_ids, negatives.shape[0], device)
    if (query_ids is None) != (negative_ids is None):
        raise ValueError("pass both query_ids and negative_ids, or neither")
    scale = _scale_tensor(logit_scale, device)
    autocast = _autocast_dtype(device)
    chosen, dtype = _resolve(backend, device, query.dtype, autocast)
    query, positive, negatives = _inputs((query, positive, negatives), dtype, chosen, autocast)
    with _no_autocast(device, autocast):
        if chosen == "reference":
            total = reference.contrastive_rows(query, positive, negatives, scale.to(query.dtype), query_ids,
                                               negative_ids)
        else:
            total = OPS[chosen]["rows_fwd"](query, positive, negatives, scale, query_ids, negative_ids)[0]
    return total / query.shape[0]

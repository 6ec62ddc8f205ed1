"""Metrics of the zero-shot tasks, as pure functions on tensors (no loops over queries).

Conventions shared by every function here:

* Scores: higher is better. NaN scores are treated as ``-inf`` (ranked last).
* Ties are broken deterministically by index: among equal scores the candidate with the lower index ranks
  first (a stable descending sort). A model that gives every candidate the same score therefore retrieves
  the gallery in its stored order; callers that do not want the order to carry information shuffle it.
* Results are fractions in [0, 1] (Python floats); the evaluation reports them as percentages. A metric over
  zero queries is ``nan``.
* ``k`` larger than the gallery is clamped to the gallery size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def _clean(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.float() if not scores.is_floating_point() else scores
    return torch.nan_to_num(scores, nan=-math.inf)


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """(Q, G) -> (Q, G) gallery indices of each query, best first; ties broken by the lower index."""
    return torch.sort(_clean(scores), dim=1, descending=True, stable=True).indices


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {ks}")
    return ks


def _check_pair(scores: torch.Tensor, relevant: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape != relevant.shape:
        raise ValueError(f"scores and relevant must both be (Q, G), got {tuple(scores.shape)} and "
                         f"{tuple(relevant.shape)}")


def accuracy_at_1(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy: the fraction of rows whose best-scoring class is the target.

    Args:
        scores: (Q, C) class scores of each query.
        targets: (Q,) index of each query's class.

    Ties go to the lower class index (so a constant row is a hit only when its target is class 0).
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (Q, C) and targets (Q,), got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    if scores.shape[0] == 0:
        return math.nan
    top = rank_order(scores)[:, 0]
    return (top == targets.to(top.device)).float().mean().item()


def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k as used in retrieval benchmarks: the fraction of queries with at least one relevant gallery
    item among their top ``k``.

    Args:
        scores: (Q, G) query-gallery similarities.
        relevant: (Q, G) bool, True where the gallery item is a correct answer to the query.
        ks: cut-offs; a ``k`` larger than G is clamped to G.

    A query with no relevant item in the gallery counts as a miss (0) and stays in the average; callers that
    want to leave such queries out drop them before calling.
    """
    _check_pair(scores, relevant)
    ks = _check_ks(ks)
    if scores.shape[0] == 0:
        return {k: math.nan for k in ks}
    hits = relevant.bool().gather(1, rank_order(scores).to(relevant.device))
    return {k: hits[:, :min(k, hits.shape[1])].any(dim=1).float().mean().item() for k in ks}


def mean_average_precision_at_k(scores: torch.Tensor, relevant: torch.Tensor,
                                ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """mAP@k: the mean over queries of AP@k.

    For one query with ``R`` relevant items in the gallery and its ranking ``r_1, r_2, ...`` (best first,
    ties broken by the lower index),

        AP@k = (1 / min(k, R)) * sum_{i <= k, r_i relevant} P@i,     P@i = (#relevant among r_1..r_i) / i,

    i.e. the precision at the rank of each relevant item retrieved in the top ``k``, summed and divided by
    the most relevant items the top ``k`` could hold. AP@k is 1 exactly when the top ``min(k, R)`` are all
    relevant. A query with ``R = 0`` has AP@k = 0 and stays in the average. ``k`` larger than the gallery is
    clamped to G (min(k, R) is then unchanged, since R <= G).
    """
    _check_pair(scores, relevant)
    ks = _check_ks(ks)
    if scores.shape[0] == 0:
        return {k: math.nan for k in ks}
    hits = relevant.bool().gather(1, rank_order(scores).to(relevant.device)).double()
    gallery = hits.shape[1]
    ranks = torch.arange(1, gallery + 1, dtype=torch.float64, device=hits.device)
    precision_hits = hits.cumsum(dim=1) / ranks * hits  # P@i where r_i is relevant, else 0
    num_relevant = hits.sum(dim=1)
    out = {}
    for k in ks:
        kk = min(k, gallery)
        denominator = torch.minimum(num_relevant, torch.tensor(float(kk), dtype=torch.float64)).clamp(min=1)
        ap = torch.where(num_relevant > 0, precision_hits[:, :kk].sum(dim=1) / denominator, 0.0)
        out[k] = ap.mean().item()
    return out


# --- boxes ---------------------------------------------------------------------------------------------

def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes (x0, y0, x1, y1) -> (...) areas; inverted boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union: (N, 4), (M, 4) boxes (x0, y0, x1, y1) -> (N, M).

    Coordinates are continuous (a box covers [x0, x1) x [y0, y1)); a pair whose union is empty has IoU 0.
    """
    boxes1, boxes2 = boxes1.double(), boxes2.double()
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), 0.0)


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two (N, 4) box lists -> (N,) (same conventions as :func:`box_iou`)."""
    boxes1, boxes2 = boxes1.double(), boxes2.double()
    wh = (torch.minimum(boxes1[:, 2:], boxes2[:, 2:]) - torch.maximum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), 0.0)


def box_pixel_bounds(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pixels a continuous box covers: (..., 4) -> (..., 4) int64 ``(c0, r0, c1, r1)`` with columns
    ``c0 <= c < c1`` and rows ``r0 <= r < r1`` (floor of the start, ceil of the end), clamped to the image
    and at least one pixel wide and high."""
    x0 = boxes[..., 0].floor().long().clamp(0, width - 1)
    y0 = boxes[..., 1].floor().long().clamp(0, height - 1)
    x1 = torch.maximum(boxes[..., 2].ceil().long().clamp(0, width), x0 + 1)
    y1 = torch.maximum(boxes[..., 3].ceil().long().clamp(0, height), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=-1)


def mean_in_boxes(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The mean of each map over the pixels of each of its boxes (see :func:`box_pixel_bounds`).

    Args:
        maps: (B, H, W) score maps.
        boxes: (B, K, 4) boxes (x0, y0, x1, y1) in the maps' pixel coordinates.

    Returns:
        (B, K) float64 means, computed with a summed-area table (exact for maps of small integers).
    """
    if maps.dim() != 3 or boxes.dim() != 3 or boxes.shape[0] != maps.shape[0] or boxes.shape[-1] != 4:
        raise ValueError(f"maps must be (B, H, W) and boxes (B, K, 4), got {tuple(maps.shape)} and "
                         f"{tuple(boxes.shape)}")
    batch, height, width = maps.shape
    table = torch.nn.functional.pad(maps.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, H+1, W+1)
    x0, y0, x1, y1 = box_pixel_bounds(boxes.to(maps.device), height, width).unbind(-1)
    flat = table.reshape(batch, -1)
    stride = width + 1

    def at(r, c):
        return flat.gather(1, r * stride + c)

    total = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    return total / ((x1 - x0) * (y1 - y0)).double()


def select_top_box(box_scores: torch.Tensor, candidate_boxes: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """(Q,) index of each query's best candidate box.

    The highest score wins; ties go to the larger box (among boxes whose mean score is equal, the larger one
    covers more of the high-scoring region), then to the lower index. Invalid (padding) candidates and NaN
    scores rank last.
    """
    scores = _clean(box_scores.double())
    if valid is not None:
        scores = scores.masked_fill(~valid.bool(), -math.inf)
    by_area = torch.sort(box_area(candidate_boxes.double()), dim=1, descending=True, stable=True).indices
    by_score = torch.sort(scores.gather(1, by_area), dim=1, descending=True, stable=True).indices
    return by_area.gather(1, by_score[:, :1])[:, 0]


def grounding_accuracy(box_scores: torch.Tensor, candidate_boxes: torch.Tensor, target_boxes: torch.Tensor,
                       valid: torch.Tensor | None = None,
                       thresholds: Iterable[float] = (0.5, 0.7)) -> dict[float, float]:
    """Acc@t: the fraction of queries whose top candidate box (:func:`select_top_box`) has IoU >= t with the
    query's target box.

    Args:
        box_scores: (Q, K) score of each candidate box.
        candidate_boxes: (Q, K, 4) candidate boxes (x0, y0, x1, y1).
        target_boxes: (Q, 4) the true box of each query.
        valid: (Q, K) bool, False for padding candidates (rows may have different numbers); a row with no
            valid candidate is a miss.
        thresholds: IoU thresholds.
    """
    if box_scores.dim() != 2 or candidate_boxes.shape != (*box_scores.shape, 4) or \
            target_boxes.shape != (box_scores.shape[0], 4):
        raise ValueError(f"expected box_scores (Q, K), candidate_boxes (Q, K, 4), target_boxes (Q, 4); got "
                         f"{tuple(box_scores.shape)}, {tuple(candidate_boxes.shape)}, {tuple(target_boxes.shape)}")
    thresholds = [float(t) for t in thresholds]
    if box_scores.shape[0] == 0:
        return {t: math.nan for t in thresholds}
    top = select_top_box(box_scores, candidate_boxes, valid)
    chosen = candidate_boxes.gather(1, top[:, None, None].expand(-1, 1, 4))[:, 0]
    iou = paired_box_iou(chosen, target_boxes)
    if valid is not None:
        iou = torch.where(valid.bool().any(dim=1), iou, 0.0)
    return {t: (iou >= t).float().mean().item() for t in thresholds}

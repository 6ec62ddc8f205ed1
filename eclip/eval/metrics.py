"""Metrics of the zero-shot tasks, as pure functions on tensors (no loops over queries).

Conventions shared by every function here:

* Scores: higher is better. NaN scores are treated as ``-inf`` (ranked last).
* Ties: :func:`rank_order`, :func:`accuracy_at_1`, :func:`recall_at_k` and
  :func:`mean_average_precision_at_k` break them deterministically by index (among equal scores the
  candidate with the lower index ranks first, a stable descending sort), so a model that gives every candidate
  the same score retrieves the gallery in its stored order. :func:`expected_recall_at_k` instead averages
  over every order of the tied items (a random tie-break, in expectation): a model whose scores cannot tell
  the candidates apart scores exactly the chance level (:func:`chance_recall_at_k`). The evaluation reports
  recall and accuracy this way.
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


def _log_binomial(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _hit_probability(above: torch.Tensor, tied: torch.Tensor, tied_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """P(at least one relevant item in the top k) when ``above`` items outrank every relevant one and the best
    relevant items tie with ``tied`` items in all (``tied_relevant`` of them relevant), in a random order."""
    above, tied, rel = above.double(), tied.double(), tied_relevant.double()
    slots = (k - above).clamp(min=0)  # positions of the top k left for the tied group
    take = torch.minimum(slots, tied)
    # 1 - C(tied - rel, take) / C(tied, take): the chance that the drawn slots miss every relevant item
    misses_possible = (tied - rel) >= take
    log_miss = _log_binomial((tied - rel).clamp(min=0), take.clamp(max=(tied - rel).clamp(min=0))) - \
        _log_binomial(tied, take)
    miss = torch.where(misses_possible, log_miss.exp(), torch.zeros_like(log_miss))
    hit = 1.0 - miss
    hit = torch.where(slots <= 0, torch.zeros_like(hit), hit)
    return torch.where(rel > 0, hit, torch.zeros_like(hit))


def expected_recall_at_k(scores: torch.Tensor, relevant: torch.Tensor,
                         ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k with ties broken at random, in expectation (exact, no sampling).

    For each query, the items that score above its best relevant item come first; the group of items that tie
    with it fills the remaining places of the top k in a uniformly random order. The query's value is the
    probability that a relevant item is among the top k. Without ties this is :func:`recall_at_k`; with every
    score equal it is :func:`chance_recall_at_k`. Top-1 accuracy is the ``k = 1`` case with one relevant class.

    Args:
        scores: (Q, G). relevant: (Q, G) bool. ks: cut-offs (clamped to G).
    """
    _check_pair(scores, relevant)
    ks = _check_ks(ks)
    if scores.shape[0] == 0:
        return {k: math.nan for k in ks}
    scores = _clean(scores.double())
    relevant = relevant.bool().to(scores.device)
    best = scores.masked_fill(~relevant, -math.inf).max(dim=1, keepdim=True).values
    has_relevant = relevant.any(dim=1)
    # a query whose relevant items all score -inf (NaN) ties with every other -inf item: handled the same way
    above = (scores > best).sum(dim=1)
    tied = (scores == best).sum(dim=1)
    tied_relevant = (relevant & (scores == best)).sum(dim=1)
    out = {}
    for k in ks:
        hit = _hit_probability(above, tied, tied_relevant, min(k, scores.shape[1]))
        out[k] = torch.where(has_relevant, hit, torch.zeros_like(hit)).mean().item()
    return out


def _chance_inputs(num_relevant, gallery, ks) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The checked ks and the (Q,) float64 relevant counts and gallery sizes (an int broadcasts to all)."""
    ks = _check_ks(ks)
    num_relevant = torch.as_tensor(num_relevant, dtype=torch.float64).reshape(-1)
    gallery = torch.as_tensor(gallery, dtype=torch.float64).reshape(-1)
    num_relevant, gallery = torch.broadcast_tensors(num_relevant, gallery)
    return ks, num_relevant, gallery


def chance_recall_at_k(num_relevant, gallery, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """The expected Recall@k of a random ranking: the mean over queries of 1 - C(G - R, k) / C(G, k).

    Args:
        num_relevant: (Q,) relevant items R of each query (or one int for all).
        gallery: (Q,) gallery size G of each query (or one int).
    """
    ks, num_relevant, gallery = _chance_inputs(num_relevant, gallery, ks)
    if num_relevant.numel() == 0:
        return {k: math.nan for k in ks}
    zeros = torch.zeros_like(gallery)
    return {k: _hit_probability(zeros, gallery, num_relevant, k).mean().item() for k in ks}


def chance_map_at_k(num_relevant, gallery, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """The expected mAP@k (:func:`mean_average_precision_at_k`) of a random ranking.

    With R relevant items among G, the item at rank i is relevant with probability R / G and, given that,
    the i - 1 items above it hold (i - 1)(R - 1)/(G - 1) relevant ones on average, so
    E[AP@k] = sum_{i <= min(k, G)} (R / (G i)) (1 + (i - 1)(R - 1) / (G - 1)) / min(k, R); queries with R = 0
    count 0.
    """
    ks, num_relevant, gallery = _chance_inputs(num_relevant, gallery, ks)
    if num_relevant.numel() == 0:
        return {k: math.nan for k in ks}
    out = {}
    for k in ks:
        top = int(min(k, gallery.max().item()))
        i = torch.arange(1, top + 1, dtype=torch.float64)[None, :]
        inside = i <= gallery[:, None]
        others = ((i - 1) * (num_relevant[:, None] - 1) / (gallery[:, None] - 1).clamp(min=1))
        terms = num_relevant[:, None] / (gallery[:, None] * i) * (1 + others) * inside
        ap = terms.sum(dim=1) / torch.minimum(num_relevant, torch.tensor(float(k))).clamp(min=1)
        out[k] = torch.where(num_relevant > 0, ap, 0.0).mean().item()
    return out


def binomial_noise(chance: float, n: int) -> float:
    """Two standard errors of a rate measured on ``n`` independent queries whose true value is ``chance``:
    2 sqrt(p (1 - p) / n). A score closer to the chance level than this is within noise of it."""
    if n <= 0 or chance is None or math.isnan(chance):
        return math.nan
    return 2.0 * math.sqrt(max(chance * (1.0 - chance), 0.0) / n)


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


def select_centre_box(candidate_boxes: torch.Tensor, image_size: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """(Q,) index of each query's candidate box whose centre is nearest to the image centre (a square image of
    side ``image_size``); ties go to the larger box, then to the lower index (the "centre box" baseline)."""
    centre = image_size / 2.0
    boxes = candidate_boxes.double()
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    return select_top_box(-((cx - centre) ** 2 + (cy - centre) ** 2), boxes, valid)


def select_largest_box(candidate_boxes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(Q,) index of each query's largest candidate box (ties: the lower index): the "largest box" baseline."""
    return select_top_box(torch.zeros(candidate_boxes.shape[:2], dtype=torch.float64), candidate_boxes, valid)


def choice_accuracy(choice: torch.Tensor, candidate_boxes: torch.Tensor, target_boxes: torch.Tensor,
                    valid: torch.Tensor | None = None, thresholds: Iterable[float] = (0.5, 0.7)) -> dict[float, float]:
    """Acc@t of one chosen candidate per query: the fraction whose choice has IoU >= t with the target box. A
    query without a valid candidate is a miss."""
    thresholds = [float(t) for t in thresholds]
    if candidate_boxes.shape[0] == 0:
        return {t: math.nan for t in thresholds}
    chosen = candidate_boxes.gather(1, choice[:, None, None].expand(-1, 1, 4))[:, 0]
    iou = paired_box_iou(chosen, target_boxes)
    if valid is not None:
        iou = torch.where(valid.bool().any(dim=1), iou, 0.0)
    return {t: (iou >= t).float().mean().item() for t in thresholds}


def random_box_accuracy(candidate_boxes: torch.Tensor, target_boxes: torch.Tensor, valid: torch.Tensor | None = None,
                        thresholds: Iterable[float] = (0.5, 0.7)) -> dict[float, float]:
    """The expected Acc@t of picking a candidate uniformly at random (the chance level of grounding): the mean
    over queries of the fraction of their valid candidates with IoU >= t with the target."""
    thresholds = [float(t) for t in thresholds]
    if candidate_boxes.shape[0] == 0:
        return {t: math.nan for t in thresholds}
    q, k = candidate_boxes.shape[:2]
    iou = paired_box_iou(candidate_boxes.reshape(-1, 4), target_boxes[:, None, :].expand(q, k, 4).reshape(-1, 4))
    iou = iou.reshape(q, k)
    mask = torch.ones(q, k, dtype=torch.bool) if valid is None else valid.bool()
    count = mask.sum(dim=1).double()
    out = {}
    for t in thresholds:
        hits = ((iou >= t) & mask).sum(dim=1).double()
        out[t] = torch.where(count > 0, hits / count.clamp(min=1), 0.0).mean().item()
    return out


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
    return choice_accuracy(select_top_box(box_scores, candidate_boxes, valid), candidate_boxes, target_boxes,
                           valid, thresholds)


# --- attention diagnostics -----------------------------------------------------------------------------

def patch_coverage(boxes: torch.Tensor, grid: int, image_size: float) -> torch.Tensor:
    """(B, 4) boxes in pixels of a square image of side ``image_size`` -> (B, grid * grid) the fraction of each
    patch (row-major, as ViT tokens) that the box covers, in [0, 1]. Its sum is the number of patches the box
    covers; its mean, the box's share of the image."""
    step = image_size / grid
    edges = torch.arange(grid + 1, dtype=torch.float64) * step
    boxes = boxes.double()

    def overlap(lo, hi):  # (B,) -> (B, grid): the length of [lo, hi) inside each patch interval
        return (torch.minimum(hi[:, None], edges[None, 1:]) - torch.maximum(lo[:, None], edges[None, :-1])).clamp(min=0)

    cols = overlap(boxes[:, 0], boxes[:, 2]) / step
    rows = overlap(boxes[:, 1], boxes[:, 3]) / step
    return (rows[:, :, None] * cols[:, None, :]).reshape(boxes.shape[0], grid * grid)


def attention_in_box(weights: torch.Tensor, coverage: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where a distribution over patches puts its mass, against a box.

    Args:
        weights: (B, N) non-negative weights over the N patches (normalized here).
        coverage: (B, N) from :func:`patch_coverage`.

    Returns:
        ``mass_in_box`` (B,): the weight inside the box (patches counted by the fraction the box covers);
        ``chance_mass_in_box`` (B,): the same for uniform weights, the box's share of the image;
        ``effective_tokens`` (B,): exp of the entropy of the weights (N for uniform weights, 1 for one patch);
        ``box_tokens`` (B,): the number of patches the box covers.
    """
    w = weights.double().clamp(min=0)
    w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-300)
    entropy = -(w * torch.log(w.clamp(min=1e-300))).sum(dim=1)
    coverage = coverage.double()
    return {"mass_in_box": (w * coverage).sum(dim=1), "chance_mass_in_box": coverage.mean(dim=1),
            "effective_tokens": entropy.exp(), "box_tokens": coverage.sum(dim=1)}

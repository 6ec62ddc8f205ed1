"""Zero-shot evaluation of an ECLIP model on a held-out product catalogue (the paper's transfer tasks, in a
protocol that cannot be passed without looking at the image).

    eclip-eval --catalogue data/catalogue.jsonl [--heldout-fraction 0.1 | --all] [--model eclip-tiny]
               [--checkpoint model.pt ...] [--seeds 0 1 2] [--json results.json] [--verbose]

Every task reports, on the same queries and candidates, the ECLIP method (instance decoder), the CLIP
methods computed from the same model's global tower (and so also for the CLIP baseline, which has no
decoder), trivial baselines where they exist, and the chance level with its noise (two standard errors of a
chance-level score on this many queries). Scores are percentages. The tasks (keys of ``results["tasks"]``;
docs/evaluation.md has every key):

* ``fine_retrieval`` (the headline): each customer photo (the product small, among clutter) retrieves its
  product's merchant image among the merchant images of all evaluated products; one relevant item per query.
  ECLIP scores a (query, gallery) pair by the cosine of the two instance features decoded with the SAME
  prompt, the query's product text (cross-prompt scoring): the prompt is the same for every gallery item, so
  only the images can tell them apart. CLIP rows: global embeddings; global embedding of the query's true
  product crop (the upper bound a perfect grounder would give CLIP); text-weighted pooling of the patch
  embeddings (weights: softmax over patches of their similarity to the query text), also cross-prompt.
* ``fine_retrieval_family``: the same rankings restricted to the query's variant family (products that differ
  in one attribute), for catalogues that record families (``eclip-data synth --family-size``).
* ``coarse_retrieval``: the same rankings, a match = same category (mAP@k).
* ``classification``: every image against one text embedding per category, built from in-distribution
  prompts (the bare category word, or an ensemble of the synthetic catalogue's phrasings); global image
  embeddings (CLIP-style), and the paper's multimodal version: the instance feature of the image decoded with
  its own product text; with the CLIP + text pooling and the text alone as baselines (the product text names
  the category).
* ``image_to_text`` / ``text_to_image``: each product's first image against the product texts, global
  embeddings.
* ``grounding_<source>`` (headline: customer): the candidates of each image (every object: the product and the
  distractors, plus seeded decoys of the objects' sizes) are scored by the mean of a map inside them; the best
  is a hit at IoU >= 0.5 (0.7) with the product box. Maps: the decoder's attention of the positive query (ECLIP), the
  similarity of the text embedding to each projected patch (CLIP). Baselines on the same candidates: the
  largest box, the box nearest the centre, a random object (the product or a distractor, expected value:
  what knowing where the objects are, and nothing about the text, gives), a random box (expected value: the
  chance row).
  ``grounding_customer_same_category``: the customer photos that hold a distractor of the product's own
  category (``eclip-data synth --same-category-distractor``).

``results["diagnostics"]`` (printed with ``--verbose``): on customer photos, the share of the positive
query's attention (and of the CLIP + text pooling weights) inside the product box against the box's share of
the image, and the effective number of tokens (exp of the entropy) against the tokens the box covers.

The model is an :class:`eclip.models.ECLIP` (read through :class:`eclip.eval.features.ECLIPFeatures`) or
anything with the transfer API (:class:`eclip.eval.features.TransferAPIFeatures`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import sys

import numpy as np
import torch
from torch.nn import functional as F

from . import metrics, report
from .features import adapter_for, negative_prompt_set, upsample_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QUERY_SOURCE = "customer"
GALLERY_SOURCE = "merchant"
SOURCE_ORDER = ("merchant", "ad", "customer")
NUM_DECOYS = 5
RETRIEVAL_KS = (1, 5)
PRODUCT_KS = (1, 5, 10)
IOU_THRESHOLDS = (0.5, 0.7)
CLASS_PROMPTS = ("category", "templates")
PRODUCT_INFO_NAME = "attributes.jsonl"  # written next to the manifest by eclip-data synth


# --- inputs ----------------------------------------------------------------------------------------------

def _to_tensor(image, image_size: int) -> torch.Tensor:
    from PIL import Image

    image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (tensor - mean) / std


def load_image(path: str, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, S, S) float tensor (RGB, bilinear resize to S x S, ImageNet-normalized), and the original
    (width, height)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        return _to_tensor(image, image_size), image.size


def square_around(box, width: int, height: int) -> list[int]:
    """The smallest square around ``box`` (x0, y0, x1, y1), moved inside the image (and cut to it when the
    image is smaller), in whole pixels."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = min(max(x1 - x0, y1 - y0, 1.0), float(width), float(height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0.0), width - side)))
    top = int(round(min(max(cy - side / 2, 0.0), height - side)))
    side = int(round(side))
    return [left, top, min(left + side, width), min(top + side, height)]


def load_crop(path: str, box, image_size: int) -> torch.Tensor:
    """The square crop around ``box`` (original pixels, see :func:`square_around`) resized to S x S, as
    :func:`load_image` (the product as a perfect grounder would hand it to CLIP, aspect ratio kept)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        return _to_tensor(image.crop(square_around(box, *image.size)), image_size)


def scale_box(box, original_size: tuple[int, int], image_size: int) -> list[float]:
    """A box (x0, y0, x1, y1) in original pixels -> the same box in the resized S x S image."""
    width, height = original_size
    sx, sy = image_size / width, image_size / height
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def decoy_boxes(objects: torch.Tensor, count: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 4) decoys: each the size of one of the image's ``objects`` (K, 4), drawn uniformly, placed
    uniformly inside the image. Decoys of the objects' sizes keep the box score (the mean of a map inside the
    box) from favouring the objects for their size alone: the mean over a small box varies more than over a
    large one, so with decoys larger than the objects even a map of noise would pick an object."""
    pick = torch.randint(len(objects), (count,), generator=generator)
    wh = (objects[pick, 2:] - objects[pick, :2]).clamp(min=1.0, max=float(image_size))
    top_left = torch.rand(count, 2, generator=generator, dtype=torch.float64) * (image_size - wh)
    return torch.cat([top_left, top_left + wh], dim=1)


def read_product_info(manifest_path: str) -> dict | None:
    """The per-product side information ``eclip-data synth`` writes next to the manifest
    (``attributes.jsonl``: ``product_id``, ``family``, ``attributes``, ``distractor_categories``), keyed by
    product id, or None when the file is absent."""
    path = os.path.join(os.path.dirname(os.path.abspath(manifest_path)), PRODUCT_INFO_NAME)
    if not os.path.isfile(path):
        return None
    info = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                info[row["product_id"]] = row
    return info


def class_prompt_templates(name_or_templates) -> tuple[str, ...]:
    """Category prompt templates ("{}" = the category): "category" -> the bare category word (every catalogue
    text contains it); "templates" -> the ensemble of the synthetic catalogue's phrasings
    (:data:`eclip.data.synth.CLASS_TEMPLATES`); a string with "{}" or a sequence of them -> as given."""
    if name_or_templates == "category":
        return ("{}",)
    if name_or_templates == "templates":
        from eclip.data.synth import CLASS_TEMPLATES

        return tuple(CLASS_TEMPLATES)
    templates = (name_or_templates,) if isinstance(name_or_templates, str) else tuple(name_or_templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"class prompts must be 'category', 'templates' or templates with '{{}}', got "
                         f"{name_or_templates!r}")
    return templates


# --- the evaluation ---------------------------------------------------------------------------------------

def _pct(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else 100.0 * value


def _batched(fn, count: int, size: int):
    """Concatenate fn(slice) over slices of ``count`` rows (dict outputs concatenated key by key)."""
    parts = [fn(slice(start, min(start + size, count))) for start in range(0, count, size)]
    if not parts:
        return None
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if parts[0][k] is not None}
    if isinstance(parts[0], tuple):
        return tuple(None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return None if parts[0] is None else torch.cat(parts)


class _Catalogue:
    """The evaluated images, loaded once: pixels, boxes, candidates and the index maps the tasks use."""

    def __init__(self, products, image_size, seed, num_decoys, product_info):
        self.products = products
        self.entries = [(p, image) for p, product in enumerate(products) for image in product.images]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(lambda e: load_image(e[1].path, image_size), self.entries))
        self.pixels = torch.stack([t for t, _ in loaded]) if loaded else torch.zeros(0, 3, image_size, image_size)
        self.sizes = [s for _, s in loaded]
        self.image_size = image_size
        self.product_of = torch.tensor([p for p, _ in self.entries], dtype=torch.long)
        self.sources = [image.source for _, image in self.entries]
        self.categories = sorted({product.category for product in products})
        index = {c: i for i, c in enumerate(self.categories)}
        self.product_category = torch.tensor([index[p.category] for p in products], dtype=torch.long)
        # targets and candidates of every image with a product box, in resized pixels
        self.boxes, self.candidates, self.is_object = {}, {}, {}
        for flat, (p, image) in enumerate(self.entries):
            if image.box is None:
                continue
            target = scale_box(image.box, self.sizes[flat], image_size)
            objects = [target] + [scale_box(b, self.sizes[flat], image_size) for b in image.distractors
                                  if isinstance(b, (list, tuple)) and len(b) == 4]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + flat)
            objects_t = torch.tensor(objects, dtype=torch.float64)
            boxes = torch.cat([objects_t, decoy_boxes(objects_t, num_decoys, image_size, generator)])
            order = torch.randperm(len(boxes), generator=generator)
            self.boxes[flat] = torch.tensor(target, dtype=torch.float64)
            self.candidates[flat] = boxes[order]
            self.is_object[flat] = order < len(objects)  # the product's and the distractors' boxes
        # side information of synthetic catalogues: variant families, distractor categories
        self.family = None
        self.same_category_distractor = set()
        if product_info:
            self.family = [product_info.get(p.product_id, {}).get("family") for p in products]
            flat = 0
            for product in products:
                cats = product_info.get(product.product_id, {}).get("distractor_categories") or []
                for j in range(len(product.images)):
                    if j < len(cats) and product.category in (cats[j] or []):
                        self.same_category_distractor.add(flat + j)
                flat += len(product.images)

    def source_order(self) -> list[str]:
        present = set(self.sources)
        return [s for s in SOURCE_ORDER if s in present] + sorted(present - set(SOURCE_ORDER))


def _pooled(patches: torch.Tensor, text: torch.Tensor, scale: float, return_weights: bool = False):
    """CLIP + text: (B, N, D) unit patch embeddings and (B, D) unit text embeddings -> (B, D) the unit mean of
    the patches weighted by softmax over patches of scale x their cosine to the text (and the weights)."""
    weights = torch.softmax(scale * torch.einsum("bnd,bd->bn", patches, text), dim=1)
    pooled = F.normalize(torch.einsum("bn,bnd->bd", weights, patches), dim=-1)
    return (pooled, weights) if return_weights else pooled


def _pairs(num_queries: int, num_gallery: int, pair_batch: int):
    """Slices of the flattened (query, gallery) pairs, ``pair_batch`` at a time: (query idx, gallery idx)."""
    total = num_queries * num_gallery
    for start in range(0, total, pair_batch):
        flat = torch.arange(start, min(start + pair_batch, total))
        yield flat // num_gallery, flat % num_gallery


def _cross_prompt_instance(fx, image_state, query_text_state, query_features, gallery, pair_batch):
    """(Q, G) cosine of the query's instance feature (decoded with its own text) and each gallery image's
    instance feature decoded with the SAME (query's) text."""
    q_count, g_count = query_features.shape[0], len(gallery)
    scores = torch.empty(q_count * g_count)
    done = 0
    for qi, gi in _pairs(q_count, g_count, pair_batch):
        feats, _ = fx.decode(image_state[gallery[gi]], query_text_state[qi])
        scores[done:done + len(qi)] = (query_features[qi] * feats).sum(dim=-1)
        done += len(qi)
    return scores.view(q_count, g_count)


def _cross_prompt_pooling(patches, query_text, query_pooled, gallery, scale, pair_batch):
    """(Q, G) CLIP + text, cross-prompt: the gallery image pooled with the query's text."""
    q_count, g_count = query_text.shape[0], len(gallery)
    chunk = max(1, pair_batch // max(g_count, 1))
    gallery_patches = patches[gallery]
    out = []
    for start in range(0, q_count, chunk):
        text = query_text[start:start + chunk]
        weights = torch.softmax(scale * torch.einsum("qd,gnd->qgn", text, gallery_patches), dim=2)
        pooled = F.normalize(torch.einsum("qgn,gnd->qgd", weights, gallery_patches), dim=-1)
        out.append(torch.einsum("qd,qgd->qg", query_pooled[start:start + chunk], pooled))
    return torch.cat(out) if out else torch.zeros(0, g_count)


def _recall_row(scores, relevant, ks):
    return {f"R@{k}": _pct(v) for k, v in metrics.expected_recall_at_k(scores, relevant, ks).items()}


def _task(title, n, columns, rows, chance, noise=None, **extra):
    rows = {name: row for name, row in rows.items() if row is not None}
    rows["chance"] = chance
    return {"title": title, "n": n, **extra, "columns": list(columns), "rows": rows, "noise": noise or {}}


def evaluate(model, products, tokenizer, image_size: int, *, batch_size: int = 64, seed: int = 0, device="cpu",
             class_prompts="category", num_decoys: int = NUM_DECOYS, product_info: dict | None = None,
             query_source: str = QUERY_SOURCE, gallery_source: str = GALLERY_SOURCE, pair_batch: int = 8192,
             negative_prompts: torch.Tensor | None = None) -> dict:
    """Run every zero-shot task on ``products`` (a list of :class:`eclip.data.manifest.Product`).

    Args:
        model: an :class:`eclip.models.ECLIP`, or anything with the transfer API, already on ``device``.
        tokenizer: texts -> (input_ids, attention_mask), e.g. :func:`eclip.models.tokenizer_for`.
        image_size: side of the square model input; manifest boxes are rescaled to it.
        batch_size: images (and texts) per model call.
        seed: the decoder's negative prompts and the decoy candidate boxes.
        class_prompts: see :func:`class_prompt_templates`.
        num_decoys: decoy candidate boxes per grounding image (:func:`decoy_boxes`).
        product_info: product id -> side information (:func:`read_product_info`): variant families and the
            categories of each image's distractors; None: no family and same-category tasks.
        query_source, gallery_source: the image sources of fine-grained retrieval.
        pair_batch: (query, gallery) pairs decoded per call in cross-prompt retrieval.
        negative_prompts: (T - 1, D) negative prompts of the decoder instead of the seeded N(0, I) draw
            (:func:`eclip.eval.features.negative_prompt_set`); ECLIP models only.

    Returns:
        ``{"catalogue", "settings", "tasks", "diagnostics", "summary", "summary_methods"}``; each task has
        ``title``, ``n``, ``columns``, ``rows`` (method -> column -> percent, None where a method has no value)
        and ``noise`` (column -> two standard errors of a chance-level score). docs/evaluation.md lists the keys.
    """
    templates = class_prompt_templates(class_prompts)
    was_training = getattr(model, "training", None)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            return _evaluate(model, products, tokenizer, image_size, batch_size, seed, device, templates,
                             num_decoys, product_info, query_source, gallery_source, pair_batch, negative_prompts)
    finally:
        if was_training and hasattr(model, "train"):
            model.train(was_training)


def _evaluate(model, products, tokenizer, image_size, batch_size, seed, device, templates, num_decoys,
              product_info, query_source, gallery_source, pair_batch, negative_prompts=None):
    cat = _Catalogue(products, image_size, seed, num_decoys, product_info)
    fx = adapter_for(model, seed=seed, device=device, negative_prompts=negative_prompts)
    entries, num_images = cat.entries, len(cat.entries)
    scale = fx.logit_scale

    def encode_texts(texts):
        def run(rows):
            ids, mask = tokenizer(list(texts[rows]))
            return fx.texts(ids, mask)
        return _batched(run, len(texts), batch_size)

    product_texts = np.array([p.text for p in products], dtype=object)
    text = encode_texts(product_texts) if len(products) else None
    image = _batched(lambda rows: fx.images(cat.pixels[rows]), num_images, batch_size) if num_images else None

    # class embeddings: the normalized mean of the template embeddings of each category
    class_emb = None
    if cat.categories:
        prompts = np.array([t.format(c) for c in cat.categories for t in templates], dtype=object)
        emb = encode_texts(prompts)["embedding"].view(len(cat.categories), len(templates), -1)
        class_emb = F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)

    # every image decoded with its own product's text: instance features, attention, decoder maps
    own_inst = own_attn = None
    if num_images and fx.has_decoder:
        own = _batched(lambda rows: fx.decode(image["state"][rows], text["state"][cat.product_of[rows]],
                                              fx.has_attention), num_images, batch_size)
        if own is not None and own[0] is not None:
            own_inst, own_attn = own
    has_patches = image is not None and "patches" in image
    own_pooled = own_weights = None
    if has_patches:
        own_pooled, own_weights = _pooled(image["patches"], text["embedding"][cat.product_of], scale, True)

    tasks = {}
    tasks["classification"] = _classification(cat, image, text, class_emb, own_inst, own_pooled)
    tasks["image_to_text"], tasks["text_to_image"] = _image_text(cat, image, text)
    fine, coarse, family = _product_retrieval(cat, fx, image, text, own_inst, own_pooled, scale, query_source,
                                              gallery_source, batch_size, pair_batch)
    tasks["fine_retrieval"], tasks["fine_retrieval_family"], tasks["coarse_retrieval"] = fine, family, coarse
    if family is None:
        del tasks["fine_retrieval_family"]
    tasks.update(_grounding(cat, fx, image, text, own_attn, batch_size))
    diagnostics = _diagnostics(cat, fx, own_attn, own_weights, query_source)

    results = {
        "catalogue": {"products": len(products), "images": num_images, "categories": len(cat.categories),
                      "images_by_source": {s: cat.sources.count(s) for s in cat.source_order()}},
        "settings": {"image_size": image_size, "seed": seed, "class_prompts": list(templates),
                     "decoy_boxes": num_decoys, "query_source": query_source,
                     "gallery_source": gallery_source, "logit_scale": scale,
                     "features": type(fx).__name__,
                     "negative_prompts": "N(0, I)" if negative_prompts is None else "given",
                     "instance_decoder": bool(fx.has_decoder and own_inst is not None),
                     "product_info": product_info is not None},
        "tasks": tasks,
        "diagnostics": diagnostics,
    }
    results["summary"], results["summary_methods"] = report.summary(results)
    return results


def _classification(cat, image, text, class_emb, own_inst, own_pooled):
    columns = ["Acc@1"] + [f"Acc@1 {s}" for s in cat.source_order()]
    n = len(cat.entries)
    if not n or class_emb is None:
        return _task("Product classification (category prompts)", 0, columns, {}, {c: None for c in columns})
    targets = cat.product_category[cat.product_of]
    relevant = F.one_hot(targets, len(cat.categories)).bool()
    by_source = {s: torch.tensor([src == s for src in cat.sources]) for s in cat.source_order()}

    def row(features):
        if features is None:
            return None
        scores = features @ class_emb.T
        out = {"Acc@1": _pct(metrics.expected_recall_at_k(scores, relevant, (1,))[1])}
        for s, mask in by_source.items():
            out[f"Acc@1 {s}"] = _pct(metrics.expected_recall_at_k(scores[mask], relevant[mask], (1,))[1])
        return out

    chance = 1.0 / len(cat.categories)
    noise = {"Acc@1": _pct(metrics.binomial_noise(chance, n))}
    noise.update({f"Acc@1 {s}": _pct(metrics.binomial_noise(chance, int(m.sum()))) for s, m in by_source.items()})
    rows = {"eclip_instance": row(own_inst), "clip_global": row(image["global"]),
            "clip_text_pooling": row(own_pooled), "text_only": row(text["embedding"][cat.product_of])}
    return _task("Product classification (category prompts)", n, columns, rows,
                 {c: _pct(chance) for c in columns}, noise, n_by_source={s: int(m.sum()) for s, m in by_source.items()})


def _image_text(cat, image, text):
    first = {}
    for flat, (p, _) in enumerate(cat.entries):
        first.setdefault(p, flat)
    with_image = sorted(first)
    n = len(with_image)
    columns = [f"R@{k}" for k in RETRIEVAL_KS]
    if not n:
        empty = _task("", 0, columns, {}, {c: None for c in columns})
        return dict(empty, title="Image-to-text retrieval"), dict(empty, title="Text-to-image retrieval")
    texts = [cat.products[p].text for p in with_image]
    same_text = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
    image_feats, text_feats = image["global"][[first[p] for p in with_image]], text["embedding"][with_image]
    chance = metrics.chance_recall_at_k(same_text.sum(dim=1), n, RETRIEVAL_KS)
    noise = {f"R@{k}": _pct(metrics.binomial_noise(v, n)) for k, v in chance.items()}
    chance = {f"R@{k}": _pct(v) for k, v in chance.items()}
    i2t = _task("Image-to-text retrieval (each product's first image; global embeddings)", n, columns,
                {"clip_global": _recall_row(image_feats @ text_feats.T, same_text, RETRIEVAL_KS)}, chance, noise)
    t2i = _task("Text-to-image retrieval (each product's first image; global embeddings)", n, columns,
                {"clip_global": _recall_row(text_feats @ image_feats.T, same_text, RETRIEVAL_KS)}, chance, noise)
    return i2t, t2i


def _product_retrieval(cat, fx, image, text, own_inst, own_pooled, scale, query_source, gallery_source,
                       batch_size, pair_batch):
    gallery_of = {}
    for flat, (p, _) in enumerate(cat.entries):
        if cat.sources[flat] == gallery_source:
            gallery_of.setdefault(p, flat)
    gallery = torch.tensor(sorted(gallery_of.values()), dtype=torch.long)
    queries = torch.tensor([flat for flat, (p, _) in enumerate(cat.entries)
                            if cat.sources[flat] == query_source and p in gallery_of], dtype=torch.long)
    q_count, g_count = len(queries), len(gallery)
    fine_cols = [f"R@{k}" for k in PRODUCT_KS]
    coarse_cols = [f"mAP@{k}" for k in PRODUCT_KS]
    fine_title = (f"Fine-grained product retrieval ({query_source} photo -> {gallery_source} image of the same "
                  "product)")
    coarse_title = f"Coarse product retrieval ({query_source} -> {gallery_source}, match = same category)"
    if not q_count:
        return (_task(fine_title, 0, fine_cols, {}, {c: None for c in fine_cols}, gallery=g_count),
                _task(coarse_title, 0, coarse_cols, {}, {c: None for c in coarse_cols}, gallery=g_count), None)

    q_product, g_product = cat.product_of[queries], cat.product_of[gallery]
    same_product = q_product[:, None] == g_product[None, :]
    same_category = cat.product_category[q_product][:, None] == cat.product_category[g_product][None, :]

    scores = {"clip_global": image["global"][queries] @ image["global"][gallery].T}
    if own_inst is not None:
        scores["eclip_instance"] = _cross_prompt_instance(fx, image["state"], text["state"][q_product],
                                                          own_inst[queries], gallery, pair_batch)
    crops = [(cat.entries[q][1], cat.image_size) for q in queries.tolist()]
    if all(image_.box is not None for image_, _ in crops):
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            crop_pixels = torch.stack(list(pool.map(lambda c: load_crop(c[0].path, c[0].box, c[1]), crops)))
        crop_global = _batched(lambda rows: fx.images(crop_pixels[rows])["global"], q_count, batch_size)
        scores["clip_global_crop"] = crop_global @ image["global"][gallery].T
    if own_pooled is not None:
        scores["clip_text_pooling"] = _cross_prompt_pooling(image["patches"], text["embedding"][q_product],
                                                            own_pooled[queries], gallery, scale, pair_batch)
    order = ("eclip_instance", "clip_global", "clip_global_crop", "clip_text_pooling")
    scores = {name: scores[name] for name in order if name in scores}

    chance = metrics.chance_recall_at_k(same_product.sum(dim=1), g_count, PRODUCT_KS)
    fine = _task(fine_title, q_count, fine_cols,
                 {name: _recall_row(s, same_product, PRODUCT_KS) for name, s in scores.items()},
                 {f"R@{k}": _pct(v) for k, v in chance.items()},
                 {f"R@{k}": _pct(metrics.binomial_noise(v, q_count)) for k, v in chance.items()}, gallery=g_count)

    coarse_chance = metrics.chance_map_at_k(same_category.sum(dim=1), g_count, PRODUCT_KS)
    coarse = _task(coarse_title, q_count, coarse_cols,
                   {name: {f"mAP@{k}": _pct(v) for k, v in
                           metrics.mean_average_precision_at_k(s, same_category, PRODUCT_KS).items()}
                    for name, s in scores.items()},
                   {f"mAP@{k}": _pct(v) for k, v in coarse_chance.items()}, gallery=g_count)

    family = None
    if cat.family is not None and any(f is not None for f in cat.family):
        fam = torch.tensor([-1 - i if f is None else int(f) for i, f in enumerate(cat.family)], dtype=torch.long)
        same_family = fam[q_product][:, None] == fam[g_product][None, :]
        keep = same_family.sum(dim=1) >= 2
        sizes = same_family[keep].sum(dim=1)
        n = int(keep.sum())
        chance1 = metrics.chance_recall_at_k(torch.ones(n), sizes, (1,))[1] if n else math.nan
        rows = {}
        for name, s in scores.items():
            restricted = s[keep].masked_fill(~same_family[keep], -math.inf)
            rows[name] = {"R@1": _pct(metrics.expected_recall_at_k(restricted, same_product[keep], (1,))[1])
                          if n else None}
        family = _task(f"Fine-grained retrieval within the variant family ({query_source} -> {gallery_source} "
                       "images of the family)", n, ["R@1"], rows, {"R@1": _pct(chance1)},
                       {"R@1": _pct(metrics.binomial_noise(chance1, n))},
                       mean_family_gallery=float(sizes.double().mean()) if n else None)
    return fine, coarse, family


def _grounding(cat, fx, image, text, own_attn, batch_size):
    boxed = sorted(cat.boxes)
    groups = {f"grounding_{s}": [f for f in boxed if cat.sources[f] == s] for s in cat.source_order()}
    if cat.same_category_distractor:
        groups["grounding_customer_same_category"] = [f for f in boxed if f in cat.same_category_distractor
                                                      and cat.sources[f] == QUERY_SOURCE]
    columns = [f"Acc@{t}" for t in IOU_THRESHOLDS]
    if not boxed:
        return {}
    # box scores of every boxed image, per map
    flat = torch.tensor(boxed, dtype=torch.long)
    width = max(len(cat.candidates[f]) for f in boxed)
    cands = torch.zeros(len(boxed), width, 4, dtype=torch.float64)
    valid = torch.zeros(len(boxed), width, dtype=torch.bool)
    objects = torch.zeros(len(boxed), width, dtype=torch.bool)
    for row, f in enumerate(boxed):
        cands[row, :len(cat.candidates[f])], valid[row, :len(cat.candidates[f])] = cat.candidates[f], True
        objects[row, :len(cat.candidates[f])] = cat.is_object[f]
    targets = torch.stack([cat.boxes[f] for f in boxed])
    size = cat.image_size
    box_scores = {}
    if fx.has_decoder:
        def decoder_scores(rows):
            f = flat[rows]
            state, prompt = image["state"][f], text["state"][cat.product_of[f]]
            maps = fx.decoder_maps(state, prompt, None if own_attn is None else own_attn[f])
            return None if maps is None else metrics.mean_in_boxes(maps, cands[rows])
        scores = _batched(decoder_scores, len(boxed), batch_size)
        if scores is not None:
            box_scores["eclip_decoder_map"] = scores
    if "patches" in image and fx.grid is not None:
        def patch_scores(rows):
            f = flat[rows]
            sim = torch.einsum("bnd,bd->bn", image["patches"][f], text["embedding"][cat.product_of[f]])
            return metrics.mean_in_boxes(upsample_grid(sim, fx.grid, size), cands[rows])
        box_scores["clip_patch_map"] = _batched(patch_scores, len(boxed), batch_size)

    out = {}
    position = {f: row for row, f in enumerate(boxed)}
    for key, members in groups.items():
        source = key[len("grounding_"):]
        title = f"Visual grounding, {source} images"
        if key == "grounding_customer_same_category":
            title = "Visual grounding, customer images with a same-category distractor"
        if not members:
            out[key] = _task(title, 0, columns, {}, {c: None for c in columns})
            continue
        rows_idx = torch.tensor([position[f] for f in members])
        c, v, t = cands[rows_idx], valid[rows_idx], targets[rows_idx]

        def acc(values):
            return {f"Acc@{k}": _pct(x) for k, x in values.items()}

        rows = {name: acc(metrics.grounding_accuracy(s[rows_idx], c, t, v, IOU_THRESHOLDS))
                for name, s in box_scores.items()}
        rows["largest_box"] = acc(metrics.choice_accuracy(metrics.select_largest_box(c, v), c, t, v, IOU_THRESHOLDS))
        rows["centre_box"] = acc(metrics.choice_accuracy(metrics.select_centre_box(c, size, v), c, t, v,
                                                         IOU_THRESHOLDS))
        rows["random_object"] = acc(metrics.random_box_accuracy(c, t, objects[rows_idx], IOU_THRESHOLDS))
        chance = metrics.random_box_accuracy(c, t, v, IOU_THRESHOLDS)
        out[key] = _task(title, len(members), columns, rows, acc(chance),
                         {f"Acc@{k}": _pct(metrics.binomial_noise(x, len(members))) for k, x in chance.items()},
                         mean_candidates=float(v.sum(dim=1).double().mean()))
    return out


def _diagnostics(cat, fx, own_attn, own_weights, query_source):
    """Attention of the positive query (and CLIP + text weights) against the product box, on the query-source
    (customer) images."""
    members = [f for f in sorted(cat.boxes) if cat.sources[f] == query_source]
    columns = ["mass_in_box", "effective_tokens"]
    if not members or fx.grid is None:
        return {"title": "Attention diagnostics", "n": 0, "columns": columns, "rows": {}}
    idx = torch.tensor(members)
    coverage = metrics.patch_coverage(torch.stack([cat.boxes[f] for f in members]), fx.grid, cat.image_size)

    def row(weights):
        stats = metrics.attention_in_box(weights, coverage)
        return {"mass_in_box": _pct(stats["mass_in_box"].mean()),
                "effective_tokens": float(stats["effective_tokens"].mean())}

    rows = {}
    if own_attn is not None:
        rows["eclip_decoder"] = row(own_attn[idx])
    if own_weights is not None:
        rows["clip_text_pooling"] = row(own_weights[idx])
    rows["chance"] = row(torch.ones_like(coverage))
    return {"title": f"Attention diagnostics ({query_source} images, positive query / text weights)",
            "n": len(members), "tokens": fx.num_tokens,
            "box_tokens": float(coverage.sum(dim=1).mean()), "columns": columns, "rows": rows}


# --- command line ----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eclip-eval", description="Zero-shot evaluation of an ECLIP model on "
                                     "the held-out products of a catalogue (docs/evaluation.md).")
    parser.add_argument("--catalogue", required=True, help="the catalogue manifest (JSONL)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--heldout-fraction", type=float, default=0.1,
                       help="evaluate the held-out split of this fraction (default 0.1, the training split's)")
    which.add_argument("--all", action="store_true", help="evaluate every product of the catalogue")
    parser.add_argument("--model", default="eclip-tiny", help="preset name (default eclip-tiny)")
    parser.add_argument("--checkpoint", nargs="+", default=None,
                        help="state_dict file(s) of the model, or eclip-train run folder(s) (config.json and "
                             "checkpoints/: the run's own model, e.g. runs/demo/clip-baseline); several: mean ± "
                             "std over them (random init without one: a fresh initialization per seed)")
    parser.add_argument("--vocab", help="BERT vocab.txt (default: the preset's own)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", "--out", dest="json", help="write every number as JSON here")
    parser.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                        help="evaluation seeds (negative prompts, decoy boxes; random init without a checkpoint); "
                             "several: mean ± std (default 0)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--class-prompts", default="category",
                        help="category prompts: 'category' (the bare word, default), 'templates' (the synthetic "
                             "catalogue's phrasings) or a template with '{}'")
    parser.add_argument("--decoy-boxes", "--random-boxes", dest="decoys", type=int, default=NUM_DECOYS,
                        help=f"decoy candidate boxes (the objects' sizes, placed at random) per grounding image "
                             f"(default {NUM_DECOYS})")
    parser.add_argument("--query-source", default=QUERY_SOURCE, help="fine-grained retrieval queries (customer)")
    parser.add_argument("--gallery-source", default=GALLERY_SOURCE, help="fine-grained retrieval gallery (merchant)")
    parser.add_argument("--negatives", default="noise", choices=("noise", "texts", "mean"),
                        help="the decoder's negative prompts: 'noise' N(0, I) (default, paper section 3.4), 'texts' "
                             "the texts of T - 1 products that are not evaluated, 'mean' the mean prompt of the "
                             "texts of the products that are not evaluated (paper Table 6)")
    parser.add_argument("--verbose", action="store_true", help="also print the attention diagnostics")
    return parser


def _load_state_dict(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # a checkpoint that wraps the state_dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_model(preset: str, checkpoint: str | None):
    """The model to evaluate: ``preset`` with the weights of a state_dict file, or the model of an eclip-train
    run folder (its config and latest checkpoint), or ``preset`` at random init (``checkpoint`` None)."""
    import eclip.models as em

    if checkpoint and os.path.isdir(checkpoint):
        from eclip.train.config import TrainConfig
        from eclip.train.trainer import load_trained

        config = os.path.join(checkpoint, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{checkpoint} is a folder without config.json (not an eclip-train run)")
        with open(config, encoding="utf-8") as f:
            cfg = TrainConfig(**json.load(f))
        cfg.out = checkpoint
        return load_trained(cfg)
    model = em.create(preset)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    return model


def main(argv: list[str] | None = None) -> int:
    """The ``eclip-eval`` command: 0 on success, 2 on a usage or input error."""
    args = _parser().parse_args(argv)
    from eclip._deps import MODEL, require

    require("eclip-eval", *MODEL, "PIL")
    from eclip.data.manifest import ManifestError, read_manifest, split

    try:
        products = read_manifest(args.catalogue)
    except (OSError, ManifestError) as exc:
        print(f"eclip-eval: cannot read the catalogue: {exc}", file=sys.stderr)
        return 2
    others = []  # products that are not evaluated: the source of the 'texts' and 'mean' negative prompts
    if not args.all:
        if not 0.0 < args.heldout_fraction <= 1.0:
            print("eclip-eval: --heldout-fraction must be in (0, 1]", file=sys.stderr)
            return 2
        others, products = split(products, args.heldout_fraction)
    if args.negatives != "noise" and not others:
        print(f"eclip-eval: --negatives {args.negatives} needs products that are not evaluated (not with --all "
              "or --heldout-fraction 1)", file=sys.stderr)
        return 2
    if not products:
        print("eclip-eval: no product to evaluate (the held-out split is empty; try --all or a larger "
              "--heldout-fraction)", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("eclip-eval: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        class_prompt_templates(args.class_prompts)
    except ValueError as exc:
        print(f"eclip-eval: {exc}", file=sys.stderr)
        return 2

    import eclip.models as em

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = read_product_info(args.catalogue)
    runs = []
    for checkpoint in args.checkpoint or [None]:
        for seed in args.seeds:
            torch.manual_seed(seed)
            try:
                model = load_model(args.model, checkpoint)
                tokenizer = em.tokenizer_for(model, args.vocab)
            except (KeyError, ValueError, OSError, RuntimeError) as exc:
                print(f"eclip-eval: {exc}", file=sys.stderr)
                return 2
            model.to(device)
            try:
                negatives = negative_prompt_set(args.negatives, model, tokenizer, [p.text for p in others],
                                                seed=seed, batch_size=args.batch_size, device=device)
            except ValueError as exc:
                print(f"eclip-eval: {exc}", file=sys.stderr)
                return 2
            runs.append(evaluate(model, products, tokenizer, model.config.image_size, batch_size=args.batch_size,
                                 seed=seed, device=device, class_prompts=args.class_prompts,
                                 num_decoys=args.decoys, product_info=info,
                                 query_source=args.query_source, gallery_source=args.gallery_source,
                                 negative_prompts=negatives))
    results = report.aggregate(runs)
    split_name = "all products" if args.all else f"held-out split {args.heldout_fraction:g}"
    weights = ", ".join(args.checkpoint) if args.checkpoint else "random init"
    results["settings"].update(model=args.model, checkpoints=args.checkpoint, catalogue=args.catalogue,
                               split=split_name, seeds=args.seeds, negatives=args.negatives)
    print(report.format_results(results, f"ECLIP zero-shot: {args.model} ({weights}), {split_name}",
                                verbose=args.verbose))
    if args.json:
        report.write_json(results, args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Zero-shot evaluation of an ECLIP model on a held-out product catalogue (the paper's transfer tasks).

    eclip-eval --catalogue data/catalogue.jsonl [--heldout-fraction 0.1 | --all] [--model eclip-tiny]
               [--checkpoint model.pt] [--vocab vocab.txt] [--batch-size 64] [--out results.json] [--seed 0]

Tasks (all scores in percent):

* product classification, Acc@1: every image against the category prompts ("a photo of a {category}"),
  global embeddings;
* image-to-text and text-to-image retrieval, R@1/R@5: each product's first image against the product texts,
  global embeddings (a text identical to the query product's text also counts as a match);
* coarse product retrieval, mAP@1/5/10 (a match = same category), and fine-grained product retrieval,
  R@1/5/10 and mAP@1/5/10 (a match = same product): one query image per product that has two or more images
  (its first "customer" image, else its last image), prompted with the product's text; the gallery is every
  other image of the catalogue (prompted with its own product's text); instance features of the decoder.
  Caveat: a query and its matching gallery images share their product's text, so a model whose instance
  features follow the prompt more than the image can match products by the text alone.
  ``retrieval_prompt="generic"`` (``--retrieval-prompt generic``) prompts every image with one fixed text
  instead, a control that measures what the image contributes;
* visual grounding, Acc@0.5/Acc@0.7: for every image with a product box, the grounding map (prompt = the
  product's text) scores the candidate boxes, i.e. the boxes of all objects in the image (product and
  distractors) plus a few seeded random boxes standing in for region proposals, in a seeded random order;
  the score of a box is the mean of the map inside it, the best box wins (ties: the larger box), and it is a
  hit when its IoU with the product box is >= 0.5 (0.7).

The model is anything with the transfer API (``encode_image``, ``encode_text``, ``instance_features``,
``grounding_map``; see :class:`eclip.models.ECLIP`). A model without an instance decoder (the plain CLIP
baseline) is evaluated on product retrieval with its global image embeddings, and without grounding.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import math
import os
import sys

import numpy as np
import torch

from . import metrics

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PROMPT = "a photo of a {}"  # every word is in the eclip-tiny vocabulary
GENERIC_PROMPT = "a photo of a product"  # the instance prompt of retrieval_prompt="generic"
RETRIEVAL_PROMPTS = ("text", "generic")
QUERY_SOURCES = ("customer",)
NUM_RANDOM_BOXES = 5
RETRIEVAL_KS = (1, 5)
PRODUCT_KS = (1, 5, 10)
IOU_THRESHOLDS = (0.5, 0.7)

# (section key, title, metric columns): the layout of the printed table
SECTIONS = (
    ("classification", "Product classification", ("Acc@1",)),
    ("image_to_text", "Image-to-text retrieval", ("R@1", "R@5")),
    ("text_to_image", "Text-to-image retrieval", ("R@1", "R@5")),
    ("coarse_retrieval", "Coarse-grained product retrieval (match = same category)", ("mAP@1", "mAP@5", "mAP@10")),
    ("fine_retrieval", "Fine-grained product retrieval (match = same product)",
     ("R@1", "R@5", "R@10", "mAP@1", "mAP@5", "mAP@10")),
    ("grounding", "Visual grounding", ("Acc@0.5", "Acc@0.7")),
)


# --- inputs ----------------------------------------------------------------------------------------------

def load_image(path: str, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, S, S) float tensor (RGB, bilinear resize to S x S, ImageNet-normalized), and the original
    (width, height)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        size = image.size
        image = image.resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (tensor - mean) / std, size


def scale_box(box, original_size: tuple[int, int], image_size: int) -> list[float]:
    """A box (x0, y0, x1, y1) in original pixels -> the same box in the resized S x S image."""
    width, height = original_size
    sx, sy = image_size / width, image_size / height
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def random_boxes(count: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 4) boxes with sides uniform in [0.1, 0.9] of the image, placed uniformly inside it."""
    wh = (0.1 + 0.8 * torch.rand(count, 2, generator=generator)) * image_size
    top_left = torch.rand(count, 2, generator=generator) * (image_size - wh)
    return torch.cat([top_left, top_left + wh], dim=1)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _percent(value: float) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * value


# --- evaluation ------------------------------------------------------------------------------------------

class _Encoder:
    """Runs the model over the catalogue in batches, loading each image once."""

    def __init__(self, model, tokenizer, image_size, batch_size, seed, device, num_random_boxes):
        self.model, self.tokenizer, self.image_size = model, tokenizer, image_size
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.num_random_boxes = num_random_boxes
        self.generator = torch.Generator().manual_seed(seed)  # negative prompts of the decoder
        self.instance_mode = "decoder"  # or "global" for a model without a decoder
        self.grounding_available = True

    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenizer(list(texts[start:start + self.batch_size]))
            out.append(self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def _instance(self, images, ids, mask):
        if self.instance_mode == "decoder":
            fn = self.model.instance_features
            extra = {"generator": self.generator} if _accepts(fn, "generator") else {}
            try:
                return fn(images, input_ids=ids, attention_mask=mask, **extra)
            except RuntimeError as exc:
                if "decoder" not in str(exc):
                    raise
                self.instance_mode = "global"
        return self.model.encode_image(images)

    def _grounding(self, images, ids, mask):
        fn = self.model.grounding_map
        extra = {"generator": self.generator} if _accepts(fn, "generator") else {}
        try:
            return fn(images, ids, mask, **extra)
        except RuntimeError as exc:
            if "decoder" not in str(exc):
                raise
            self.grounding_available = False
            return None

    def _candidates(self, image, original_size, flat_index):
        """(target box (4,), candidate boxes (K, 4)) in resized pixels, candidates in a seeded random order."""
        size = self.image_size
        target = scale_box(image.box, original_size, size)
        objects = [target] + [scale_box(b, original_size, size) for b in image.distractors
                              if isinstance(b, (list, tuple)) and len(b) == 4]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + flat_index)
        boxes = torch.cat([torch.tensor(objects, dtype=torch.float64),
                           random_boxes(self.num_random_boxes, size, generator).double()])
        return torch.tensor(target, dtype=torch.float64), boxes[torch.randperm(len(boxes), generator=generator)]

    def images(self, entries, ids, mask, instance_ids, instance_mask):
        """Global and instance features of every entry (product index, image), and the grounding rows
        (target box, candidate boxes, box scores) of the entries that have a box. ``ids``, ``mask``: the
        grounding prompt of each product; ``instance_ids``, ``instance_mask``: its instance-feature prompt."""
        global_feats, instance_feats, grounding = [], [], []
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            for start in range(0, len(entries), self.batch_size):
                chunk = entries[start:start + self.batch_size]
                loaded = list(pool.map(lambda e: load_image(e[1].path, self.image_size), chunk))
                images = torch.stack([t for t, _ in loaded]).to(self.device)
                rows = torch.tensor([p for p, _ in chunk])
                b_ids, b_mask = ids[rows].to(self.device), mask[rows].to(self.device)
                global_feats.append(self.model.encode_image(images).float().cpu())
                instance_feats.append(self._instance(images, instance_ids[rows].to(self.device),
                                                     instance_mask[rows].to(self.device)).float().cpu())
                boxed = [j for j, (_, image) in enumerate(chunk) if image.box is not None]
                if boxed and self.grounding_available:
                    sel = torch.tensor(boxed)
                    maps = self._grounding(images[sel.to(self.device)], b_ids[sel.to(self.device)],
                                           b_mask[sel.to(self.device)])
                    if maps is not None:
                        grounding.extend(self._score_boxes(maps.float().cpu(), chunk, loaded, boxed, start))
        finally:
            pool.shutdown()
        return torch.cat(global_feats), torch.cat(instance_feats), grounding

    def _score_boxes(self, maps, chunk, loaded, boxed, start):
        targets, candidates = zip(*(self._candidates(chunk[j][1], loaded[j][1], start + j) for j in boxed))
        width = max(len(c) for c in candidates)
        padded = torch.zeros(len(boxed), width, 4, dtype=torch.float64)
        for row, boxes in enumerate(candidates):
            padded[row, :len(boxes)] = boxes
        scores = metrics.mean_in_boxes(maps, padded)
        return [(t, c, scores[row, :len(c)]) for row, (t, c) in enumerate(zip(targets, candidates))]


def evaluate(model, products, tokenizer, image_size: int, batch_size: int = 64, seed: int = 0,
             device="cpu", prompt: str = DEFAULT_PROMPT, num_random_boxes: int = NUM_RANDOM_BOXES,
             retrieval_prompt: str = "text") -> dict:
    """Run every zero-shot task on ``products`` (a list of :class:`eclip.data.manifest.Product`).

    Args:
        model: anything with the transfer API (``encode_image``, ``encode_text``, ``instance_features``,
            ``grounding_map``), already on ``device``.
        tokenizer: texts -> (input_ids, attention_mask), e.g. :func:`eclip.models.tokenizer_for`.
        image_size: side of the square model input; manifest boxes are rescaled to it.
        batch_size: images (and texts) per model call.
        seed: the decoder's negative prompts and the random candidate boxes.
        prompt: the category prompt template ("{}" is the category).
        num_random_boxes: random candidate boxes per grounding image.
        retrieval_prompt: the prompt of the instance features in product retrieval: "text" (each image's
            product text, the paper's protocol) or "generic" (:data:`GENERIC_PROMPT` for every image).

    Returns:
        One entry per task (see :data:`SECTIONS`), each with ``n`` (number of queries) and its metrics in
        percent (None when the task has no query), plus catalogue counts and the settings used.
    """
    if retrieval_prompt not in RETRIEVAL_PROMPTS:
        raise ValueError(f"retrieval_prompt must be one of {RETRIEVAL_PROMPTS}, got {retrieval_prompt!r}")
    entries = [(p, image) for p, product in enumerate(products) for image in product.images]
    categories = sorted({product.category for product in products})
    was_training = getattr(model, "training", None)
    if hasattr(model, "eval"):
        model.eval()
    encoder = _Encoder(model, tokenizer, image_size, batch_size, seed, device, num_random_boxes)
    try:
        with torch.no_grad():
            ids, mask = tokenizer([product.text for product in products]) if products else (None, None)
            text_feats = encoder.texts([product.text for product in products])
            category_feats = encoder.texts([prompt.format(c) for c in categories])
            if entries:
                instance_ids, instance_mask = ids, mask
                if retrieval_prompt == "generic":
                    instance_ids, instance_mask = (t.expand(len(products), -1) for t in tokenizer([GENERIC_PROMPT]))
                global_feats, instance_feats, grounding = encoder.images(entries, ids, mask, instance_ids,
                                                                         instance_mask)
            else:
                global_feats = instance_feats = torch.zeros(0, 0)
                grounding = []
    finally:
        if was_training and hasattr(model, "train"):
            model.train(was_training)

    product_of = torch.tensor([p for p, _ in entries], dtype=torch.long)
    category_index = {c: i for i, c in enumerate(categories)}
    product_category = torch.tensor([category_index[p.category] for p in products], dtype=torch.long)
    results = {"num_products": len(products), "num_images": len(entries), "num_categories": len(categories)}

    # product classification: every image against the category prompts
    n = len(entries)
    acc = metrics.accuracy_at_1(global_feats @ category_feats.T, product_category[product_of]) if n else math.nan
    results["classification"] = {"n": n, "Acc@1": _percent(acc)}

    # image <-> text retrieval: each product's first image against the product texts
    first = {}
    for flat, (p, _) in enumerate(entries):
        first.setdefault(p, flat)
    with_image = sorted(first)
    n = len(with_image)
    if n:
        image_feats = global_feats[[first[p] for p in with_image]]
        texts = [products[p].text for p in with_image]
        same_text = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
        i2t = metrics.recall_at_k(image_feats @ text_feats[with_image].T, same_text, RETRIEVAL_KS)
        t2i = metrics.recall_at_k(text_feats[with_image] @ image_feats.T, same_text, RETRIEVAL_KS)
    else:
        i2t = t2i = {k: math.nan for k in RETRIEVAL_KS}
    results["image_to_text"] = {"n": n, **{f"R@{k}": _percent(v) for k, v in i2t.items()}}
    results["text_to_image"] = {"n": n, **{f"R@{k}": _percent(v) for k, v in t2i.items()}}

    # product retrieval: one query image per product with >= 2 images, gallery = every other image
    queries, flat = [], 0
    for product in products:
        count = len(product.images)
        if count >= 2:
            pick = next((i for i, image in enumerate(product.images) if image.source in QUERY_SOURCES), count - 1)
            queries.append(flat + pick)
        flat += count
    is_query = torch.zeros(len(entries), dtype=torch.bool)
    is_query[queries] = True
    gallery = (~is_query).nonzero().flatten()
    query = torch.tensor(queries, dtype=torch.long)
    n, size = len(queries), len(gallery)
    if n and size:
        scores = instance_feats[query] @ instance_feats[gallery].T
        same_product = product_of[query][:, None] == product_of[gallery][None, :]
        same_category = product_category[product_of[query]][:, None] == product_category[product_of[gallery]][None, :]
        coarse = metrics.mean_average_precision_at_k(scores, same_category, PRODUCT_KS)
        fine_r = metrics.recall_at_k(scores, same_product, PRODUCT_KS)
        fine_map = metrics.mean_average_precision_at_k(scores, same_product, PRODUCT_KS)
    else:
        n = 0
        coarse = fine_r = fine_map = {k: math.nan for k in PRODUCT_KS}
    results["coarse_retrieval"] = {"n": n, "gallery": size, **{f"mAP@{k}": _percent(v) for k, v in coarse.items()}}
    results["fine_retrieval"] = {"n": n, "gallery": size, **{f"R@{k}": _percent(v) for k, v in fine_r.items()},
                                 **{f"mAP@{k}": _percent(v) for k, v in fine_map.items()}}

    # visual grounding
    n = len(grounding)
    if n:
        width = max(len(c) for _, c, _ in grounding)
        scores = torch.full((n, width), -math.inf, dtype=torch.float64)
        boxes = torch.zeros(n, width, 4, dtype=torch.float64)
        valid = torch.zeros(n, width, dtype=torch.bool)
        for row, (_, cand, box_scores) in enumerate(grounding):
            scores[row, :len(cand)], boxes[row, :len(cand)], valid[row, :len(cand)] = box_scores, cand, True
        targets = torch.stack([t for t, _, _ in grounding])
        acc = metrics.grounding_accuracy(scores, boxes, targets, valid, IOU_THRESHOLDS)
    else:
        acc = {t: math.nan for t in IOU_THRESHOLDS}
    results["grounding"] = {"n": n, **{f"Acc@{t}": _percent(v) for t, v in acc.items()}}
    if not encoder.grounding_available:
        results["grounding"]["skipped"] = "the model has no instance decoder"

    results["settings"] = {"image_size": image_size, "prompt": prompt, "seed": seed,
                           "random_boxes": num_random_boxes, "query_sources": list(QUERY_SOURCES),
                           "instance_features": encoder.instance_mode, "retrieval_prompt": retrieval_prompt}
    return results


# --- reporting -------------------------------------------------------------------------------------------

def format_table(results: dict, title: str | None = None) -> str:
    """The results as one Markdown table per task (the paper's layout: metric columns, scores in %)."""
    lines = []
    if title:
        lines.append(f"## {title}")
        lines.append("")
    lines.append(f"{results.get('num_products', 0)} products, {results.get('num_images', 0)} images, "
                 f"{results.get('num_categories', 0)} categories")
    for key, name, columns in SECTIONS:
        section = results.get(key)
        if section is None:
            continue
        detail = f"n = {section.get('n', 0)}"
        if "gallery" in section:
            detail += f", gallery = {section['gallery']}"
        if section.get("skipped"):
            detail += f"; skipped: {section['skipped']}"
        widths = [max(len(c), 6) for c in columns]  # 6 = len("100.00")
        lines += ["", f"### {name} ({detail})", "",
                  "| " + " | ".join(c.rjust(w) for c, w in zip(columns, widths)) + " |",
                  "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                  "| " + " | ".join(_cell(section.get(c), w) for c, w in zip(columns, widths)) + " |"]
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    text = "-" if value is None else f"{value:.2f}"
    return text.rjust(width)


def write_json(results: dict, path: str) -> None:
    """Write the results as JSON (None for metrics of tasks without queries)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


# --- command line ----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eclip-eval", description="Zero-shot evaluation of an ECLIP model on "
                                     "the held-out products of a catalogue (the paper's transfer tasks).")
    parser.add_argument("--catalogue", required=True, help="the catalogue manifest (JSONL)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--heldout-fraction", type=float, default=0.1,
                       help="evaluate the held-out split of this fraction (default 0.1, the training split's)")
    which.add_argument("--all", action="store_true", help="evaluate every product of the catalogue")
    parser.add_argument("--model", default="eclip-tiny", help="preset name (default eclip-tiny)")
    parser.add_argument("--checkpoint", help="a state_dict file of the model (random init without one)")
    parser.add_argument("--vocab", help="BERT vocab.txt (default: the preset's own)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"category prompt (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--random-boxes", type=int, default=NUM_RANDOM_BOXES,
                        help="random candidate boxes per grounding image")
    parser.add_argument("--retrieval-prompt", choices=RETRIEVAL_PROMPTS, default="text",
                        help="instance prompt in product retrieval: each product's text (default, the paper's) "
                             f"or the fixed {GENERIC_PROMPT!r}")
    return parser


def _load_state_dict(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # a checkpoint that wraps the state_dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def main(argv: list[str] | None = None) -> int:
    """The ``eclip-eval`` command: 0 on success, 2 on a usage or input error."""
    args = _parser().parse_args(argv)
    from eclip.data.manifest import ManifestError, read_manifest, split

    try:
        products = read_manifest(args.catalogue)
    except (OSError, ManifestError) as exc:
        print(f"eclip-eval: cannot read the catalogue: {exc}", file=sys.stderr)
        return 2
    if not args.all:
        if not 0.0 < args.heldout_fraction <= 1.0:
            print("eclip-eval: --heldout-fraction must be in (0, 1]", file=sys.stderr)
            return 2
        products = split(products, args.heldout_fraction)[1]
    if not products:
        print("eclip-eval: no product to evaluate (the held-out split is empty; try --all or a larger "
              "--heldout-fraction)", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("eclip-eval: --batch-size must be >= 1", file=sys.stderr)
        return 2

    import eclip.models as em

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    try:
        model = em.create(args.model)
        if args.checkpoint:
            model.load_state_dict(_load_state_dict(args.checkpoint))
        tokenizer = em.tokenizer_for(model, args.vocab)
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        print(f"eclip-eval: {exc}", file=sys.stderr)
        return 2
    model.to(device)
    results = evaluate(model, products, tokenizer, model.config.image_size, batch_size=args.batch_size,
                       seed=args.seed, device=device, prompt=args.prompt, num_random_boxes=args.random_boxes,
                       retrieval_prompt=args.retrieval_prompt)
    split_name = "all products" if args.all else f"held-out split {args.heldout_fraction:g}"
    weights = args.checkpoint or "random init"
    results["settings"].update(model=args.model, checkpoint=args.checkpoint, catalogue=args.catalogue,
                               split=split_name)
    print(format_table(results, f"ECLIP zero-shot: {args.model} ({weights}), {split_name}"))
    if args.out:
        write_json(results, args.out)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

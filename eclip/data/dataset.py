"""Training samples from a product catalogue: (text, image, second image of the same product).

Two readers give the same samples: :class:`ProductDataset` (map-style, over a JSONL manifest) and
:func:`shard_dataset` (WebDataset shards written by :func:`eclip.data.shards.write_shards`, for scale).
Both yield per product a dict::

    {"image": (3, S, S), "positive_image": (3, S, S), "text": str, "product_index": int, "product_id": str}

and :class:`Collate` tokenizes the texts and stacks a batch in the keys :class:`eclip.models.ECLIP`
expects (images, positive_images, input_ids, attention_mask, product_ids), plus ``skipped``.

Bad data never stops a run and is never lost silently:

* a product with an empty text, or no images, is left out when the dataset is built (counted in
  ``dataset.report``);
* an image that is missing or unreadable is passed over; the product uses its other images;
* a product none of whose images can be read becomes a ``Skipped`` marker that :class:`Collate` drops and
  counts in the batch's ``skipped`` dict (the trainer sums these and reports them at the end);
* a product with a single (readable) image uses that image twice, with two independent augmentations, as
  its Eq. 8 positive; counted as ``single_image``;
* shards (:func:`eclip.data.shards.read_shards`): a shard that cannot be read to its end (truncated, corrupt,
  missing) gives the records before the break, a warning and a ``Skipped`` marker ``unreadable_shard``, and
  reading goes on with the next shard; a record with missing or malformed metadata is ``bad_record``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import random

import torch
from PIL import Image, UnidentifiedImageError

from .manifest import Product
from .shards import read_shards

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROPS = ("random_resized", "keep_box")


def image_transform(size: int, train: bool, crop: str = "random_resized"):
    """The paper's augmentation for training (random resized crop, horizontal flip); resize for evaluation.

    ``crop="keep_box"`` (training only) draws the crop with :class:`BoxKeepingCrop` instead, so that the
    product's box stays inside it; the transform is then called as ``transform(image, box)``.
    """
    from torchvision import transforms

    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    tail = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    if train and crop == "keep_box":
        return BoxKeepingCrop(size, then=transforms.Compose([transforms.RandomHorizontalFlip()] + tail))
    if train:
        ops = [transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip()]
    else:
        ops = [transforms.Resize((size, size))]
    return transforms.Compose(ops + tail)


class BoxKeepingCrop:
    """A random resized crop that keeps the product's box inside it (torch's global generator draws it).

    The crop's area (a share in ``scale`` of the image) and aspect ratio (in ``ratio``) are drawn as
    ``RandomResizedCrop`` draws them; the crop then grows, where needed, to hold the box (up to the whole
    image), and its position is drawn uniformly among those that hold the box. The result is resized to
    ``size`` x ``size`` and passed to ``then`` (flip, tensor, normalization). An image without a box gets an
    unconstrained crop.

    Called as ``crop(image, box)`` with a PIL image and ``box`` = [x0, y0, x1, y1] in its pixels, or None.
    """

    needs_box = True

    def __init__(self, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), then=None):
        self.size, self.scale, self.ratio, self.then = size, scale, ratio, then

    def params(self, width: int, height: int, box) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height) of one draw."""
        area = width * height * float(torch.empty(1).uniform_(*self.scale))
        log_ratio = torch.log(torch.tensor(self.ratio))
        aspect = float(torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item())))
        crop_w = min(width, max(1, round((area * aspect) ** 0.5)))
        crop_h = min(height, max(1, round((area / aspect) ** 0.5)))
        if box is None:
            lo_x, hi_x, lo_y, hi_y = 0, width - crop_w, 0, height - crop_h
        else:
            x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
            x1, y1 = min(width, int(box[2])), min(height, int(box[3]))
            crop_w, crop_h = max(crop_w, x1 - x0), max(crop_h, y1 - y0)
            lo_x, hi_x = max(0, x1 - crop_w), min(x0, width - crop_w)
            lo_y, hi_y = max(0, y1 - crop_h), min(y0, height - crop_h)
        left = int(torch.randint(lo_x, hi_x + 1, (1,)))
        top = int(torch.randint(lo_y, hi_y + 1, (1,)))
        return left, top, crop_w, crop_h

    def __call__(self, image, box=None):
        from PIL import Image

        left, top, w, h = self.params(image.width, image.height, box)
        out = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        return self.then(out) if self.then is not None else out


@dataclasses.dataclass
class Skipped:
    """A product that produced no sample, and why."""

    product_id: str
    reason: str


def _open(source) -> Image.Image | None:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # PIL reports a damaged file with any of these


def choose_pair(sources: list[str], rng: random.Random) -> tuple[int, int]:
    """Indices (anchor, positive) among a product's images: the positive from another source when the
    product has one, else another image, else the anchor itself."""
    anchor = rng.randrange(len(sources))
    others = [i for i in range(len(sources)) if sources[i] != sources[anchor]]
    if not others:
        others = [i for i in range(len(sources)) if i != anchor] or [anchor]
    return anchor, rng.choice(others)


def make_sample(product_id, text, product_index, images: list, sources: list[str], transform, rng, boxes=None):
    """A sample from the images (PIL or None where unreadable) of one product, or a Skipped marker.
    ``boxes``: the product's box in each image (for a transform with ``needs_box``)."""
    readable = [i for i, image in enumerate(images) if image is not None]
    if not readable:
        return Skipped(product_id, "no_readable_image")
    anchor, positive = choose_pair([sources[i] for i in readable], rng)
    anchor, positive = readable[anchor], readable[positive]
    # the augmentation draws from a generator seeded by the sample's own rng: the same crops whatever the
    # process, rank or DataLoader worker that builds the sample (exact resumption, equal runs across ranks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(63))
        if getattr(transform, "needs_box", False):
            box_of = (lambda i: boxes[i] if boxes is not None and i < len(boxes) else None)
            views = transform(images[anchor], box_of(anchor)), transform(images[positive], box_of(positive))
        else:
            views = transform(images[anchor]), transform(images[positive])
    sample = {"image": views[0], "positive_image": views[1], "text": text,
              "product_index": product_index, "product_id": product_id,
              "unreadable_images": len(images) - len(readable), "single_image": anchor == positive}
    return sample


def usable_products(products: list[Product]) -> tuple[list[Product], collections.Counter]:
    """Products with a non-empty text and at least one image, and counts of those left out."""
    kept, report = [], collections.Counter()
    for product in products:
        if not product.text.strip():
            report["empty_text"] += 1
        elif not product.images:
            report["no_images"] += 1
        else:
            kept.append(product)
    return kept, report


class ProductDataset(torch.utils.data.Dataset):
    """Map-style dataset over products (one sample per product and epoch).

    Args:
        products: from :func:`eclip.data.manifest.read_manifest` (e.g. the train part of
            :func:`eclip.data.manifest.split`).
        image_size: side of the square images.
        train: training augmentation (else a plain resize).
        seed: the choice of the image pair is drawn from (seed, epoch, index): set ``dataset.epoch`` for a new
            draw each epoch; with ``train=False`` the pair is fixed per product.
        product_index: product_id -> int id used as ``product_ids`` (default: order in ``products``).
        crop: "random_resized" (default) or "keep_box": a random crop that keeps the product's box (from the
            manifest) inside it (:class:`BoxKeepingCrop`); training only.
    """

    def __init__(self, products: list[Product], image_size: int, *, train: bool = True, seed: int = 0,
                 product_index: dict[str, int] | None = None, crop: str = "random_resized"):
        self.products, self.report = usable_products(products)
        self.index = product_index or {p.product_id: i for i, p in enumerate(products)}
        self.transform = image_transform(image_size, train, crop)
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.products)

    def __getitem__(self, i: int):
        product = self.products[i]
        rng = random.Random(f"{self.seed}:{self.epoch if self.train else 0}:{product.product_id}")
        images = [_open(image.path) for image in product.images]
        return make_sample(product.product_id, product.text, self.index[product.product_id], images,
                           [image.source for image in product.images], self.transform, rng,
                           [image.box for image in product.images])


def shard_dataset(urls, image_size: int, *, train: bool = True, seed: int = 0, shuffle: int = 0,
                  crop: str = "random_resized"):
    """An iterable dataset over WebDataset shards (see :func:`eclip.data.shards.write_shards`) yielding the
    same samples as :class:`ProductDataset`. Shards are split between DataLoader workers (and between
    ranks when ``torch.distributed`` is initialized).

    Args:
        urls: a shard pattern ("dir/shard-{000000..000009}.tar"), a path, or a list of paths.
        shuffle: buffer size for sample shuffling (0 = keep shard order).
        crop: as in :class:`ProductDataset` (the boxes come from the shard's metadata).
    """
    import webdataset as wds

    transform = image_transform(image_size, train, crop)

    def decode(raw: dict):
        if "__error__" in raw:  # a damaged shard or record, passed on by read_shards to be counted
            return Skipped(raw["__key__"] or raw["__url__"], raw["__error__"])
        meta = json.loads(raw["json"])
        if not meta["text"].strip():
            return Skipped(meta["product_id"], "empty_text")
        images = [_open(io.BytesIO(raw[name])) if name in raw else None for name in meta["image_keys"]]
        rng = random.Random(f"{seed}:0:{meta['product_id']}")
        return make_sample(meta["product_id"], meta["text"], meta["product_index"], images, meta["sources"],
                           transform, rng, meta.get("boxes"))

    nodesplitter = wds.split_by_node if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else wds.single_node_only
    dataset = read_shards(urls, nodesplitter=nodesplitter, shardshuffle=bool(shuffle))
    if shuffle:
        dataset = dataset.shuffle(shuffle)
    return dataset.map(decode)


class Collate:
    """Tokenizes and stacks samples into a batch for :class:`eclip.models.ECLIP`; drops ``Skipped`` markers
    and counts them (and the readable-image fallbacks) in ``batch["skipped"]``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list) -> dict:
        skipped = collections.Counter(s.reason for s in samples if isinstance(s, Skipped))
        samples = [s for s in samples if not isinstance(s, Skipped)]
        skipped["unreadable_image"] += sum(s["unreadable_images"] for s in samples)
        skipped["single_image"] += sum(bool(s["single_image"]) for s in samples)
        batch = {"skipped": dict(+skipped), "size": len(samples)}
        if not samples:
            return batch
        input_ids, attention_mask = self.tokenizer([s["text"] for s in samples])
        batch.update(
            images=torch.stack([s["image"] for s in samples]),
            positive_images=torch.stack([s["positive_image"] for s in samples]),
            input_ids=input_ids, attention_mask=attention_mask,
            product_ids=torch.tensor([s["product_index"] for s in samples], dtype=torch.long),
            product_keys=[s["product_id"] for s in samples],
        )
        return batch

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
  its Eq. 8 positive; counted as ``single_image``.
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

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def image_transform(size: int, train: bool):
    """The paper's augmentation for training (random resized crop, horizontal flip); resize for evaluation."""
    from torchvision import transforms

    if train:
        ops = [transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip()]
    else:
        ops = [transforms.Resize((size, size))]
    return transforms.Compose(ops + [transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


@dataclasses.dataclass
class Skipped:
    """A product that produced no sample, and why."""

    product_id: str
    reason: str


def _open(source) -> Image.Image | None:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def choose_pair(sources: list[str], rng: random.Random) -> tuple[int, int]:
    """Indices (anchor, positive) among a product's images: the positive from another source when the
    product has one, else another image, else the anchor itself."""
    anchor = rng.randrange(len(sources))
    others = [i for i in range(len(sources)) if sources[i] != sources[anchor]]
    if not others:
        others = [i for i in range(len(sources)) if i != anchor] or [anchor]
    return anchor, rng.choice(others)


def make_sample(product_id, text, product_index, images: list, sources: list[str], transform, rng):
    """A sample from the images (PIL or None where unreadable) of one product, or a Skipped marker."""
    readable = [i for i, image in enumerate(images) if image is not None]
    if not readable:
        return Skipped(product_id, "no_readable_image")
    anchor, positive = choose_pair([sources[i] for i in readable], rng)
    anchor, positive = readable[anchor], readable[positive]
    # the augmentation draws from a generator seeded by the sample's own rng: the same crops whatever the
    # process, rank or DataLoader worker that builds the sample (exact resumption, equal runs across ranks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(63))
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
    """

    def __init__(self, products: list[Product], image_size: int, *, train: bool = True, seed: int = 0,
                 product_index: dict[str, int] | None = None):
        self.products, self.report = usable_products(products)
        self.index = product_index or {p.product_id: i for i, p in enumerate(products)}
        self.transform = image_transform(image_size, train)
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.products)

    def __getitem__(self, i: int):
        product = self.products[i]
        rng = random.Random(f"{self.seed}:{self.epoch if self.train else 0}:{product.product_id}")
        images = [_open(image.path) for image in product.images]
        return make_sample(product.product_id, product.text, self.index[product.product_id], images,
                           [image.source for image in product.images], self.transform, rng)


def shard_dataset(urls, image_size: int, *, train: bool = True, seed: int = 0, shuffle: int = 0):
    """An iterable dataset over WebDataset shards (see :func:`eclip.data.shards.write_shards`) yielding the
    same samples as :class:`ProductDataset`. Shards are split between DataLoader workers (and between
    ranks when ``torch.distributed`` is initialized).

    Args:
        urls: a shard pattern ("dir/shard-{000000..000009}.tar"), a path, or a list of paths.
        shuffle: buffer size for sample shuffling (0 = keep shard order).
    """
    import webdataset as wds

    transform = image_transform(image_size, train)

    def decode(raw: dict):
        meta = json.loads(raw["json"])
        if not meta["text"].strip():
            return Skipped(meta["product_id"], "empty_text")
        images = [_open(io.BytesIO(raw[name])) if name in raw else None for name in meta["image_keys"]]
        rng = random.Random(f"{seed}:0:{meta['product_id']}")
        return make_sample(meta["product_id"], meta["text"], meta["product_index"], images, meta["sources"],
                           transform, rng)

    nodesplitter = wds.split_by_node if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else wds.single_node_only
    dataset = wds.WebDataset(urls, shardshuffle=bool(shuffle), nodesplitter=nodesplitter, empty_check=False)
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

"""The product catalogue format: a JSONL manifest, one product per line.

    {"product_id": "p000042", "text": "red striped cup with a star", "category": "cup",
     "images": [{"path": "images/p000042_0.png", "source": "merchant", "box": [12, 9, 52, 55],
                 "distractors": [[0, 3, 10, 14]]}, ...]}

``path`` is relative to the manifest's folder (or absolute); ``source`` is a free tag ("merchant",
"customer", "ad", ...); ``box`` (optional) is the product's box in pixels (x0, y0, x1, y1), and
``distractors`` (optional) the boxes of other objects in the image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib


@dataclasses.dataclass
class ProductImage:
    path: str
    source: str
    box: list[int] | None = None
    distractors: list[list[int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Product:
    product_id: str
    text: str
    category: str
    images: list[ProductImage]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))


class ManifestError(ValueError):
    """A malformed manifest line; the message names the file and the line number."""


def _parse(line: str, where: str) -> Product:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in ("product_id", "text", "category", "images") if k not in raw]
    if missing:
        raise ManifestError(f"{where}: missing {missing}")
    if not isinstance(raw["images"], list):
        raise ManifestError(f"{where}: 'images' must be a list")
    images = []
    for j, image in enumerate(raw["images"]):
        if not isinstance(image, dict) or "path" not in image or "source" not in image:
            raise ManifestError(f"{where}: image {j} needs 'path' and 'source'")
        box = image.get("box")
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise ManifestError(f"{where}: image {j} 'box' must be [x0, y0, x1, y1]")
        images.append(ProductImage(str(image["path"]), str(image["source"]), box, list(image.get("distractors", []))))
    return Product(str(raw["product_id"]), str(raw["text"]), str(raw["category"]), images)


def read_manifest(path: str) -> list[Product]:
    """All products of a JSONL manifest, image paths made absolute. Blank lines are skipped; a malformed
    line raises :class:`ManifestError` naming the file and line."""
    root = os.path.dirname(os.path.abspath(path))
    products = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            product = _parse(line, f"{path}:{number}")
            for image in product.images:
                if not os.path.isabs(image.path):
                    image.path = os.path.join(root, image.path)
            products.append(product)
    return products


def write_manifest(path: str, products: list[Product]) -> None:
    """Write products as JSONL (image paths are written as given: keep them relative to the manifest)."""
    with open(path, "w", encoding="utf-8") as f:
        for product in products:
            f.write(product.to_json() + "\n")


def is_heldout(product_id: str, heldout_fraction: float) -> bool:
    """Deterministic split by product: a product is held out when a hash of its id falls below the fraction
    (the same on every machine and run)."""
    return (zlib.crc32(product_id.encode()) % 10_000) < heldout_fraction * 10_000


def split(products: list[Product], heldout_fraction: float = 0.1) -> tuple[list[Product], list[Product]]:
    """(train, held-out) products, split by product id (see :func:`is_heldout`)."""
    train = [p for p in products if not is_heldout(p.product_id, heldout_fraction)]
    heldout = [p for p in products if is_heldout(p.product_id, heldout_fraction)]
    return train, heldout

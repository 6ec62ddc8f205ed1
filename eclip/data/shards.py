"""WebDataset shards from a manifest, sharded by product: all images of a product stay in one sample."""

from __future__ import annotations

import collections
import json
import os

from .manifest import Product, read_manifest


def write_shards(products: list[Product] | str, out_dir: str, products_per_shard: int = 1000,
                 product_index: dict[str, int] | None = None) -> tuple[list[str], collections.Counter]:
    """Write ``out_dir/shard-000000.tar``, ... One sample per product: ``<id>.json`` (text, category, ids,
    sources, boxes, the image keys) and ``<id>.<k>.<ext>`` the bytes of its k-th image, as stored on disk.

    Args:
        products: products, or the path of a JSONL manifest.
        product_index: product_id -> int id written as ``product_index`` (default: order of the products).

    Returns:
        The shard paths, and counts of what could not be copied (``missing_image``: the file is absent or
        unreadable; the sample records the image's key without bytes and readers skip it).
    """
    import webdataset as wds

    if isinstance(products, str):
        products = read_manifest(products)
    if product_index is None:
        product_index = {p.product_id: i for i, p in enumerate(products)}
    os.makedirs(out_dir, exist_ok=True)
    report = collections.Counter()
    paths = []
    for start in range(0, len(products), products_per_shard):
        path = os.path.join(out_dir, f"shard-{start // products_per_shard:06d}.tar")
        with wds.TarWriter(path) as sink:
            for product in products[start:start + products_per_shard]:
                # the key is the product index: product ids may hold dots, which tar sample keys cannot
                sample = {"__key__": f"{product_index[product.product_id]:09d}"}
                keys = []
                for k, image in enumerate(product.images):
                    ext = os.path.splitext(image.path)[1].lstrip(".").lower() or "img"
                    key = f"{k}.{ext}"
                    keys.append(key)
                    try:
                        with open(image.path, "rb") as f:
                            sample[key] = f.read()
                    except OSError:
                        report["missing_image"] += 1
                meta = {"product_id": product.product_id, "text": product.text, "category": product.category,
                        "product_index": product_index[product.product_id], "image_keys": keys,
                        "sources": [image.source for image in product.images],
                        "boxes": [image.box for image in product.images],
                        "distractors": [image.distractors for image in product.images]}
                sample["json"] = json.dumps(meta).encode()
                sink.write(sample)
        paths.append(path)
    return paths, report

"""WebDataset shards from a manifest, sharded by product: all images of a product stay in one sample, and
reading them back so that a damaged shard or record is passed over, counted and reported, never fatal."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import warnings

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
        # written under another name and renamed when complete: an interrupted run leaves no truncated shard
        with wds.TarWriter(path + ".tmp") as sink:
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
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths, report


class ShardReadWarning(UserWarning):
    """A shard could not be read to its end (truncated, corrupt or missing): the rest of it was skipped."""


RECORD_KEYS = ("product_id", "text", "product_index", "image_keys", "sources")


def _record_problem(record: dict) -> str | None:
    """Why a record's metadata is unusable, or None."""
    if "json" not in record:
        return "no json metadata"
    try:
        meta = json.loads(record["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        return f"metadata is not valid JSON ({exc})"
    if not isinstance(meta, dict):
        return f"metadata is a {type(meta).__name__}, not an object"
    missing = [k for k in RECORD_KEYS if k not in meta]
    if missing:
        return f"metadata lacks {missing}"
    if not isinstance(meta["text"], str):
        return "text is not a string"
    if not isinstance(meta["image_keys"], list) or not isinstance(meta["sources"], list) \
            or len(meta["sources"]) != len(meta["image_keys"]):
        return "image_keys and sources must be lists of one length"
    return None


def _ends_properly(url: str) -> bool:
    """False when ``url`` is a local tar file that lacks the two zero blocks every complete tar ends with: a
    copy cut off inside or right before a member header, which tarfile reads as a normal end of the archive.
    True for anything else (remote streams cannot be checked this way)."""
    path = url[len("file:"):] if url.startswith("file:") else url
    if not os.path.isfile(path):
        return True
    size = os.path.getsize(path)
    if size % 512 or size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read())


def _records_of_each_shard(shards):
    """Pipeline stage: shard dicts ({"url": ...}) in, records out, one shard at a time.

    A shard whose tar stream breaks (truncated, corrupt, missing) yields the records read before the break
    (the last, possibly partial one included: its missing images count as unreadable), then an error record
    ``{"__error__": "unreadable_shard", "__url__": url, "__key__": None, "__detail__": message}``, and the
    stage goes on with the next shard (WebDataset's exception handler stops only the broken shard; a
    :class:`ShardReadWarning` says which). A local shard cut off at a member boundary, which reads as a
    shorter complete archive, is caught by its missing end-of-archive blocks. A record with missing or
    malformed metadata becomes an error record with ``"__error__": "bad_record"``.
    """
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for shard in shards:
        url = shard["url"]
        failures = []

        def stop_this_shard(exn, failures=failures):
            failures.append(exn)
            return False  # past a broken tar header nothing can be trusted: stop this shard only

        try:
            stream = wds.gopen(url)
        except Exception as exn:  # a missing file, a failing pipe: reported below, not raised
            failures.append(exn)
        else:
            with contextlib.closing(stream):
                files = tar_file_expander([dict(url=url, stream=stream)], handler=stop_this_shard)
                for record in group_by_keys(files, handler=stop_this_shard):
                    problem = _record_problem(record)
                    if problem is None:
                        yield record
                    else:
                        yield {"__error__": "bad_record", "__url__": url, "__key__": record.get("__key__"),
                               "__detail__": problem}
            if not failures and not _ends_properly(url):
                failures.append(EOFError("no end-of-archive blocks: the file was cut off"))
        if failures:
            detail = f"{type(failures[0]).__name__}: {failures[0]}"
            warnings.warn(f"shard {url} could not be read to its end ({detail}); skipped the rest of it",
                          ShardReadWarning, stacklevel=2)
            yield {"__error__": "unreadable_shard", "__url__": url, "__key__": None, "__detail__": detail}


def read_shards(urls, *, nodesplitter=None, shardshuffle: bool = False):
    """WebDataset records of the shards ``urls`` (a brace pattern, a path or a list), split between ranks
    (``nodesplitter``, default: one node only) and DataLoader workers, with the damaged shards and records
    turned into error records (see :func:`_records_of_each_shard`) instead of exceptions. Returns a
    WebDataset pipeline (``.map``, ``.shuffle``, ... work on it)."""
    import webdataset as wds

    stages = [nodesplitter or wds.single_node_only, wds.split_by_worker]
    if shardshuffle:
        stages.append(wds.shuffle(100))
    return wds.FluidWrapper(wds.SimpleShardList(urls)).compose(*stages, _records_of_each_shard)

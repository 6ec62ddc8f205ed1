"""Catalogue readers: manifest parsing, the product-pair dataset, WebDataset shards, bad data."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch

pytest.importorskip("torchvision", reason="the datasets use torchvision transforms")
pytest.importorskip("webdataset", reason="the shard reader needs webdataset")
from PIL import Image  # noqa: E402

from eclip.data.dataset import Collate, ProductDataset, Skipped, shard_dataset  # noqa: E402
from eclip.data.manifest import ManifestError, read_manifest, split, write_manifest  # noqa: E402
from eclip.data.shards import write_shards  # noqa: E402
import eclip.models as em  # noqa: E402


def _image(path, colour):
    Image.new("RGB", (40, 30), colour).save(path)


@pytest.fixture
def catalogue(tmp_path):
    """Five products: two sources each (p0, p1), one source twice (p2), a single image (p3), one unreadable
    and one missing image besides a good one (p4); plus an empty text (p5)."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    colours = ["red", "blue", "green", "yellow", "purple", "black"]
    for i, sources in enumerate([["merchant", "customer", "ad"], ["merchant", "customer"], ["merchant", "merchant"],
                                 ["customer"], ["merchant", "customer", "ad"], ["merchant", "ad"]]):
        entries = []
        for k, source in enumerate(sources):
            name = f"images/p{i}_{k}.png"
            if i == 4 and k == 1:
                (tmp_path / name).write_bytes(b"not an image")
            elif not (i == 4 and k == 2):  # p4's third image is missing
                _image(tmp_path / name, colours[i])
            entries.append({"path": name, "source": source, "box": [1, 2, 30, 25], "distractors": []})
        rows.append({"product_id": f"p{i}", "text": "" if i == 5 else f"{colours[i]} cup number {i}",
                     "category": "cup", "images": entries})
    path = tmp_path / "catalogue.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _tokenizer():
    return em.tokenizer_for(em.preset_config("eclip-tiny"))


def test_manifest_round_trip_and_split(catalogue, tmp_path):
    products = read_manifest(catalogue)
    assert [p.product_id for p in products] == [f"p{i}" for i in range(6)]
    assert os.path.isabs(products[0].images[0].path) and products[0].images[0].box == [1, 2, 30, 25]
    copy = tmp_path / "copy.jsonl"
    write_manifest(str(copy), products)
    assert [p.to_json() for p in read_manifest(str(copy))] == [p.to_json() for p in products]
    train, heldout = split(products * 50, 0.3)
    assert {p.product_id for p in train}.isdisjoint({p.product_id for p in heldout})
    assert split(products, 0.3) == split(products, 0.3)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"product_id": "x", "text": "t", "category": "c"}', "missing \\['images'\\]"),
    ('{"product_id": "x", "text": "t", "category": "c", "images": [{"path": "a.png"}]}', "image 0 needs 'path' and 'source'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_manifest_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"product_id": "ok", "text": "t", "category": "c", "images": []}\n\n' + line + "\n")
    with pytest.raises(ManifestError, match=f"bad.jsonl:3: {message}"):
        read_manifest(str(path))


def test_samples_pair_two_images_of_one_product_from_different_sources(catalogue):
    dataset = ProductDataset(read_manifest(catalogue), 32, train=True, seed=0)
    assert len(dataset) == 5 and dict(dataset.report) == {"empty_text": 1}
    products = {p.product_id: p for p in dataset.products}
    for epoch in range(3):
        dataset.epoch = epoch
        for i in range(len(dataset)):
            sample = dataset[i]
            assert sample["image"].shape == (3, 32, 32) and sample["positive_image"].shape == (3, 32, 32)
            assert sample["text"] == products[sample["product_id"]].text
    # p0 and p1 have two sources: never a same-source pair (checked through the pair choice itself)
    from eclip.data.dataset import choose_pair
    import random
    for seed in range(50):
        a, b = choose_pair(["merchant", "customer", "ad"], random.Random(seed))
        assert a != b
        a, b = choose_pair(["merchant", "merchant"], random.Random(seed))
        assert a != b
    assert choose_pair(["customer"], random.Random(0)) == (0, 0)


def test_bad_data_is_handled_and_counted(catalogue, tmp_path):
    dataset = ProductDataset(read_manifest(catalogue), 32, train=False)
    collate = Collate(_tokenizer())
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["size"] == 5
    # p4: two of its three images unreadable, so like p3 it pairs its one readable image with itself
    assert batch["skipped"] == {"unreadable_image": 2, "single_image": 2}
    assert batch["images"].shape == (5, 3, 32, 32) and batch["input_ids"].shape == (5, 32)
    assert batch["product_ids"].tolist() == [0, 1, 2, 3, 4]
    # a product with no readable image at all becomes a Skipped marker, dropped and counted by Collate
    for image in dataset.products[3].images:
        os.remove(image.path)
    marker = dataset[3]
    assert isinstance(marker, Skipped) and marker.reason == "no_readable_image"
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["size"] == 4 and batch["skipped"]["no_readable_image"] == 1


def test_shards_give_the_same_samples_as_the_manifest(catalogue, tmp_path):
    products = read_manifest(catalogue)
    paths, report = write_shards(catalogue, str(tmp_path / "shards"), products_per_shard=2)
    assert len(paths) == 3 and dict(report) == {"missing_image": 1}
    from_manifest = ProductDataset(products, 32, train=False)
    by_id = {s["product_id"]: s for s in (from_manifest[i] for i in range(len(from_manifest)))}
    from_shards = [s for s in shard_dataset(paths, 32, train=False)]
    assert sum(isinstance(s, Skipped) and s.reason == "empty_text" for s in from_shards) == 1
    samples = [s for s in from_shards if not isinstance(s, Skipped)]
    assert sorted(s["product_id"] for s in samples) == sorted(by_id)
    for sample in samples:
        expected = by_id[sample["product_id"]]
        assert torch.equal(sample["image"], expected["image"])
        assert torch.equal(sample["positive_image"], expected["positive_image"])
        assert sample["product_index"] == expected["product_index"]


@pytest.mark.slow
def test_both_readers_feed_a_dataloader_with_workers(catalogue, tmp_path):
    paths, _ = write_shards(catalogue, str(tmp_path / "shards"), products_per_shard=2)
    collate = Collate(_tokenizer())
    for dataset in (ProductDataset(read_manifest(catalogue), 32), shard_dataset(paths, 32)):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
        seen = sorted(key for batch in loader for key in batch.get("product_keys", []))
        assert seen == ["p0", "p1", "p2", "p3", "p4"]


def test_cli_shard_and_inspect(catalogue, tmp_path, capsys):
    from eclip.data.cli import main

    assert main(["shard", "--manifest", catalogue, "--out", str(tmp_path / "s"), "--products-per-shard", "4"]) == 0
    assert main(["inspect", "--manifest", catalogue, "--workers", "0", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 shards" in out and "5 samples" in out and "empty_text" in out


def _member_offset(shard, name, data=True):
    import tarfile

    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
        return member.offset_data if data else member.offset


def test_damaged_shards_and_images_are_skipped_counted_and_reported(tmp_path, capsys):
    """Four shards of three products and a missing one: shard 1 is cut off inside its second product's second
    image, shard 3 inside its second product's tar header (which reads as a shorter complete archive), and
    shard 2 holds a product with no readable image and one with one unreadable image. Every readable product
    comes through; each damaged shard, the partial record and the bad images are counted, the damaged shards
    named in a warning, and the reader goes on to the next shard."""
    from eclip.data.shards import ShardReadWarning

    rows = []
    for i in range(12):
        entries = []
        for k, source in enumerate(["merchant", "customer"]):
            path = tmp_path / f"p{i}_{k}.png"
            if i == 6 or (i == 7 and k == 0):
                path.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
            else:
                _image(path, (20 * i, 100 * k, 50))
            entries.append({"path": path.name, "source": source})
        rows.append({"product_id": f"p{i}", "text": f"cup number {i}", "category": "cup", "images": entries})
    manifest = tmp_path / "catalogue.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    paths, _ = write_shards(str(manifest), str(tmp_path / "shards"), products_per_shard=3)
    assert not [name for name in os.listdir(tmp_path / "shards") if name.endswith(".tmp")]
    cuts = [(paths[1], "000000004.1.png", True, 50), (paths[3], "000000010.0.png", False, 200)]
    for path, member, in_data, past in cuts:  # 50 bytes into an image's data; 200 bytes into a header
        with open(path, "r+b") as f:
            f.truncate(_member_offset(path, member, data=in_data) + past)
    urls = paths + [str(tmp_path / "shards" / "shard-000099.tar")]

    collate = Collate(_tokenizer())
    with pytest.warns(ShardReadWarning) as warned:
        loader = torch.utils.data.DataLoader(shard_dataset(urls, 32, train=False), batch_size=4, collate_fn=collate)
        seen, report = [], collections.Counter()
        for batch in loader:
            seen += batch.get("product_keys", [])
            report.update(batch["skipped"])
    assert sorted(seen) == ["p0", "p1", "p2", "p3", "p7", "p8", "p9"]
    # p4: its json never arrived (bad_record); p5, p10, p11 are lost with the rest of their shards
    assert dict(report) == {"unreadable_shard": 3, "bad_record": 1, "no_readable_image": 1, "unreadable_image": 1,
                            "single_image": 1}
    named = " ".join(str(w.message) for w in warned if issubclass(w.category, ShardReadWarning))
    assert all(os.path.basename(u) in named for u in (paths[1], paths[3], urls[-1]))

    from eclip.data.cli import main

    with pytest.warns(ShardReadWarning):
        assert main(["inspect", "--shards", str(tmp_path / "shards" / "*.tar"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "7 samples" in out and "'unreadable_shard': 2" in out and "'no_readable_image': 1" in out

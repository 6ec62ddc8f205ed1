"""The synthetic catalogue generator (eclip.data.synth): determinism, boxes, sources, texts, CLI, the options of
the "instance under clutter" evaluation (families, same-category distractors, marks) and the training crop
that keeps the product box."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from eclip.data import synth
from eclip.data.manifest import read_manifest

VOCAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eclip", "assets", "vocab.txt")


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    path = synth.generate_catalogue(str(out), products=48, images_per_product=4, size=48, seed=3, workers=1)
    return path, read_manifest(path)


def test_manifest_layout(catalogue):
    path, products = catalogue
    assert os.path.basename(path) == "catalogue.jsonl"
    assert len(products) == 48
    assert [p.product_id for p in products] == [f"p{i:06d}" for i in range(48)]
    for p in products:
        assert p.category in synth.CATEGORIES
        assert p.category in p.text.replace(",", " ").split()
        assert len(p.images) == 4
        for k, image in enumerate(p.images):
            assert os.path.isfile(image.path)
            assert os.path.basename(image.path) == f"{p.product_id}_{k}.png"
            with Image.open(image.path) as img:
                assert img.size == (48, 48) and img.mode == "RGB"
    # The manifest stores paths relative to its folder.
    with open(path, encoding="utf-8") as f:
        assert '"path":"images/p000000_0.png"' in f.readline()


def test_deterministic(tmp_path):
    a = synth.generate_catalogue(str(tmp_path / "a"), 10, 3, 40, seed=7, workers=1)
    b = synth.generate_catalogue(str(tmp_path / "b"), 10, 3, 40, seed=7, workers=1)
    c = synth.generate_catalogue(str(tmp_path / "c"), 10, 3, 40, seed=7, workers=2)
    files_a = _files(os.path.dirname(a))
    assert len(files_a) == 30 + 3  # images, manifest, attributes.jsonl, synth.json
    assert files_a == _files(os.path.dirname(b))
    assert files_a == _files(os.path.dirname(c))
    d = synth.generate_catalogue(str(tmp_path / "d"), 10, 3, 40, seed=8, workers=1)
    assert _files(os.path.dirname(d)) != files_a


def test_prefix_stable(tmp_path):
    """Product i does not depend on how many products come after it."""
    small = read_manifest(synth.generate_catalogue(str(tmp_path / "s"), 5, 2, 32, seed=1, workers=1))
    large = read_manifest(synth.generate_catalogue(str(tmp_path / "l"), 9, 2, 32, seed=1, workers=1))
    for p, q in zip(small, large):
        assert (p.text, p.category) == (q.text, q.category)
        for x, y in zip(p.images, q.images):
            assert (x.box, x.distractors) == (y.box, y.distractors)
            assert open(x.path, "rb").read() == open(y.path, "rb").read()


def _valid(box, size):
    x0, y0, x1, y1 = box
    return all(isinstance(v, int) for v in box) and 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


def test_boxes_inside_and_positive(catalogue):
    _, products = catalogue
    for p in products:
        for image in p.images:
            assert image.box is not None and _valid(image.box, 48), image
            for box in image.distractors:
                assert _valid(box, 48), image


def test_sources(catalogue):
    _, products = catalogue
    for p in products:
        assert [i.source for i in p.images] == ["merchant", "customer", "ad", "merchant"]
        for image in p.images:
            if image.source == "merchant":
                assert image.distractors == []
            elif image.source == "customer":
                assert 2 <= len(image.distractors) <= 4
            else:
                assert 0 <= len(image.distractors) <= 2
        # The product is larger in merchant images than in customer images.
        area = {i.source: (i.box[2] - i.box[0]) * (i.box[3] - i.box[1]) for i in p.images}
        assert area["merchant"] > area["customer"]


def test_two_images_two_sources(tmp_path):
    products = read_manifest(synth.generate_catalogue(str(tmp_path), 6, 2, 32, seed=0, workers=1))
    assert all({i.source for i in p.images} == {"merchant", "customer"} for p in products)


def test_texts_tokenize_without_unk(catalogue):
    from eclip.models.tokenizer import TextTokenizer

    _, products = catalogue
    tokenizer = TextTokenizer(VOCAB, 32)
    ids, mask = tokenizer([p.text for p in products])
    assert not (ids == tokenizer.token_id("[UNK]")).any()
    assert (mask.sum(dim=1) < 32).all()  # nothing truncated
    with open(VOCAB, encoding="utf-8") as f:
        vocab = set(f.read().split())
    for p in products:  # whole words of the vocabulary, not word pieces
        assert set(p.text.replace(",", " ").split()) <= vocab, p.text


def test_same_category_products_differ(catalogue):
    _, products = catalogue
    texts = [p.text for p in products]
    assert len(set(texts)) == len(texts)
    by_category = collections.defaultdict(list)
    for p in products:
        by_category[p.category].append(p)
    assert any(len(group) > 1 for group in by_category.values())


def test_attributes_unique_at_scale():
    specs = synth._catalogue_specs(2000, seed=0)
    assert len({spec for spec, _ in specs}) == 2000
    assert len({text for _, text in specs}) == 2000
    assert len({spec[0] for spec, _ in specs}) == len(synth.CATEGORIES) >= 8


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synth.generate_catalogue(str(tmp_path), 2, 0)
    with pytest.raises(ValueError):
        synth.generate_catalogue(str(tmp_path), 2, 1, size=8)


def test_main(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = synth.main(["--products", "4", "--images-per-product", "2", "--size", "32", "--seed", "5",
                     "--out", str(out), "--workers", "1"])
    assert rc == 0
    assert "4 products" in capsys.readouterr().out
    products = read_manifest(str(out / "catalogue.jsonl"))
    assert len(products) == 4 and all(len(p.images) == 2 for p in products)
    expected = synth.generate_catalogue(str(tmp_path / "api"), 4, 2, 32, seed=5, workers=1)
    assert _files(str(out)) == _files(os.path.dirname(expected))


def _attributes(folder) -> list[dict]:
    with open(os.path.join(folder, synth.ATTRIBUTES_NAME), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_side_files_describe_the_catalogue(catalogue):
    path, products = catalogue
    rows = _attributes(os.path.dirname(path))
    assert [r["product_id"] for r in rows] == [p.product_id for p in products]
    for row, product in zip(rows, products):
        attrs = row["attributes"]
        assert attrs["category"] == product.category and attrs["colour"] in product.text
        assert [len(c) for c in row["distractor_categories"]] == [len(i.distractors) for i in product.images]
        assert row["family"] == products.index(product)  # without families each product is its own
    with open(os.path.join(os.path.dirname(path), synth.SETTINGS_NAME)) as f:
        settings = json.load(f)
    assert settings == {"products": 48, "images_per_product": 4, "size": 48, "seed": 3,
                        "same_category_distractor": 0.0, "family_size": 1, "mark_min_px": 0.0, "marks": True}


def test_variant_families_differ_in_one_attribute(tmp_path):
    path = synth.generate_catalogue(str(tmp_path / "f"), 22, 2, 32, seed=2, workers=1, family_size=4)
    rows = _attributes(os.path.dirname(path))
    families = collections.defaultdict(list)
    for row in rows:
        families[row["family"]].append(row)
    assert sorted(len(m) for m in families.values()) == [2] + [4] * 5  # 22 = 5 x 4 + 2
    for members in families.values():
        base = members[0]["attributes"]
        changed = set()
        for row in members[1:]:
            assert row["variant_of"] == members[0]["product_id"]
            diff = {k for k in base if row["attributes"][k] != base[k]}
            # one attribute; a pattern that appears on a plain item brings its colour along
            assert diff and (len(diff) == 1 or diff == {"pattern", "pattern_colour"}), diff
            changed |= diff - ({"pattern_colour"} if "pattern" in diff else set())
        assert len(changed) == 1  # the same attribute throughout the family
    assert len({tuple(r["attributes"].values()) for r in rows}) == 22
    texts = [p.text for p in read_manifest(path)]
    assert len(set(texts)) == 22
    # prefix-stable with families too
    fewer = read_manifest(synth.generate_catalogue(str(tmp_path / "g"), 9, 2, 32, seed=2, workers=1, family_size=4))
    assert [p.text for p in fewer] == texts[:9]


def test_same_category_distractors_on_customer_photos(tmp_path):
    path = synth.generate_catalogue(str(tmp_path), 12, 3, 48, seed=1, workers=1, same_category_distractor=1.0)
    products, rows = read_manifest(path), _attributes(str(tmp_path))
    for product, row in zip(products, rows):
        merchant, customer, ad = row["distractor_categories"]
        assert customer.count(product.category) == 1 and customer[-1] == product.category
        assert product.category not in ad and merchant == []
        image = product.images[1]
        assert len(image.distractors) == len(customer) and _valid(image.distractors[-1], 48)
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        assert area(image.distractors[-1]) < 4 * area(image.box)  # about the product's size
    plain = _attributes(os.path.dirname(synth.generate_catalogue(str(tmp_path / "none"), 12, 3, 48, seed=1,
                                                                  workers=1)))
    assert all(p.category not in r["distractor_categories"][1] for p, r in zip(products, plain))


def test_marks_can_grow_or_go(tmp_path):
    spec = ("box", "red", "plain", None, "star")
    small, _ = synth.render_object(spec, 18, 18)
    large, _ = synth.render_object(spec, 18, 18, mark_min_px=5)
    none, _ = synth.render_object(spec[:4] + (None,), 18, 18)

    def ink(img):  # the star is drawn in light ink on red
        return int((np.asarray(img).min(axis=2) > 200).sum())
    assert ink(none) == 0 < ink(small) < ink(large)
    path = synth.generate_catalogue(str(tmp_path), 10, 2, 32, seed=0, workers=1, marks=False)
    assert all("mark" not in p.text for p in read_manifest(path))
    assert all(r["attributes"]["mark"] is None for r in _attributes(str(tmp_path)))


def test_bad_options(tmp_path):
    for kwargs in ({"same_category_distractor": 1.5}, {"family_size": 0}, {"family_size": 99},
                   {"mark_min_px": -1.0}):
        with pytest.raises(ValueError):
            synth.generate_catalogue(str(tmp_path), 2, 1, **kwargs)


def test_main_options(tmp_path, capsys):
    out = tmp_path / "opts"
    assert synth.main(["--products", "6", "--images-per-product", "2", "--size", "32", "--out", str(out),
                       "--workers", "1", "--family-size", "3", "--same-category-distractor", "0.5",
                       "--mark-min-px", "3", "--no-marks"]) == 0
    capsys.readouterr()
    with open(out / synth.SETTINGS_NAME) as f:
        settings = json.load(f)
    assert settings["family_size"] == 3 and settings["same_category_distractor"] == 0.5
    assert settings["mark_min_px"] == 3.0 and settings["marks"] is False
    assert [r["family"] for r in _attributes(str(out))] == [0, 0, 0, 1, 1, 1]


def test_training_crop_keeps_the_product_box(tmp_path):
    import torch

    from eclip.data.dataset import BoxKeepingCrop, ProductDataset

    crop = BoxKeepingCrop(32)
    torch.manual_seed(0)
    for _ in range(500):
        x0, y0 = int(torch.randint(0, 60, (1,))), int(torch.randint(0, 40, (1,)))
        box = [x0, y0, min(64, x0 + int(torch.randint(1, 40, (1,)))), min(48, y0 + int(torch.randint(1, 40, (1,))))]
        left, top, w, h = crop.params(64, 48, box)
        assert 0 <= left <= box[0] and box[2] <= left + w <= 64, (box, left, w)
        assert 0 <= top <= box[1] and box[3] <= top + h <= 48, (box, top, h)
    path = synth.generate_catalogue(str(tmp_path), 4, 3, 40, seed=0, workers=1)
    dataset = ProductDataset(read_manifest(path), 32, train=True, crop="keep_box")
    sample, again = dataset[1], dataset[1]
    assert sample["image"].shape == (3, 32, 32) and torch.equal(sample["image"], again["image"])
    with pytest.raises(ValueError):
        ProductDataset(read_manifest(path), 32, crop="center")

"""The synthetic catalogue generator (eclip.data.synth): determinism, boxes, sources, texts, CLI."""

from __future__ import annotations

import collections
import os

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
    assert len(files_a) == 31
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

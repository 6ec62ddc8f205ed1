"""The zero-shot protocol cannot be passed without looking at the image: on a small synthetic catalogue (variant
families, same-category distractors), an oracle that reads the product's identity from the pixels scores 100,
a "text-only" model whose instance features depend only on the prompt scores exactly the chance level on
fine-grained retrieval, and the ECLIP feature adapter matches the model's own transfer API."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from eclip.data import synth
from eclip.data.manifest import read_manifest
from eclip.eval import metrics as M
from eclip.eval import report as R
from eclip.eval import zero_shot as Z

CATALOGUE_SIZE = 48  # the catalogue's pixels; the model input is larger (a resize)
IMAGE_SIZE = 64
GRID = 4


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("protocol")
    path = synth.generate_catalogue(str(folder), 24, 3, CATALOGUE_SIZE, seed=5, workers=1, family_size=3,
                                    same_category_distractor=0.7, mark_min_px=2.5)
    return path, read_manifest(path), Z.read_product_info(path)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers")
    from eclip.models.config import TINY_VOCAB
    from eclip.models.tokenizer import TextTokenizer

    return TextTokenizer(TINY_VOCAB, 32)


def _key(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


class Oracle:
    """Sees the product in the pixels: every image (and every product crop) the evaluation loads is looked up
    by its exact pixels. Embeddings are one-hot product + category vectors; the grounding map is 1 on the
    product's box; patch embeddings are the product's vector on the patches the box covers."""

    def __init__(self, products, tokenizer, image_size=IMAGE_SIZE):
        categories = sorted({p.category for p in products})
        self.num_products = len(products)
        self.dim = len(products) + len(categories) + 1  # + background
        self.background = self.dim - 1
        self.category_of = [len(products) + categories.index(p.category) for p in products]
        self.image_size = image_size
        self.images = {}  # pixel key -> (product, box in resized pixels or None)
        for p, product in enumerate(products):
            for image in product.images:
                pixels, size = Z.load_image(image.path, image_size)
                box = None if image.box is None else Z.scale_box(image.box, size, image_size)
                self.images[_key(pixels)] = (p, box)
                if image.box is not None:
                    self.images[_key(Z.load_crop(image.path, image.box, image_size))] = (p, None)
        self.texts = {}
        for p, product in enumerate(products):
            self.texts[self._ids(tokenizer, product.text)] = self._vector([p, self.category_of[p]])
        for c, category in enumerate(categories):
            for template in Z.class_prompt_templates("category") + Z.class_prompt_templates("templates"):
                self.texts[self._ids(tokenizer, template.format(category))] = self._vector([len(products) + c])

    @staticmethod
    def _ids(tokenizer, text):
        ids, mask = tokenizer([text])
        return tuple(ids[0][mask[0].bool()].tolist())

    def _vector(self, hot):
        v = torch.zeros(self.dim)
        v[hot] = 1.0
        return v / v.norm()

    def _lookup(self, images):
        return [self.images[_key(row)] for row in images]

    def scale(self):
        return torch.tensor([100.0])

    def encode_image(self, images):
        return torch.stack([self._vector([p, self.category_of[p]]) for p, _ in self._lookup(images)])

    def encode_text(self, input_ids, attention_mask):
        return torch.stack([self.texts[tuple(ids[m.bool()].tolist())] for ids, m in zip(input_ids, attention_mask)])

    def instance_features(self, images, *, input_ids=None, attention_mask=None, generator=None):
        return self.encode_image(images)

    def grounding_map(self, images, input_ids, attention_mask, generator=None):
        maps = torch.zeros(images.shape[0], self.image_size, self.image_size)
        for row, (_, box) in enumerate(self._lookup(images)):
            c0, r0, c1, r1 = M.box_pixel_bounds(torch.tensor(box), self.image_size, self.image_size).tolist()
            maps[row, r0:r1, c0:c1] = 1.0
        return maps

    def encode_patches(self, images):
        out = torch.zeros(images.shape[0], GRID * GRID, self.dim)
        out[:, :, self.background] = 1.0
        for row, (p, box) in enumerate(self._lookup(images)):
            if box is None:  # a crop: the product everywhere
                out[row] = self._vector([p, self.category_of[p]])
                continue
            coverage = M.patch_coverage(torch.tensor([box]), GRID, self.image_size)[0]
            inside = coverage >= coverage.max() * 0.5
            out[row, inside] = self._vector([p, self.category_of[p]])
        return out


class TextOnly(Oracle):
    """Instance features and maps that depend only on the prompt; constant image embeddings."""

    def encode_image(self, images):
        return torch.ones(images.shape[0], self.dim) / self.dim ** 0.5

    def instance_features(self, images, *, input_ids=None, attention_mask=None, generator=None):
        return self.encode_text(input_ids, attention_mask)

    def grounding_map(self, images, input_ids, attention_mask, generator=None):
        return torch.ones(images.shape[0], self.image_size, self.image_size)

    def encode_patches(self, images):
        return torch.ones(images.shape[0], GRID * GRID, self.dim)


def _rows(results, task):
    return results["tasks"][task]["rows"]


def test_the_oracle_scores_100_on_every_headline_task(catalogue, tokenizer):
    _, products, info = catalogue
    results = Z.evaluate(Oracle(products, tokenizer), products, tokenizer, IMAGE_SIZE, batch_size=7, seed=1,
                         product_info=info, pair_batch=50)
    fine = results["tasks"]["fine_retrieval"]
    assert fine["n"] == 24 and fine["gallery"] == 24  # every customer photo against every merchant image
    for method in ("eclip_instance", "clip_global", "clip_global_crop", "clip_text_pooling"):
        assert fine["rows"][method] == pytest.approx({"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}), method
        assert _rows(results, "fine_retrieval_family")[method]["R@1"] == pytest.approx(100.0), method
    assert fine["rows"]["chance"] == pytest.approx({"R@1": 100 / 24, "R@5": 500 / 24, "R@10": 1000 / 24})
    for task in ("grounding_customer", "grounding_customer_same_category", "grounding_ad", "grounding_merchant"):
        assert _rows(results, task)["eclip_decoder_map"] == pytest.approx({"Acc@0.5": 100.0, "Acc@0.7": 100.0})
    assert results["tasks"]["grounding_customer_same_category"]["n"] > 0
    assert _rows(results, "classification")["eclip_instance"]["Acc@1"] == pytest.approx(100.0)
    assert _rows(results, "classification")["clip_global"]["Acc@1 customer"] == pytest.approx(100.0)
    assert _rows(results, "image_to_text")["clip_global"]["R@1"] == pytest.approx(100.0)
    assert results["summary"]["fine_r1"] == pytest.approx(100.0)
    assert results["summary"]["chance_fine_r1"] == pytest.approx(100 / 24)
    assert set(results["summary"]) == set(R.SUMMARY_KEYS)
    # the CLIP + text weights sit on the product patches
    diag = results["diagnostics"]["rows"]
    assert diag["clip_text_pooling"]["mass_in_box"] > 3 * diag["chance"]["mass_in_box"]


def test_a_text_only_model_scores_chance_on_fine_retrieval(catalogue, tokenizer):
    _, products, info = catalogue
    model = TextOnly(products, tokenizer)
    results = Z.evaluate(model, products, tokenizer, IMAGE_SIZE, batch_size=7, seed=1, product_info=info)
    for task in ("fine_retrieval", "fine_retrieval_family"):
        chance = _rows(results, task)["chance"]
        for method in ("eclip_instance", "clip_global", "clip_text_pooling"):
            assert _rows(results, task)[method] == pytest.approx(chance), (task, method)
    assert results["summary"]["fine_r1"] == pytest.approx(results["summary"]["chance_fine_r1"])
    # the old protocol (each image decoded with its own product's text) hands the text-only model the answer
    ids, mask = tokenizer([p.text for p in products])
    feats = model.instance_features(None, input_ids=ids, attention_mask=mask)
    own_prompt = feats @ feats.T
    assert M.expected_recall_at_k(own_prompt, torch.eye(len(products), dtype=torch.bool), (1,))[1] == 1.0


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import eclip.models as em

    torch.manual_seed(0)
    model = em.create("eclip-tiny")
    return model, em.tokenizer_for(model)


def test_the_eclip_adapter_matches_the_transfer_api(catalogue, tiny):
    from eclip.eval.features import ECLIPFeatures

    _, products, _ = catalogue
    model, tokenizer = tiny
    model.eval()
    pixels = torch.stack([Z.load_image(products[i].images[1].path, IMAGE_SIZE)[0] for i in range(3)])
    ids, mask = tokenizer([products[i].text for i in range(3)])
    fx = ECLIPFeatures(model, seed=7)
    with torch.no_grad():
        feats, texts = fx.images(pixels), fx.texts(ids, mask)
        assert torch.allclose(feats["global"], model.encode_image(pixels), atol=1e-6)
        assert torch.allclose(texts["embedding"], model.encode_text(ids, mask), atol=1e-6)
        inst, attn = fx.decode(feats["state"], texts["state"], return_attention=True)
        maps = fx.decoder_maps(feats["state"], texts["state"])
        for i in range(3):  # the fixed negative prompts are the draw instance_features makes for one image
            g = torch.Generator().manual_seed(7)
            ref = model.instance_features(pixels[i:i + 1], input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1],
                                          generator=g)
            assert torch.allclose(inst[i], ref[0], atol=1e-5)
            ref_map = model.grounding_map(pixels[i:i + 1], ids[i:i + 1], mask[i:i + 1],
                                          generator=torch.Generator().manual_seed(7))
            assert torch.allclose(maps[i], ref_map[0], atol=1e-6)
        assert torch.allclose(attn.sum(dim=1), torch.ones(3), atol=1e-5)
        # cross-prompt scores: gallery image g decoded with query q's text, batched in odd pair slices
        scores = Z._cross_prompt_instance(fx, feats["state"], texts["state"][:2], inst[:2], torch.tensor([2, 0, 1]),
                                          pair_batch=4)
        for q in range(2):
            for j, g in enumerate([2, 0, 1]):
                h, _ = fx.decode(feats["state"][g:g + 1], texts["state"][q:q + 1])
                assert scores[q, j].item() == pytest.approx(float(inst[q] @ h[0]), abs=1e-5)
    assert fx.has_decoder and fx.grid == GRID and fx.num_tokens == GRID * GRID


def test_random_eclip_tiny_and_the_clip_baseline_get_every_row(catalogue, tiny):
    import eclip.models as em

    _, products, info = catalogue
    model, tokenizer = tiny
    model.train()
    results = Z.evaluate(model, products, tokenizer, IMAGE_SIZE, batch_size=16, seed=0, product_info=info)
    assert model.training  # the mode is restored
    again = Z.evaluate(model, products, tokenizer, IMAGE_SIZE, batch_size=5, seed=0, product_info=info,
                       pair_batch=33)
    for key, task in results["tasks"].items():
        assert "chance" in task["rows"], key
        for method, row in task["rows"].items():
            for column, value in row.items():
                assert value is not None and math.isfinite(value) and 0 <= value <= 100, (key, method, column)
                assert again["tasks"][key]["rows"][method][column] == pytest.approx(value, abs=1e-6), \
                    (key, method, column)  # seeded, and independent of the batching
    assert set(results["tasks"]["fine_retrieval"]["rows"]) == {"eclip_instance", "clip_global", "clip_global_crop",
                                                               "clip_text_pooling", "chance"}
    assert set(_rows(results, "grounding_customer")) == {"eclip_decoder_map", "clip_patch_map", "largest_box",
                                                         "centre_box", "random_object", "chance"}
    assert set(results["diagnostics"]["rows"]) == {"eclip_decoder", "clip_text_pooling", "chance"}
    assert results["summary_methods"]["fine_r1"] == "fine_retrieval/eclip_instance/R@1"

    torch.manual_seed(0)
    clip = em.create("eclip-tiny", use_decoder=False)
    baseline = Z.evaluate(clip, products, tokenizer, IMAGE_SIZE, product_info=info)
    assert set(baseline["tasks"]["fine_retrieval"]["rows"]) == {"clip_global", "clip_global_crop",
                                                                "clip_text_pooling", "chance"}
    assert "eclip_decoder_map" not in _rows(baseline, "grounding_customer")
    assert "clip_patch_map" in _rows(baseline, "grounding_customer")
    assert baseline["summary_methods"]["fine_r1"] == "fine_retrieval/clip_global/R@1"
    assert baseline["summary_methods"]["grounding_customer_acc50"] == "grounding_customer/clip_patch_map/Acc@0.5"
    table = R.format_comparison({"ECLIP": results, "CLIP": baseline}, verbose=True)
    assert "cross-prompt" in table and "chance: a random candidate" in table and "mass in box" in table
    assert table.count("| baseline: largest box |") == len([k for k in results["tasks"] if "grounding" in k])

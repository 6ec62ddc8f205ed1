"""The zero-shot evaluation suite (eclip.eval): metrics on hand-computed cases, an oracle model that scores 100
on every task, and a randomly initialized eclip-tiny on a small catalogue written here with PIL."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from eclip.data.manifest import read_manifest
from eclip.eval import metrics as M
from eclip.eval import zero_shot as Z

# --- metrics ---------------------------------------------------------------------------------------------


def test_accuracy_at_1_breaks_ties_by_lower_index():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.5, 0.1], [0.2, 0.7, 0.7], [1.0, 1.0, 1.0]])
    # predictions: 1, 0 (tie), 1 (tie), 0 (all tied)
    assert M.accuracy_at_1(scores, torch.tensor([1, 0, 1, 0])) == 1.0
    assert M.accuracy_at_1(scores, torch.tensor([1, 1, 2, 2])) == 0.25
    assert math.isnan(M.accuracy_at_1(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError):
        M.accuracy_at_1(scores, torch.tensor([0, 1]))


def test_recall_and_map_hand_computed_with_ties_and_a_query_without_a_match():
    scores = torch.tensor([[0.9, 0.1, 0.5],     # ranking 0, 2, 1
                           [0.2, 0.2, 0.2],     # all tied: ranking 0, 1, 2
                           [0.3, 0.8, 0.1]])    # no relevant item
    relevant = torch.tensor([[0, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert M.recall_at_k(scores, relevant, (1, 2, 10)) == pytest.approx({1: 0.0, 2: 2 / 3, 10: 2 / 3})
    # both matching queries find their item at rank 2: AP@1 = 0, AP@k>=2 = (1/2) / 1; the third counts 0
    assert M.mean_average_precision_at_k(scores, relevant, (1, 2, 10)) == pytest.approx({1: 0.0, 2: 1 / 3, 10: 1 / 3})


def test_map_with_several_relevant_items_and_k_beyond_the_gallery():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    relevant = torch.tensor([[1, 0, 1, 0, 1]], dtype=torch.bool)  # hits at ranks 1, 3, 5: P = 1, 2/3, 3/5
    got = M.mean_average_precision_at_k(scores, relevant, (1, 2, 3, 5, 10))
    assert got[1] == pytest.approx(1.0)
    assert got[2] == pytest.approx(1 / 2)  # one hit in the top 2, out of min(2, 3) possible
    assert got[3] == pytest.approx((1 + 2 / 3) / 3)
    assert got[5] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert got[10] == got[5]  # clamped to the gallery
    assert M.recall_at_k(scores, relevant, (1, 10)) == {1: 1.0, 10: 1.0}
    with pytest.raises(ValueError):
        M.recall_at_k(scores, relevant, (0,))


def test_perfect_and_worst_rankings():
    relevant = torch.eye(4, dtype=torch.bool)
    perfect = torch.eye(4) + 0.01 * torch.rand(4, 4)
    assert M.recall_at_k(perfect, relevant, (1, 5)) == {1: 1.0, 5: 1.0}
    assert M.mean_average_precision_at_k(perfect, relevant, (1, 5)) == {1: 1.0, 5: 1.0}
    worst = -perfect  # the match always ranks last of 4
    assert M.recall_at_k(worst, relevant, (1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}
    assert M.mean_average_precision_at_k(worst, relevant, (1, 4, 10)) == pytest.approx({1: 0.0, 4: 0.25, 10: 0.25})
    # NaN scores rank last
    nan_scores = torch.tensor([[float("nan"), 0.0, -1.0]])
    assert M.rank_order(nan_scores).tolist() == [[1, 2, 0]]


def test_box_iou_and_means_in_boxes():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 5]])
    iou = M.box_iou(a, b)
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]], dtype=torch.float64)
    assert torch.allclose(iou, expected)
    assert torch.allclose(M.paired_box_iou(a, b[:2]), torch.tensor([1 / 7, 0.25], dtype=torch.float64))

    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 7, 9, generator=gen)
    boxes = torch.tensor([[[0.0, 0, 9, 7], [1.5, 2.2, 4.0, 5.9], [8.7, 6.5, 9.0, 7.0]],
                          [[3.0, 1.0, 3.0, 1.0], [-4.0, -1.0, 2.0, 3.0], [2.0, 2.0, 5.0, 3.0]]])
    got = M.mean_in_boxes(maps, boxes)
    for i in range(2):
        for k in range(3):
            c0, r0, c1, r1 = M.box_pixel_bounds(boxes[i, k], 7, 9).tolist()
            assert got[i, k].item() == pytest.approx(maps[i, r0:r1, c0:c1].double().mean().item())
    assert M.box_pixel_bounds(boxes[0, 1], 7, 9).tolist() == [1, 2, 4, 6]
    assert M.box_pixel_bounds(boxes[1, 0], 7, 9).tolist() == [3, 1, 4, 2]  # empty box -> one pixel


def test_grounding_accuracy_ties_go_to_the_larger_box_and_padding_is_ignored():
    target = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    cands = torch.tensor([[[2.0, 2, 4, 4], [0, 0, 10, 10], [0, 0, 6, 10]],     # tie on score -> the larger
                          [[0.0, 0, 10, 8], [20, 20, 30, 30], [0, 0, 10, 10]],  # IoU 0.8
                          [[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]])  # padding holds the best score
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.9, 0.1, 0.5], [0.1, 0.5, 9.0]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True, True, False]])
    assert M.select_top_box(scores, cands, valid).tolist() == [1, 0, 1]
    acc = M.grounding_accuracy(scores, cands, target, valid, (0.5, 0.7, 0.9))
    assert acc == pytest.approx({0.5: 2 / 3, 0.7: 2 / 3, 0.9: 1 / 3})
    no_valid = M.grounding_accuracy(scores[:1], cands[:1], target[:1], torch.zeros(1, 3, dtype=torch.bool))
    assert no_valid == {0.5: 0.0, 0.7: 0.0}


# --- a synthetic catalogue -------------------------------------------------------------------------------

PRODUCTS = [  # (product id, text, category, [(source, (width, height), box or None, distractors)])
    ("p0", "red striped cup", "cup", [("merchant", (80, 60), [10, 8, 50, 40], [[55, 30, 75, 55]]),
                                      ("customer", (100, 100), [30, 30, 90, 95], [])]),
    ("p1", "blue dotted cup", "cup", [("merchant", (64, 64), [20, 20, 60, 60], [[2, 40, 15, 60]]),
                                      ("customer", (90, 120), [5, 10, 60, 70], [[62, 80, 88, 118]]),
                                      ("ad", (64, 64), None, [])]),
    ("p2", "green plain bag", "bag", [("merchant", (120, 80), [40, 10, 110, 70], [[5, 50, 30, 78]]),
                                      ("customer", (64, 64), [8, 8, 40, 56], [])]),
    ("p3", "black leather bag", "bag", [("merchant", (70, 70), [6, 6, 50, 64], [[52, 5, 68, 30]]),
                                        ("ad", (70, 70), [20, 30, 66, 66], [[4, 4, 18, 20]])]),
    ("p4", "white cotton shoe", "shoe", [("merchant", (96, 64), [10, 6, 70, 60], [[74, 10, 94, 40]]),
                                         ("customer", (64, 96), [6, 30, 60, 90], [[8, 4, 40, 26]])]),
    ("p5", "pink floral shoe", "shoe", [("merchant", (64, 64), [12, 12, 52, 52], [])]),
]


def _background(flat_index: int) -> tuple[int, int, int]:
    """A distinct colour per image, unrelated between images of one product (a colour that varies smoothly
    with the index would let even a random network group a product's images)."""
    g = torch.Generator().manual_seed(1000 + flat_index)
    return tuple(int(v) for v in torch.randint(30, 226, (3,), generator=g))


def _write_catalogue(folder) -> str:
    """A catalogue of 6 products (3 categories), 1-3 images each, in several sizes; each image has its own
    background colour, a product rectangle and distractor rectangles."""
    from PIL import Image, ImageDraw

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines, flat = [], 0
    for pid, text, category, images in PRODUCTS:
        records = []
        for j, (source, size, box, distractors) in enumerate(images):
            image = Image.new("RGB", size, _background(flat))
            draw = ImageDraw.Draw(image)
            for d in distractors:
                draw.rectangle([d[0], d[1], d[2] - 1, d[3] - 1], fill=(20, 20, 220))
            if box is not None:
                draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(230, 30, 30))
            path = f"images/{pid}_{j}.png"
            image.save(os.path.join(folder, path))
            record = {"path": path, "source": source, "distractors": distractors}
            if box is not None:
                record["box"] = box
            records.append(record)
            flat += 1
        lines.append(json.dumps({"product_id": pid, "text": text, "category": category, "images": records}))
    path = os.path.join(folder, "catalogue.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Oracle:
    """A model that copies the answers: it recognizes each image by its background colour (the top-left
    pixel) and each text by its token ids, and embeds [one-hot(product), one-hot(category)]; its grounding map
    is 1 inside the true box and 0 elsewhere."""

    def __init__(self, tokenizer, image_size, prompt=Z.DEFAULT_PROMPT):
        categories = sorted({c for _, _, c, _ in PRODUCTS})
        self.dim = len(PRODUCTS) + len(categories)
        self.image_size = image_size
        mean, std = torch.tensor(Z.IMAGENET_MEAN), torch.tensor(Z.IMAGENET_STD)
        colours, self.image_product, self.image_box = [], [], []
        flat = 0
        for p, (_, _, _, images) in enumerate(PRODUCTS):
            for _, (w, h), box, _ in images:
                colours.append((torch.tensor(_background(flat)) / 255.0 - mean) / std)
                self.image_product.append(p)
                self.image_box.append(None if box is None else
                                      torch.tensor([box[0] * image_size / w, box[1] * image_size / h,
                                                    box[2] * image_size / w, box[3] * image_size / h]))
                flat += 1
        self.colours = torch.stack(colours)
        self.category_of = [len(PRODUCTS) + categories.index(c) for _, _, c, _ in PRODUCTS]
        self.texts = {}
        for p, (_, text, _, _) in enumerate(PRODUCTS):
            self.texts[tuple(tokenizer([text])[0][0].tolist())] = self._vector([p, self.category_of[p]])
        for i, c in enumerate(categories):
            self.texts[tuple(tokenizer([prompt.format(c)])[0][0].tolist())] = self._vector([len(PRODUCTS) + i])
        self.calls = {"instance": 0, "grounding": 0}

    def _vector(self, hot):
        v = torch.zeros(self.dim)
        v[hot] = 1.0
        return v / v.norm()

    def _which(self, images):
        return torch.cdist(images[:, :, 0, 0], self.colours).argmin(dim=1).tolist()

    def encode_image(self, images):
        return torch.stack([self._vector([self.image_product[i], self.category_of[self.image_product[i]]])
                            for i in self._which(images)])

    def encode_text(self, input_ids, attention_mask):
        return torch.stack([self.texts[tuple(row.tolist())] for row in input_ids])

    def instance_features(self, images, *, input_ids=None, attention_mask=None, generator=None):
        self.calls["instance"] += 1
        return self.encode_image(images)

    def grounding_map(self, images, input_ids, attention_mask):
        self.calls["grounding"] += 1
        maps = torch.zeros(images.shape[0], self.image_size, self.image_size)
        for row, i in enumerate(self._which(images)):
            c0, r0, c1, r1 = M.box_pixel_bounds(self.image_box[i], self.image_size, self.image_size).tolist()
            maps[row, r0:r1, c0:c1] = 1.0
        return maps


def _metric_values(results):
    for key, _, columns in Z.SECTIONS:
        for column in columns:
            yield f"{key}/{column}", results[key][column]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return _write_catalogue(str(tmp_path_factory.mktemp("catalogue")))


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers")
    from eclip.models.config import TINY_VOCAB
    from eclip.models.tokenizer import TextTokenizer

    return TextTokenizer(TINY_VOCAB, 32)


def test_an_oracle_scores_100_on_every_task(catalogue, tokenizer):
    products = read_manifest(catalogue)
    oracle = Oracle(tokenizer, image_size=48)
    results = Z.evaluate(oracle, products, tokenizer, image_size=48, batch_size=3, seed=1)
    for name, value in _metric_values(results):
        assert value == pytest.approx(100.0), name
    generic = Z.evaluate(oracle, products, tokenizer, image_size=48, batch_size=3, seed=1, retrieval_prompt="generic")
    for name, value in _metric_values(generic):
        assert value == pytest.approx(100.0), name
    assert results["classification"]["n"] == 12
    assert results["image_to_text"]["n"] == 6
    # one query per product with >= 2 images; the gallery is every other image
    assert results["fine_retrieval"]["n"] == 5 and results["fine_retrieval"]["gallery"] == 7
    assert results["grounding"]["n"] == 11
    assert oracle.calls["instance"] == 8 and oracle.calls["grounding"] == 8  # 2 runs, batches of 3


def test_a_blind_model_does_not_score_100(catalogue, tokenizer):
    """Constant embeddings and a constant map: ties must not hand out the answers."""
    class Blind(Oracle):
        def encode_image(self, images):
            return torch.ones(images.shape[0], self.dim) / self.dim ** 0.5

        def encode_text(self, input_ids, attention_mask):
            return torch.ones(input_ids.shape[0], self.dim) / self.dim ** 0.5

        def grounding_map(self, images, input_ids, attention_mask):
            return torch.ones(images.shape[0], self.image_size, self.image_size)

    results = Z.evaluate(Blind(tokenizer, 48), read_manifest(catalogue), tokenizer, image_size=48)
    assert results["classification"]["Acc@1"] < 100 and results["image_to_text"]["R@1"] < 100
    assert results["fine_retrieval"]["R@1"] < 100 and results["grounding"]["Acc@0.7"] < 100


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import eclip.models as em

    torch.manual_seed(0)
    model = em.create("eclip-tiny")
    return model, em.tokenizer_for(model)


def test_random_eclip_tiny_gives_finite_numbers_for_every_metric(catalogue, tiny):
    model, tokenizer = tiny
    model.train()
    products = read_manifest(catalogue)
    results = Z.evaluate(model, products, tokenizer, model.config.image_size, batch_size=4, seed=0)
    for name, value in _metric_values(results):
        assert value is not None and math.isfinite(value) and 0.0 <= value <= 100.0, (name, value)
    assert model.training  # the mode is restored
    again = Z.evaluate(model, products, tokenizer, model.config.image_size, batch_size=4, seed=0)
    assert list(_metric_values(again)) == list(_metric_values(results))  # seeded: reproducible
    assert results["settings"]["instance_features"] == "decoder"
    generic = Z.evaluate(model, products, tokenizer, model.config.image_size, batch_size=4, seed=0,
                         retrieval_prompt="generic")
    assert generic["settings"]["retrieval_prompt"] == "generic"
    for name, value in _metric_values(generic):
        assert math.isfinite(value), name
    assert generic["classification"] == results["classification"]  # only the retrieval prompt changed
    with pytest.raises(ValueError, match="retrieval_prompt"):
        Z.evaluate(model, products, tokenizer, model.config.image_size, retrieval_prompt="title")


def test_a_model_without_decoder_falls_back_to_global_features(catalogue):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import eclip.models as em
    model = em.create("eclip-tiny", use_decoder=False)
    results = Z.evaluate(model, read_manifest(catalogue), em.tokenizer_for(model), model.config.image_size)
    assert results["settings"]["instance_features"] == "global"
    assert math.isfinite(results["fine_retrieval"]["mAP@10"])
    assert results["grounding"]["n"] == 0 and results["grounding"]["Acc@0.5"] is None
    assert "skipped" in Z.format_table(results)


def test_main_prints_the_table_and_writes_json(catalogue, tiny, tmp_path, capsys):
    model, _ = tiny
    checkpoint = str(tmp_path / "model.pt")
    torch.save(model.state_dict(), checkpoint)
    out = str(tmp_path / "out" / "results.json")
    code = Z.main(["--catalogue", catalogue, "--all", "--checkpoint", checkpoint, "--batch-size", "5",
                   "--out", out, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    for _, title, columns in Z.SECTIONS:
        assert title in printed
        header = printed.split(title, 1)[1].splitlines()[2]
        assert [cell.strip() for cell in header.strip("| ").split("|")] == list(columns)
    with open(out) as f:
        saved = json.load(f)
    assert saved["num_products"] == 6 and saved["settings"]["split"] == "all products"
    for _, value in _metric_values(saved):
        assert math.isfinite(value)
    # the same weights through evaluate() directly give the same numbers
    direct = Z.evaluate(model, read_manifest(catalogue), tiny[1], model.config.image_size, batch_size=5, seed=0)
    assert list(_metric_values(direct)) == list(_metric_values(saved))


def test_main_reports_input_errors(tmp_path, catalogue, capsys):
    assert Z.main(["--catalogue", str(tmp_path / "missing.jsonl")]) == 2
    # a held-out fraction no product falls under
    assert Z.main(["--catalogue", catalogue, "--heldout-fraction", "0.0001"]) == 2
    assert "held-out split is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        Z.main(["--catalogue", catalogue, "--all", "--heldout-fraction", "0.5"])

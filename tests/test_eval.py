"""The zero-shot evaluation suite (eclip.eval): metrics on hand-computed cases, chance levels against brute
force, aggregation over runs, and eclip-eval on a small catalogue written here with PIL (images of several
sizes, images without a box, a product without a customer photo). tests/test_eval_protocol.py has the oracle
and text-only models."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest
import torch

from eclip.data.manifest import read_manifest
from eclip.eval import metrics as M
from eclip.eval import report as R
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


def test_expected_recall_averages_over_tied_orders():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0],    # all tied: the relevant item is at a random rank
                           [3.0, 2.0, 1.0, 0.0],    # rank 2
                           [1.0, 2.0, 2.0, 0.0],    # tied for first with one other
                           [0.0, 5.0, 5.0, 5.0]])   # two relevant items tie with a third for first
    relevant = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    got = M.expected_recall_at_k(scores, relevant, (1, 2, 3, 9))
    # per query R@1: 1/4, 0, 1/2, 2/3; R@2: 1/2, 1, 1, 1 (one of 3 left out); R@3: 3/4, 1, 1, 1
    assert got[1] == pytest.approx((1 / 4 + 0 + 1 / 2 + 2 / 3) / 4)
    assert got[2] == pytest.approx((1 / 2 + 1 + 1 + 1) / 4)
    assert got[3] == pytest.approx((3 / 4 + 1 + 1 + 1) / 4)
    assert got[9] == pytest.approx(1.0)
    # without ties it is recall_at_k; with every score equal it is the chance level
    distinct = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    rel = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.3
    assert M.expected_recall_at_k(distinct, rel, (1, 3)) == pytest.approx(M.recall_at_k(distinct, rel, (1, 3)))
    flat = M.expected_recall_at_k(torch.zeros(5, 7), rel, (1, 3))
    assert flat == pytest.approx(M.chance_recall_at_k(rel.sum(dim=1), 7, (1, 3)))


def test_chance_levels_match_brute_force_over_every_order():
    gallery, num_relevant = 6, 2
    relevant = torch.zeros(1, gallery, dtype=torch.bool)
    relevant[0, :num_relevant] = True
    recalls, maps = {1: 0.0, 3: 0.0}, {1: 0.0, 3: 0.0, 10: 0.0}
    orders = list(itertools.permutations(range(gallery)))
    for order in orders:
        scores = -torch.tensor(order, dtype=torch.float64)[None]  # item order[j] ... any permutation
        for k, v in M.recall_at_k(scores, relevant, recalls).items():
            recalls[k] += v / len(orders)
        for k, v in M.mean_average_precision_at_k(scores, relevant, maps).items():
            maps[k] += v / len(orders)
    assert M.chance_recall_at_k(num_relevant, gallery, (1, 3)) == pytest.approx(recalls)
    assert M.chance_map_at_k(num_relevant, gallery, (1, 3, 10)) == pytest.approx(maps)
    assert M.chance_recall_at_k(1, 307, (1, 5, 10)) == pytest.approx({1: 1 / 307, 5: 5 / 307, 10: 10 / 307})
    assert M.binomial_noise(0.5, 100) == pytest.approx(0.1)
    assert math.isnan(M.binomial_noise(0.5, 0))


def test_trivial_grounding_baselines():
    target = torch.tensor([[10.0, 10, 20, 20], [0, 0, 30, 30]])
    cands = torch.tensor([[[10.0, 10, 20, 20], [0, 0, 40, 40], [0, 0, 6, 6], [0, 0, 0, 0]],
                          [[0.0, 0, 30, 30], [14, 14, 26, 26], [36, 36, 40, 40], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, False]])
    assert M.select_largest_box(cands, valid).tolist() == [1, 0]
    # image of side 40: centres (15, 15), (20, 20), (3, 3) | (15, 15), (20, 20), (38, 38)
    assert M.select_centre_box(cands, 40, valid).tolist() == [1, 1]
    assert M.random_box_accuracy(cands, target, valid, (0.5,)) == pytest.approx({0.5: (1 / 3 + 1 / 3) / 2})
    choice = torch.tensor([0, 2])
    assert M.choice_accuracy(choice, cands, target, valid, (0.5,)) == {0.5: 0.5}


def test_patch_coverage_and_attention_in_box():
    boxes = torch.tensor([[0.0, 0, 32, 32], [8, 8, 24, 40]])
    cover = M.patch_coverage(boxes, 4, 64)
    assert cover[0].reshape(4, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert cover[1].reshape(4, 4)[:3, :2].tolist() == [[0.25, 0.25], [0.5, 0.5], [0.25, 0.25]]
    assert cover.mean(dim=1).tolist() == pytest.approx([0.25, 16 * 32 / 64 ** 2])  # the box's share
    weights = torch.zeros(2, 16)
    weights[0, 0] = 1.0  # all on one patch inside the box
    weights[1] = 1.0  # uniform
    stats = M.attention_in_box(weights, cover)
    assert stats["mass_in_box"].tolist() == pytest.approx([1.0, cover[1].mean().item()])
    assert stats["effective_tokens"].tolist() == pytest.approx([1.0, 16.0])
    assert stats["box_tokens"].tolist() == pytest.approx([4.0, 2.0])
    assert stats["chance_mass_in_box"].tolist() == pytest.approx(cover.mean(dim=1).tolist())


def test_aggregate_gives_mean_and_sample_std():
    def run(value, seed):
        return {"catalogue": {}, "settings": {"seed": seed}, "summary": {"fine_r1": value},
                "tasks": {"t": {"rows": {"m": {"R@1": value, "R@5": None}, "chance": {"R@1": 1.0, "R@5": None}}}},
                "diagnostics": {"rows": {"m": {"mass_in_box": value}}}}
    out = R.aggregate([run(1.0, 0), run(3.0, 1)])
    assert out["runs"] == 2 and out["settings"]["seed"] == [0, 1]
    assert out["tasks"]["t"]["rows"]["m"] == {"R@1": 2.0, "R@5": None}
    assert out["tasks"]["t"]["std"]["m"]["R@1"] == pytest.approx(math.sqrt(2.0))
    assert out["tasks"]["t"]["std"]["chance"]["R@1"] == 0.0
    assert out["summary"]["fine_r1"] == 2.0 and out["summary_std"]["fine_r1"] == pytest.approx(math.sqrt(2.0))
    assert R.aggregate([run(1.0, 0)])["runs"] == 1
    with pytest.raises(ValueError):
        R.aggregate([])


def test_square_crop_around_a_box():
    assert Z.square_around([10, 20, 30, 30], 64, 64) == [10, 15, 30, 35]
    assert Z.square_around([0, 0, 10, 40], 64, 64) == [0, 0, 40, 40]  # moved inside the image
    assert Z.square_around([50, 10, 64, 20], 64, 64) == [50, 8, 64, 22]
    assert Z.square_around([0, 0, 80, 10], 80, 60) == [10, 0, 70, 60]  # cut to the image, centred


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


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return _write_catalogue(str(tmp_path_factory.mktemp("catalogue")))


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import eclip.models as em

    torch.manual_seed(0)
    model = em.create("eclip-tiny")
    return model, em.tokenizer_for(model)


def _numbers(results):
    for key, task in results["tasks"].items():
        for method, row in task["rows"].items():
            for column, value in row.items():
                yield f"{key}/{method}/{column}", value


def test_queries_gallery_and_candidates_of_a_mixed_catalogue(catalogue, tiny):
    model, tokenizer = tiny
    results = Z.evaluate(model, read_manifest(catalogue), tokenizer, model.config.image_size, batch_size=4, seed=0)
    tasks = results["tasks"]
    assert results["catalogue"]["images_by_source"] == {"merchant": 6, "ad": 2, "customer": 4}
    assert tasks["classification"]["n"] == 12 and tasks["classification"]["n_by_source"]["ad"] == 2
    # customer photos of products with a merchant image (p0, p1, p2, p4) against the 6 merchant images
    assert tasks["fine_retrieval"]["n"] == 4 and tasks["fine_retrieval"]["gallery"] == 6
    assert tasks["fine_retrieval"]["rows"]["chance"]["R@1"] == pytest.approx(100 / 6)
    assert tasks["fine_retrieval"]["rows"]["chance"]["R@10"] == pytest.approx(100.0)
    assert tasks["image_to_text"]["n"] == 6
    # every image with a box is grounded, per source (p1's ad image has no box)
    assert (tasks["grounding_merchant"]["n"], tasks["grounding_ad"]["n"], tasks["grounding_customer"]["n"]) == (6, 1, 4)
    # the product, its distractors and 5 decoys
    assert tasks["grounding_customer"]["mean_candidates"] == pytest.approx(5 + (1 + 2 + 1 + 2) / 4)
    # a random object: p0 and p2 show only the product, p1 and p4 one distractor each
    assert tasks["grounding_customer"]["rows"]["random_object"]["Acc@0.5"] == pytest.approx(75.0)
    assert "fine_retrieval_family" not in tasks and "grounding_customer_same_category" not in tasks
    for name, value in _numbers(results):
        assert value is not None and 0.0 <= value <= 100.0, name
    assert results["diagnostics"]["n"] == 4 and results["diagnostics"]["tokens"] == 16
    with pytest.raises(ValueError, match="class prompts"):
        Z.evaluate(model, read_manifest(catalogue), tokenizer, model.config.image_size, class_prompts="a photo")


def test_class_prompt_templates():
    assert Z.class_prompt_templates("category") == ("{}",)
    templates = Z.class_prompt_templates("templates")
    assert "{}" in templates and "red {}" in templates and len(templates) > 20
    assert Z.class_prompt_templates("a photo of a {}") == ("a photo of a {}",)
    with pytest.raises(ValueError):
        Z.class_prompt_templates(["{}", "no slot"])


def test_main_prints_the_tables_and_writes_json(catalogue, tiny, tmp_path, capsys):
    model, tokenizer = tiny
    checkpoint = str(tmp_path / "model.pt")
    torch.save(model.state_dict(), checkpoint)
    out = str(tmp_path / "out" / "results.json")
    code = Z.main(["--catalogue", catalogue, "--all", "--checkpoint", checkpoint, "--batch-size", "5",
                   "--json", out, "--device", "cpu", "--seeds", "0", "1", "--verbose",
                   "--class-prompts", "templates"])
    printed = capsys.readouterr().out
    assert code == 0
    for title in ("Fine-grained product retrieval", "Visual grounding, customer images", "Attention diagnostics",
                  "Product classification", "noise: 2 s.e."):
        assert title in printed, title
    assert "mean ± std over 2 runs" in printed and " ± " in printed
    with open(out) as f:
        saved = json.load(f)
    assert saved["runs"] == 2 and saved["settings"]["seeds"] == [0, 1]
    assert saved["settings"]["split"] == "all products" and saved["catalogue"]["products"] == 6
    assert set(saved["summary"]) == set(R.SUMMARY_KEYS) and set(saved["summary_std"]) == set(R.SUMMARY_KEYS)
    assert saved["tasks"]["fine_retrieval"]["std"]["eclip_instance"]["R@1"] is not None
    # one seed through evaluate() directly gives the same numbers as one seed through main()
    assert Z.main(["--catalogue", catalogue, "--all", "--checkpoint", checkpoint, "--json", out,
                   "--class-prompts", "templates"]) == 0
    capsys.readouterr()
    with open(out) as f:
        saved = json.load(f)
    direct = Z.evaluate(model, read_manifest(catalogue), tokenizer, model.config.image_size, seed=0,
                        class_prompts="templates")
    assert dict(_numbers(direct)) == pytest.approx(dict(_numbers(saved)))


def test_main_random_init_differs_per_seed(catalogue, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert Z.main(["--catalogue", catalogue, "--all", "--seeds", "3", "4", "--json", out]) == 0
    capsys.readouterr()
    with open(out) as f:
        saved = json.load(f)
    assert saved["settings"]["checkpoints"] is None
    assert saved["tasks"]["classification"]["std"]["clip_global"]["Acc@1"] is not None


def test_main_reports_input_errors(tmp_path, catalogue, capsys):
    assert Z.main(["--catalogue", str(tmp_path / "missing.jsonl")]) == 2
    # a held-out fraction no product falls under
    assert Z.main(["--catalogue", catalogue, "--heldout-fraction", "0.0001"]) == 2
    assert "held-out split is empty" in capsys.readouterr().err
    assert Z.main(["--catalogue", catalogue, "--all", "--class-prompts", "photo"]) == 2
    with pytest.raises(SystemExit):
        Z.main(["--catalogue", catalogue, "--all", "--heldout-fraction", "0.5"])


def test_negative_prompt_sets_are_the_decoders_negatives(catalogue, tiny):
    """Table 6: 'texts' are the prompts of T - 1 given texts, 'mean' their mean repeated; the adapter decodes
    with exactly the given set (equal to decoding by hand), and a wrong shape or a non-ECLIP model is refused."""
    import math

    from eclip.eval.features import ECLIPFeatures, negative_prompt_set
    from eclip.models.decoder import InstanceDecoder

    model, tokenizer = tiny
    cfg = model.config
    model.eval()  # as the evaluation runs it (no dropout); the fixture's model is left in eval mode
    texts = [f"product number {i} in red" for i in range(12)]
    assert negative_prompt_set("noise", model, tokenizer, texts) is None
    chosen = negative_prompt_set("texts", model, tokenizer, texts, seed=3)
    assert chosen.shape == (cfg.num_queries - 1, cfg.embed_dim)
    assert torch.allclose(chosen.norm(dim=-1), torch.full((cfg.num_queries - 1,), math.sqrt(cfg.embed_dim)))
    with torch.no_grad():
        ids, mask = tokenizer(texts)
        every = model._prompt(model.towers.encode_text(ids, mask)).float()
    # each chosen prompt is one of the texts' prompts, all distinct, and the draw follows the seed
    match = torch.cdist(chosen, every).argmin(dim=1)
    assert torch.allclose(chosen, every[match], atol=1e-5) and len(set(match.tolist())) == cfg.num_queries - 1
    assert not torch.equal(chosen, negative_prompt_set("texts", model, tokenizer, texts, seed=4))
    mean = negative_prompt_set("mean", model, tokenizer, texts, batch_size=5)
    assert torch.allclose(mean, every.mean(dim=0).expand_as(mean), atol=1e-5)

    fx = ECLIPFeatures(model, negative_prompts=chosen)
    default = ECLIPFeatures(model, seed=0)
    pixels = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state, prompt = fx.images(pixels)["state"], fx.texts(ids[:2], mask[:2])["state"]
        features, _ = fx.decode(state, prompt)
        prompts = torch.cat([prompt[:, None], chosen[None].expand(2, -1, -1)], dim=1)
        types = torch.full(prompts.shape[:2], InstanceDecoder.TEXT, dtype=torch.long)
        by_hand = torch.nn.functional.normalize(model.towers.decode(state, prompts, types).hidden[:, 0], dim=-1)
        assert torch.allclose(features, by_hand, atol=1e-5)
        assert not torch.allclose(features, default.decode(state, prompt)[0], atol=1e-3)

    with pytest.raises(ValueError, match=r"shape \(T - 1, D\)"):
        ECLIPFeatures(model, negative_prompts=chosen[:-1])
    with pytest.raises(ValueError, match="one of"):
        negative_prompt_set("ema", model, tokenizer, texts)
    with pytest.raises(ValueError, match="at least T - 1"):
        negative_prompt_set("texts", model, tokenizer, texts[:2])
    with pytest.raises(ValueError, match="needs an eclip.models.ECLIP"):
        from eclip.eval.features import adapter_for

        adapter_for(object(), negative_prompts=chosen)
    results = Z.evaluate(model, read_manifest(catalogue), tokenizer, cfg.image_size, batch_size=4,
                         negative_prompts=mean)
    assert results["settings"]["negative_prompts"] == "given"


def test_main_negative_prompt_sets(catalogue, tmp_path, capsys):
    out = str(tmp_path / "n.json")
    assert Z.main(["--catalogue", catalogue, "--heldout-fraction", "0.5", "--negatives", "mean", "--json", out]) == 0
    capsys.readouterr()
    with open(out) as f:
        saved = json.load(f)
    assert saved["settings"]["negatives"] == "mean" and saved["settings"]["negative_prompts"] == "given"
    assert Z.main(["--catalogue", catalogue, "--all", "--negatives", "texts"]) == 2
    assert "needs products that are not evaluated" in capsys.readouterr().err
    # 'texts' needs T - 1 = 7 other products; this catalogue has fewer
    assert Z.main(["--catalogue", catalogue, "--heldout-fraction", "0.5", "--negatives", "texts"]) == 2
    assert "at least T - 1" in capsys.readouterr().err

"""The one-GPU recipe on the CPU at tiny sizes: the eclip-small preset, the data preloaded to the device
(pair choice against the dataset's, the device crop against torchvision's on PIL, its draws against
RandomResizedCrop's), the h100-recipe preset, and eclip-demo --scale gpu end to end (preload, warm-up,
branches, evaluation)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="eclip needs timm")
pytest.importorskip("torchvision", reason="the PIL path needs torchvision")

import eclip.models as em  # noqa: E402
from eclip.data.dataset import MEAN, STD, Collate, ProductDataset, image_transform  # noqa: E402
from eclip.data.manifest import read_manifest  # noqa: E402
from eclip.data.preload import PreloadedProducts, draw_crops, resized_crop_flip  # noqa: E402
from eclip.data.synth import generate_catalogue  # noqa: E402
from eclip.train import preset  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    generate_catalogue(str(root), products=24, images_per_product=3, size=SIZE, seed=0, workers=1)
    return str(root)


def _tokenizer():
    return em.tokenizer_for(em.preset_config("eclip-small"))


def _normalized(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (pixels.float() / 255 - mean) / std


def test_eclip_small_has_196_tokens_a_few_million_parameters_and_the_shipped_vocabulary(catalogue):
    config = em.preset_config("eclip-small")
    assert (config.image_size, config.patch_size, config.num_patches) == (112, 8, 196)
    with torch.device("meta"):
        model = em.create("eclip-small")
    assert 3e6 < em.count_parameters(model) < 6e6
    tokenizer = em.tokenizer_for(config)
    unknown = tokenizer.token_id("[UNK]")
    ids, mask = tokenizer([p.text for p in read_manifest(os.path.join(catalogue, "catalogue.jsonl"))])
    assert not (ids[mask.bool()] == unknown).any()  # the catalogue's words are all in the vocabulary


def test_h100_recipe_is_the_demo_recipe_at_the_larger_scale(capsys):
    gpu, cpu = preset("h100-recipe"), preset("demo-recipe")
    assert gpu.model == "eclip-small" and gpu.preload and not cpu.preload
    for field in ("micro_batch", "lr", "weight_decay", "warmup_steps", "decay_all", "crop", "grad_clip"):
        assert getattr(gpu, field) == getattr(cpu, field), field
    assert em.preset_config(gpu.model, **gpu.model_overrides).patch_size == 8
    assert gpu.model_overrides["queue_size"] == cpu.model_overrides["queue_size"]
    from eclip.train.cli import main as train_cli

    assert train_cli(["--preset", "h100-recipe", "--dry-run"]) == 0
    assert "parameters: 4.2M trainable" in capsys.readouterr().out


def test_device_crop_equals_torchvision_on_pil_up_to_rounding(catalogue):
    """The same box and flip: the device crop of the S-px uint8 image against RandomResizedCrop's resample
    (torchvision's resized_crop on the PIL image, bilinear) and flip, normalized. PIL rounds its result to
    uint8, so they may differ by 1 level in 255; a box one pixel to the side differs by far more."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    boxes = [(0, 0, SIZE, SIZE), (3, 1, 23, 17), (9, 0, 23, 29), (0, 14, 32, 18), (15, 11, 17, 21), (1, 2, 31, 30)]
    paths = [image.path for p in read_manifest(os.path.join(catalogue, "catalogue.jsonl"))[:4] for image in p.images]
    for path in paths:
        with Image.open(path) as image:
            pil = image.convert("RGB")
        pixels = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None]
        for top, left, h, w in boxes:
            for flip in (False, True):
                want = TF.resized_crop(pil, top, left, h, w, [SIZE, SIZE], InterpolationMode.BILINEAR)
                want = TF.normalize(TF.to_tensor(TF.hflip(want) if flip else want), MEAN, STD)
                got = resized_crop_flip(pixels, torch.tensor([[top, left, h, w]]), torch.tensor([flip]), SIZE)[0]
                levels = (got - want).abs() * torch.tensor(STD)[:, None, None] * 255
                assert levels.max() <= 1.001, (path, top, left, h, w, flip, levels.max())
                if w < SIZE:
                    shifted = resized_crop_flip(pixels, torch.tensor([[top, left + 1, h, w]]), torch.tensor([flip]),
                                                SIZE)[0]
                    assert ((shifted - want).abs() * torch.tensor(STD)[:, None, None] * 255).max() > 10


def test_device_crops_are_drawn_as_random_resized_crop_draws_them():
    """20000 draws on the device against 20000 of torchvision's RandomResizedCrop.get_params (scale (0.5, 1),
    ratio (3/4, 4/3), on 112 x 112, where many tries do not fit): two-sample Kolmogorov-Smirnov distances of
    the crop's sides and position, and the flip rate."""
    from torchvision.transforms import RandomResizedCrop

    count, side = 20000, 112
    boxes, flips = draw_crops(count, side, side, torch.Generator().manual_seed(0))
    assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 0] + boxes[:, 2] <= side)
            & (boxes[:, 1] + boxes[:, 3] <= side)).all()
    torch.manual_seed(1)
    reference = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, side, side), (0.5, 1.0), (3 / 4, 4 / 3))
                              for _ in range(count)])
    for column, name in enumerate(("top", "left", "height", "width")):
        a, b = boxes[:, column].double(), reference[:, column].double()
        grid = torch.arange(side + 1, dtype=torch.float64)
        cdf_a = (a[:, None] <= grid).double().mean(0)
        cdf_b = (b[:, None] <= grid).double().mean(0)
        assert (cdf_a - cdf_b).abs().max() < 0.025, name  # critical value at p = 0.001: 0.0195
    assert abs(flips.double().mean().item() - 0.5) < 0.015
    area = (boxes[:, 2] * boxes[:, 3]).double() / side**2
    assert area.min() > 0.48 and area.max() <= 1.0


def test_preloaded_pairs_are_the_datasets_and_unreadable_images_are_left_out(catalogue, tmp_path):
    """Epochs 0 and 1: the anchor and positive image of every product, through ProductDataset with a transform
    that does not augment, equal the preloaded pixels the epoch plan picks. One product has an unreadable image
    (its pair comes from the other two), one has none readable (left out when loading)."""
    import shutil

    data = tmp_path / "catalogue"
    shutil.copytree(catalogue, data)
    products = read_manifest(str(data / "catalogue.jsonl"))
    for image in products[1].images[:1] + products[2].images:
        with open(image.path, "wb") as f:
            f.write(b"not an image")
    preloaded = PreloadedProducts(products, SIZE, tokenizer=_tokenizer(), device="cpu", seed=3)
    assert len(preloaded) == len(products) - 1 and preloaded.pixels.shape == (3 * len(products) - 4, 3, SIZE, SIZE)
    assert preloaded.report == {"unreadable_image": 4, "no_readable_image": 1}
    dataset = ProductDataset(products, SIZE, train=True, seed=3)
    dataset.transform = image_transform(SIZE, train=False)  # a plain resize: no-op at the catalogue's size
    rows = {p.product_id: i for i, p in enumerate(preloaded.products)}
    plans = {epoch: preloaded.epoch_plan(epoch) for epoch in (0, 1)}
    for epoch, plan in plans.items():
        dataset.epoch = epoch
        for i, product in enumerate(dataset.products):
            if product.product_id not in rows:
                continue
            sample, row = dataset[i], rows[product.product_id]
            anchor, positive = plan["anchor"][row], plan["positive"][row]
            torch.testing.assert_close(_normalized(preloaded.pixels[anchor]), sample["image"], atol=1e-6, rtol=0)
            torch.testing.assert_close(_normalized(preloaded.pixels[positive]), sample["positive_image"], atol=1e-6,
                                       rtol=0)
    assert not torch.equal(plans[0]["anchor"], plans[1]["anchor"])  # a new epoch draws new pairs


def test_a_preloaded_batch_has_collates_keys_and_tokens_and_depends_only_on_the_epoch(catalogue):
    products = read_manifest(os.path.join(catalogue, "catalogue.jsonl"))
    index = {p.product_id: 100 + i for i, p in enumerate(products)}
    tokenizer = _tokenizer()
    preloaded = PreloadedProducts(products, SIZE, tokenizer=tokenizer, device="cpu", product_index=index)
    rows = [5, 0, 17, 3]
    batch = preloaded.batch(rows, preloaded.epoch_plan(0))
    assert batch["size"] == 4 and batch["skipped"] == {}
    assert batch["images"].shape == batch["positive_images"].shape == (4, 3, SIZE, SIZE)
    assert batch["images"].dtype == torch.float32
    reference = Collate(tokenizer)([{"image": torch.zeros(3, SIZE, SIZE), "positive_image": torch.zeros(3, SIZE, SIZE),
                                     "text": products[r].text, "product_index": index[products[r].product_id],
                                     "product_id": products[r].product_id, "unreadable_images": 0,
                                     "single_image": False} for r in rows])
    for key in ("input_ids", "attention_mask", "product_ids", "product_keys"):
        assert (batch[key] == reference[key]) if key == "product_keys" else torch.equal(batch[key], reference[key])
    low, high = _normalized(torch.tensor(0)).min(), _normalized(torch.tensor(255)).max()
    assert batch["images"].min() >= low - 1e-5 and batch["images"].max() <= high + 1e-5
    again = preloaded.batch(rows, preloaded.epoch_plan(0))
    assert torch.equal(again["images"], batch["images"]) and torch.equal(again["positive_images"],
                                                                           batch["positive_images"])
    assert not torch.equal(preloaded.batch(rows, preloaded.epoch_plan(1))["images"], batch["images"])


def test_preload_refuses_the_box_keeping_crop(catalogue, tmp_path):
    from eclip.train import train

    cfg = preset("demo", {"data": catalogue, "out": str(tmp_path / "run"), "micro_batch": 8, "max_steps": 1,
                          "preload": True, "crop": "keep_box"})
    with pytest.raises(ValueError, match="keep_box.*preload=False"):
        train(cfg, progress=False)


TINY_SMALL = ("{'image_size': 32, 'vision_width': 32, 'vision_depth': 1, 'vision_heads': 2, 'text_width': 32, "
              "'text_depth': 1, 'text_heads': 2, 'text_mlp': 64, 'embed_dim': 32, 'decoder_mlp': 64, "
              "'decoder_heads': 2, 'queue_size': 16}")


def test_gpu_scale_demo_runs_preload_warm_up_branches_and_evaluation_on_the_cpu(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from eclip import demo

    data, out = str(tmp_path / "data"), str(tmp_path / "runs")
    generate_catalogue(data, 48, 3, SIZE, seed=0, workers=1)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            demo.main(["--scale", "gpu", "--data", data, "--out", out])
        assert "--allow-cpu" in capsys.readouterr().err
    args = ["--scale", "gpu", "--allow-cpu", "--data", data, "--out", out, "--warmup-steps", "2", "--steps", "2",
            "--batch", "8", "--eval-products", "4", "--model-overrides", TINY_SMALL]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("data preloaded to cpu: ") == 3  # the warm-up and both branches
    assert printed.count("started from") == 2 and "the first 4 of them evaluated" in printed
    for run in ("warmup", "eclip", "clip-baseline"):
        with open(os.path.join(out, run, "config.json")) as f:
            config = json.load(f)
        assert config["model"] == "eclip-small" and config["preload"] and config["max_steps"] == 2
        assert config["model_overrides"]["image_size"] == SIZE and config["micro_batch"] == 8
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["scale"] == "gpu"
    assert set(results["phase_seconds"]) >= {"warm-up", "ECLIP", "CLIP baseline", "total"}
    assert results["models"]["ECLIP"]["tasks"]["fine_retrieval"]["n"] <= 4
    for key, values in results["summary"].items():
        if key != "seconds":
            assert set(values) == {"ECLIP", "CLIP baseline"}, key

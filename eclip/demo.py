"""``eclip-demo``: ECLIP against a CLIP baseline on the synthetic product catalogue, on a CPU.

    eclip-demo                       # data in data/synthetic, runs and figures in runs/demo

1. generates the synthetic catalogue if it is absent (``eclip-data synth``);
2. trains eclip-tiny (decoder and its losses on) and the CLIP baseline (decoder off: ITC only) with the same
   data, steps and optimizer;
3. evaluates both on the held-out products with the zero-shot suite and prints the tables side by side;
4. writes the training curves and grounding maps of a few held-out images as PNG files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from eclip.data.manifest import read_manifest, split
from eclip.eval.zero_shot import SECTIONS, evaluate
from eclip.train import preset, train
from eclip.train.trainer import load_trained, manifest_path

RUNS = {"ECLIP": {}, "CLIP baseline": {"use_decoder": False, "queue_size": 0}}


def _side_by_side(results: dict) -> str:
    names = list(results)
    lines = [f"| task | metric | {' | '.join(names)} |", "|---|---|" + "---:|" * len(names)]
    for key, title, metrics in SECTIONS:
        for metric in metrics:
            cells = []
            for name in names:
                value = results[name].get(key, {}).get(metric)
                cells.append("-" if value is None else f"{value:.2f}")
            lines.append(f"| {title} | {metric} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _plot_curves(histories: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "itc", "inter", "itm", "intra", "entropy"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, key in zip(axes.flat, keys):
        for name, history in histories.items():
            points = [(r["step"], r[key]) for r in history if key in r]
            if points:
                ax.plot(*zip(*points), label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_grounding(model, tokenizer, products, image_size: int, path: str, count: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from eclip.eval.zero_shot import load_image, scale_box

    picks = [(p, im) for p in products for im in p.images if im.source == "customer" and im.box][:count]
    if not picks:
        return
    images, boxes = [], []
    for product, image in picks:
        tensor, size = load_image(image.path, image_size)
        images.append(tensor)
        boxes.append(scale_box(image.box, size, image_size))
    ids, mask = tokenizer([p.text for p, _ in picks])
    with torch.no_grad():
        maps = model.grounding_map(torch.stack(images), ids, mask, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    fig, axes = plt.subplots(2, len(picks), figsize=(2.4 * len(picks), 5.2))
    for i, ((product, _), image, box, heat) in enumerate(zip(picks, images, boxes, maps)):
        rgb = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        for row in range(2):
            axes[row, i].imshow(rgb)
            axes[row, i].axis("off")
        axes[1, i].imshow(heat.numpy(), alpha=0.6, cmap="jet")
        x0, y0, x1, y1 = box
        axes[1, i].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
        axes[0, i].set_title(product.text[:28], fontsize=7)
    fig.suptitle("held-out customer photos: grounding map of the product text (box: the true product)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eclip-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--products", type=int, default=3000)
    parser.add_argument("--images-per-product", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    if not os.path.isfile(os.path.join(args.data, "catalogue.jsonl")):
        from eclip.data.synth import generate_catalogue

        print(f"generating the synthetic catalogue in {args.data} ...")
        generate_catalogue(args.data, args.products, args.images_per_product, args.size, args.seed)
    products = read_manifest(manifest_path(args.data))
    _, heldout = split(products, 0.1)
    print(f"catalogue: {len(products)} products, {len(heldout)} held out for evaluation")

    histories, results = {}, {}
    import eclip.models as em

    for name, model_overrides in RUNS.items():
        slug = name.lower().replace(" ", "-")
        cfg = preset("demo", {"data": args.data, "out": os.path.join(args.out, slug), "epochs": args.epochs,
                              "seed": args.seed, "model_overrides": {**preset("demo").model_overrides, **model_overrides}})
        print(f"\n== training {name} ({cfg.model}, {'decoder on' if not model_overrides else 'decoder off'})")
        history = train(cfg, resume=True)
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        with open(metrics_path) as f:
            histories[name] = [json.loads(line) for line in f] or history
        model = load_trained(cfg)
        tokenizer = em.tokenizer_for(model)
        print(f"== evaluating {name} on {len(heldout)} held-out products")
        results[name] = evaluate(model, heldout, tokenizer, model.config.image_size, seed=args.seed)
        if name == "ECLIP":
            grounding_png = os.path.join(args.out, "grounding.png")
            _plot_grounding(model, tokenizer, heldout, model.config.image_size, grounding_png)

    os.makedirs(args.out, exist_ok=True)
    curves_png = os.path.join(args.out, "training_curves.png")
    _plot_curves(histories, curves_png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nZero-shot results on {len(heldout)} held-out products (%):\n")
    print(_side_by_side(results))
    print(f"\nfiles: {curves_png}, {os.path.join(args.out, 'grounding.png')}, "
          f"{os.path.join(args.out, 'results.json')}, runs and checkpoints in {args.out}/")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

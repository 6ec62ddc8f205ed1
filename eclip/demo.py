"""``eclip-demo``: ECLIP against a CLIP baseline on the synthetic product catalogue, on a CPU.

    eclip-demo                       # data in data/synthetic, runs and figures in runs/demo

1. generates the synthetic catalogue if it is absent (``eclip-data synth``);
2. trains a shared warm-up of eclip-tiny with ITC only (the analogue of the paper's pretrained encoders), then
   from it ECLIP (decoder and its losses on) and the CLIP baseline (decoder off: ITC only) for the same steps
   with the same data, seed and optimizer (the ``demo-recipe`` training preset; docs/recipe.md);
3. evaluates both on the held-out products with the zero-shot suite (:mod:`eclip.eval.zero_shot`) and prints
   its tables side by side: every task with the ECLIP method, the CLIP methods of both models, the trivial
   baselines and the chance level;
4. writes ``results.json`` (a ``summary`` block of headline numbers per model, then every number of both
   evaluations), the training curves and the grounding maps of a few held-out customer photos as PNG files.

A folder that already holds a model's final checkpoint is not trained again (``--out`` of an earlier run
re-evaluates its models). A catalogue made with ``eclip-data synth`` options is used as it is (``--data``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from eclip._deps import TRAIN, require
from eclip.data.manifest import read_manifest, split
from eclip.eval import report
from eclip.eval.zero_shot import evaluate, read_product_info
from eclip.train import preset, train
from eclip.train.trainer import load_trained, manifest_path

RUNS = {"ECLIP": {}, "CLIP baseline": {"use_decoder": False, "queue_size": 0}}


def demo_summary(results: dict[str, dict], seconds: float) -> tuple[dict, dict]:
    """The ``summary`` block of results.json: each headline key (:data:`eclip.eval.report.SUMMARY_KEYS`) ->
    {model name: percent}, plus ``seconds``; and the method each model's number came from."""
    block = {key: {name: r["summary"][key] for name, r in results.items()} for key in report.SUMMARY_KEYS}
    block["seconds"] = round(seconds, 1)
    return block, {name: r["summary_methods"] for name, r in results.items()}


def _format_summary(block: dict) -> str:
    names = [n for n in next(iter(block.values()))] if block else []
    lines = ["| summary key | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, values in block.items():
        if key == "seconds":
            continue
        lines.append(f"| {key} | " + " | ".join("-" if values[n] is None else f"{values[n]:.2f}" for n in names) + " |")
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


def _plot_grounding(models: dict, tokenizer, products, image_size: int, path: str, count: int = 6) -> None:
    """Held-out customer photos, the ECLIP decoder's attention map of the product text and each model's
    patch-text similarity map (the CLIP localisation), with the true product box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from eclip.eval.features import adapter_for, upsample_grid
    from eclip.eval.zero_shot import load_image, scale_box

    picks = [(p, im) for p in products for im in p.images if im.source == "customer" and im.box][:count]
    if not picks:
        return
    images, boxes = [], []
    for product, image in picks:
        tensor, size = load_image(image.path, image_size)
        images.append(tensor)
        boxes.append(scale_box(image.box, size, image_size))
    pixels = torch.stack(images)
    ids, mask = tokenizer([p.text for p, _ in picks])
    rows = [("image", None)]
    with torch.no_grad():
        for name, model in models.items():
            fx = adapter_for(model, seed=0)
            feats, texts = fx.images(pixels), fx.texts(ids, mask)
            if fx.has_decoder:
                rows.append((f"{name}: decoder attention", fx.decoder_maps(feats["state"], texts["state"])))
            sim = torch.einsum("bnd,bd->bn", feats["patches"], texts["embedding"])
            rows.append((f"{name}: patch-text map", upsample_grid(sim, fx.grid, image_size)))
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(2.4 * len(picks), 2.5 * len(rows)), squeeze=False)
    for i, ((product, _), image, box) in enumerate(zip(picks, images, boxes)):
        rgb = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        for r, (label, maps) in enumerate(rows):
            ax = axes[r, i]
            ax.imshow(rgb)
            ax.axis("off")
            if maps is not None:
                ax.imshow(maps[i].numpy(), alpha=0.6, cmap="jet")
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
            if i == 0 and r > 0:
                ax.set_title(label, fontsize=7, loc="left")
        axes[0, i].set_title(product.text[:28], fontsize=7)
    fig.suptitle("held-out customer photos: maps of the product text, colour scale per map (box: the true product)")
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
    parser.add_argument("--warmup-steps", type=int, default=1500,
                        help="steps of the shared ITC-only warm-up (0: both models from scratch)")
    parser.add_argument("--steps", type=int, default=750, help="steps of each model after the warm-up")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the demo-recipe preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    require("eclip-demo", *TRAIN, "matplotlib")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    if not os.path.isfile(os.path.join(args.data, "catalogue.jsonl")):
        from eclip.data.synth import generate_catalogue

        print(f"generating the synthetic catalogue in {args.data} ...")
        generate_catalogue(args.data, args.products, args.images_per_product, args.size, args.seed)
    products = read_manifest(manifest_path(args.data))
    info = read_product_info(manifest_path(args.data))
    _, heldout = split(products, 0.1)
    print(f"catalogue: {len(products)} products, {len(heldout)} held out for evaluation")

    histories, results, models = {}, {}, {}
    import eclip.models as em

    recipe = preset("demo-recipe")
    common = {"data": args.data, "seed": args.seed, **({"micro_batch": args.batch} if args.batch else {})}
    warmup = None
    if args.warmup_steps > 0:
        warmup = preset("demo-recipe", {**common, "out": os.path.join(args.out, "warmup"),
                                        "max_steps": args.warmup_steps,
                                        "model_overrides": {**recipe.model_overrides, **RUNS["CLIP baseline"]}})
        print(f"\n== shared warm-up ({warmup.model}, ITC only, {args.warmup_steps} steps)")
        train(warmup, resume=True)
    for name, model_overrides in RUNS.items():
        slug = name.lower().replace(" ", "-")
        cfg = preset("demo-recipe", {**common, "out": os.path.join(args.out, slug), "max_steps": args.steps,
                                     "init_from": warmup.out if warmup else None,
                                     "model_overrides": {**recipe.model_overrides, **model_overrides}})
        print(f"\n== training {name} ({cfg.model}, {'decoder on' if not model_overrides else 'decoder off'}, "
              f"{args.steps} steps{' from the warm-up' if warmup else ''})")
        history = train(cfg, resume=True)
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        with open(metrics_path) as f:
            histories[name] = [json.loads(line) for line in f] or history
        model = load_trained(cfg)
        tokenizer = em.tokenizer_for(model)
        print(f"== evaluating {name} on {len(heldout)} held-out products")
        eval_start = time.perf_counter()
        results[name] = evaluate(model, heldout, tokenizer, model.config.image_size, seed=args.seed,
                                 product_info=info)
        print(f"   evaluated in {time.perf_counter() - eval_start:.1f} s")
        models[name] = model

    os.makedirs(args.out, exist_ok=True)
    curves_png = os.path.join(args.out, "training_curves.png")
    _plot_curves(histories, curves_png)
    grounding_png = os.path.join(args.out, "grounding.png")
    _plot_grounding(models, tokenizer, heldout, models["ECLIP"].config.image_size, grounding_png)
    print(f"\nZero-shot results on {len(heldout)} held-out products (%); docs/evaluation.md explains the "
          "protocol:\n")
    print(report.format_comparison(results, verbose=True))
    seconds = time.perf_counter() - start
    summary, methods = demo_summary(results, seconds)
    print("\nHeadline numbers (results.json \"summary\"; each model's own method, see \"summary_methods\"):\n")
    print(_format_summary(summary))
    results_json = os.path.join(args.out, "results.json")
    with open(results_json, "w") as f:
        json.dump({"summary": summary, "summary_methods": methods, "models": results}, f, indent=1)
        f.write("\n")
    print(f"\nfiles: {curves_png}, {grounding_png}, {results_json}, runs and checkpoints in {args.out}/")
    print(f"demo took {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

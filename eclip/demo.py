"""``eclip-demo``: ECLIP against a CLIP baseline on the synthetic product catalogue, on a CPU.

    eclip-demo                       # data in data/synthetic, runs and figures in runs/demo
    eclip-demo --scale gpu           # the same recipe at 112 px on one GPU (data/synthetic-112, runs/gpu-demo)

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

``--scale gpu`` runs the ``h100-recipe`` training preset instead (docs/gpu-recipe.md): eclip-small at 112 px
with patch 8 (196 image tokens), 20000 products, the data preloaded to the GPU, sized for under 8 minutes of
training on one H100; it evaluates on the GPU, on the first 1000 held-out products. Without a GPU it stops,
unless ``--allow-cpu`` (for tests at tiny sizes).
"""

from __future__ import annotations

import argparse
import ast
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

# the defaults of each --scale: the training preset, the catalogue, the steps and the evaluated products
SCALES = {
    "cpu": dict(preset="demo-recipe", data="data/synthetic", out="runs/demo", products=3000, size=64,
                warmup_steps=1500, steps=750, eval_products=None),
    # steps: docs/gpu-recipe.md (the FLOP and operator estimate of bench/gpu_recipe_estimate.py)
    "gpu": dict(preset="h100-recipe", data="data/synthetic-112", out="runs/gpu-demo", products=20000, size=112,
                warmup_steps=6000, steps=3000, eval_products=1000),
}


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
    parser.add_argument("--scale", choices=list(SCALES), default="cpu",
                        help="cpu: the demo recipe with eclip-tiny at 64 px (default); gpu: the h100-recipe with "
                             "eclip-small at 112 px, 20000 products, data preloaded to the GPU (docs/gpu-recipe.md). "
                             "The defaults below are the scale's.")
    parser.add_argument("--data", default=None,
                        help="catalogue folder (cpu: data/synthetic, gpu: data/synthetic-112)")
    parser.add_argument("--out", default=None, help="runs and figures (cpu: runs/demo, gpu: runs/gpu-demo)")
    parser.add_argument("--products", type=int, default=None,
                        help="products when the catalogue is generated (cpu: 3000, gpu: 20000)")
    parser.add_argument("--images-per-product", type=int, default=3)
    parser.add_argument("--size", type=int, default=None,
                        help="image side of a generated catalogue (cpu: 64, gpu: 112)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="steps of the shared ITC-only warm-up (0: both models from scratch; cpu: 1500, gpu: "
                             f"{SCALES['gpu']['warmup_steps']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps of each model after the warm-up (cpu: 750, gpu: {SCALES['gpu']['steps']})")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the training preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-products", type=int, default=None,
                        help="evaluate on the first N held-out products (cpu: all; gpu: 1000)")
    parser.add_argument("--model-overrides", default=None, metavar="DICT",
                        help="ECLIPConfig fields over the preset's, a Python dict literal, e.g. "
                             "\"{'vision_depth': 2}\" (the tests run the gpu scale with a tiny model)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="with --scale gpu: run without a GPU (only sensible at tiny sizes, as the tests do)")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    for key in ("data", "out", "products", "size", "warmup_steps", "steps", "eval_products"):
        if getattr(args, key) is None:
            setattr(args, key, scale[key])
    try:
        extra_model = ast.literal_eval(args.model_overrides) if args.model_overrides else {}
    except (ValueError, SyntaxError):
        extra_model = None
    if not isinstance(extra_model, dict):
        parser.error(f"--model-overrides must be a Python dict literal, got {args.model_overrides!r}")
    if args.scale == "gpu" and not torch.cuda.is_available() and not args.allow_cpu:
        parser.error("--scale gpu is sized for one GPU and no CUDA device is visible here; --allow-cpu runs it on "
                     "the CPU anyway (only at tiny sizes: --products, --steps, --model-overrides)")
    require("eclip-demo", *TRAIN, "matplotlib")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # evaluation where training runs (the trainer takes the GPU when there is one); the CPU demo as before
    device = "cuda" if args.scale == "gpu" and torch.cuda.is_available() else "cpu"
    phases = {}  # seconds of each phase

    if not os.path.isfile(os.path.join(args.data, "catalogue.jsonl")):
        from eclip.data.synth import generate_catalogue

        print(f"generating the synthetic catalogue in {args.data} ...")
        phase = time.perf_counter()
        generate_catalogue(args.data, args.products, args.images_per_product, args.size, args.seed)
        phases["catalogue"] = time.perf_counter() - phase
    products = read_manifest(manifest_path(args.data))
    info = read_product_info(manifest_path(args.data))
    _, heldout = split(products, 0.1)
    held = len(heldout)
    if args.eval_products is not None:
        heldout = heldout[:args.eval_products]
    print(f"catalogue: {len(products)} products, {held} held out"
          + (f", the first {len(heldout)} of them evaluated" if len(heldout) < held else " for evaluation"))

    histories, results, models = {}, {}, {}
    import eclip.models as em

    recipe = preset(scale["preset"])
    common = {"data": args.data, "seed": args.seed, **({"micro_batch": args.batch} if args.batch else {})}
    base_model = {**recipe.model_overrides, **extra_model}
    warmup = None
    if args.warmup_steps > 0:
        warmup = preset(scale["preset"], {**common, "out": os.path.join(args.out, "warmup"),
                                          "max_steps": args.warmup_steps,
                                          "model_overrides": {**base_model, **RUNS["CLIP baseline"]}})
        print(f"\n== shared warm-up ({warmup.model}, ITC only, {args.warmup_steps} steps)")
        phase = time.perf_counter()
        train(warmup, resume=True)
        phases["warm-up"] = time.perf_counter() - phase
    for name, model_overrides in RUNS.items():
        slug = name.lower().replace(" ", "-")
        cfg = preset(scale["preset"], {**common, "out": os.path.join(args.out, slug), "max_steps": args.steps,
                                       "init_from": warmup.out if warmup else None,
                                       "model_overrides": {**base_model, **model_overrides}})
        print(f"\n== training {name} ({cfg.model}, {'decoder on' if not model_overrides else 'decoder off'}, "
              f"{args.steps} steps{' from the warm-up' if warmup else ''})")
        phase = time.perf_counter()
        history = train(cfg, resume=True)
        phases[name] = time.perf_counter() - phase
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        with open(metrics_path) as f:
            histories[name] = [json.loads(line) for line in f] or history
        model = load_trained(cfg).to(device)
        tokenizer = em.tokenizer_for(model)
        print(f"== evaluating {name} on {len(heldout)} held-out products")
        eval_start = time.perf_counter()
        results[name] = evaluate(model, heldout, tokenizer, model.config.image_size, seed=args.seed,
                                 product_info=info, device=device)
        phases[f"evaluation of {name}"] = time.perf_counter() - eval_start
        print(f"   evaluated in {phases[f'evaluation of {name}']:.1f} s")
        models[name] = model.cpu()

    os.makedirs(args.out, exist_ok=True)
    curves_png = os.path.join(args.out, "training_curves.png")
    _plot_curves(histories, curves_png)
    grounding_png = os.path.join(args.out, "grounding.png")
    _plot_grounding(models, tokenizer, heldout, models["ECLIP"].config.image_size, grounding_png)
    print(f"\nZero-shot results on {len(heldout)} held-out products (%); docs/evaluation.md explains the "
          "protocol:\n")
    print(report.format_comparison(results, verbose=True))
    total = time.perf_counter() - start
    summary, methods = demo_summary(results, total)
    print("\nHeadline numbers (results.json \"summary\"; each model's own method, see \"summary_methods\"):\n")
    print(_format_summary(summary))
    results_json = os.path.join(args.out, "results.json")
    with open(results_json, "w") as f:
        json.dump({"summary": summary, "summary_methods": methods, "models": results,
                   "phase_seconds": {**{k: round(v, 1) for k, v in phases.items()}, "total": round(total, 1)},
                   "scale": args.scale}, f, indent=1)
        f.write("\n")
    print(f"\nfiles: {curves_png}, {grounding_png}, {results_json}, runs and checkpoints in {args.out}/")
    print("phases (s): " + ", ".join(f"{name} {value:.0f}" for name, value in phases.items()))
    print(f"demo took {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

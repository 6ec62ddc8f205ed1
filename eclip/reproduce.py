"""``eclip-reproduce`` (``python -m eclip.reproduce``): the demo recipe over several seeds, with the loss
ablation of the paper's Table 5.

    eclip-reproduce                          # 3 seeds, every row; runs/reproduce/{results.json,results.md}
    eclip-reproduce --quick                  # a tiny catalogue and a few steps: checks the pipeline only

For each seed: the shared ITC-only warm-up of the demo recipe (``demo-recipe`` training preset), then one run
per row from that warm-up, all with the same data, steps, seed and optimizer:

* ``ITC only (CLIP)``: the CLIP baseline (decoder off);
* ``+ inter``, ``+ intra (with entropy)``, ``+ ITM``: ITC plus one of the decoder's tasks (Eq. 8, Eq. 9 with
  Eq. 10, the ITM loss), the other loss weights set to 0;
* ``all``: ECLIP with every loss (the demo's ECLIP).

Each model is evaluated with the zero-shot protocol (docs/evaluation.md); the tables give mean ± std over
the seeds of each headline number (the summary keys of ``eclip.eval.report``), with the chance row.

The second table is the analogue of the paper's Table 6: the ``all`` models evaluated again with other
negative prompts for the decoder (:func:`eclip.eval.features.negative_prompt_set`): N(0, I) (the protocol's
default, the first table's ``all`` row), the texts of T - 1 training products, and the mean prompt of the
training texts (a fixed set, the analogue of the paper's moving average of the queries). A run
whose evaluation is already on disk is not redone, and a training run that was interrupted resumes from its
last checkpoint, so the command can be stopped and started again. Several hours on 2 cores at the default
sizes (about 6 minutes per row and seed, after a 5-minute warm-up per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from eclip._deps import TRAIN, require
from eclip.eval.report import mean_std

NEGATIVES = {"noise": "N(0, I) (default)", "texts": "other products' texts", "mean": "mean training prompt (fixed)"}

# row -> model overrides on top of the demo-recipe preset's
ROWS = {
    "ITC only (CLIP)": {"use_decoder": False, "queue_size": 0},
    "+ inter": {"loss_weights": {"itc": 1.0, "inter": 1.0, "itm": 0.0, "intra": 0.0, "entropy": 0.0}},
    "+ intra (with entropy)": {"loss_weights": {"itc": 1.0, "inter": 0.0, "itm": 0.0, "intra": 1.0, "entropy": 1.0}},
    "+ ITM": {"loss_weights": {"itc": 1.0, "inter": 0.0, "itm": 1.0, "intra": 0.0, "entropy": 0.0}},
    "all": {},
}
QUICK = {"products": 48, "warmup_steps": 2, "steps": 2, "batch": 16}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def table(per_row: dict[str, list[dict]]) -> dict[str, dict[str, list]]:
    """{row: [summary of each seed]} -> {row: {key: [mean, std, n]}} over the seeds."""
    from eclip.eval.report import SUMMARY_KEYS

    out = {}
    for row, summaries in per_row.items():
        out[row] = {}
        for key in SUMMARY_KEYS:
            mean, std = mean_std([s.get(key) for s in summaries])
            out[row][key] = [mean, std, len(summaries)]
    return out


def markdown(aggregated: dict[str, dict[str, list]], seeds: list[int], title: str | None = None) -> str:
    """The ablation table: one line per row, mean ± std over the seeds of each headline number (%)."""
    from eclip.eval.report import SUMMARY_KEYS

    keys = [k for k in SUMMARY_KEYS if not k.startswith("chance_")]
    title = title or ("each model by its own method (instance features and decoder maps with a decoder, global "
                      "features and patch-text maps without).")
    lines = [f"Mean ± std over seeds {', '.join(map(str, seeds))} (%); {title}",
             "", "| row | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]

    def cell(v):
        mean, std, _ = v
        if mean is None:
            return "-"
        return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    for row, values in aggregated.items():
        lines.append(f"| {row} | " + " | ".join(cell(values[k]) for k in keys) + " |")
    first = next(iter(aggregated.values()), None)
    if first is not None:
        chance = {"fine_r1": first["chance_fine_r1"], "grounding_customer_acc50": first["chance_grounding_customer_acc50"]}
        lines.append("| chance | " + " | ".join(cell(chance[k]) if k in chance else "-" for k in keys) + " |")
    return "\n".join(lines)


def _write(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"summary": result["summary"], "summary_methods": result["summary_methods"], "results": result}, f)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eclip-reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help=f"rows of the ablation (default: all of {list(ROWS)})")
    parser.add_argument("--products", type=int, default=3000, help="catalogue size when --data must be generated")
    parser.add_argument("--warmup-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--negatives", nargs="*", default=list(NEGATIVES), choices=list(NEGATIVES),
                        help="negative prompt sets of the second table (the 'all' models; default: all of "
                             f"{list(NEGATIVES)}; none: no second table)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny check of the pipeline ({QUICK}); its numbers mean nothing")
    args = parser.parse_args(argv)
    require("eclip-reproduce", *TRAIN)
    if args.quick:
        args.products, args.warmup_steps, args.steps, args.batch = (QUICK[k] for k in ("products", "warmup_steps",
                                                                                        "steps", "batch"))
    from eclip.data.manifest import read_manifest, split
    from eclip.eval.features import negative_prompt_set
    from eclip.eval.zero_shot import evaluate, read_product_info
    from eclip.train import preset, train
    from eclip.train.trainer import load_trained, manifest_path
    import eclip.models as em

    start = time.perf_counter()
    if not os.path.isfile(os.path.join(args.data, "catalogue.jsonl")):
        from eclip.data.synth import generate_catalogue

        print(f"generating the synthetic catalogue in {args.data} ...")
        generate_catalogue(args.data, args.products, 3, 64, 0, **({"workers": 1} if args.quick else {}))
    products = read_manifest(manifest_path(args.data))
    info = read_product_info(manifest_path(args.data))
    training, heldout = split(products, 0.1)
    recipe = preset("demo-recipe")
    per_row: dict[str, list[dict]] = {row: [] for row in args.rows}
    negatives = args.negatives if "all" in args.rows else []
    per_negatives: dict[str, list[dict]] = {NEGATIVES[kind]: [] for kind in negatives}
    for seed in args.seeds:
        common = {"data": args.data, "seed": seed, **({"micro_batch": args.batch} if args.batch else {})}
        warmup = None
        if args.warmup_steps > 0:
            warmup = preset("demo-recipe", {**common, "out": os.path.join(args.out, f"seed{seed}", "warmup"),
                                            "max_steps": args.warmup_steps,
                                            "model_overrides": {**recipe.model_overrides, **ROWS["ITC only (CLIP)"]}})
            print(f"\n== seed {seed}: shared warm-up ({args.warmup_steps} steps)")
            train(warmup, resume=True, progress=False)
        for row in args.rows:
            out = os.path.join(args.out, f"seed{seed}", _slug(row))
            done = os.path.join(out, "evaluation.json")
            if os.path.isfile(done):
                with open(done) as f:
                    per_row[row].append(json.load(f)["summary"])
                print(f"== seed {seed}, {row}: evaluated before ({done})")
                continue
            cfg = preset("demo-recipe", {**common, "out": out, "max_steps": args.steps,
                                         "init_from": warmup.out if warmup else None,
                                         "model_overrides": {**recipe.model_overrides, **ROWS[row]}})
            print(f"== seed {seed}, {row}: training {args.steps} steps")
            train(cfg, resume=True, progress=False)
            model = load_trained(cfg)
            result = evaluate(model, heldout, em.tokenizer_for(model), model.config.image_size, seed=seed,
                              product_info=info)
            _write(done, result)
            per_row[row].append(result["summary"])
            print("   " + ", ".join(f"{k} {v:.2f}" for k, v in result["summary"].items() if v is not None))
        for kind in negatives:
            out = os.path.join(args.out, f"seed{seed}", _slug("all"))
            done = os.path.join(out, "evaluation.json" if kind == "noise" else f"evaluation-negatives-{kind}.json")
            if not os.path.isfile(done):
                cfg = preset("demo-recipe", {**common, "out": out, "max_steps": args.steps,
                                             "model_overrides": {**recipe.model_overrides, **ROWS["all"]}})
                model = load_trained(cfg)
                tokenizer = em.tokenizer_for(model)
                prompts = negative_prompt_set(kind, model, tokenizer, [p.text for p in training], seed=seed)
                print(f"== seed {seed}, all, negative prompts: {NEGATIVES[kind]}")
                _write(done, evaluate(model, heldout, tokenizer, model.config.image_size, seed=seed,
                                      product_info=info, negative_prompts=prompts))
            with open(done) as f:
                per_negatives[NEGATIVES[kind]].append(json.load(f)["summary"])
    aggregated = table(per_row)
    text = markdown(aggregated, args.seeds)
    aggregated_negatives = table(per_negatives) if negatives else {}
    if negatives:
        text += "\n\n" + markdown(aggregated_negatives, args.seeds,
                                   "the 'all' models with each set of negative prompts for the decoder (Table 6).")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"seeds": args.seeds, "rows": aggregated, "per_seed": per_row,
                   "negatives": aggregated_negatives, "negatives_per_seed": per_negatives,
                   "settings": {"warmup_steps": args.warmup_steps, "steps": args.steps, "batch": args.batch,
                                "quick": args.quick, "catalogue": args.data}}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"\nreproduction took {time.perf_counter() - start:.0f} s; {args.out}/results.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables, JSON, the per-model summary and the mean ± std over runs of :func:`eclip.eval.zero_shot.evaluate`
results. The keys are documented in docs/evaluation.md."""

from __future__ import annotations

import copy
import json
import math
import os

# method key -> the row label of the tables
METHOD_LABELS = {
    "eclip_instance": "ECLIP instance feature",
    "clip_global": "CLIP: global embedding",
    "clip_global_crop": "CLIP: global embedding of the true product crop (upper bound)",
    "clip_text_pooling": "CLIP + text: text-weighted patch pooling",
    "text_only": "text only: the product text's embedding",
    "eclip_decoder_map": "ECLIP: decoder attention map",
    "clip_patch_map": "CLIP: patch-text similarity map",
    "largest_box": "baseline: largest box",
    "centre_box": "baseline: box nearest the centre",
    "random_object": "baseline: a random object, product or distractor (expected)",
    "eclip_decoder": "ECLIP: positive query's attention",
    "chance": "chance",
}
# rows that do not depend on the model (printed once in a comparison of models)
MODEL_INDEPENDENT = ("largest_box", "centre_box", "random_object", "chance")
# task-specific wording of some rows
TASK_LABELS = {
    ("fine_retrieval", "eclip_instance"): "ECLIP instance feature, cross-prompt (query text on both sides)",
    ("fine_retrieval", "clip_text_pooling"): "CLIP + text: text-weighted patch pooling, cross-prompt",
    ("fine_retrieval_family", "eclip_instance"): "ECLIP instance feature, cross-prompt",
    ("fine_retrieval_family", "clip_text_pooling"): "CLIP + text: text-weighted patch pooling, cross-prompt",
    ("coarse_retrieval", "eclip_instance"): "ECLIP instance feature, cross-prompt",
    ("coarse_retrieval", "clip_text_pooling"): "CLIP + text: text-weighted patch pooling, cross-prompt",
    ("classification", "eclip_instance"): "ECLIP instance feature (image + own text; the paper's multimodal)",
    ("classification", "clip_text_pooling"): "CLIP + text: patch pooling weighted by the own text",
    ("classification", "clip_global"): "CLIP: global embedding (image only)",
    ("chance", "grounding"): "chance: a random candidate (expected)",
    ("chance", "diagnostics"): "chance: uniform attention",
}
DIAGNOSTIC_COLUMNS = {"mass_in_box": "mass in box %", "effective_tokens": "effective tokens"}

# summary key -> (task, metric, method of a model with the decoder, method of one without)
SUMMARY_KEYS = {
    "fine_r1": ("fine_retrieval", "R@1", "eclip_instance", "clip_global"),
    "fine_r1_crop_upper_bound": ("fine_retrieval", "R@1", "clip_global_crop", "clip_global_crop"),
    "grounding_customer_acc50": ("grounding_customer", "Acc@0.5", "eclip_decoder_map", "clip_patch_map"),
    "i2t_r1": ("image_to_text", "R@1", "clip_global", "clip_global"),
    "t2i_r1": ("text_to_image", "R@1", "clip_global", "clip_global"),
    "classification_acc1": ("classification", "Acc@1", "eclip_instance", "clip_global"),
    "chance_fine_r1": ("fine_retrieval", "R@1", "chance", "chance"),
    "chance_grounding_customer_acc50": ("grounding_customer", "Acc@0.5", "chance", "chance"),
}


def summary(results: dict) -> tuple[dict, dict]:
    """The headline numbers of one model (:data:`SUMMARY_KEYS`): its own method for each (the instance decoder
    when the model has one, else what CLIP does), and the method each came from."""
    decoder = results["settings"].get("instance_decoder", False)
    values, methods = {}, {}
    for key, (task, metric, with_decoder, without) in SUMMARY_KEYS.items():
        method = with_decoder if decoder else without
        row = results["tasks"].get(task, {}).get("rows", {}).get(method)
        values[key] = None if row is None else row.get(metric)
        methods[key] = f"{task}/{method}/{metric}"
    return values, methods


def _label(task: str, method: str) -> str:
    if (task, method) in TASK_LABELS:
        return TASK_LABELS[(task, method)]
    if method == "chance" and task.startswith("grounding"):
        return TASK_LABELS[("chance", "grounding")]
    if method == "chance" and task == "diagnostics":
        return TASK_LABELS[("chance", "diagnostics")]
    return METHOD_LABELS.get(method, method)


# --- runs -------------------------------------------------------------------------------------------------

def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the present values (None and NaN left out; std None for fewer
    than 2)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None
    mean = sum(present) / len(present)
    if len(present) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))


def _aggregate_rows(tables: list[dict]) -> tuple[dict, dict]:
    rows, std = {}, {}
    for method in tables[0].get("rows", {}):
        rows[method], std[method] = {}, {}
        for column in tables[0]["rows"][method]:
            mean, spread = mean_std([t["rows"].get(method, {}).get(column) for t in tables])
            rows[method][column], std[method][column] = mean, spread
    return rows, std


def aggregate(runs: list[dict]) -> dict:
    """One result from several runs (seeds, checkpoints) of the same evaluation: every number is the mean over
    runs, and each task, the diagnostics and the summary get a ``std`` twin (sample standard deviation, None
    for one run). ``runs`` holds the count. A single run is returned unchanged apart from ``runs`` = 1."""
    if not runs:
        raise ValueError("no run to aggregate")
    out = copy.deepcopy(runs[0])
    out["runs"] = len(runs)
    if len(runs) == 1:
        return out
    for key, task in out["tasks"].items():
        task["rows"], task["std"] = _aggregate_rows([r["tasks"][key] for r in runs])
    out["diagnostics"]["rows"], out["diagnostics"]["std"] = _aggregate_rows([r["diagnostics"] for r in runs])
    out["summary"], out["summary_std"] = {}, {}
    for key in runs[0]["summary"]:
        out["summary"][key], out["summary_std"][key] = mean_std([r["summary"][key] for r in runs])
    out["settings"]["seed"] = [r["settings"]["seed"] for r in runs]
    return out


# --- tables -----------------------------------------------------------------------------------------------

def _cell(value, spread=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.2f}"
    if spread is not None:
        text += f" ± {spread:.2f}"
    return text


def _header(task: dict) -> str:
    detail = f"n = {task.get('n', 0)}"
    if "gallery" in task:
        detail += f", gallery = {task['gallery']}"
    if task.get("mean_family_gallery") is not None:
        detail += f", {task['mean_family_gallery']:.2f} family items per query"
    if task.get("mean_candidates") is not None:
        detail += f", {task['mean_candidates']:.1f} candidates per image"
    if task.get("tokens") is not None:
        detail += f"; {task['tokens']} tokens, the box covers {task['box_tokens']:.2f} on average"
    return f"### {task['title']} ({detail})"


def format_task(key: str, task: dict, models: dict | None = None) -> str:
    """One Markdown table: a row per method (per model when ``models`` maps names to this task of each), the
    chance row, and the noise row (two standard errors of a chance-level score)."""
    tasks = models or {None: task}
    columns = task["columns"]
    names = [DIAGNOSTIC_COLUMNS.get(c, c) for c in columns]
    lines = [_header(task), "", "| method | " + ("model | " if models else "") + " | ".join(names) + " |",
             "|---|" + ("---|" if models else "") + "---:|" * len(columns)]
    methods = []
    for t in tasks.values():
        methods += [m for m in t.get("rows", {}) if m not in methods and m not in MODEL_INDEPENDENT]
    methods += [m for m in MODEL_INDEPENDENT if m in task.get("rows", {})]
    for method in methods:
        shared = method in MODEL_INDEPENDENT
        for name, t in ({"-": task} if shared and models else tasks).items():
            row = t.get("rows", {}).get(method)
            if row is None:
                continue
            std = (t.get("std") or {}).get(method, {})
            cells = [_cell(row.get(c), std.get(c)) for c in columns]
            lines.append(f"| {_label(key, method)} | " + (f"{name} | " if models else "") + " | ".join(cells) + " |")
    noise = task.get("noise") or {}
    if any(noise.get(c) is not None for c in columns):
        lines.append("| noise: 2 s.e. of a chance-level score | " + ("- | " if models else "") +
                     " | ".join("-" if noise.get(c) is None else f"±{noise[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def format_results(results: dict, title: str | None = None, verbose: bool = False) -> str:
    """Every task as a Markdown table (the diagnostics too with ``verbose``)."""
    lines = [f"## {title}", ""] if title else []
    cat = results.get("catalogue", {})
    by_source = ", ".join(f"{n} {s}" for s, n in cat.get("images_by_source", {}).items())
    runs = results.get("runs", 1)
    lines.append(f"{cat.get('products', 0)} products, {cat.get('images', 0)} images ({by_source}), "
                 f"{cat.get('categories', 0)} categories; scores in %"
                 + (f", mean ± std over {runs} runs" if runs > 1 else ""))
    for key, task in results["tasks"].items():
        lines += ["", format_task(key, task)]
    if verbose and results.get("diagnostics", {}).get("rows"):
        lines += ["", format_task("diagnostics", results["diagnostics"])]
    return "\n".join(lines)


def format_comparison(results: dict[str, dict], verbose: bool = False) -> str:
    """Several models' results (name -> result) side by side: per task one table with a row per (method,
    model) and the shared chance row (the same queries and candidates for every model)."""
    names = list(results)
    first = results[names[0]]
    lines = []
    for key in first["tasks"]:
        lines += ["", format_task(key, first["tasks"][key],
                                  {n: results[n]["tasks"][key] for n in names if key in results[n]["tasks"]})]
    if verbose:
        lines += ["", format_task("diagnostics", first["diagnostics"],
                                  {n: results[n]["diagnostics"] for n in names})]
    return "\n".join(lines).lstrip("\n")


def write_json(results: dict, path: str) -> None:
    """Write the results as JSON (None for metrics without a value)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")

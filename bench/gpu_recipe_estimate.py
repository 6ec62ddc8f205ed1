"""How long the h100-recipe (docs/gpu-recipe.md) should take on one GPU: an estimate, not a measurement.

Counts, on the CPU, the floating-point operations and the kernel-launching operators of one training step
(forward with its losses, backward, gradient clipping, AdamW, momentum update) of each model the recipe
trains, and turns them into GPU time with two stated assumptions: a sustained fp32 throughput and a host
cost per operator. With ``--measure-cpu`` it also times steps on this CPU at small sizes and fits the same
two-term model (seconds per FLOP, seconds per operator) to check that step time follows the counts.

    python bench/gpu_recipe_estimate.py                       # counts and the GPU estimate (about a minute)
    python bench/gpu_recipe_estimate.py --measure-cpu         # plus the CPU timing check (a few minutes)

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and the
CPU's scaled-dot-product attention, forward and backward; a multiply-add is 2 FLOPs) at a small batch and
scaled linearly to the recipe's batch (the count at two batch sizes shows how linear it is). The fused
slot-attention kernels of the decoder are not counted: about 0.1 GFLOP per step at batch 64, under 0.1%.
Operators are the aten operators dispatched, views excluded; each launches about one kernel on a GPU.
Prints a table and writes JSON next to the other benchmark results.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import eclip.models as em  # noqa: E402
from cases import environment  # noqa: E402
from eclip.train.config import preset  # noqa: E402
from eclip.train.trainer import parameter_groups  # noqa: E402

aten = torch.ops.aten


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# the CPU's fused attention has no formula in torch's counter: the GPU kernels' formulas
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}
CLIP = {"use_decoder": False, "queue_size": 0}


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched, views (no kernel) excluded."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in (aten.detach, aten.lift_fresh, aten._unsafe_view):
            self.counts[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def make_batch(config, batch: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    size = config.image_size
    return dict(images=torch.randn(batch, 3, size, size, generator=gen),
                positive_images=torch.randn(batch, 3, size, size, generator=gen),
                input_ids=torch.randint(5, config.vocab_size, (batch, config.max_text_len), generator=gen),
                attention_mask=torch.ones(batch, config.max_text_len, dtype=torch.long),
                product_ids=torch.arange(batch))


def make_step(model_name: str, overrides: dict, batch: int, cfg):
    """A training step as the trainer runs it in one process on a GPU, here on the CPU: fused AdamW and the
    multi-tensor (foreach) gradient norm, as the trainer gets them on CUDA."""
    torch.manual_seed(0)
    model = em.create(model_name, **overrides).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98), fused=True)
    data = make_batch(model.config, batch)

    def step():
        loss = model(data)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_momentum()

    return step


def count(model_name: str, overrides: dict, batch: int, cfg) -> dict:
    """FLOPs and operators of one step at ``batch`` (after one step outside the counters, so that AdamW's
    state exists)."""
    step = make_step(model_name, overrides, batch, cfg)
    step()
    flops, ops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION), OperatorCount()
    with flops, ops:
        step()
    return {"flops": flops.get_total_flops(), "operators": sum(ops.counts.values()),
            "top_operators": ops.counts.most_common(8)}


def data_costs(image_size: int, batch: int, products: int = 64, plan_products: int = 18000) -> dict:
    """The preloaded data's costs, on this CPU: operators per micro-batch, seconds per product of an epoch's
    plan (its pair choice is Python; timed over ``plan_products``, the catalogue's products repeated), CPU
    seconds per decoded image (a catalogue of ``products`` made here, 1 thread)."""
    import tempfile

    from eclip.data.manifest import read_manifest
    from eclip.data.preload import PreloadedProducts
    from eclip.data.synth import generate_catalogue

    with tempfile.TemporaryDirectory() as root:
        generate_catalogue(root, products, 3, image_size, seed=0, workers=1)
        items = read_manifest(os.path.join(root, "catalogue.jsonl"))
        tokenizer = em.tokenizer_for(em.preset_config("eclip-small"))
        start = time.process_time()
        data = PreloadedProducts(items, image_size, tokenizer=tokenizer, device="cpu", threads=1)
        decode_s = (time.process_time() - start) / data.pixels.shape[0]
        plan = data.epoch_plan(0)
        ops = OperatorCount()
        with ops:
            data.batch(list(range(min(batch, len(data)))), plan)
        repeat = -(-plan_products // len(data))
        data.products, data.sources = data.products * repeat, data.sources * repeat
        data.first = data.first.repeat(repeat)
        start = time.process_time()
        data.epoch_plan(1)
        plan_s = (time.process_time() - start) / len(data)
    return {"operators": sum(ops.counts.values()), "plan_s_per_product": plan_s, "decode_s_per_image": decode_s}


def cpu_seconds(model_name: str, overrides: dict, batch: int, cfg, repeats: int) -> float:
    """Median CPU time of this process per step (time.process_time: the time this process ran, which a
    loaded machine changes less than wall time)."""
    step = make_step(model_name, overrides, batch, cfg)
    step()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return statistics.median(times)


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least squares t = a * flops + b * operators (no intercept)."""
    sxx = sum(r["flops"] ** 2 for r in rows)
    syy = sum(r["operators"] ** 2 for r in rows)
    sxy = sum(r["flops"] * r["operators"] for r in rows)
    sxt = sum(r["flops"] * r["cpu_s"] for r in rows)
    syt = sum(r["operators"] * r["cpu_s"] for r in rows)
    det = sxx * syy - sxy ** 2
    return (sxt * syy - syt * sxy) / det, (syt * sxx - sxt * sxy) / det


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="h100-recipe", help="training preset (default h100-recipe)")
    parser.add_argument("--batch", type=int, default=None, help="the recipe's batch (default: the preset's)")
    parser.add_argument("--count-batch", type=int, default=4, help="batch of the counted steps (default 4)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: eclip-demo --scale gpu's")
    parser.add_argument("--steps", type=int, default=None, help="default: eclip-demo --scale gpu's")
    parser.add_argument("--tflops", type=float, default=25.0,
                        help="assumed sustained fp32 throughput of the GPU, TFLOP/s (default 25: about 37%% of an "
                             "H100 SXM's 67 fp32 TFLOP/s without tensor cores)")
    parser.add_argument("--us-per-operator", type=float, default=10.0,
                        help="assumed host time per operator, microseconds (eager dispatch and launch; default 10)")
    parser.add_argument("--measure-cpu", action="store_true", help="also time steps on this CPU (small sizes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from eclip.demo import SCALES

    cfg = preset(args.preset)
    batch = args.batch or cfg.micro_batch
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else SCALES["gpu"]["warmup_steps"]
    steps = args.steps if args.steps is not None else SCALES["gpu"]["steps"]
    models = {"ECLIP": dict(cfg.model_overrides), "CLIP (warm-up and baseline)": {**cfg.model_overrides, **CLIP}}
    image_size = em.preset_config(cfg.model, **cfg.model_overrides).image_size
    data = data_costs(image_size, batch) if cfg.preload else {"operators": 0}
    rows = []
    for name, overrides in models.items():
        small = count(cfg.model, overrides, args.count_batch, cfg)
        double = count(cfg.model, overrides, 2 * args.count_batch, cfg)
        per_sample = (double["flops"] - small["flops"]) / args.count_batch
        flops = small["flops"] + per_sample * (batch - args.count_batch)
        compute_s = flops / (args.tflops * 1e12)
        operators = small["operators"] + data["operators"]  # the model's step and its preloaded batch
        host_s = operators * args.us_per_operator * 1e-6
        rows.append({"model": name, "flops_per_step": flops, "flops_per_sample": per_sample,
                     "linearity": double["flops"] / small["flops"], "operators": operators,
                     "model_operators": small["operators"],
                     "operators_at_double_batch": double["operators"], "top_operators": small["top_operators"],
                     "compute_s": compute_s, "host_s": host_s, "step_s_low": max(compute_s, host_s),
                     "step_s_high": compute_s + host_s})
    eclip_row, clip_row = rows
    total_low = (warmup_steps + steps) * clip_row["step_s_low"] + steps * eclip_row["step_s_low"]
    total_high = (warmup_steps + steps) * clip_row["step_s_high"] + steps * eclip_row["step_s_high"]

    env = environment()
    print(f"\n{args.preset}: {cfg.model} {cfg.model_overrides}, batch {batch}; counted on {env['cpu']}, torch "
          f"{env['torch']}\nassumed: {args.tflops:g} TFLOP/s sustained fp32, {args.us_per_operator:g} us per "
          "operator\n")
    print("| model | GFLOP per step | per sample | x2 batch | operators | compute ms | host ms | step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['flops_per_step'] / 1e9:.0f} | {r['flops_per_sample'] / 1e9:.2f} | "
              f"{r['linearity']:.3f} | {r['operators']} | {r['compute_s'] * 1e3:.1f} | {r['host_s'] * 1e3:.1f} | "
              f"{r['step_s_low'] * 1e3:.1f}-{r['step_s_high'] * 1e3:.1f} |")
    print(f"\nwarm-up {warmup_steps} + ECLIP {steps} + CLIP {steps} steps: {total_low / 60:.1f}-{total_high / 60:.1f} "
          "min of training (estimate)")
    if cfg.preload:
        print(f"preloaded data: {data['operators']} of the operators above per micro-batch; on this CPU "
              f"{data['plan_s_per_product'] * 1e6:.1f} us per product for an epoch's plan and "
              f"{data['decode_s_per_image'] * 1e3:.2f} ms per image decoded once ({image_size} px, 1 thread)")

    measured = []
    if args.measure_cpu:
        # The same architecture at sizes a CPU runs in seconds: FLOPs change with batch and image size at a
        # fixed operator count, and with depth at another operator count.
        base = {**cfg.model_overrides}
        cases = [("eclip-small, 56 px", {**base, "image_size": 56}, 2),
                 ("eclip-small, 56 px", {**base, "image_size": 56}, 8),
                 ("eclip-small, 112 px", base, 2),
                 ("eclip-small, 112 px", base, 4),
                 ("eclip-small, 112 px, CLIP", {**base, **CLIP}, 4),
                 ("eclip-small, 3 blocks, 112 px", {**base, "vision_depth": 3, "text_depth": 2}, 4),
                 ("eclip-small, 3 blocks, 112 px, CLIP", {**base, "vision_depth": 3, "text_depth": 2, **CLIP}, 4)]
        for label, overrides, b in cases:
            counted = count(cfg.model, overrides, b, cfg)
            seconds = cpu_seconds(cfg.model, overrides, b, cfg, args.repeats)
            measured.append({"case": label, "batch": b, "flops": counted["flops"], "operators": counted["operators"],
                             "cpu_s": seconds})
        per_flop, per_op = fit(measured)
        print(f"\nCPU check ({torch.get_num_threads()} thread(s), process time, median of {args.repeats}): fit "
              f"t = flops / {1 / per_flop / 1e9:.1f} GFLOP/s + operators x {per_op * 1e6:.1f} us\n")
        print("| case | batch | GFLOP | operators | CPU s | fit s | fit error |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for m in measured:
            m["fit_s"] = per_flop * m["flops"] + per_op * m["operators"]
            print(f"| {m['case']} | {m['batch']} | {m['flops'] / 1e9:.1f} | {m['operators']} | {m['cpu_s']:.2f} | "
                  f"{m['fit_s']:.2f} | {(m['fit_s'] / m['cpu_s'] - 1) * 100:+.0f}% |")
        measured = {"cases": measured, "gflop_per_s": 1 / per_flop / 1e9, "us_per_operator": per_op * 1e6}

    path = args.out or os.path.join(HERE, "results", f"gpu_recipe_estimate-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "preset": args.preset, "batch": batch,
                   "assumed_tflops": args.tflops, "assumed_us_per_operator": args.us_per_operator,
                   "warmup_steps": warmup_steps, "steps": steps, "rows": rows, "data": data,
                   "training_minutes": [total_low / 60, total_high / 60], "cpu_check": measured}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Side-by-side timing of slot attention (forward, backward, forward+backward with entropy) for every
usable backend, the eager reference and torch.compile of the reference, in one process.

    python bench/slot_attention_table.py                       # every SPEC shape that fits this machine
    python bench/slot_attention_table.py --shapes cpu-small --threads 2 --repeats 7

Each number is the median over --repeats runs of the median of --iters timed calls (the CPU of the
development machines is noisy); ratios are taken against the eager reference measured in the same run.
Prints a Markdown table and writes JSON (device, versions, shapes, every sample) to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import MODES, SHAPES, Case, environment, shapes_for_this_machine, sync, variants_for  # noqa: E402


def time_once(case: Case, mode: str, iters: int) -> float:
    """Median seconds of one call over iters calls."""
    device = case.shape.device
    samples = []
    for _ in range(iters):
        if mode == "backward":
            out, ent = case.forward()
            sync(device)
            start = time.perf_counter()
            case.backward(out, ent)
        elif mode == "forward":
            sync(device)
            start = time.perf_counter()
            case.forward_no_grad()
        else:
            sync(device)
            start = time.perf_counter()
            case.forward_backward()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), help="default: all that fit this machine")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU shapes")
    parser.add_argument("--repeats", type=int, default=5, help="outer repeats (median taken)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per repeat")
    parser.add_argument("--out", default=None, help="JSON path; default bench/results/slot_attention-<device>-<date>.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [SHAPES[s] for s in args.shapes] if args.shapes else shapes_for_this_machine()
    env = environment()
    results = []
    for shape in shapes:
        variants = variants_for(shape)
        cases = {v: Case(v, shape) for v in variants}
        for case in cases.values():  # warm-up and compilation, outside the timed region
            for _ in range(3):
                case.forward_backward()
        for mode in args.modes:
            samples = {v: [] for v in variants}
            for _ in range(args.repeats):  # interleaved, so drift of the machine hits every variant alike
                for v in variants:
                    samples[v].append(time_once(cases[v], mode, args.iters))
            eager = statistics.median(samples["reference"])
            for v in variants:
                median = statistics.median(samples[v])
                results.append({
                    "shape": shape.name, "sizes": shape.describe(), "mode": mode, "variant": v,
                    "median_ms": median * 1e3, "min_ms": min(samples[v]) * 1e3, "max_ms": max(samples[v]) * 1e3,
                    "speedup_vs_eager": eager / median, "samples_ms": [s * 1e3 for s in samples[v]],
                })

    device = env.get("gpu") or env["cpu"]
    print(f"\n{device}; torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} CPU threads\n")
    print("| shape | mode | variant | median ms | min-max ms | vs eager |")
    print("|---|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['shape']} ({r['sizes']}) | {r['mode']} | {r['variant']} | {r['median_ms']:.3f} | "
              f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['speedup_vs_eager']:.2f}x |")

    path = args.out
    if path is None:
        tag = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
        stamp = datetime.date.today().isoformat()
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"slot_attention-{tag}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "repeats": args.repeats,
                   "iters": args.iters, "results": results}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""eclip_kernels.nn.SlotAttention and MultiHeadSlotAttention against the PyPI slot-attention modules:
forward+backward time and the memory autograd keeps for backward, side by side in one process.

    python bench/slot_attention_module_table.py --threads 2            # CPU object-centric shapes
    python bench/slot_attention_module_table.py --shapes object-centric-cpu-4heads --threads 2
    python bench/slot_attention_module_table.py --shapes object-centric-cpu-4heads --batch 2 --tokens 64 \
        --repeats 1 --iters 1 --out /tmp/smoke.json                    # a smoke run of the script

Times are the median over --repeats of the median of --iters calls, the modules interleaved. Prints a
Markdown table and writes JSON (device, versions, every sample) to bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import environment, sync  # noqa: E402
from modules import MODULE_SHAPES, forward_backward, make_inputs, make_modules, saved_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", choices=sorted(MODULE_SHAPES), default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="override B of every shape (smoke runs)")
    parser.add_argument("--tokens", type=int, default=None, help="override N of every shape (smoke runs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.shapes or [n for n, s in MODULE_SHAPES.items() if s.device == "cpu" or torch.cuda.is_available()]
    env = environment()
    results = []
    for name in names:
        shape = MODULE_SHAPES[name]
        overrides = {"batch": args.batch, "tokens": args.tokens}
        shape = dataclasses.replace(shape, **{k: v for k, v in overrides.items() if v is not None})
        modules = make_modules(shape)
        inputs, grad = make_inputs(shape)
        for module in modules.values():
            for _ in range(2):
                forward_backward(module, inputs, grad)
        samples = {m: [] for m in modules}
        for _ in range(args.repeats):
            for label, module in modules.items():
                times = []
                for _ in range(args.iters):
                    sync(shape.device)
                    start = time.perf_counter()
                    forward_backward(module, inputs, grad)
                    sync(shape.device)
                    times.append(time.perf_counter() - start)
                samples[label].append(statistics.median(times))
        memory = {label: saved_bytes(module, inputs) for label, module in modules.items()}
        base = "slot-attention (PyPI)" if "slot-attention (PyPI)" in modules else "eclip_kernels"
        for label in modules:
            median = statistics.median(samples[label])
            results.append({
                "shape": name, "sizes": shape.describe(), "module": label, "median_ms": median * 1e3,
                "min_ms": min(samples[label]) * 1e3, "max_ms": max(samples[label]) * 1e3,
                "saved_for_backward_mib": memory[label] / 2**20,
                "speedup_vs_pypi": statistics.median(samples[base]) / median,
                "memory_ratio_vs_pypi": memory[label] / memory[base],
                "samples_ms": [s * 1e3 for s in samples[label]],
            })

    device = env.get("gpu") or env["cpu"]
    print(f"\n{device}; torch {env['torch']}, {env['torch_threads']} CPU threads\n")
    print("| shape | module | fwd+bwd median ms | min-max ms | saved for backward MiB | speed vs PyPI | memory vs PyPI |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['shape']} ({r['sizes']}) | {r['module']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} "
              f"| {r['saved_for_backward_mib']:.1f} | {r['speedup_vs_pypi']:.2f}x | {r['memory_ratio_vs_pypi']:.2f}x |")
    path = args.out
    if path is None:
        tag = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            f"slot_attention_module-{tag}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "results": results}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

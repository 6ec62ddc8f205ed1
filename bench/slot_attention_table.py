"""Side-by-side timing of slot attention (forward, backward, forward+backward with entropy) for every
usable backend, the eager reference and torch.compile of the reference, in one process.

    python bench/slot_attention_table.py                       # every SPEC shape that fits this machine
    python bench/slot_attention_table.py --shapes cpu-small --threads 2 --repeats 7

Each number is the median over --repeats runs of the median of --iters timed calls (the CPU of the
development machines is noisy); ratios are taken against the eager reference measured in the same run.
CUDA shapes are timed with CUDA events around each call, and each variant's peak memory of one
forward+backward over what the inputs already hold (torch.cuda.max_memory_allocated) is reported too.
A variant that fails (a compile error, out of memory) is reported with its error; the others go on. Prints
a Markdown table and writes JSON (device, versions, shapes, every sample) to bench/results/, rewritten after
each shape so that a run cut short keeps the shapes it finished.
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
    if case.shape.device == "cuda":
        return time_once_cuda(case, mode, iters)
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


def time_once_cuda(case: Case, mode: str, iters: int) -> float:
    """Median seconds of one call over iters calls, from CUDA events recorded around each call."""
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if mode == "backward":
            out, ent = case.forward()
            start.record()
            case.backward(out, ent)
        elif mode == "forward":
            start.record()
            case.forward_no_grad()
        else:
            start.record()
            case.forward_backward()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def peak_memory_mib(case: Case) -> float | None:
    """Peak CUDA memory of one forward+backward beyond what was allocated before it (inputs, grads)."""
    if case.shape.device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    case.forward_backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def write_json(path: str, env: dict, args, results: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "repeats": args.repeats,
                   "iters": args.iters, "results": results}, f, indent=1)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), help="default: all that fit this machine")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU shapes")
    parser.add_argument("--repeats", type=int, default=5, help="outer repeats (median taken)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per repeat")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="only these of reference, reference+compile, cpu, cuda, triton (those usable here)")
    parser.add_argument("--out", default=None, help="JSON path; default bench/results/slot_attention-<device>-<date>.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [SHAPES[s] for s in args.shapes] if args.shapes else shapes_for_this_machine()
    env = environment()
    device = env.get("gpu") or env["cpu"]
    path = args.out
    if path is None:
        tag = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
        stamp = datetime.date.today().isoformat()
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"slot_attention-{tag}-{stamp}.json")
    results = []
    for shape in shapes:
        variants = [v for v in variants_for(shape) if args.variants is None or v in args.variants]
        if "reference" not in variants:
            variants.insert(0, "reference")  # the ratios are taken against it
        cases, errors = {}, {}
        for v in variants:
            try:
                cases[v] = Case(v, shape)
                for _ in range(3):  # warm-up and compilation, outside the timed region
                    cases[v].forward_backward()
                sync(shape.device)
            except Exception as exc:  # one broken variant must not hide the others
                errors[v] = _error(exc)
                cases.pop(v, None)
                if shape.device == "cuda":
                    torch.cuda.empty_cache()
        peaks = {}
        for v, case in cases.items():
            try:
                peaks[v] = peak_memory_mib(case)
            except Exception as exc:
                errors[v] = _error(exc)
        for mode in args.modes:
            samples = {v: [] for v in cases if v not in errors}
            for _ in range(args.repeats):  # interleaved, so drift of the machine hits every variant alike
                for v in list(samples):
                    try:
                        samples[v].append(time_once(cases[v], mode, args.iters))
                    except Exception as exc:
                        errors[v] = _error(exc)
                        del samples[v]
            eager = statistics.median(samples["reference"]) if samples.get("reference") else None
            for v in variants:
                row = {"shape": shape.name, "sizes": shape.describe(), "mode": mode, "variant": v}
                if v in samples and samples[v]:
                    median = statistics.median(samples[v])
                    row.update({
                        "median_ms": median * 1e3, "min_ms": min(samples[v]) * 1e3, "max_ms": max(samples[v]) * 1e3,
                        "speedup_vs_eager": eager / median if eager else None,
                        "peak_mib": peaks.get(v), "samples_ms": [x * 1e3 for x in samples[v]],
                    })
                else:
                    row.update({"median_ms": None, "error": errors.get(v, "not measured")})
                results.append(row)
        del cases
        if shape.device == "cuda":
            torch.cuda.empty_cache()
        write_json(path, env, args, results)

    print(f"\n{device}; torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} CPU threads\n")
    print("| shape | mode | variant | median ms | min-max ms | vs eager | peak MiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        if r["median_ms"] is None:
            print(f"| {r['shape']} ({r['sizes']}) | {r['mode']} | {r['variant']} | failed: {r['error']} | | | |")
            continue
        ratio = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['shape']} ({r['sizes']}) | {r['mode']} | {r['variant']} | {r['median_ms']:.3f} | "
              f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {ratio} | {peak} |")

    write_json(path, env, args, results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

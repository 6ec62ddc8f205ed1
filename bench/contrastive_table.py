"""clip_loss forward+backward: time and peak memory of every usable backend against open_clip's ClipLoss.

    python bench/contrastive_table.py --batch 8192 --threads 2                  # all variants
    python bench/contrastive_table.py --batch 65536 --variants cpu --repeats 1  # the large-batch memory check

Every measurement runs in a fresh Python process (so that one variant's allocations do not hide another's
peak): the features (B, D) are allocated, then one forward+backward is run while a thread samples the
resident memory every millisecond; the peak growth over the features is reported, and the growth beyond
the features' gradients (2 B D elements, which any implementation must allocate). Further calls give the
time (median). The variants are interleaved over --repeats rounds, each in its own process.
Prints a Markdown table and writes JSON (device, versions, samples) to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, batch: int, dim: int, dtype_name: str, threads: int, iters: int) -> dict:
    """Runs inside the child process."""
    import threading
    import time

    import torch

    sys.path.insert(0, HERE)
    from contrastive_cases import make_features, make_loss_fn

    torch.set_num_threads(threads)
    image, text, scale = make_features(batch, dim, getattr(torch, dtype_name))
    loss_fn = make_loss_fn(variant, image, text, scale)

    baseline, peak, running = _rss_bytes(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    loss_fn().backward()
    first = time.perf_counter() - start
    running[0] = False
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    grad_bytes = image.grad.numel() * image.grad.element_size() * 2
    times = [first]
    for _ in range(iters - 1):
        image.grad = text.grad = scale.grad = None
        start = time.perf_counter()
        loss_fn().backward()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "times_s": times, "peak_growth_bytes": peak[0] - baseline,
            "grad_bytes": grad_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=None, help="cpu, reference, open_clip (default: all usable)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of fresh processes per variant")
    parser.add_argument("--iters", type=int, default=2, help="forward+backward calls per process")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.dim, args.dtype, args.threads, args.iters)))
        return

    sys.path.insert(0, HERE)
    from cases import environment

    env = environment()
    variants = args.variants
    if variants is None:
        variants = ["cpu", "reference"]
        try:
            import open_clip  # noqa: F401

            variants.append("open_clip")
        except ImportError:
            pass
    samples = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--batch", str(args.batch),
                   "--dim", str(args.dim), "--dtype", args.dtype, "--threads", str(args.threads),
                   "--iters", str(args.iters)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{v} failed:\n{done.stderr[-3000:]}")
            samples[v].append(json.loads(done.stdout.strip().splitlines()[-1]))

    rows = []
    for v in variants:
        times = [t for s in samples[v] for t in s["times_s"][1:] or s["times_s"]]
        growth = max(s["peak_growth_bytes"] for s in samples[v])
        grad_bytes = samples[v][0]["grad_bytes"]
        rows.append({"variant": v, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "peak_growth_mib": growth / 2**20, "beyond_grads_mib": (growth - grad_bytes) / 2**20,
                     "samples": samples[v]})
    base = next((r for r in rows if r["variant"] == "open_clip"), rows[0])
    print(f"\n{env['cpu']}; torch {env['torch']}, {args.threads} threads; B={args.batch} D={args.dim} {args.dtype}\n")
    print("| variant | fwd+bwd median s | min-max s | peak memory growth MiB | beyond the feature grads MiB | speed vs open_clip |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["speedup_vs_open_clip"] = base["median_s"] / r["median_s"]
        print(f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {r['peak_growth_mib']:.0f} "
              f"| {r['beyond_grads_mib']:.0f} | {r['speedup_vs_open_clip']:.2f}x |")
    path = args.out or os.path.join(HERE, "results", f"clip_loss-cpu-B{args.batch}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "batch": args.batch, "dim": args.dim,
                   "dtype": args.dtype, "results": rows}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

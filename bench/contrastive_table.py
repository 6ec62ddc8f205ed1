"""clip_loss forward+backward: time and peak memory of every usable backend against open_clip's ClipLoss.

    python bench/contrastive_table.py --batch 8192 --threads 2                  # all variants
    python bench/contrastive_table.py --batch 65536 --variants cpu --repeats 1  # the large-batch memory check
    python bench/contrastive_table.py --device cuda --dtype bfloat16 --batch 6400 65536 262144   # on a GPU

On the CPU:
Every measurement runs in a fresh Python process (so that one variant's allocations do not hide another's
peak): the features (B, D) are allocated, then one forward+backward is run while a thread samples the
resident memory every millisecond; the peak growth over the features is reported, and the growth beyond
the features' gradients (2 B D elements, which any implementation must allocate). Further calls give the
time (median). The variants are interleaved over --repeats rounds, each in its own process.

On a GPU (--device cuda): variants triton and cuda (eclip_kernels backends), reference (materializes the
logits), open_clip (ClipLoss) and inf_cl (Inf-CL, package inf-cl: its single-process loss cal_flash_loss,
which cal_inf_loss runs without torch.distributed, in both directions). One
process per batch size (so that a fault in one does not lose the others); in it, each variant is warmed up
(compilation), then timed with CUDA events around each forward+backward (median), and its peak memory is
torch.cuda.max_memory_allocated over what the features held before the call. A variant is skipped, with the
reason, when its (B, B) logits cannot fit in the GPU's free memory, when its package is missing, or when its
time at the previous batch size predicts more than --max-call-s per call; an out-of-memory error is recorded
and the next variant runs. The loss of each variant is reported too (they must agree).

Prints a Markdown table and writes JSON (device, versions, samples) to bench/results/ (on a GPU rewritten
after each variant, so that a run cut short keeps what finished).
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


# --- CUDA ---------------------------------------------------------------------------------------------------

CUDA_VARIANTS = ("triton", "cuda", "inf_cl", "reference", "open_clip")
# (B, B) matrices each variant holds at its peak, in the feature dtype (logits, log-softmax of both
# directions and their gradients), for the does-it-fit check; an out-of-memory error is caught anyway.
BXB_MATRICES = {"reference": 6, "open_clip": 7}


def cuda_skip_reason(variant: str, batch: int, dim: int, dtype, free_bytes: int, device: str = "cuda") -> str | None:
    """Why a variant cannot run at this size here (None: it can)."""
    import torch

    from eclip_kernels.backends import resolve_backend

    if variant in ("triton", "cuda"):
        try:
            resolve_backend(variant, torch.device(device), dtype, op="contrastive")
        except (RuntimeError, ValueError, TypeError) as exc:
            return f"backend {variant!r} unusable: {exc}"
    if variant == "open_clip":
        try:
            import open_clip  # noqa: F401
        except ImportError as exc:
            return f"open_clip is not installed ({exc}; carry open-clip-torch: scripts/gpu_wheels.sh)"
    if variant == "inf_cl":
        try:
            import inf_cl  # noqa: F401
        except ImportError as exc:
            return f"inf_cl is not installed ({exc}; carry inf-cl: scripts/gpu_wheels.sh)"
        if dim % 16:
            return f"Inf-CL needs D to be a multiple of 16, got {dim}"
    if variant in BXB_MATRICES:
        need = BXB_MATRICES[variant] * batch * batch * torch.empty((), dtype=dtype).element_size()
        if need > 0.9 * free_bytes:
            return (f"its B x B logits need about {need / 2**30:.0f} GiB, the device has {free_bytes / 2**30:.0f} "
                    "GiB free")
    return None


def _free_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:  # --emulate-on-cpu: the machine's available memory
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024


def measure_cuda(variant: str, batch: int, dim: int, dtype_name: str, iters: int, max_call_s: float,
                 device: str = "cuda") -> dict:
    """One variant at one batch size, in the child process of that batch. (device="cpu" only runs the same
    steps on the CPU, timed with the host clock and without memory numbers: for the tests of this script.)"""
    import statistics as stats
    import time

    import torch

    sys.path.insert(0, HERE)
    from contrastive_cases import make_features, make_loss_fn

    on_gpu = device == "cuda"
    image, text, scale = make_features(batch, dim, getattr(torch, dtype_name), device)
    loss_fn = make_loss_fn(variant, image, text, scale)

    def step():
        image.grad = text.grad = scale.grad = None
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if on_gpu:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, loss.detach().float().item()
        return time.perf_counter() - t0, loss.detach().float().item()

    first_s, loss = step()  # warm-up: compilation, autotuning, allocator growth
    image.grad = text.grad = scale.grad = None
    peak = None
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = [step()[0]]
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() - base
    # the timed calls take about --max-call-s at most (at least one call, at most --iters)
    for _ in range(max(1, min(iters, int(max_call_s / max(times[0], 1e-6)))) - 1):
        times.append(step()[0])
    grad_bytes = image.numel() * image.element_size() * 2
    return {"variant": variant, "batch": batch, "times_s": times, "first_call_s": first_s, "loss": loss,
            "median_ms": stats.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "peak_growth_mib": None if peak is None else peak / 2**20,
            "beyond_grads_mib": None if peak is None else (peak - grad_bytes) / 2**20}


def cuda_child(args) -> None:
    """Every variant at one batch size; one JSON line per variant, as each finishes."""
    import torch

    device = "cpu" if args.emulate_on_cpu else "cuda"
    batch = args.batch[0]
    dtype = getattr(torch, args.dtype)
    predicted = json.loads(args.predict or "{}")
    for variant in args.variants or CUDA_VARIANTS:
        reason = cuda_skip_reason(variant, batch, args.dim, dtype, _free_bytes(device), device)
        if reason is None and predicted.get(variant, 0) > args.max_call_s:
            reason = (f"its time at a smaller batch predicts {predicted[variant]:.0f} s per call "
                      f"(over --max-call-s {args.max_call_s:.0f})")
        if reason:
            row = {"variant": variant, "batch": batch, "skipped": reason}
        else:
            try:
                row = measure_cuda(variant, batch, args.dim, args.dtype, args.iters, args.max_call_s, device)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"variant": variant, "batch": batch, "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
            except Exception as exc:  # recorded, and the next variant runs
                lines = str(exc).strip().splitlines()
                row = {"variant": variant, "batch": batch,
                       "error": f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"}
        print("ROW " + json.dumps(row), flush=True)


def cuda_main(args) -> None:
    sys.path.insert(0, HERE)
    from cases import environment

    env = environment()
    rows: list[dict] = []
    path = args.out or os.path.join(HERE, "results", f"clip_loss-cuda-{datetime.date.today().isoformat()}.json")

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"environment": env, "command": " ".join(sys.argv), "device": "cuda", "dim": args.dim,
                       "dtype": args.dtype, "batches": args.batch, "results": rows}, f, indent=1)
        os.replace(path + ".tmp", path)

    previous: dict[str, tuple[int, float]] = {}  # variant -> (batch, seconds per call) at the last size measured
    for batch in sorted(args.batch):
        # logits work grows as B^2: predict this size's call from the last one
        predict = {v: s * (batch / b) ** 2 for v, (b, s) in previous.items()}
        cmd = [sys.executable, os.path.abspath(__file__), "--cuda-child", "--device", "cuda", "--batch", str(batch),
               "--dim", str(args.dim), "--dtype", args.dtype, "--iters", str(args.iters),
               "--max-call-s", str(args.max_call_s), "--predict", json.dumps(predict)]
        if args.emulate_on_cpu:
            cmd.append("--emulate-on-cpu")
        if args.variants:
            cmd += ["--variants", *args.variants]
        seen = set()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if line.startswith("ROW "):
                    row = json.loads(line[4:])
                    rows.append(row)
                    seen.add(row["variant"])
                    if row.get("median_ms") is not None:
                        previous[row["variant"]] = (batch, row["median_ms"] / 1e3)
                    save()
                    print(_row_text(row), flush=True)
            stderr = proc.stderr.read()
        if proc.returncode != 0:
            print(f"B={batch}: the child process failed (exit code {proc.returncode}):\n{stderr[-3000:]}", flush=True)
            for variant in args.variants or CUDA_VARIANTS:
                if variant not in seen:
                    rows.append({"variant": variant, "batch": batch,
                                 "error": f"not measured: the process of B={batch} died (exit code {proc.returncode})"})
            save()

    print(f"\n{env.get('gpu')}; torch {env['torch']}, triton {env['triton']}; D={args.dim} {args.dtype}\n")
    print("| B | variant | fwd+bwd median ms | min-max ms | peak MiB | beyond the feature grads MiB | loss | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(_row_text(row))
    save()
    print(f"\nwrote {path}")


def _row_text(row: dict) -> str:
    if row.get("median_ms") is None:
        return f"| {row['batch']} | {row['variant']} | - | - | - | - | - | {row.get('skipped') or row.get('error')} |"
    peak, beyond = row.get("peak_growth_mib"), row.get("beyond_grads_mib")
    return (f"| {row['batch']} | {row['variant']} | {row['median_ms']:.2f} | {row['min_ms']:.2f}-{row['max_ms']:.2f} "
            f"| {'-' if peak is None else f'{peak:.0f}'} | {'-' if beyond is None else f'{beyond:.0f}'} "
            f"| {row['loss']:.5f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[8192], help="one or more batch sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default=None, help="feature dtype (default float32 on the CPU, bfloat16 on a GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=None,
                        help="CPU: cpu, reference, open_clip; GPU: " + ", ".join(CUDA_VARIANTS) + " (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of fresh processes per variant (CPU)")
    parser.add_argument("--iters", type=int, default=None,
                        help="forward+backward calls per process (CPU, default 2) / timed calls per variant (GPU, default 10)")
    parser.add_argument("--max-call-s", type=float, default=10.0,
                        help="GPU: skip a variant whose predicted call takes longer; also caps its timed calls")
    parser.add_argument("--out", default=None, help="JSON path (CPU: with one --batch)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cuda-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--predict", default=None, help=argparse.SUPPRESS)
    # the GPU path's code on CPU tensors (no CUDA events, no memory numbers): for tests/test_gpu_check.py
    parser.add_argument("--emulate-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.iters = args.iters or (10 if args.device == "cuda" else 2)

    if args.cuda_child:
        cuda_child(args)
        return
    if args.device == "cuda":
        cuda_main(args)
        return
    if args.child:
        print(json.dumps(measure(args.child, args.batch[0], args.dim, args.dtype, args.threads, args.iters)))
        return
    if args.out and len(args.batch) > 1:
        parser.error("--out takes one --batch on the CPU (each batch size gets its own JSON file)")
    for batch in args.batch:
        cpu_table(args, batch)


def cpu_table(args, batch: int) -> None:
    """Fresh processes per variant and repeat, resident-memory peaks (see the module docstring)."""
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
            cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--batch", str(batch),
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
    print(f"\n{env['cpu']}; torch {env['torch']}, {args.threads} threads; B={batch} D={args.dim} {args.dtype}\n")
    print("| variant | fwd+bwd median s | min-max s | peak memory growth MiB | beyond the feature grads MiB | speed vs open_clip |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["speedup_vs_open_clip"] = base["median_s"] / r["median_s"]
        print(f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {r['peak_growth_mib']:.0f} "
              f"| {r['beyond_grads_mib']:.0f} | {r['speedup_vs_open_clip']:.2f}x |")
    path = args.out or os.path.join(HERE, "results", f"clip_loss-cpu-B{batch}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "batch": batch, "dim": args.dim,
                   "dtype": args.dtype, "results": rows}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

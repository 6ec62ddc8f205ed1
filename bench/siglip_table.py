"""siglip_loss forward+backward: time and peak memory against open_clip's SigLipLoss, every case in a fresh process.

    python bench/siglip_table.py --batch 8192 65536 --threads 2                     # CPU: cpu, reference, open_clip
    python bench/siglip_table.py --device cuda --dtype bfloat16 --batch 8192 65536   # GPU: triton, cuda, reference, open_clip
    python bench/siglip_memory_check.py --batch 65536                                # the cpu backend's memory bound

Each (variant, batch size, repeat) runs in its own Python process, so that one case's allocations and
allocator caches do not hide another's peak, and a failure loses only that case. In it the features (B, D),
open_clip's SigLIP logit scale 10 and bias -10 are made (leaves requiring grad), then one forward+backward
runs while the memory is followed:

* CPU: a thread samples the resident memory every millisecond; the peak growth over the features is
  reported, and the growth beyond the features' gradients (2 B D elements, which any implementation must
  allocate). Further calls (--iters) give the time (median of the calls after the first).
* GPU (--device cuda): one warm-up call (compilation), then torch.cuda.max_memory_allocated over what the
  features held, and CUDA-event times.

Out of memory. open_clip's SigLipLoss and the ``reference`` backend materialize the (B, B) logits and more
matrices of that size (labels, their product with the logits, logsigmoid's buffer, the gradients): at
B = 65536 one float32 (B, B) matrix is 16 GiB. Before a case starts its peak is predicted as
``BXB_MATRICES[variant] x B^2 x element size`` (the counts were measured at B = 4096 and 8192 with this script);
when that exceeds the memory the case may use (CPU: --memory-fraction of MemAvailable; GPU: the device's free
memory), the case is not run and its row says "out of memory (predicted)" with both sizes. A case that runs
and still fails to allocate is recorded as out of memory with the allocation that failed: on the CPU the
child's address space is capped at that budget (RLIMIT_AS), so an allocation beyond it raises an error
instead of waking the kernel's OOM killer; on a GPU torch.cuda.OutOfMemoryError is caught. The table goes on.

Prints a Markdown table and writes JSON (device, versions, every sample) to bench/results/.
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
CPU_VARIANTS = ("cpu", "reference", "open_clip")
CUDA_VARIANTS = ("triton", "cuda", "reference", "open_clip")
# (B, B) matrices each variant holds at its peak beyond the feature gradients, in the feature dtype (measured
# on the CPU in float32 with this script at B = 4096 and 8192: open_clip's SigLipLoss 4.9-5.0 B^2 elements, the
# reference 4.1-4.2; rounded up)
BXB_MATRICES = {"open_clip": 6, "reference": 5}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def cpu_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024


def predicted_bytes(variant: str, batch: int, dim: int, element_size: int) -> int:
    """The peak a variant needs beyond the features: its (B, B) matrices and the feature gradients."""
    return BXB_MATRICES.get(variant, 0) * batch * batch * element_size + 2 * batch * dim * element_size


def _oom_message(exc: BaseException) -> str | None:
    """The out-of-memory line of an allocation error, None for any other error."""
    import torch

    text = str(exc).strip().splitlines()
    first = text[0][:300] if text else type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, (RuntimeError, MemoryError))
                                                       and ("allocate" in str(exc) or isinstance(exc, MemoryError))):
        return f"out of memory: {first}"
    return None


def measure(variant: str, batch: int, dim: int, dtype_name: str, threads: int, iters: int, device: str,
            budget: int) -> dict:
    """One variant at one batch size; runs inside the child process."""
    import threading
    import time

    import torch

    sys.path.insert(0, HERE)
    from contrastive_cases import make_siglip_features, make_siglip_loss_fn

    torch.set_num_threads(threads)
    on_gpu = device == "cuda"
    image, text, scale, bias = make_siglip_features(batch, dim, getattr(torch, dtype_name), device)
    loss_fn = make_siglip_loss_fn(variant, image, text, scale, bias)
    grad_bytes = 2 * image.numel() * image.element_size()

    def step():
        image.grad = text.grad = scale.grad = bias.grad = None
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if on_gpu:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, loss.detach().float().item()
        return time.perf_counter() - t0, loss.detach().float().item()

    times, peak_growth = [], None
    if on_gpu:
        first_s, loss = step()  # warm-up: compilation, allocator growth
        image.grad = text.grad = scale.grad = bias.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times.append(step()[0])
        peak_growth = torch.cuda.max_memory_allocated() - base
    else:
        import resource

        # allocations beyond the budget fail with an error (recorded as out of memory), never the OOM killer
        limit = _vm_bytes() + budget
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        baseline, peak, running = _rss_bytes(), [0], [True]

        def sample():
            while running[0]:
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            first_s, loss = step()
        finally:
            running[0] = False
            sampler.join()
        peak_growth = max(peak[0], _rss_bytes()) - baseline
        times.append(first_s)
    for _ in range(iters - 1):
        times.append(step()[0])
    timed = times[1:] if len(times) > 1 and not on_gpu else times
    return {"variant": variant, "batch": batch, "times_s": times, "first_call_s": first_s, "loss": loss,
            "median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed),
            "peak_growth_mib": peak_growth / 2**20, "beyond_grads_mib": (peak_growth - grad_bytes) / 2**20}


def child(args) -> None:
    """The child process: one JSON line, a measurement, a skip or an error."""
    import torch

    variant, batch = args.child, args.batch[0]
    row = {"variant": variant, "batch": batch}
    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    if args.device == "cuda":
        torch.cuda.init()
        budget = torch.cuda.mem_get_info()[0]
    else:
        budget = int(args.memory_fraction * cpu_available_bytes())
    need = predicted_bytes(variant, batch, args.dim, element)
    reason = None
    if variant not in ("open_clip",):
        from eclip_kernels.backends import resolve_backend

        try:
            resolve_backend(variant, torch.device(args.device), getattr(torch, args.dtype), op="contrastive")
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = f"backend {variant!r} unusable: {exc}"
    else:
        try:
            import open_clip  # noqa: F401
        except ImportError as exc:
            reason = f"open_clip is not installed ({exc})"
    if reason is None and need > budget:
        row["oom"] = True
        reason = (f"out of memory (predicted, not run): its {BXB_MATRICES[variant]} B x B matrices need about "
                  f"{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB may be used here")
    if reason is not None:
        row["skipped"] = reason
    else:
        try:
            row = measure(variant, batch, args.dim, args.dtype, args.threads, args.iters, args.device, budget)
        except BaseException as exc:  # recorded; the table goes on
            message = _oom_message(exc)
            row["oom"] = message is not None
            row["error"] = message or f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    print("ROW " + json.dumps(row), flush=True)


def run_case(args, variant: str, batch: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--device", args.device,
           "--batch", str(batch), "--dim", str(args.dim), "--dtype", args.dtype, "--threads", str(args.threads),
           "--iters", str(args.iters), "--memory-fraction", str(args.memory_fraction)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if rows:
        return rows[-1]
    # the process died without a word (killed, a crash in native code): recorded, the table goes on
    return {"variant": variant, "batch": batch,
            "error": f"the process failed (exit code {done.returncode}): {done.stderr.strip()[-500:]}"}


def summarize(samples: list[dict]) -> dict:
    measured = [s for s in samples if "median_s" in s]
    if not measured:
        return dict(samples[0])
    times = [t for s in measured for t in (s["times_s"][1:] or s["times_s"])]
    return {"variant": measured[0]["variant"], "batch": measured[0]["batch"], "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times), "loss": measured[0]["loss"],
            "peak_growth_mib": max(s["peak_growth_mib"] for s in measured),
            "beyond_grads_mib": max(s["beyond_grads_mib"] for s in measured), "samples": samples}


def row_text(row: dict) -> str:
    if "median_s" not in row:
        return f"| {row['batch']} | {row['variant']} | - | - | - | - | - | {row.get('skipped') or row.get('error')} |"
    return (f"| {row['batch']} | {row['variant']} | {row['median_s'] * 1e3:.1f} | "
            f"{row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f} | {row['peak_growth_mib']:.0f} | "
            f"{row['beyond_grads_mib']:.0f} | {row['loss']:.5f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[8192, 65536], help="one or more batch sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default=None, help="feature dtype (default float32 on the CPU, bfloat16 on a GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=None,
                        help=f"CPU: {', '.join(CPU_VARIANTS)}; GPU: {', '.join(CUDA_VARIANTS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per (variant, batch)")
    parser.add_argument("--iters", type=int, default=None,
                        help="forward+backward calls per process (default 2 on the CPU, 10 on a GPU)")
    parser.add_argument("--memory-fraction", type=float, default=0.8,
                        help="CPU: the share of MemAvailable a case may use (default 0.8)")
    parser.add_argument("--out", default=None, help="JSON path")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.iters = args.iters or (10 if args.device == "cuda" else 2)
    if args.child:
        child(args)
        return

    sys.path.insert(0, HERE)
    from cases import environment

    env = environment()
    variants = args.variants or (CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS)
    path = args.out or os.path.join(HERE, "results", f"siglip_loss-{args.device}-{datetime.date.today().isoformat()}.json")
    rows = []
    for batch in sorted(args.batch):
        for variant in variants:
            samples = [run_case(args, variant, batch) for _ in range(args.repeats)]
            rows.append(summarize(samples))
            print(row_text(rows[-1]), flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump({"environment": env, "command": " ".join(sys.argv), "device": args.device, "dim": args.dim,
                           "dtype": args.dtype, "threads": args.threads, "batches": args.batch, "results": rows},
                          f, indent=1)
    where = env.get("gpu") if args.device == "cuda" else f"{env['cpu']}, {args.threads} threads"
    print(f"\n{where}; torch {env['torch']}, triton {env['triton']}; D={args.dim} {args.dtype}\n")
    print("| B | variant | fwd+bwd median ms | min-max ms | peak growth MiB | beyond the feature grads MiB | loss | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(row_text(row))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

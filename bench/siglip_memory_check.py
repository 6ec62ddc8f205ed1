"""The memory bound of the tiled sigmoid loss: at B = 65536, D = 512 float32 on the CPU, one forward+backward of
``siglip_loss(backend="cpu")`` must grow the process by less than 1 GiB beyond the features' gradients (the
(B, B) float32 logits alone would be 16 GiB).

    python bench/siglip_memory_check.py --batch 65536 --dim 512 --threads 2     # the check (minutes)
    python bench/siglip_memory_check.py --batch 4096                            # a quick run of the same code

Runs the measurement of bench/siglip_table.py (a fresh process, resident memory sampled every millisecond,
peak growth over the features minus their gradients' 2 B D elements) and exits 1 when the growth beyond the
gradients reaches --limit-mib.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="cpu", help="an eclip_kernels backend (default cpu)")
    parser.add_argument("--limit-mib", type=float, default=1024.0)
    parser.add_argument("--memory-fraction", type=float, default=0.8)
    args = parser.parse_args()

    sys.path.insert(0, HERE)
    import siglip_table

    run = argparse.Namespace(device="cpu", dim=args.dim, dtype=args.dtype, threads=args.threads, iters=1,
                             memory_fraction=args.memory_fraction)
    row = siglip_table.run_case(run, args.variant, args.batch)
    if "beyond_grads_mib" not in row:
        print(f"not measured: {row.get('skipped') or row.get('error')}")
        return 1
    ok = row["beyond_grads_mib"] < args.limit_mib
    print(f"siglip_loss backend={args.variant} B={args.batch} D={args.dim} {args.dtype}, {args.threads} threads: "
          f"forward+backward {row['first_call_s']:.1f} s, peak growth {row['peak_growth_mib']:.0f} MiB, "
          f"{row['beyond_grads_mib']:.0f} MiB beyond the feature gradients "
          f"({'under' if ok else 'NOT under'} {args.limit_mib:.0f} MiB); loss {row['loss']:.6f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

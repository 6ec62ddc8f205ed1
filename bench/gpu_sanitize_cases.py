"""Every Triton kernel once, forward and backward, at small shapes, and the slot-attention CUDA C++ kernels
(backend "cuda", csrc/cuda) likewise: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck python bench/gpu_sanitize_cases.py
    compute-sanitizer --tool racecheck python bench/gpu_sanitize_cases.py --quick
    python bench/gpu_sanitize_cases.py --device cpu --backend reference    # the driver itself, without a GPU

The cases of --backend (default triton) cover every family; --slot-backends (default cuda) adds the
slot-attention cases of other backends on CUDA devices (named "cuda:slot_attention-..."; left out, with a
note, where that backend is not usable). The CUDA cases run with ECLIP_KERNELS_CUDA_TARGET_BLOCKS unset and
again forced to split the tokens ("...-split"), so both the single-block and the merge/slab paths are checked.

Shapes are small (the sanitizers slow kernels down 10-100x) but not single-tile: odd sizes, several token
tiles, partial last tiles, a fully masked sample. Set PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor
is its own allocation and memcheck sees an overrun past it (bench/gpu_check.py does). The last line,
"sanitize cases: all done", tells the caller every case ran; the exit code is 1 when a case raised.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

import eclip_kernels as ek


def _unit(rows: int, dim: int, dtype, device, gen) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype).requires_grad_()


def slot_attention_case(dtype, masked: bool, backend: str, device: str, deterministic: bool = False):
    def run():
        gen = torch.Generator().manual_seed(0)
        batch, tokens, queries, dim, dim_v = 3, 197, 7, 40, 24
        q = (torch.randn(batch, queries, dim, generator=gen) * 2).to(device, dtype).requires_grad_()
        k = torch.randn(batch, tokens, dim, generator=gen).to(device, dtype).requires_grad_()
        v = torch.randn(batch, tokens, dim_v, generator=gen).to(device, dtype).requires_grad_()
        mask = None
        if masked:
            mask = torch.rand(batch, tokens, generator=gen) > 0.3
            mask[:, 0] = True
            mask[-1] = False  # a sample with every token masked
            mask = mask.to(device)
        out, ent = ek.slot_attention(q, k, v, mask=mask, eps=1e-8 if masked else 0.0, return_entropy=True,
                                     backend=backend)
        grad_out = torch.randn(out.shape, generator=gen).to(device, out.dtype)
        grad_ent = torch.randn(ent.shape, generator=gen).to(device, ent.dtype)
        torch.autograd.backward((out, ent), (grad_out, grad_ent))
        return [out, ent, q.grad, k.grad, v.grad]

    return run


def clip_case(with_ids: bool, dtype, backend: str, device: str):
    def run():
        gen = torch.Generator().manual_seed(1)
        batch, dim = 150, 40
        image, text = _unit(batch, dim, dtype, device, gen), _unit(batch, dim, dtype, device, gen)
        ids = torch.randint(0, batch // 3, (batch,), generator=gen).to(device) if with_ids else None
        scale = torch.tensor(14.3, device=device, requires_grad=True)
        loss = ek.clip_loss(image, text, scale, ids=ids, backend=backend)
        loss.backward()
        return [loss, image.grad, text.grad, scale.grad]

    return run


def info_nce_case(dtype, backend: str, device: str):
    def run():
        gen = torch.Generator().manual_seed(2)
        queries, bank, dim = 37, 300, 40
        query, positive = _unit(queries, dim, dtype, device, gen), _unit(queries, dim, dtype, device, gen)
        negatives = _unit(bank, dim, dtype, device, gen)
        qids = torch.randint(0, 20, (queries,), generator=gen).to(device)
        nids = torch.randint(0, 20, (bank,), generator=gen).to(device)
        scale = torch.tensor(14.3, device=device, requires_grad=True)
        loss = ek.info_nce(query, positive, negatives, scale, query_ids=qids, negative_ids=nids, backend=backend)
        loss.backward()
        return [loss, query.grad, positive.grad, negatives.grad, scale.grad]

    return run


def deterministic(fn):
    """Run fn twice under torch.use_deterministic_algorithms(True); the results must be bitwise equal."""

    def run():
        torch.use_deterministic_algorithms(True)
        try:
            first, second = fn(), fn()
        finally:
            torch.use_deterministic_algorithms(False)
        for a, b in zip(first, second):
            if not torch.equal(a, b):
                raise AssertionError("deterministic mode gave different results on a repeat")
        return first

    return run


def with_env(name: str, value: str, fn):
    """fn() with the environment variable name set to value (restored afterwards)."""
    import os

    def run():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before

    return run


def slot_cases(backend: str, device: str, quick: bool = False) -> dict:
    """The slot-attention cases of one more backend (its own kernels, its own names)."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    table = {
        f"{backend}:slot_attention-fp32-nomask": slot_attention_case(f32, False, backend, device),
        f"{backend}:slot_attention-fp32-mask": slot_attention_case(f32, True, backend, device),
        f"{backend}:slot_attention-bf16-mask": slot_attention_case(bf16, True, backend, device),
        f"{backend}:slot_attention-fp16-mask": slot_attention_case(f16, True, backend, device),
        f"{backend}:slot_attention-fp32-mask-split": with_env(
            "ECLIP_KERNELS_CUDA_TARGET_BLOCKS", "4096", slot_attention_case(f32, True, backend, device)),
        f"{backend}:deterministic-slot_attention": deterministic(slot_attention_case(f32, True, backend, device)),
    }
    if quick:
        del table[f"{backend}:slot_attention-fp16-mask"]
    return table


def cases(backend: str, device: str, quick: bool = False) -> dict:
    f32, bf16 = torch.float32, torch.bfloat16
    table = {
        "slot_attention-fp32-nomask": slot_attention_case(f32, False, backend, device),
        "slot_attention-fp32-mask": slot_attention_case(f32, True, backend, device),
        "slot_attention-bf16-nomask": slot_attention_case(bf16, False, backend, device),
        "slot_attention-bf16-mask": slot_attention_case(bf16, True, backend, device),
        "clip_loss-fp32-noids": clip_case(False, f32, backend, device),
        "clip_loss-fp32-ids": clip_case(True, f32, backend, device),
        "clip_loss-bf16-ids": clip_case(True, bf16, backend, device),
        "info_nce-fp32-ids": info_nce_case(f32, backend, device),
        "deterministic-clip_loss": deterministic(clip_case(True, f32, backend, device)),
        "deterministic-info_nce": deterministic(info_nce_case(f32, backend, device)),
        "deterministic-slot_attention": deterministic(slot_attention_case(f32, True, backend, device)),
    }
    if quick:
        for name in ("slot_attention-bf16-nomask", "clip_loss-bf16-ids"):
            del table[name]
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="triton", help="backend of every call (default triton)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slot-backends", default="cuda",
                        help="comma-separated backends whose slot-attention cases run too, on CUDA devices "
                        "(default cuda; '' for none)")
    parser.add_argument("--quick", action="store_true", help="leave out the bfloat16 repeats of covered kernels")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)

    table = cases(args.backend, args.device, args.quick)
    if args.device == "cuda":
        status = ek.available_backends()
        for extra in [b.strip() for b in args.slot_backends.split(",") if b.strip() and b.strip() != args.backend]:
            if extra in status and status[extra].usable and "cuda" in status[extra].devices:
                table.update(slot_cases(extra, args.device, args.quick))
            else:
                reason = status[extra].reason if extra in status else "unknown backend"
                print(f"sanitize cases: no {extra} slot-attention cases ({reason})", file=sys.stderr, flush=True)
    if args.list:
        print("\n".join(table))
        return 0
    names = list(table) if args.cases is None else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; --list shows them")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize cases: no CUDA GPU visible", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        start = time.perf_counter()
        try:
            outputs = table[name]()
            if args.device == "cuda":
                torch.cuda.synchronize()
            bad = [i for i, t in enumerate(outputs) if t is not None and not torch.isfinite(t).all()]
            if bad:
                raise AssertionError(f"non-finite values in outputs {bad}")
            print(f"case {name}: ok ({(time.perf_counter() - start) * 1e3:.0f} ms)", flush=True)
        except Exception:
            failed.append(name)
            print(f"case {name}: FAILED\n{traceback.format_exc()}", flush=True)
    print(f"sanitize cases: {len(names) - len(failed)} ok, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
    print("sanitize cases: all done", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

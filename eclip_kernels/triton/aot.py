"""Ahead-of-time compile check of every Triton kernel, for GPU targets, on a machine without a GPU.

    python -m eclip_kernels.triton.aot --arch 80,90 --json bench/results/triton_aot.json --check

1. Capture. Each launcher (``slot_attention_fwd``/``bwd``, ``clip_loss_fwd``/``bwd``,
   ``contrastive_rows_fwd``/``bwd``, ``siglip_loss_fwd``/``bwd``) runs on ``device="meta"`` tensors at the shapes below, under the
   geometry of the target GPU (its block sizes, 2 programs per multiprocessor: A100 108, H100 132), with
   ``JITFunction.run`` replaced by a recorder. That records the exact kernels, arguments, constexprs, warp
   counts and grids the launcher would use on that GPU, in every mode it has (masks, ids, deterministic
   mode, which inputs need gradients, the float32 matmul precision).
2. Compile. Each distinct specialization is compiled by ``triton.compile`` for ``GPUTarget("cuda", arch)``,
   bound the way Triton's own JIT binds it (divisibility and constant specialization of the arguments).
3. Read. ``cuobjdump --dump-resource-usage`` on the cubin gives registers, stack (spills), local and static
   shared memory per thread / block; Triton's metadata gives the dynamic shared memory.

``--check`` fails (exit 1) on any compile error, and on any spill (stack or local memory > 0) at a
headline case: the shapes the project is built for (SPEC section 7: eclip-b, object-centric; clip_loss at
B = 6400 and 65536; siglip_loss at B = 65536). Other cases are recorded and reported, not enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# multiprocessors of the reference GPU of each target: A100 (sm_80) and H100 / H200 (sm_90)
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
# largest shared memory one block may use (opt-in limit, bytes): a kernel above it fails at load time
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclasses.dataclass(frozen=True)
class SlotCase:
    name: str
    batch: int
    tokens: int
    queries: int
    dim: int
    headline: bool


@dataclasses.dataclass(frozen=True)
class ContrastiveCase:
    name: str
    kind: str  # "clip": the symmetric loss of one process; "rows": info_nce / each direction across ranks;
    # "siglip": the sigmoid loss, rows images against cols texts (cols > rows: a rank against the gathered texts)
    rows: int  # B (clip) or M queries (rows)
    cols: int  # B (clip) or K keys (rows)
    dim: int
    headline: bool


# SPEC section 7 shapes, the ECLIP presets' decoder (eclip-vit-b16 / -l16: N = 196, T = 20, D = 512; eclip-tiny
# at patch 8), the drop-in SlotAttention's benchmark shape, and the object-centric shape with T = 7 and 11.
SLOT_CASES = [
    SlotCase("eclip-b", 200, 196, 20, 512, True),
    SlotCase("eclip-b-large-batch", 1024, 196, 20, 512, False),
    SlotCase("object-centric", 64, 4096, 7, 256, True),
    SlotCase("object-centric-T11", 64, 4096, 11, 256, True),
    SlotCase("cpu-small", 64, 196, 20, 256, False),
    SlotCase("eclip-tiny", 64, 64, 8, 64, False),
    SlotCase("slot-attention-module", 32, 1024, 7, 64, False),
    SlotCase("eclip-b-one-sample", 1, 196, 20, 512, False),
]
CONTRASTIVE_CASES = [
    ContrastiveCase("clip-6400", "clip", 6400, 6400, 512, True),
    ContrastiveCase("clip-65536", "clip", 65536, 65536, 512, True),
    ContrastiveCase("clip-262144", "clip", 262144, 262144, 512, False),
    # each rank's rows against the gathered batch (6400 on 32 ranks) and the inter-product loss against the
    # batch plus a 65536 queue
    ContrastiveCase("rows-200x6400", "rows", 200, 6400, 512, False),
    ContrastiveCase("rows-200x71936", "rows", 200, 6400 + 65536, 512, False),
    # the sigmoid loss of one process, and one rank's 512 rows against 65536 gathered texts (positives at an
    # offset)
    ContrastiveCase("siglip-8192", "siglip", 8192, 8192, 512, False),
    ContrastiveCase("siglip-65536", "siglip", 65536, 65536, 512, True),
    ContrastiveCase("siglip-512x65536", "siglip", 512, 65536, 512, False),
]


# --------------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    case: str
    mode: str
    dtype: str
    headline: bool
    kernel: object  # JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def _recording(sink: list):
    from triton.runtime.jit import JITFunction

    from . import _launch

    original, wrapper = JITFunction.run, _launch._torch_wrap_triton

    def record(self, *args, grid, warmup, **kwargs):
        sink.append((self, args, kwargs, tuple(grid) if not callable(grid) else grid))

    JITFunction.run = record
    _launch._torch_wrap_triton = None  # plain launches: wrap_triton would turn them into no-op ops on meta tensors
    try:
        yield
    finally:
        JITFunction.run, _launch._torch_wrap_triton = original, wrapper


@contextlib.contextmanager
def _matmul_precision(value: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def _deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _slot_modes(case: SlotCase, dtype: torch.dtype):
    """(mode name, callable) for every launch mode of the slot-attention launchers at this case."""
    from . import slot_attention as sa

    B, N, T, D = case.batch, case.tokens, case.queries, case.dim
    q, k, v = _meta(B, T, D, dtype=dtype), _meta(B, N, D, dtype=dtype), _meta(B, N, D, dtype=dtype)
    for masked in (False, True):
        mask = _meta(B, N, dtype=torch.bool) if masked else None
        tag = "mask" if masked else "nomask"

        def run(mask=mask):
            out, ent, S, lse = sa.slot_attention_fwd(q, k, v, mask, D**-0.5, 0.0)
            sa.slot_attention_bwd(torch.empty_like(out), torch.empty_like(ent), q, k, v, mask, out, ent, S, lse,
                                  D**-0.5, 0.0)

        yield tag, run


def _siglip_modes(case: ContrastiveCase, dtype: torch.dtype):
    """Every launch mode of the sigmoid loss: with and without ids, and the backward's gradient subsets (a
    frozen tower, only the scale and bias) that change the constexprs. No atomics: no deterministic mode."""
    from . import siglip as sg

    M, K, D = case.rows, case.cols, case.dim
    scalar = _meta((), dtype=torch.float32)
    offset = 0 if M == K else M  # a rank's rows: the second rank's positives
    masks = {"": (True, True, True, True), "-frozen-image": (False, True, True, True),
             "-scale-bias-only": (False, False, True, True)}
    for with_ids in (False, True):
        for suffix, mask in masks.items():
            if with_ids and suffix:
                continue
            a, b = _meta(M, D, dtype=dtype), _meta(K, D, dtype=dtype)
            ids_a = _meta(M, dtype=torch.int64) if with_ids else None
            ids_b = _meta(K, dtype=torch.int64) if with_ids else None

            def run(a=a, b=b, ids_a=ids_a, ids_b=ids_b, mask=mask):
                sg.siglip_loss_fwd(a, b, scalar, scalar, ids_a, ids_b, offset)
                sg.siglip_loss_bwd(scalar, a, b, scalar, scalar, ids_a, ids_b, offset, mask)

            yield ("ids" if with_ids else "noids") + suffix, run


def _contrastive_modes(case: ContrastiveCase, dtype: torch.dtype):
    from . import contrastive as ct

    if case.kind == "siglip":
        yield from _siglip_modes(case, dtype)
        return
    M, K, D = case.rows, case.cols, case.dim
    scale = _meta((), dtype=torch.float32)
    f32 = torch.float32
    for with_ids in (False, True):
        for deterministic in (False, True):
            tag = ("ids" if with_ids else "noids") + ("-det" if deterministic else "")
            if case.kind == "clip":
                a, b = _meta(M, D, dtype=dtype), _meta(M, D, dtype=dtype)
                ids = _meta(M, dtype=torch.int64) if with_ids else None

                def run(a=a, b=b, ids=ids, deterministic=deterministic):
                    with _deterministic(deterministic):
                        _, row_lse, col_lse = ct.clip_loss_fwd(a, b, scale, ids)
                        ct.clip_loss_bwd(_meta((), dtype=f32), a, b, scale, ids, row_lse, col_lse)
            else:
                qry, pos, keys = _meta(M, D, dtype=dtype), _meta(M, D, dtype=dtype), _meta(K, D, dtype=dtype)
                qids = _meta(M, dtype=torch.int64) if with_ids else None
                kids = _meta(K, dtype=torch.int64) if with_ids else None

                def run(qry=qry, pos=pos, keys=keys, qids=qids, kids=kids, deterministic=deterministic):
                    with _deterministic(deterministic):
                        _, lse = ct.contrastive_rows_fwd(qry, pos, keys, scale, qids, kids)
                        ct.contrastive_rows_bwd(_meta((), dtype=f32), qry, pos, keys, scale, qids, kids, lse)
            yield tag, run


def capture(arch: int, dtypes: list[str], cases: list[str] | None = None) -> list[Launch]:
    """Every launch the launchers make at the cases, as on a GPU of compute capability ``arch``."""
    from ._launch import override_geometry

    launches: list[Launch] = []
    programs = 2 * SM_COUNT[arch]
    todo = [(c, _slot_modes) for c in SLOT_CASES] + [(c, _contrastive_modes) for c in CONTRASTIVE_CASES]
    for case, modes in todo:
        if cases and case.name not in cases:
            continue
        for dname in dtypes:
            precision = "high" if dname == "tf32" else "highest"
            for mode, run in modes(case, DTYPES[dname]):
                sink: list = []
                with override_geometry(True, programs), _matmul_precision(precision), _recording(sink):
                    run()
                for kernel, args, kwargs, grid in sink:
                    launches.append(Launch(case.name, mode, dname, case.headline, kernel, args, kwargs, grid))
    return launches


# --------------------------------------------------------------------------------------------------------
# Compile and read resources
# --------------------------------------------------------------------------------------------------------


def _bind(launch: Launch, arch: int):
    """(ASTSource, options dict, target) exactly as Triton's JIT would build them for this launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, target


def _spec_key(src, options: dict) -> str:
    return src.hash() + repr(sorted((k, repr(v)) for k, v in options.items()))


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in triton's backends/nvidia/bin nor on PATH)")
    return found


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resources(cubin: bytes) -> dict:
    """Registers, stack and local bytes per thread, static shared bytes per block, from a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = _RESOURCE.findall(text)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel's resource line in cuobjdump's output, got:\n{text}")
    reg, stack, shared, local = (int(x) for x in found[0])
    return {"regs": reg, "stack": stack, "shared_static": shared, "local": local}


def compile_one(launch: Launch, arch: int) -> dict:
    import triton

    src, options, target = _bind(launch, arch)
    start = time.perf_counter()
    kernel = triton.compile(src, target=target, options=options)
    res = resources(kernel.asm["cubin"])
    res["shared_dynamic"] = int(getattr(kernel.metadata, "shared", 0))
    res["compile_s"] = round(time.perf_counter() - start, 2)
    if res["shared_static"] + res["shared_dynamic"] > SHARED_LIMIT[arch]:
        raise RuntimeError(f"out of resources: {res['shared_static'] + res['shared_dynamic']} bytes of shared "
                           f"memory, sm_{arch} allows {SHARED_LIMIT[arch]} per block")
    return res


def _constexprs(launch: Launch) -> dict:
    names = launch.kernel.arg_names
    out = {}
    for name, param in zip(names, launch.kernel.params):
        if param.is_constexpr:
            idx = names.index(name)
            value = launch.args[idx] if idx < len(launch.args) else launch.kwargs.get(name, param.default)
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def run(archs: list[int], dtypes: list[str], cases: list[str] | None = None, log=print) -> dict:
    import triton

    rows, errors = [], []
    cache: dict[str, dict] = {}
    for arch in archs:
        for launch in capture(arch, dtypes, cases):
            try:
                src, options, _ = _bind(launch, arch)
                key = f"{arch}:{_spec_key(src, options)}"
                if key not in cache:
                    cache[key] = compile_one(launch, arch)
                    log(f"  sm_{arch} {launch.kernel.__name__:24s} {launch.case}/{launch.dtype}/{launch.mode}: "
                        f"{_fmt(cache[key])}")
                res = dict(cache[key])
            except Exception as exc:  # a compile error is a result: recorded, and fails --check
                res = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
                errors.append((arch, launch.case, launch.dtype, launch.mode, launch.kernel.__name__, res["error"]))
                log(f"  sm_{arch} {launch.kernel.__name__} {launch.case}/{launch.dtype}/{launch.mode}: ERROR {res['error'][:300]}")
            rows.append({
                "arch": arch, "case": launch.case, "dtype": launch.dtype, "mode": launch.mode,
                "headline": launch.headline, "kernel": launch.kernel.__name__,
                "grid": list(launch.grid) if isinstance(launch.grid, tuple) else str(launch.grid),
                "num_warps": launch.kwargs.get("num_warps", 4), "num_stages": launch.kwargs.get("num_stages"),
                "constexprs": _constexprs(launch), **res,
                "spills": bool(res.get("stack", 0) or res.get("local", 0)),
            })
    spills = [r for r in rows if r.get("spills")]
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "archs": archs,
        "dtypes": dtypes,
        "specializations_compiled": len(cache),
        "launches": len(rows),
        "errors": len(errors),
        "spilling_launches": len(spills),
        "spilling_headline_launches": sum(r["headline"] for r in spills),
        "rows": rows,
    }


def _fmt(res: dict) -> str:
    return (f"REG {res['regs']:3d} STACK {res['stack']:5d} LOCAL {res['local']:4d} "
            f"SHARED {res['shared_static'] + res['shared_dynamic']:6d}  ({res['compile_s']:.1f} s)")


def table(report: dict) -> str:
    """Markdown: one row per (case, dtype, kernel, arch), the worst mode of each."""
    worst: dict[tuple, dict] = {}
    for r in report["rows"]:
        key = (r["case"], r["dtype"], r["kernel"], r["arch"])
        cur = worst.get(key)
        score = (1 if "error" in r else 0, r.get("stack", 0) + r.get("local", 0), r.get("regs", 0))
        if cur is None or score > cur[0]:
            worst[key] = (score, r)
    lines = ["| case | dtype | kernel | sm | grid | warps | REG | STACK | LOCAL | SHARED (B) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (case, dtype, kernel, arch), (_, r) in worst.items():
        name = case + (" *" if r["headline"] else "")
        if "error" in r:
            lines.append(f"| {name} | {dtype} | {kernel} | {arch} | | | ERROR | | | |")
            continue
        lines.append(f"| {name} | {dtype} | {kernel} | {arch} | {r['grid']} | {r['num_warps']} | {r['regs']} | "
                     f"{r['stack']} | {r['local']} | {r['shared_static'] + r['shared_dynamic']} |")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    """JSON with one launch per line (compact, and diffs between runs stay readable)."""
    head = {k: v for k, v in report.items() if k != "rows"}
    with open(path, "w") as f:
        f.write(json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n')
        f.write(",\n".join("  " + json.dumps(r, sort_keys=True) for r in report["rows"]))
        f.write("\n ]\n}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eclip_kernels.triton.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    parser.add_argument("--dtypes", default="fp32,tf32,bf16,fp16",
                        help="input dtypes: fp32 (float32, exact products), tf32 (float32 under "
                             "torch.set_float32_matmul_precision('high')), bf16, fp16 (default all)")
    parser.add_argument("--cases", default=None, help="only these case names, comma separated")
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a compile error or on a spill at a headline case")
    parser.add_argument("--quiet", action="store_true", help="no per-kernel lines, only the table")
    args = parser.parse_args(argv)

    archs = [int(a) for a in args.arch.split(",") if a]
    for a in archs:
        if a not in SM_COUNT:
            parser.error(f"unknown arch {a}; known: {sorted(SM_COUNT)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d}; known: {sorted(DTYPES)}")
    cases = args.cases.split(",") if args.cases else None
    known = {c.name for c in SLOT_CASES} | {c.name for c in CONTRASTIVE_CASES}
    for c in cases or []:
        if c not in known:
            parser.error(f"unknown case {c}; known: {sorted(known)}")

    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    start = time.perf_counter()
    report = run(archs, dtypes, cases, log=(lambda *_: None) if args.quiet else print)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(table(report))
    print(f"\n{report['launches']} launches, {report['specializations_compiled']} specializations compiled in "
          f"{report['seconds']} s; {report['errors']} compile errors; {report['spilling_launches']} spilling "
          f"launches, {report['spilling_headline_launches']} at headline cases (*)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_report(report, args.json)
    if args.check and (report["errors"] or report["spilling_headline_launches"]):
        print("AOT check FAILED: compile errors or spills at headline cases", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

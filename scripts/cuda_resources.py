"""Registers, stack, shared memory and spills of this project's CUDA kernels in the built extension.

    python scripts/cuda_resources.py [--so PATH] [--json OUT] [--arch 80,90] [--prefix eclip_]

Reads the compiled library (eclip_kernels/_C*.so; by default the one `import eclip_kernels._C` would load)
with cuobjdump, no GPU needed:
  * `cuobjdump --dump-resource-usage`: REG, STACK (stack frame bytes), SHARED, LOCAL per kernel and target;
  * `cuobjdump -sass`: the local-memory instructions of each kernel (STL = spill stores, LDL = spill loads;
    this project's kernels keep every array in registers, so any of them is a spill).
Only kernels whose (mangled) name contains --prefix are checked: this project's kernels are all named
eclip_<...>_kernel. Prints one table row per kernel and target, writes the rows as JSON (--json), and exits
with 1 when a checked kernel spills (STL/LDL > 0, or a stack frame > 0), when a target of --arch has no
code for them, or when no kernel of the project is found; 2 when cuobjdump or the library is missing.

cuobjdump is looked up on PATH, in $CUDA_HOME/bin, /usr/local/cuda*/bin, and in the Triton wheel
(triton/backends/nvidia/bin), which ships one.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PREFIX = "eclip_"

RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
ARCH = re.compile(r"^\s*arch\s*=\s*sm_(\d+)")
FUNCTION = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
LOCAL_OP = re.compile(r"\b(STL|LDL)(?:\.[A-Z0-9.]+)?\b")


def find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        candidate = os.path.join(root, "bin", "cuobjdump") if root else ""
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "backends", "nvidia", "bin", "cuobjdump")
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def find_library() -> str | None:
    """The eclip_kernels._C library this interpreter would load, else the one in the source tree."""
    try:
        spec = importlib.util.find_spec("eclip_kernels._C")
        if spec and spec.origin and os.path.exists(spec.origin):
            return spec.origin
    except (ImportError, ValueError):
        pass
    found = sorted(glob.glob(os.path.join(ROOT, "eclip_kernels", "_C*.so")))
    return found[0] if found else None


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return dict(zip(names, out)) if done.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """eclip_..._kernel<T> without namespaces and parameter lists (for the table)."""
    match = re.search(r"(eclip_\w+?)(<[^()]*>)?\(", demangled)
    if not match:
        return demangled
    name, targs = match.group(1), match.group(2) or ""
    return name + targs.replace("c10::", "")


def parse_resource_usage(text: str) -> list[dict]:
    rows, arch, function = [], None, None
    for line in text.splitlines():
        m = ARCH.match(line)
        if m:
            arch = int(m.group(1))
            continue
        m = FUNCTION.match(line)
        if m:
            function = m.group(1)
            continue
        m = RESOURCE.search(line)
        if m and function:
            rows.append({"arch": arch, "function": function, "registers": int(m.group(1)),
                         "stack": int(m.group(2)), "shared": int(m.group(3)), "local": int(m.group(4))})
            function = None
    return rows


def parse_sass_local_ops(text: str) -> dict[tuple[int | None, str], dict]:
    """(arch, mangled function) -> {"STL": n, "LDL": n}."""
    counts: dict = {}
    arch, function = None, None
    for line in text.splitlines():
        m = ARCH.match(line)
        if m:
            arch, function = int(m.group(1)), None
            continue
        m = SASS_FUNCTION.match(line)
        if m:
            function = m.group(1)
            counts.setdefault((arch, function), {"STL": 0, "LDL": 0})
            continue
        if function is None:
            continue
        for op in LOCAL_OP.findall(line):
            counts[(arch, function)][op] += 1
    return counts


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit code {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--so", default=None, help="the library (default: eclip_kernels._C as imported here)")
    parser.add_argument("--json", default=None, help="write the rows and the verdict to this file")
    parser.add_argument("--arch", default="80,90", help="targets that must have code for the kernels (default 80,90)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"kernel name prefix (default {DEFAULT_PREFIX})")
    args = parser.parse_args(argv)

    tool = find_cuobjdump()
    if tool is None:
        print("cuda_resources: cuobjdump not found (PATH, CUDA_HOME/bin, /usr/local/cuda*/bin, triton's "
              "backends/nvidia/bin)", file=sys.stderr)
        return 2
    library = args.so or find_library()
    if library is None or not os.path.exists(library):
        print(f"cuda_resources: no built library ({library or 'eclip_kernels/_C*.so not found'})", file=sys.stderr)
        return 2

    try:
        usage = parse_resource_usage(run([tool, "--dump-resource-usage", library]))
        local_ops = parse_sass_local_ops(run([tool, "-sass", library]))
    except RuntimeError as exc:
        print(f"cuda_resources: {exc}", file=sys.stderr)
        return 2
    rows = [r for r in usage if args.prefix in r["function"]]
    names = demangle(sorted({r["function"] for r in rows}))
    problems = []
    for r in rows:
        ops = local_ops.get((r["arch"], r["function"]), {"STL": 0, "LDL": 0})
        r["spill_stores"], r["spill_loads"] = ops["STL"], ops["LDL"]
        r["kernel"] = short_name(names[r["function"]])
        if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["local"]:
            problems.append(f"sm_{r['arch']} {r['kernel']}: {r['spill_stores']} local stores, {r['spill_loads']} "
                            f"local loads, stack frame {r['stack']} bytes")
    rows.sort(key=lambda r: (r["arch"] or 0, r["kernel"]))
    wanted = [int(a) for a in args.arch.split(",") if a.strip()]
    present = sorted({r["arch"] for r in rows if r["arch"] is not None})
    for arch in wanted:
        if arch not in present:
            problems.append(f"no code for sm_{arch} among the {args.prefix}* kernels (targets present: "
                            f"{', '.join(f'sm_{a}' for a in present) or 'none'})")
    if not rows:
        problems.append(f"no kernel named *{args.prefix}* in {library} (built without its CUDA sources?)")

    print(f"CUDA kernels of {os.path.basename(library)} (cuobjdump: {tool})")
    print("| target | kernel | registers | stack bytes | shared bytes | spill stores (STL) | spill loads (LDL) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| sm_{r['arch']} | {r['kernel']} | {r['registers']} | {r['stack']} | {r['shared']} | "
              f"{r['spill_stores']} | {r['spill_loads']} |")
    verdict = "ok" if not problems else "failed"
    print(f"cuda_resources: {verdict}: {len(rows)} kernel images" + "".join(f"\n  {p}" for p in problems))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"library": library, "cuobjdump": tool, "prefix": args.prefix, "verdict": verdict,
                       "problems": problems, "kernels": rows}, f, indent=1)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

"""The one command that verifies eclip-kernels on a GPU machine, in one call, into one folder.

    bash scripts/gpu_check.sh --out DIR [--quick] [--stages env,build,tests,sanitizer,bench]

Stages, in this order; each has its own time limit, and a stage that fails, raises or runs out of time does
not stop the later ones:

  env        device name, compute capability, SM count, memory, driver (nvidia-smi), CUDA, torch, triton,
             numpy and Python versions, git commit (or a digest of the sources when there is no .git)
             -> env.json
  build      installs the carried wheels of .whl/ (if any) into a folder put on PYTHONPATH, builds the
             extension with its CUDA sources (FORCE_CUDA=1, `pip install --no-build-isolation --no-deps -e .`;
             `python setup.py build_ext --inplace` if that fails), prints available_backends() -> build.log
  tests      pytest of the Triton test files, the CUDA C++ slot-attention tests (tests/test_slot_attention_cuda.py,
             the experimental backend "cuda") and tests/test_gpu_large.py, then every other test marked `gpu`
             (junit XML parsed into results.json) -> tests.log
  sanitizer  compute-sanitizer memcheck and racecheck over bench/gpu_sanitize_cases.py (each Triton kernel
             and each slot-attention CUDA C++ kernel once forward+backward at small shapes); "unavailable"
             with the tool's message where the tool is missing or refuses the device -> sanitizer.log
  bench      bench/slot_attention_table.py at the SPEC GPU shapes (rows: eager reference, torch.compile of it,
             triton and cuda) and bench/contrastive_table.py --device cuda at B = 6400, 65536, 262144 (not
             with --quick), D = 512, bf16 -> bench.log

Everything lands in the output folder (--out; default $OUT when set, else bench/results/gpu-<date>), at
most 8 plain files, no deeper than two folders, simple names: env.json, build.log, tests.log, sanitizer.log,
bench.log, results.json (every stage's status and data) and summary.md (the table printed at the end).
results.json and summary.md are rewritten after every stage, so a call cut short keeps what finished.

The stages run in subprocesses of the interpreter given by --python (default: this one), so this file
imports nothing beyond the standard library and runs (for --help and the tests) without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

STAGES = ("env", "build", "tests", "sanitizer", "bench")
# Seconds per stage at most; the whole run is also held to --budget (the device call allows 8 minutes).
DEFAULT_TIMEOUTS = {"env": 40, "build": 150, "tests": 130, "sanitizer": 75, "bench": 190}
DEFAULT_BUDGET_S = 470
# A later stage keeps at least this much of the budget (or its own limit, when smaller).
RESERVE_S = 25
# Below this many seconds a stage is not started.
MIN_STAGE_S = 5

TEST_FILES = ("tests/test_slot_attention_triton.py", "tests/test_contrastive_triton.py", "tests/test_siglip_triton.py",
              "tests/test_slot_attention_cuda.py", "tests/test_gpu_large.py", "tests/test_properties_triton.py",
              "tests/test_nn_multihead.py")  # the last: MultiHeadSlotAttention on the Triton backend, on the GPU
GPU_MARKED_DIR = "tests"  # every other test marked `gpu` under it runs too
SLOT_SHAPES = ("eclip-b", "eclip-b-large-batch", "object-centric")
CLIP_BATCHES = (6400, 65536, 262144)
CLIP_BATCHES_QUICK = (6400, 65536)

# compute-sanitizer's words for "this runtime/device cannot be checked" (gVisor says "Device not supported").
SANITIZER_UNSUPPORTED = re.compile(
    r"device not supported|device is not supported|not supported on this (device|platform|system)|"
    r"unsupported (device|gpu|driver)|unable to (load|find) .*(injection|sanitizer)|"
    r"failed to (initialize|load) .*(sanitizer|injection)",
    re.IGNORECASE,
)


class OutputLimitError(RuntimeError):
    """A file would break the output folder's limits (count, depth, name)."""


class ResultWriter:
    """Writes the output folder and keeps it within what comes back from the GPU machine: at most
    ``max_files`` plain files, at most ``max_dirs`` folders down (``root/a/b/file``), every component made
    of letters, digits, '.', '_' and '-'. Files already in the folder count too."""

    NAME = re.compile(r"^[A-Za-z0-9._-]+$")

    def __init__(self, root: str, max_files: int = 8, max_dirs: int = 2):
        self.root = os.path.abspath(root)
        self.max_files, self.max_dirs = max_files, max_dirs
        os.makedirs(self.root, exist_ok=True)
        self._reserved: set[str] = set()

    def _existing(self) -> set[str]:
        found = set()
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                found.add(os.path.relpath(os.path.join(dirpath, name), self.root))
        return found

    def path(self, relpath: str) -> str:
        """Reserve ``relpath`` (``name`` or ``a/name`` or ``a/b/name``) and return its absolute path."""
        parts = relpath.replace(os.sep, "/").split("/")
        if any(p in ("", ".", "..") or not self.NAME.match(p) for p in parts):
            raise OutputLimitError(f"{relpath!r}: every part of an output path must be made of letters, digits, "
                                   "'.', '_' and '-'")
        if len(parts) - 1 > self.max_dirs:
            raise OutputLimitError(f"{relpath!r} is {len(parts) - 1} folders down; at most {self.max_dirs} come back")
        rel = os.path.join(*parts)
        taken = self._existing() | self._reserved
        if rel not in taken and len(taken) >= self.max_files:
            raise OutputLimitError(f"{relpath!r} would be file {len(taken) + 1} in {self.root}; at most "
                                   f"{self.max_files} come back (there: {', '.join(sorted(taken))})")
        self._reserved.add(rel)
        full = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def write_text(self, relpath: str, text: str) -> str:
        full = self.path(relpath)
        tmp = full + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, full)
        return full

    def write_json(self, relpath: str, obj) -> str:
        return self.write_text(relpath, json.dumps(obj, indent=1, default=str) + "\n")

    def problems(self) -> list[str]:
        """What in the folder breaks the limits (also what others put there)."""
        found = []
        files = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            depth = 0 if rel_dir == "." else len(rel_dir.split(os.sep))
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                if not self.NAME.match(name):
                    found.append(f"{rel}: name has characters other than letters, digits, '.', '_', '-'")
                if os.path.islink(full):
                    found.append(f"{rel}: a link (does not come back)")
                elif name in filenames and not os.path.isfile(full):
                    found.append(f"{rel}: not a plain file")
            for name in filenames:
                files += 1
                if depth > self.max_dirs:
                    found.append(f"{os.path.join(rel_dir, name)}: {depth} folders down (at most {self.max_dirs})")
        if files > self.max_files:
            found.append(f"{files} files (at most {self.max_files})")
        return found


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # passed | failed | timeout | unavailable | skipped | error | interrupted
    seconds: float = 0.0
    detail: str = ""
    timeout_s: float | None = None
    data: dict = dataclasses.field(default_factory=dict)


class Deadline:
    """Seconds left until a point in time (time.monotonic)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())


def run_command(cmd: list[str], log_path: str, timeout: float, env: dict | None = None, cwd: str = ROOT,
                title: str | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group with stdout and stderr appended to ``log_path``.

    Returns (exit code, seconds); the exit code is None when the command ran past ``timeout`` seconds, in
    which case its whole process group (children included) was terminated, then killed.
    """
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n$ {title or ' '.join(cmd)}\n")
        log.flush()
        if timeout <= 0:
            log.write("not started: no time left\n")
            return None, 0.0
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=cwd, start_new_session=True)
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            return 127, time.monotonic() - start
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.write(f"\n[gpu_check] stopped after {timeout:.0f} s (time limit)\n")
            return None, time.monotonic() - start
        except BaseException:
            _kill_group(proc)
            raise
        log.write(f"[gpu_check] exit code {code} after {time.monotonic() - start:.1f} s\n")
    return code, time.monotonic() - start


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the leader is gone; stragglers of the group get the same signal once more
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# --- environment --------------------------------------------------------------------------------------------

PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version(), "python_executable": sys.executable}
for name in ("torch", "triton", "numpy"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = None
        info[name + "_error"] = f"{type(exc).__name__}: {exc}"
try:
    import torch
    info["cuda_runtime"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["device_count"] = torch.cuda.device_count() if info["cuda_available"] else 0
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["device"] = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                          "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1)}
except Exception as exc:
    info["cuda_available"] = False
    info["cuda_error"] = f"{type(exc).__name__}: {exc}"
print("PROBE " + json.dumps(info))
"""


def _first_line_of(cmd: list[str], timeout: float = 20, last: bool = False) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    lines = [line.strip() for line in (done.stdout or done.stderr).splitlines() if line.strip()]
    if done.returncode != 0:
        return f"unavailable: exit code {done.returncode}: {lines[-1] if lines else ''}"
    return (lines[-1] if last else lines[0]) if lines else ""


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in the CUDA toolkit folders."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        for sub in ("bin", "compute-sanitizer"):
            candidate = os.path.join(root, sub, name) if root else ""
            if candidate and os.access(candidate, os.X_OK):
                return candidate
    return None


def source_digest(root: str = ROOT) -> str:
    """sha256 over the project's sources (to tell which tree ran where there is no .git)."""
    digest = hashlib.sha256()
    suffixes = (".py", ".cpp", ".cu", ".h", ".cuh", ".toml", ".sh", ".txt")
    for top in ("eclip_kernels", "csrc", "bench", "tests", "scripts", "setup.py", "pyproject.toml", "CMakeLists.txt"):
        path = os.path.join(root, top)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) if "__pycache__" not in d and "/results" not in d
            for f in fs if f.endswith(suffixes))
        for f in sorted(files):
            digest.update(os.path.relpath(f, root).encode() + b"\0")
            with open(f, "rb") as fh:
                digest.update(fh.read() + b"\0")
    return digest.hexdigest()[:16]


def git_commit(root: str = ROOT) -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=20)
            return {"commit": head.stdout.strip(), "modified_files": len(dirty.stdout.splitlines())}
        reason = head.stderr.strip().splitlines()[-1] if head.stderr.strip() else f"exit code {head.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    return {"commit": os.environ.get("ECLIP_GIT_COMMIT") or None, "reason": f"no git commit here ({reason})"}


# --- the run -----------------------------------------------------------------------------------------------


class Context:
    """What the stages share: arguments, the writer, the environment of the subprocesses, the results."""

    def __init__(self, args: argparse.Namespace, writer: ResultWriter):
        self.args, self.writer = args, writer
        self.python = args.python
        self.env = dict(os.environ)
        self.env.pop("TRITON_INTERPRET", None)  # the GPU runs the kernels, not the interpreter
        self.env["PYTHONUNBUFFERED"] = "1"
        self._add_pythonpath(ROOT)
        self.results: dict = {"started": _now(), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                              "quick": args.quick, "stages": []}
        self._probe: dict | None = None
        self.scratch = tempfile.mkdtemp(prefix="eclip-gpu-check-")

    def _add_pythonpath(self, path: str) -> None:
        parts = [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p and p != path]
        self.env["PYTHONPATH"] = os.pathsep.join([path] + parts)

    def probe(self) -> dict:
        """Versions and the GPU as the stages' interpreter sees them (run once)."""
        if self._probe is None:
            try:
                done = subprocess.run([self.python, "-c", PROBE], capture_output=True, text=True, timeout=60,
                                      env=self.env, cwd=ROOT)
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")), None)
                self._probe = json.loads(line[6:]) if line else {
                    "cuda_available": False, "probe_error": (done.stderr or done.stdout).strip()[-2000:]}
            except (OSError, subprocess.TimeoutExpired) as exc:
                self._probe = {"cuda_available": False, "probe_error": str(exc)}
        return self._probe

    def has_gpu(self) -> bool:
        return bool(self.probe().get("cuda_available"))

    def log(self, stage: str) -> str:
        return self.writer.path(f"{stage}.log")


def stage_env(ctx: Context, deadline: Deadline) -> StageResult:
    info = {"date": _now(), "host_cpus": os.cpu_count()}
    info.update(ctx.probe())
    smi = find_tool("nvidia-smi")
    if smi:
        info["nvidia_smi"] = _first_line_of(
            [smi, "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm", "--format=csv,noheader"],
            timeout=min(20, deadline.remaining()))
        info["driver"] = (info["nvidia_smi"].split(", ")[1]
                          if info["nvidia_smi"] and not info["nvidia_smi"].startswith("unavailable")
                          and info["nvidia_smi"].count(", ") >= 1 else None)
    else:
        info["nvidia_smi"], info["driver"] = "unavailable: nvidia-smi not found", None
    for tool in ("nvcc", "compute-sanitizer", "ncu"):
        path = find_tool(tool)
        info[tool] = ({"path": path, "version": _first_line_of([path, "--version"], timeout=20, last=True)}
                      if path else "not found")
    info["git"] = git_commit()
    info["source_digest"] = source_digest()
    ctx.writer.write_json("env.json", info)
    device = info.get("device") or {}
    detail = (f"{device.get('name')} (sm {device.get('compute_capability')}, {device.get('sm_count')} SMs), "
              if device else "no CUDA GPU visible, ")
    detail += f"torch {info.get('torch')}, triton {info.get('triton')}, CUDA {info.get('cuda_runtime')}"
    status = "passed" if info.get("torch") else "failed"
    if not info.get("torch"):
        detail = f"torch does not import with {ctx.python}: {info.get('torch_error') or info.get('probe_error')}"
    return StageResult("env", status, detail=detail, data=info)


def stage_build(ctx: Context, deadline: Deadline) -> StageResult:
    log = ctx.log("build")
    data: dict = {}
    wheels = sorted(glob.glob(os.path.join(ctx.args.wheels, "*.whl")))
    if wheels:
        site = ctx.args.site or os.path.join(ctx.scratch, "site")
        code, secs = run_command([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                  "--no-cache-dir", "--upgrade", "--target", site] + wheels,
                                 log, min(60, deadline.remaining()), env=ctx.env,
                                 title=f"pip install --target {site} ({len(wheels)} wheels of {ctx.args.wheels})")
        data["wheels"] = {"count": len(wheels), "site": site, "ok": code == 0,
                          "names": [os.path.basename(w) for w in wheels]}
        if code == 0:
            ctx._add_pythonpath(site)
            ctx._add_pythonpath(ROOT)
    else:
        data["wheels"] = {"count": 0, "note": f"no wheels in {ctx.args.wheels} (scripts/gpu_wheels.sh makes them)"}

    env = dict(ctx.env, FORCE_CUDA="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cc = (ctx.probe().get("device") or {}).get("compute_capability")
    if "TORCH_CUDA_ARCH_LIST" not in env and cc:
        env["TORCH_CUDA_ARCH_LIST"] = cc
    data["arch_list"] = env.get("TORCH_CUDA_ARCH_LIST")
    code, secs = run_command([ctx.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                             log, deadline.remaining(), env=env)
    data["build"] = {"command": "pip install --no-build-isolation --no-deps -e .", "exit_code": code,
                     "seconds": round(secs, 1)}
    if code is not None and code != 0 and deadline.remaining() > MIN_STAGE_S:
        code, secs = run_command([ctx.python, "setup.py", "build_ext", "--inplace"], log, deadline.remaining(),
                                 env=env)
        data["build_fallback"] = {"command": "python setup.py build_ext --inplace", "exit_code": code,
                                  "seconds": round(secs, 1)}
    if code is None:
        return StageResult("build", "timeout", detail="the extension build ran out of time", data=data)

    backends_code = (
        "import json, eclip_kernels as ek, eclip_kernels._extension as e\n"
        "s = ek.available_backends()\n"
        "[print(f'{n:10s} built={b.built!s:5s} usable={b.usable!s:5s} {b.reason}') for n, b in s.items()]\n"
        "print('BACKENDS ' + json.dumps({'extension_loaded': e.is_loaded(), 'load_error': e.LOAD_ERROR,\n"
        "    'cuda_sources_built': e.cuda_sources_built(),\n"
        "    'backends': {n: {'built': b.built, 'usable': b.usable, 'reason': b.reason} for n, b in s.items()}}))\n"
    )
    out_path = os.path.join(ctx.scratch, "backends.txt")
    bcode, _ = run_command([ctx.python, "-c", backends_code], out_path, min(60, deadline.remaining()), env=ctx.env,
                           title="python -c 'print(eclip_kernels.available_backends())'")
    text = tail(out_path, 40)
    with open(log, "a") as f:
        f.write(text)
    line = next((ln for ln in text.splitlines() if ln.startswith("BACKENDS ")), None)
    if line:
        data.update(json.loads(line[len("BACKENDS "):]))
    print(_indent("\n".join(ln for ln in text.splitlines() if not ln.startswith(("BACKENDS ", "$ ", "[gpu_check]")))))
    if code != 0:
        return StageResult("build", "failed", detail=f"the extension build failed (exit code {code}); see build.log",
                           data=data)
    if not data.get("extension_loaded"):
        return StageResult("build", "failed", detail=f"built, but eclip_kernels._C does not load: "
                           f"{data.get('load_error') or 'see build.log'}", data=data)
    if not data.get("cuda_sources_built"):
        return StageResult("build", "failed", detail="eclip_kernels._C was built without its CUDA sources", data=data)
    usable = [n for n, b in data.get("backends", {}).items() if b["usable"]]
    return StageResult("build", "passed", detail=f"extension with CUDA sources; usable backends: {', '.join(usable)}",
                       data=data)


def parse_junit(path: str) -> dict:
    """Counts, failing tests (with the first line of their message) and skip reasons of a junit XML file."""
    summary = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        summary["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            summary["passed"] += 1
            continue
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        first = message[0][:300] if message else ""
        if outcome.tag == "skipped":
            summary["skipped"] += 1
            summary["skip_reasons"][first] = summary["skip_reasons"].get(first, 0) + 1
        else:
            summary["failed" if outcome.tag == "failure" else "errors"] += 1
            summary["failures"].append(f"{name}: {first}")
    return summary


def _merge_counts(parts: list[dict]) -> dict:
    total = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for p in parts:
        for key in ("tests", "passed", "failed", "errors", "skipped"):
            total[key] += p[key]
        total["failures"] += p["failures"]
        for reason, n in p["skip_reasons"].items():
            total["skip_reasons"][reason] = total["skip_reasons"].get(reason, 0) + n
    return total


def stage_tests(ctx: Context, deadline: Deadline) -> StageResult:
    if not ctx.has_gpu():
        return StageResult("tests", "unavailable", detail="no CUDA GPU visible to torch: the GPU tests need one")
    log = ctx.log("tests")
    runs = [("triton+large", list(TEST_FILES)),
            ("other gpu-marked", ["-m", "gpu", GPU_MARKED_DIR] + [f"--ignore={f}" for f in TEST_FILES])]
    parts, codes, timed_out = [], {}, False
    for label, selection in runs:
        xml = os.path.join(ctx.scratch, f"junit-{len(parts)}.xml")
        code, _ = run_command([ctx.python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                               f"--junitxml={xml}"] + selection, log, deadline.remaining(), env=ctx.env)
        codes[label] = code
        timed_out |= code is None
        if os.path.exists(xml):
            try:
                parts.append(parse_junit(xml))
            except ET.ParseError as exc:
                codes[label + " (junit unreadable)"] = str(exc)
    counts = _merge_counts(parts)
    data = dict(counts, exit_codes=codes)
    detail = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
              f"{counts['skipped']} skipped")
    if timed_out:
        return StageResult("tests", "timeout", detail=detail + " (ran out of time)", data=data)
    first_code = codes["triton+large"]
    # exit code 5 = nothing collected: fine for the gpu-marked extras, a failure for the main files
    bad = first_code != 0 or codes["other gpu-marked"] not in (0, 5) or counts["failed"] or counts["errors"]
    if not bad and counts["passed"] == 0:
        return StageResult("tests", "failed", detail=detail + ": nothing ran on the GPU", data=data)
    return StageResult("tests", "failed" if bad else "passed", detail=detail, data=data)


def parse_sanitizer(text: str, tool: str) -> dict:
    """Error count and the unsupported-device message (if any) from compute-sanitizer's output."""
    found: dict = {"errors": None, "unsupported": None}
    match = re.search(r"ERROR SUMMARY:\s*(\d+)\s+error", text)
    if match:
        found["errors"] = int(match.group(1))
    race = re.search(r"RACECHECK SUMMARY:\s*(\d+)\s+hazards? displayed\s*\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)",
                     text)
    if race:
        found["hazards"], found["warnings"] = int(race.group(1)), int(race.group(3))
        found["errors"] = max(found["errors"] or 0, int(race.group(2)))
    for line in text.splitlines():
        if SANITIZER_UNSUPPORTED.search(line):
            found["unsupported"] = line.strip().lstrip("=").strip()[:300]
            break
    found["cases_done"] = "sanitize cases: all done" in text
    return found


def stage_sanitizer(ctx: Context, deadline: Deadline) -> StageResult:
    tool = find_tool("compute-sanitizer")
    if tool is None:
        return StageResult("sanitizer", "unavailable", detail="compute-sanitizer not found (PATH, CUDA_HOME/bin, "
                           "/usr/local/cuda*/bin)", data={"tools": {}})
    if not ctx.has_gpu():
        return StageResult("sanitizer", "unavailable", detail="no CUDA GPU visible to torch", data={"tools": {}})
    log = ctx.log("sanitizer")
    env = dict(ctx.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # exact allocations: memcheck sees every overrun
    driver = [ctx.python, os.path.join(HERE, "gpu_sanitize_cases.py")] + (["--quick"] if ctx.args.quick else [])
    tools, share = {}, {"memcheck": 0.55, "racecheck": 1.0}
    for name in ("memcheck", "racecheck"):
        part = os.path.join(ctx.scratch, f"sanitizer-{name}.log")
        code, secs = run_command([tool, "--tool", name, "--error-exitcode", "86", "--print-limit", "20"] + driver,
                                 part, deadline.remaining() * share[name], env=env)
        text = open(part, errors="replace").read() if os.path.exists(part) else ""
        with open(log, "a") as f:
            f.write(text[-200_000:])
        found = parse_sanitizer(text, name)
        found.update(exit_code=code, seconds=round(secs, 1))
        if found["unsupported"] and not found["cases_done"]:
            found["status"] = "unavailable"
            found["detail"] = found["unsupported"]
        elif code is None:
            found["status"], found["detail"] = "timeout", "ran out of time"
        elif code == 0 and found["cases_done"] and not found["errors"]:
            found["status"], found["detail"] = "passed", "0 errors"
        else:
            found["status"] = "failed"
            found["detail"] = (f"{found['errors']} errors" if found["errors"] else
                               f"exit code {code}" + ("" if found["cases_done"] else ", the cases did not finish"))
        tools[name] = found
    statuses = {t["status"] for t in tools.values()}
    status = ("failed" if "failed" in statuses else "timeout" if "timeout" in statuses
              else "unavailable" if statuses == {"unavailable"} else "passed" if statuses == {"passed"} else "failed")
    detail = "; ".join(f"{n}: {t['detail']}" for n, t in tools.items())
    return StageResult("sanitizer", status, detail=detail, data={"tools": tools, "path": tool})


def stage_bench(ctx: Context, deadline: Deadline) -> StageResult:
    if not ctx.has_gpu():
        return StageResult("bench", "unavailable", detail="no CUDA GPU visible to torch")
    log = ctx.log("bench")
    quick = ctx.args.quick
    slot_json = os.path.join(ctx.scratch, "slot_attention.json")
    clip_json = os.path.join(ctx.scratch, "clip_loss.json")
    slot_cmd = [ctx.python, os.path.join(HERE, "slot_attention_table.py"), "--shapes", *SLOT_SHAPES,
                "--out", slot_json] + (["--repeats", "3", "--iters", "5", "--variants", "reference", "triton", "cuda"]
                                       if quick else ["--repeats", "5", "--iters", "10"])
    batches = CLIP_BATCHES_QUICK if quick else CLIP_BATCHES
    clip_cmd = [ctx.python, os.path.join(HERE, "contrastive_table.py"), "--device", "cuda", "--dtype", "bfloat16",
                "--dim", "512", "--batch", *map(str, batches), "--max-call-s", "3" if quick else "5",
                "--out", clip_json]
    data: dict = {}
    codes = {}
    # the slot-attention table gets half of what is left (torch.compile takes most of it), the contrastive
    # one the rest; both write their JSON as they go, so a table cut short keeps what it finished
    codes["slot_attention"], _ = run_command(slot_cmd, log, deadline.remaining() * 0.5, env=ctx.env)
    codes["clip_loss"], _ = run_command(clip_cmd, log, deadline.remaining(), env=ctx.env)
    for key, path in (("slot_attention", slot_json), ("clip_loss", clip_json)):
        try:
            with open(path) as f:
                data[key] = json.load(f)
        except (OSError, ValueError) as exc:
            data[key] = {"error": f"no results ({exc})"}
    data["exit_codes"] = codes
    timeouts = [k for k, c in codes.items() if c is None]
    failed = [k for k, c in codes.items() if c not in (0, None)]
    parts = []
    for key in ("slot_attention", "clip_loss"):
        rows = data[key].get("results", []) if isinstance(data[key], dict) else []
        measured = [r for r in rows if r.get("median_ms") is not None]
        parts.append(f"{key}: {len(measured)} measured" + (", timed out" if key in timeouts else "")
                     + (f", exit code {codes[key]}" if key in failed else ""))
    status = "failed" if failed else "timeout" if timeouts else "passed"
    return StageResult("bench", status, detail="; ".join(parts), data=data)


STAGE_FUNCTIONS = {"env": stage_env, "build": stage_build, "tests": stage_tests, "sanitizer": stage_sanitizer,
                   "bench": stage_bench}


def stage_timeout(name: str, selected: list[str], timeouts: dict, remaining: float) -> float:
    """A stage's limit: its own, and no more than the budget left after the later selected stages' reserve."""
    later = selected[selected.index(name) + 1:]
    reserve = sum(min(RESERVE_S, timeouts[s]) for s in later)
    return max(0.0, min(timeouts[name], remaining - reserve))


def run_stages(ctx: Context, selected: list[str], timeouts: dict, budget: float) -> list[StageResult]:
    overall = Deadline(budget)
    results = []
    for name in selected:
        limit = stage_timeout(name, selected, timeouts, overall.remaining())
        if limit < MIN_STAGE_S:
            result = StageResult(name, "skipped", detail=f"not started: {overall.remaining():.0f} s of the "
                                 f"{budget:.0f} s budget left", timeout_s=round(limit, 1))
        else:
            print(f"== {name} (at most {limit:.0f} s)", flush=True)
            start = time.monotonic()
            try:
                result = STAGE_FUNCTIONS[name](ctx, Deadline(limit))
            except KeyboardInterrupt:
                result = StageResult(name, "interrupted", detail="interrupted (signal)")
            except Exception as exc:  # a broken stage must not stop the others
                import traceback

                result = StageResult(name, "error", detail=f"{type(exc).__name__}: {exc}")
                try:
                    with open(ctx.log(name), "a") as f:
                        f.write(traceback.format_exc())
                except OutputLimitError:
                    pass
            result.seconds = round(time.monotonic() - start, 1)
            result.timeout_s = round(limit, 1)
            print(f"   {name}: {result.status} in {result.seconds:.0f} s: {result.detail}", flush=True)
            if result.status in ("failed", "error", "timeout"):
                log_path = os.path.join(ctx.writer.root, f"{name}.log")
                if os.path.exists(log_path):
                    print(_indent(tail(log_path, 12)), flush=True)
        results.append(result)
        ctx.results["stages"] = [_stage_record(r) for r in results]
        ctx.results[name] = result.data
        write_reports(ctx)
        if result.status == "interrupted":
            break
    return results


def _stage_record(r: StageResult) -> dict:
    return {"name": r.name, "status": r.status, "seconds": r.seconds, "timeout_s": r.timeout_s, "detail": r.detail}


def write_reports(ctx: Context) -> str:
    ctx.results["finished"] = _now()
    ctx.writer.write_json("results.json", ctx.results)
    text = summary_table(ctx.results)
    ctx.writer.write_text("summary.md", text)
    return text


def summary_table(results: dict) -> str:
    """The Markdown summary: stages, failing tests, sanitizer, benchmark medians."""
    env = results.get("env") or {}
    device = env.get("device") or {}
    lines = ["# eclip-kernels GPU check", ""]
    if env:
        git = env.get("git") or {}
        lines.append(f"{device.get('name', 'no GPU')} (sm {device.get('compute_capability', '-')}, "
                     f"{device.get('sm_count', '-')} SMs), driver {env.get('driver') or '-'}, CUDA "
                     f"{env.get('cuda_runtime')}, torch {env.get('torch')}, triton {env.get('triton')}, numpy "
                     f"{env.get('numpy')}, Python {env.get('python')}; commit {(git.get('commit') or '-')[:12]}, "
                     f"sources {env.get('source_digest')}")
        lines.append("")
    lines += ["| stage | status | seconds | detail |", "|---|---|---:|---|"]
    for s in results.get("stages", []):
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {_cell(s['detail'])} |")
    tests = results.get("tests") or {}
    if tests.get("failures"):
        lines += ["", "Failing tests:"] + [f"- {_cell(f)}" for f in tests["failures"][:15]]
        if len(tests["failures"]) > 15:
            lines.append(f"- ... and {len(tests['failures']) - 15} more (results.json)")
    if tests.get("skip_reasons"):
        lines += ["", "Skipped tests:"] + [f"- {n} x {_cell(r)}" for r, n in list(tests["skip_reasons"].items())[:6]]
    bench = results.get("bench") or {}
    slot = (bench.get("slot_attention") or {}).get("results") or []
    rows = [r for r in slot if r.get("mode") == "forward+backward"]
    if rows:
        lines += ["", "Slot attention, forward+backward with entropy (median ms; peak MiB over the inputs):", "",
                  "| shape | variant | ms | peak MiB | vs eager |", "|---|---|---:|---:|---:|"]
        for r in rows:
            if r.get("median_ms") is None:
                lines.append(f"| {r['shape']} | {r['variant']} | - | - | {_cell(r.get('error', ''))[:80]} |")
            else:
                peak = r.get("peak_mib")
                lines.append(f"| {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | "
                             f"{'-' if peak is None else f'{peak:.0f}'} | {r.get('speedup_vs_eager', 0):.2f}x |")
    clip = (bench.get("clip_loss") or {}).get("results") or []
    if clip:
        lines += ["", "clip_loss forward+backward, D=512 bf16 (median ms; peak MiB over the features):", "",
                  "| B | variant | ms | peak MiB | loss | note |", "|---:|---|---:|---:|---:|---|"]
        for r in clip:
            ms = r.get("median_ms")
            peak = r.get("peak_growth_mib")
            loss = r.get("loss")
            lines.append(f"| {r.get('batch')} | {r.get('variant')} | {'-' if ms is None else f'{ms:.2f}'} | "
                         f"{'-' if peak is None else f'{peak:.0f}'} | {'-' if loss is None else f'{loss:.5f}'} | "
                         f"{_cell(r.get('skipped') or r.get('error') or '')[:90]} |")
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _indent(text: str) -> str:
    return "\n".join("   | " + line for line in text.rstrip().splitlines())


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results/gpu-<date>)")
    parser.add_argument("--quick", action="store_true",
                        help="shorter benchmarks (no B=262144, no torch.compile variant, fewer repeats) and sanitizer")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (run in that order; 'all' = every one)")
    parser.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                        help="a stage's time limit (repeatable); defaults: "
                        + ", ".join(f"{k}={v}" for k, v in DEFAULT_TIMEOUTS.items()))
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the stages (default: this one)")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                        help="folder of carried wheels installed before the build (default .whl)")
    parser.add_argument("--site", default=None, help="where the carried wheels are installed (default: a temp dir)")
    parser.add_argument("--digest", action="store_true", help="print the digest of the sources and exit")
    args = parser.parse_args(argv)

    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    if names == ["all"]:
        names = list(STAGES)
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        parser.error(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(STAGES)}")
    args.stage_list = [s for s in STAGES if s in names]
    args.timeouts = dict(DEFAULT_TIMEOUTS)
    for item in args.timeout:
        name, sep, value = item.partition("=")
        if not sep or name not in STAGES:
            parser.error(f"--timeout {item!r}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        try:
            args.timeouts[name] = float(value)
        except ValueError:
            parser.error(f"--timeout {item!r}: {value!r} is not a number of seconds")
        if args.timeouts[name] <= 0:
            parser.error(f"--timeout {item!r}: must be positive")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    if args.out is None:
        args.out = os.environ.get("OUT") or os.path.join(HERE, "results", f"gpu-{datetime.date.today().isoformat()}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    try:
        writer = ResultWriter(args.out)
    except OSError as exc:
        print(f"gpu_check: cannot use {args.out} as the output folder: {exc}", file=sys.stderr)
        return 2
    ctx = Context(args, writer)
    print(f"gpu_check: stages {','.join(args.stage_list)}, budget {args.budget:.0f} s, output {writer.root}", flush=True)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        results = run_stages(ctx, args.stage_list, args.timeouts, args.budget)
    finally:
        shutil.rmtree(ctx.scratch, ignore_errors=True)
    text = write_reports(ctx)
    problems = writer.problems()
    print("\n" + text)
    if problems:
        print("output folder problems: " + "; ".join(problems))
    print(f"wrote {writer.root}: {', '.join(sorted(os.listdir(writer.root)))}")
    bad = [r for r in results if r.status in ("failed", "error", "timeout", "interrupted")]
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())

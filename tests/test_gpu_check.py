"""The GPU check script (scripts/gpu_check.sh, bench/gpu_check.py) without a GPU: arguments, the output
folder's limits, stage isolation, time limits, the environment record, the summary, the sanitizer stage's
"unavailable" paths, and the GPU benchmark code emulated on CPU tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check as gc  # noqa: E402


def _ctx(tmp_path, argv=(), gpu=False):
    args = gc.parse_args(["--out", str(tmp_path / "out"), *argv])
    ctx = gc.Context(args, gc.ResultWriter(args.out))
    ctx._probe = {"cuda_available": gpu, "torch": "x", **({"device": {"compute_capability": "9.0"}} if gpu else {})}
    return ctx


# --- arguments ------------------------------------------------------------------------------------------------


def test_shell_entry_help():
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--help"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert done.returncode == 0, done.stderr
    for word in ("--out", "--quick", "--stages", "env.json", "summary.md", "compute-sanitizer"):
        assert word in done.stdout


def test_parse_args_defaults_and_order(monkeypatch):
    monkeypatch.setenv("OUT", "/somewhere/out")
    args = gc.parse_args([])
    assert args.stage_list == list(gc.STAGES) and args.out == "/somewhere/out" and not args.quick
    monkeypatch.delenv("OUT")
    args = gc.parse_args(["--stages", "bench,env", "--quick", "--timeout", "bench=12.5"])
    assert args.stage_list == ["env", "bench"]  # always in pipeline order
    assert args.timeouts["bench"] == 12.5 and args.timeouts["build"] == gc.DEFAULT_TIMEOUTS["build"]
    assert os.path.basename(args.out).startswith("gpu-") and os.path.dirname(args.out).endswith(os.path.join("bench", "results"))
    assert gc.parse_args(["--stages", "all"]).stage_list == list(gc.STAGES)


@pytest.mark.parametrize("argv, message", [
    (["--stages", "env,compile"], "unknown stage(s) compile"),
    (["--stages", ","], "none given"),
    (["--timeout", "tests"], "expected STAGE=SECONDS"),
    (["--timeout", "lint=3"], "expected STAGE=SECONDS"),
    (["--timeout", "tests=soon"], "not a number"),
    (["--timeout", "tests=0"], "must be positive"),
    (["--budget", "-1"], "--budget must be positive"),
])
def test_parse_args_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


# --- the output folder ----------------------------------------------------------------------------------------


def test_writer_limits(tmp_path):
    writer = gc.ResultWriter(str(tmp_path / "out"), max_files=3)
    writer.write_text("a.log", "x")
    writer.write_json("sub/deeper/results.json", {"k": 1})  # two folders down: allowed
    writer.write_text("a.log", "again")  # rewriting a file does not take another place
    for bad in ("a/b/c/file.txt", "../escape.txt", "name with space.txt", "x/./y", "ü.json", ""):
        with pytest.raises(gc.OutputLimitError):
            writer.path(bad)
    writer.path("third.txt")
    with pytest.raises(gc.OutputLimitError, match="at most 3 come back"):
        writer.path("fourth.txt")
    assert json.loads((tmp_path / "out" / "sub" / "deeper" / "results.json").read_text()) == {"k": 1}
    assert (tmp_path / "out" / "a.log").read_text() == "again"


def test_writer_counts_files_already_there(tmp_path):
    (tmp_path / "out").mkdir()
    for i in range(8):
        (tmp_path / "out" / f"old{i}.txt").write_text("")
    writer = gc.ResultWriter(str(tmp_path / "out"))
    writer.write_text("old3.txt", "rewritten")
    with pytest.raises(gc.OutputLimitError):
        writer.write_text("new.txt", "")


def test_writer_problems(tmp_path):
    root = tmp_path / "out"
    writer = gc.ResultWriter(str(root), max_files=2)
    assert writer.problems() == []
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_text("")
    (root / "bad name.txt").write_text("")
    (root / "link").symlink_to(root / "bad name.txt")
    found = " | ".join(writer.problems())
    assert "3 folders down" in found and "bad name.txt: name" in found and "link: a link" in found
    assert "3 files (at most 2)" in found


# --- running stages -------------------------------------------------------------------------------------------


def test_run_command_timeout_kills_the_whole_group(tmp_path):
    pidfile, log = tmp_path / "pid", tmp_path / "log"
    start = time.monotonic()
    code, secs = gc.run_command(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], str(log), timeout=1.5)
    assert code is None and secs < 15 and time.monotonic() - start < 15
    child = int(pidfile.read_text())
    time.sleep(0.2)
    status = f"/proc/{child}/status"
    if os.path.exists(status):  # a zombie waiting for its reaper is dead too
        assert "\nState:\tZ" in open(status).read()
    assert "stopped after" in log.read_text()


def test_run_command_exit_code_and_log(tmp_path):
    log = tmp_path / "log"
    code, _ = gc.run_command(["bash", "-c", "echo out; echo err >&2; exit 3"], str(log), timeout=30)
    text = log.read_text()
    assert code == 3 and "out" in text and "err" in text and "exit code 3" in text
    assert gc.run_command(["/nonexistent/tool"], str(log), timeout=30)[0] == 127


def test_stage_timeout_keeps_a_reserve_for_later_stages():
    timeouts = dict(gc.DEFAULT_TIMEOUTS)
    selected = list(gc.STAGES)
    assert gc.stage_timeout("build", selected, timeouts, 1000) == timeouts["build"]
    later = sum(min(gc.RESERVE_S, timeouts[s]) for s in ("tests", "sanitizer", "bench"))
    assert gc.stage_timeout("build", selected, timeouts, 100) == pytest.approx(100 - later)
    assert gc.stage_timeout("bench", selected, timeouts, 100) == 100  # the last stage gets what is left
    assert gc.stage_timeout("tests", selected, timeouts, 10) == 0


def test_a_failing_stage_does_not_stop_the_later_ones(tmp_path, monkeypatch, capsys):
    ran = []

    def raises(ctx, deadline):
        ran.append("env")
        raise RuntimeError("probe exploded")

    def fails(ctx, deadline):
        ran.append("build")
        return gc.StageResult("build", "failed", detail="compile error")

    def too_slow(ctx, deadline):
        ran.append("tests")
        code, _ = gc.run_command(["sleep", "60"], ctx.log("tests"), deadline.remaining())
        return gc.StageResult("tests", "timeout" if code is None else "passed", detail="slept")

    def passes(name):
        def stage(ctx, deadline):
            ran.append(name)
            return gc.StageResult(name, "passed", detail="fine", data={"seen": True})
        return stage

    monkeypatch.setattr(gc, "STAGE_FUNCTIONS", {"env": raises, "build": fails, "tests": too_slow,
                                                "sanitizer": passes("sanitizer"), "bench": passes("bench")})
    monkeypatch.setattr(gc, "MIN_STAGE_S", 0.5)
    out = tmp_path / "out"
    code = gc.main(["--out", str(out), "--timeout", "tests=1"])
    assert code == 1 and ran == list(gc.STAGES)
    results = json.loads((out / "results.json").read_text())
    assert [(s["name"], s["status"]) for s in results["stages"]] == [
        ("env", "error"), ("build", "failed"), ("tests", "timeout"), ("sanitizer", "passed"), ("bench", "passed")]
    assert results["stages"][2]["seconds"] < 15 and results["bench"] == {"seen": True}
    assert "probe exploded" in (out / "env.log").read_text()  # the traceback goes to the stage's log
    summary = (out / "summary.md").read_text()
    assert "| env | error |" in summary and "| bench | passed |" in summary
    assert summary in capsys.readouterr().out  # printed at the end
    assert len(os.listdir(out)) <= 8 and gc.ResultWriter(str(out)).problems() == []


def test_budget_exhausted_skips_the_remaining_stages(tmp_path, monkeypatch):
    def slow(ctx, deadline):
        time.sleep(1.0)
        return gc.StageResult("env", "passed")

    calls = []
    monkeypatch.setattr(gc, "STAGE_FUNCTIONS", {"env": slow, **{s: lambda c, d, s=s: calls.append(s) or
                                                                 gc.StageResult(s, "passed") for s in gc.STAGES[1:]}})
    monkeypatch.setattr(gc, "RESERVE_S", 0)
    monkeypatch.setattr(gc, "MIN_STAGE_S", 2.5)
    code = gc.main(["--out", str(tmp_path / "out"), "--budget", "3", "--stages", "env,build"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert calls == [] and results["stages"][1]["status"] == "skipped" and code == 0


# --- stages without a GPU -------------------------------------------------------------------------------------


def test_environment_record_without_a_gpu(tmp_path):
    args = gc.parse_args(["--out", str(tmp_path / "out"), "--stages", "env"])
    ctx = gc.Context(args, gc.ResultWriter(args.out))
    result = gc.stage_env(ctx, gc.Deadline(60))
    info = json.loads((tmp_path / "out" / "env.json").read_text())
    import torch

    assert result.status == "passed" and info["torch"] == torch.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["cuda_available"] is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "device" not in info and "no CUDA GPU visible" in result.detail
    for key in ("numpy", "triton", "nvidia_smi", "driver", "nvcc", "compute-sanitizer", "git", "source_digest"):
        assert key in info
    assert len(info["source_digest"]) == 16 and (info["git"]["commit"] or info["git"]["reason"])


def test_environment_record_with_a_broken_interpreter(tmp_path):
    ctx = _ctx(tmp_path)
    ctx._probe = None
    ctx.python = "/nonexistent/python3"
    result = gc.stage_env(ctx, gc.Deadline(30))
    assert result.status == "failed" and "torch does not import" in result.detail


@pytest.mark.parametrize("stage", [gc.stage_tests, gc.stage_bench])
def test_gpu_stages_are_unavailable_without_a_gpu(tmp_path, stage):
    result = stage(_ctx(tmp_path), gc.Deadline(30))
    assert result.status == "unavailable" and "no CUDA GPU" in result.detail


def test_sanitizer_unavailable_when_the_tool_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "find_tool", lambda name: None)
    result = gc.stage_sanitizer(_ctx(tmp_path, gpu=True), gc.Deadline(30))
    assert result.status == "unavailable" and "compute-sanitizer not found" in result.detail


def _fake_sanitizer(tmp_path, body):
    tool = tmp_path / "compute-sanitizer"
    tool.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    tool.chmod(0o755)
    return str(tool)


@pytest.mark.parametrize("body, status, detail", [
    # what gVisor answers
    ('echo "========= Device not supported"; echo "CUDA error 999"; exit 1\n', "unavailable", "Device not supported"),
    ('echo "sanitize cases: all done"; echo "========= ERROR SUMMARY: 0 errors"\n', "passed", "0 errors"),
    ('echo "sanitize cases: all done"; echo "========= ERROR SUMMARY: 3 errors"; exit 86\n', "failed", "3 errors"),
    ('echo "case x: FAILED"; exit 1\n', "failed", "did not finish"),
])
def test_sanitizer_outcomes(tmp_path, monkeypatch, body, status, detail):
    tool = _fake_sanitizer(tmp_path, body)
    monkeypatch.setattr(gc, "find_tool", lambda name: tool if name == "compute-sanitizer" else None)
    result = gc.stage_sanitizer(_ctx(tmp_path, gpu=True), gc.Deadline(30))
    assert result.status == status and detail in result.detail
    assert set(result.data["tools"]) == {"memcheck", "racecheck"}
    log = (tmp_path / "out" / "sanitizer.log").read_text()
    assert "--tool memcheck" in log and "--tool racecheck" in log and body.split('"')[1] in log


def test_parse_sanitizer_racecheck_summary():
    text = "sanitize cases: all done\n========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    found = gc.parse_sanitizer(text, "racecheck")
    assert found["errors"] == 1 and found["hazards"] == 2 and found["cases_done"] and found["unsupported"] is None


def test_tests_stage_parses_junit(tmp_path, monkeypatch):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_main.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert 1 == 2, "one is not two"
        @pytest.mark.skip(reason="no cuda backend yet")
        def test_skipped(): pass
    """))
    monkeypatch.setattr(gc, "TEST_FILES", (str(suite / "test_main.py"),))
    monkeypatch.setattr(gc, "GPU_MARKED_DIR", str(suite))
    ctx = _ctx(tmp_path, gpu=True)
    result = gc.stage_tests(ctx, gc.Deadline(60))
    assert result.status == "failed"
    assert (result.data["passed"], result.data["failed"], result.data["skipped"]) == (1, 1, 1)
    assert any("test_bad" in f and "one is not two" in f for f in result.data["failures"])
    assert result.data["skip_reasons"] == {"no cuda backend yet": 1}
    assert result.data["exit_codes"]["other gpu-marked"] == 5  # nothing else marked gpu there: fine
    assert "test_bad" in (tmp_path / "out" / "tests.log").read_text()


def test_bench_stage_merges_the_tables(tmp_path, monkeypatch):
    def fake_run(cmd, log, timeout, env=None, cwd=None, title=None):
        out = cmd[cmd.index("--out") + 1]
        assert timeout > 0
        if "slot_attention_table.py" in cmd[1]:
            rows = [{"shape": "eclip-b", "mode": "forward+backward", "variant": "triton", "median_ms": 1.5,
                     "peak_mib": 12.0, "speedup_vs_eager": 3.0},
                    {"shape": "eclip-b", "mode": "forward+backward", "variant": "cuda", "median_ms": None,
                     "error": "RuntimeError: no kernel"}]
            code = 0
        else:
            assert "262144" not in cmd  # --quick
            rows = [{"batch": 6400, "variant": "triton", "median_ms": 2.0, "peak_growth_mib": 30.0, "loss": 8.1},
                    {"batch": 65536, "variant": "open_clip", "skipped": "its B x B logits need 56 GiB"}]
            code = None  # ran out of time after these rows
        with open(out, "w") as f:
            json.dump({"results": rows}, f)
        return code, 1.0

    monkeypatch.setattr(gc, "run_command", fake_run)
    ctx = _ctx(tmp_path, ["--quick"], gpu=True)
    result = gc.stage_bench(ctx, gc.Deadline(100))
    assert result.status == "timeout" and "slot_attention: 1 measured" in result.detail
    assert "clip_loss: 1 measured, timed out" in result.detail
    ctx.results["bench"] = result.data
    table = gc.summary_table(ctx.results)
    assert "| eclip-b | triton | 1.500 | 12 | 3.00x |" in table and "RuntimeError: no kernel" in table
    assert "| 6400 | triton | 2.00 | 30 | 8.10000 |" in table and "56 GiB" in table


def test_parse_junit_and_summary(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_fail"><failure message="assert 1 == 2&#10;more">tb</failure></testcase>
      <testcase classname="tests.test_a" name="test_err"><error message="fixture broke">tb</error></testcase>
      <testcase classname="tests.test_a" name="test_skip"><skipped message="needs cuda"/></testcase>
    </testsuite></testsuites>""")
    counts = gc.parse_junit(str(xml))
    assert (counts["tests"], counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (4, 1, 1, 1, 1)
    assert counts["failures"] == ["tests.test_a::test_fail: assert 1 == 2", "tests.test_a::test_err: fixture broke"]
    results = {"stages": [{"name": "tests", "status": "failed", "seconds": 3.2, "detail": "1 passed | 1 failed"}],
               "tests": counts,
               "env": {"device": {"name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132},
                       "torch": "2.11.0", "git": {"commit": "abcdef1234567890"}, "source_digest": "0123"}}
    table = gc.summary_table(results)
    assert "NVIDIA H200 (sm 9.0, 132 SMs)" in table and "commit abcdef123456" in table
    assert "| tests | failed | 3 | 1 passed \\| 1 failed |" in table
    assert "- tests.test_a::test_fail: assert 1 == 2" in table and "- 1 x needs cuda" in table


# --- the GPU-side programs, run on the CPU ---------------------------------------------------------------------


def test_sanitize_cases_driver_runs_on_cpu(capsys):
    import gpu_sanitize_cases as gsc

    assert gsc.main(["--device", "cpu", "--backend", "reference", "--cases",
                     "slot_attention-bf16-mask,clip_loss-fp32-ids,deterministic-info_nce"]) == 0
    out = capsys.readouterr().out
    assert "3 ok, 0 failed" in out and out.rstrip().endswith("sanitize cases: all done")
    assert gsc.main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    # the cases of --backend; on a GPU machine also the slot-attention cases of --slot-backends ("cuda:...")
    assert len([n for n in listed if ":" not in n]) == 11 and "deterministic-slot_attention" in listed
    assert set(n.split(":")[0] for n in listed if ":" in n) <= {"cuda"}
    extra = gsc.slot_cases("cuda", "cpu")
    assert len(extra) == 6 and all(n.startswith("cuda:slot_attention-") or n == "cuda:deterministic-slot_attention"
                                   for n in extra)
    with pytest.raises(SystemExit) as exc:
        gsc.main(["--cases", "nope"])
    assert exc.value.code == 2 and "unknown case(s) nope" in capsys.readouterr().err


def test_sanitize_cases_report_a_failing_case(capsys, monkeypatch):
    import gpu_sanitize_cases as gsc

    def broken():
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(gsc, "cases", lambda *a, **k: {"good": lambda: [], "bad": broken})
    assert gsc.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "case bad: FAILED" in out and "kernel fault" in out and "1 ok, 1 failed (bad)" in out


def _clip_args(**overrides):
    import argparse

    args = dict(batch=[32], dim=16, dtype="float32", iters=2, max_call_s=10.0, variants=["reference", "triton"],
                predict=None, emulate_on_cpu=True)
    args.update(overrides)
    return argparse.Namespace(**args)


def test_contrastive_gpu_child_emulated_on_cpu(capsys, monkeypatch):
    """The --device cuda child (skips, B x B memory check, predictions, timing) on CPU tensors."""
    import torch

    import contrastive_table as ct
    import eclip_kernels as ek
    from contrastive_cases import make_features

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ct.cuda_child(_clip_args())
    rows = [json.loads(line[4:]) for line in capsys.readouterr().out.splitlines() if line.startswith("ROW ")]
    by = {r["variant"]: r for r in rows}
    image, text, scale = make_features(32, 16, torch.float32)
    assert by["reference"]["loss"] == pytest.approx(ek.clip_loss(image, text, scale, backend="reference").item(),
                                                    rel=1e-5)
    assert by["reference"]["median_ms"] > 0 and len(by["reference"]["times_s"]) == 2
    assert "unusable" in by["triton"]["skipped"]

    ct.cuda_child(_clip_args(predict=json.dumps({"reference": 100.0}), variants=["reference"]))
    assert "predicts 100 s per call" in capsys.readouterr().out
    assert "B x B logits need" in ct.cuda_skip_reason("reference", 2**20, 16, torch.float32, 2**30, "cpu")
    assert ct.cuda_skip_reason("reference", 1024, 16, torch.float32, 2**30, "cpu") is None


def test_contrastive_gpu_table_emulated_on_cpu(tmp_path, monkeypatch, capsys):
    """The --device cuda parent: a child process per batch, rows collected into the JSON and the table."""
    import contrastive_table as ct

    out = tmp_path / "clip.json"
    monkeypatch.setattr(sys, "argv", ["contrastive_table.py", "--device", "cuda", "--emulate-on-cpu", "--dtype",
                                      "float32", "--dim", "16", "--batch", "32", "--iters", "1", "--variants",
                                      "reference", "inf_cl", "--out", str(out)])
    ct.main()
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(32, "reference"), (32, "inf_cl")]
    # inf_cl: skipped where it is not installed, an error where it is (its kernels assert CUDA tensors)
    assert rows[0]["median_ms"] > 0 and ("skipped" in rows[1] or "error" in rows[1])
    assert "| 32 | reference |" in capsys.readouterr().out


def test_slot_attention_table_reports_a_broken_variant_and_goes_on(tmp_path, monkeypatch, capsys):
    import slot_attention_table as sat

    real_case = sat.Case

    def case(variant, shape, seed=0):
        if variant == "broken":
            raise RuntimeError("no kernel image for this device\nmore text")
        return real_case(variant, shape, seed)

    monkeypatch.setattr(sat, "Case", case)
    monkeypatch.setattr(sat, "variants_for", lambda shape: ["reference", "broken"])
    out = tmp_path / "slot.json"
    monkeypatch.setattr(sys, "argv", ["slot_attention_table.py", "--shapes", "cpu-small", "--modes", "forward",
                                      "--repeats", "1", "--iters", "1", "--out", str(out)])
    sat.main()
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["reference"]["median_ms"] > 0 and rows["reference"]["speedup_vs_eager"] == 1.0
    assert rows["broken"]["median_ms"] is None
    assert rows["broken"]["error"] == "RuntimeError: no kernel image for this device"
    assert "failed: RuntimeError" in capsys.readouterr().out

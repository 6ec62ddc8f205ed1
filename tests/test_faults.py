"""Faults in training: a trainer killed (SIGKILL) while it writes a checkpoint resumes from the last complete
one and ends where the uninterrupted run ends; incomplete or half-deleted checkpoint folders are passed over;
a non-finite loss stops the step with a message naming the step, the loss term and the rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("timm", reason="eclip needs timm")
pytest.importorskip("webdataset", reason="eclip.data needs webdataset")

import eclip.models as em  # noqa: E402
from eclip.data.synth import generate_catalogue  # noqa: E402
from eclip.train import preset, train  # noqa: E402
from eclip.train.trainer import NonFiniteLossError, _Checkpoints, load_trained  # noqa: E402


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    generate_catalogue(str(root), products=60, images_per_product=2, size=32, seed=1, workers=1)
    return str(root)


def _options(catalogue, out, **overrides):
    options = {"data": catalogue, "out": str(out), "micro_batch": 8, "max_steps": 6, "log_every": 1,
               "checkpoint_every": 2, "warmup_steps": 2, "lr": 1e-3}
    options.update(overrides)
    return options


def _params(cfg):
    return {k: v for k, v in load_trained(cfg).state_dict().items() if not k.startswith("queue.")}


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# The child trains and, inside its second checkpoint save, after every data file is written but before
# torch.distributed.checkpoint writes the .metadata that completes it, says so and waits to be killed.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch.distributed.checkpoint.filesystem as fs
    from eclip.train import preset, train

    options, ready = json.loads(sys.argv[1]), sys.argv[2]
    finish, calls = fs.FileSystemWriter.finish, []

    def finish_then_hang(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            open(ready, "w").close()
            time.sleep(600)
        return finish(self, *args, **kwargs)

    fs.FileSystemWriter.finish = finish_then_hang
    train(preset("demo", options), progress=False)
""")


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(catalogue, tmp_path):
    killed = _options(catalogue, tmp_path / "killed")
    ready = tmp_path / "writing-step-4"
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(killed), str(ready)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached its second checkpoint"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()

    # the killed save left step 4 half written; the checkpoint of step 2 is the last complete one
    folder = tmp_path / "killed" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["latest", "step-0000002", "step-0000004.tmp"]
    assert os.listdir(folder / "step-0000004.tmp") and not (folder / "step-0000004.tmp" / ".metadata").exists()
    assert _Checkpoints(str(tmp_path / "killed"), 0, 2).latest() == str(folder / "step-0000002")

    whole = preset("demo", _options(catalogue, tmp_path / "whole"))
    train(whole, progress=False)
    resumed = preset("demo", killed)
    train(resumed, resume=True, progress=False)
    assert sorted(os.listdir(folder)) == ["latest", "step-0000004", "step-0000006"]  # the leftover is gone
    a, b = _params(whole), _params(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    # steps 3-6 of the resumed run (logged after the restart) equal the uninterrupted run's
    redone = [r for r in _metrics(tmp_path / "killed") if r["step"] > 2][-4:]
    assert [r["step"] for r in redone] == [3, 4, 5, 6]
    uninterrupted = {r["step"]: r["loss"] for r in _metrics(tmp_path / "whole")}
    assert all(r["loss"] == uninterrupted[r["step"]] for r in redone)


def test_latest_checkpoint_passes_over_incomplete_and_half_deleted_folders(tmp_path):
    checkpoints = _Checkpoints(str(tmp_path), 0, 2)
    assert checkpoints.latest() is None
    root = tmp_path / "checkpoints"

    def folder(name, complete):
        (root / name).mkdir(parents=True)
        (root / name / "__0_0.distcp").write_bytes(b"data")
        if complete:
            (root / name / ".metadata").write_bytes(b"metadata")

    folder("step-0000002", True)
    folder("step-0000010", True)   # a larger step number: ordered by number, not by name
    folder("step-0000012", False)  # written by hand or by another tool, never completed
    folder("step-0000014.tmp", True)
    folder("step-0000016.old", True)
    (root / "latest").write_text("step-0000012")
    assert checkpoints.latest() == str(root / "step-0000010")
    (root / "step-0000010" / ".metadata").unlink()  # as if half deleted
    assert checkpoints.latest() == str(root / "step-0000002")


def test_non_finite_loss_stops_the_step_and_names_it(catalogue, tmp_path, monkeypatch):
    forward, calls = em.ECLIP.forward, []

    def nan_at_third_step(self, batch, group=None):
        losses = forward(self, batch, group)
        calls.append(1)
        if len(calls) == 3:
            losses["inter"] = losses["inter"] * float("nan")
            losses["loss"] = losses["loss"] + losses["inter"]
        return losses

    monkeypatch.setattr(em.ECLIP, "forward", nan_at_third_step)
    cfg = preset("demo", _options(catalogue, tmp_path / "nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3: inter = nan on rank 0\. .* the "
                                                 r"weights are those after step 2; .*step-0000002"):
        train(cfg, progress=False)
    assert [r["step"] for r in _metrics(tmp_path / "nan")] == [1, 2]  # no NaN was ever logged or applied
    assert all(torch.isfinite(v).all() for v in _params(cfg).values())

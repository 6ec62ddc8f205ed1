"""eclip-demo end to end at a tiny size: both models trained for a few steps, evaluated with the zero-shot
protocol, and results.json with its summary block."""

from __future__ import annotations

import json
import os

import pytest

from eclip.data import synth


def test_the_demo_writes_the_summary_block(tmp_path, capsys):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from eclip import demo
    from eclip.eval.report import SUMMARY_KEYS

    data, out = str(tmp_path / "data"), str(tmp_path / "runs")
    synth.generate_catalogue(data, 40, 3, 64, seed=0, workers=1, same_category_distractor=0.5)
    assert demo.main(["--data", data, "--out", out, "--warmup-steps", "2", "--steps", "2", "--batch", "16"]) == 0
    printed = capsys.readouterr().out
    assert "Fine-grained product retrieval" in printed and "Headline numbers" in printed
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    summary = results["summary"]
    assert set(summary) == set(SUMMARY_KEYS) | {"seconds"}
    assert summary["seconds"] > 0
    for key in SUMMARY_KEYS:
        assert set(summary[key]) == {"ECLIP", "CLIP baseline"}, key
        assert all(v is None or 0 <= v <= 100 for v in summary[key].values()), key
    assert summary["chance_fine_r1"]["ECLIP"] == summary["chance_fine_r1"]["CLIP baseline"]
    assert results["summary_methods"]["CLIP baseline"]["fine_r1"] == "fine_retrieval/clip_global/R@1"
    assert "grounding_customer_same_category" in results["models"]["ECLIP"]["tasks"]
    for name in ("training_curves.png", "grounding.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # a second run finds both final checkpoints and only evaluates them again: the same numbers
    assert demo.main(["--data", data, "--out", out, "--warmup-steps", "2", "--steps", "2", "--batch", "16"]) == 0
    capsys.readouterr()
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)["summary"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in summary.items() if k != "seconds"}

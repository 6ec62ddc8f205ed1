"""eclip-reproduce --quick: every ablation row trained from the shared warm-up and evaluated for 2 seeds, the
mean ± std table written; a second call finds every evaluation on disk and redoes nothing."""

from __future__ import annotations

import json
import os

import pytest


def test_quick_reproduction_writes_the_ablation_table_and_resumes(tmp_path, capsys, monkeypatch):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from eclip import reproduce
    from eclip.eval.report import SUMMARY_KEYS

    data, out = str(tmp_path / "data"), str(tmp_path / "runs")
    argv = ["--quick", "--data", data, "--out", out, "--seeds", "0", "1"]
    assert reproduce.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert list(results["rows"]) == list(reproduce.ROWS)
    for row, values in results["rows"].items():
        assert set(values) == set(SUMMARY_KEYS)
        mean, std, n = values["i2t_r1"]
        assert n == 2 and 0 <= mean <= 100 and std is not None and std >= 0
    # the rows share the warm-up and differ in their losses: the CLIP row has no decoder
    with open(os.path.join(out, "seed0", "itc-only-clip", "config.json")) as f:
        assert json.load(f)["model_overrides"]["use_decoder"] is False
    with open(os.path.join(out, "seed0", "intra-with-entropy", "config.json")) as f:
        cfg = json.load(f)
    assert cfg["init_from"].endswith(os.path.join("seed0", "warmup"))
    assert cfg["model_overrides"]["loss_weights"] == {"itc": 1.0, "inter": 0.0, "itm": 0.0, "intra": 1.0,
                                                      "entropy": 1.0}
    table = open(os.path.join(out, "results.md")).read()
    assert "| all |" in table and "| chance |" in table and " ± " in table
    # Table 6: the 'all' models with each set of negative prompts; N(0, I) is the first table's 'all' row
    assert list(results["negatives"]) == list(reproduce.NEGATIVES.values())
    assert results["negatives"][reproduce.NEGATIVES["noise"]] == results["rows"]["all"]
    assert results["negatives"][reproduce.NEGATIVES["texts"]]["fine_r1"][2] == 2
    assert "(Table 6)" in table and "| other products' texts |" in table
    assert os.path.isfile(os.path.join(out, "seed1", "all", "evaluation-negatives-mean.json"))

    capsys.readouterr()
    trained = []
    monkeypatch.setattr("eclip.train.train", lambda *a, **k: trained.append(a), raising=True)
    assert reproduce.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("evaluated before") == 2 * len(reproduce.ROWS)
    assert "negative prompts:" not in printed  # the Table 6 evaluations are on disk too
    again = json.load(open(os.path.join(out, "results.json")))
    assert again["rows"] == results["rows"]


def test_mean_std():
    from eclip.reproduce import mean_std

    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([5.0, None]) == (5.0, None)
    assert mean_std([]) == (None, None)

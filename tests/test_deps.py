"""Commands check their optional dependencies when they start, not after minutes of work."""

from __future__ import annotations

import importlib.util

import pytest

from eclip import _deps


@pytest.fixture
def without(monkeypatch):
    """Make the named modules look uninstalled (importlib.util.find_spec returns None for them)."""
    hidden = set()
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return hidden


def test_require_names_what_is_missing_and_how_to_install_it(without):
    without.update({"matplotlib", "webdataset"})
    with pytest.raises(SystemExit, match=r"eclip-demo needs webdataset, matplotlib.*pip install webdataset matplotlib"):
        _deps.require("eclip-demo", "webdataset", "timm", "matplotlib")
    _deps.require("eclip-demo", "timm")  # present: nothing happens


@pytest.mark.parametrize("command, module, missing", [
    ("eclip.demo", "main", "matplotlib"),
    ("eclip.eval.zero_shot", "main", "transformers"),
    ("eclip.data.cli", "main", "webdataset"),
    ("eclip.train.cli", "main", "webdataset"),
])
def test_commands_stop_before_any_work(command, module, missing, without, tmp_path, monkeypatch):
    """Tried as a new user without matplotlib: eclip-demo trained for minutes, then died importing it."""
    import importlib

    main = getattr(importlib.import_module(command), module)
    without.add(missing)
    work = []
    monkeypatch.setattr("eclip.train.train", lambda *a, **k: work.append("train"), raising=False)
    argv = {"eclip.demo": ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")],
            "eclip.eval.zero_shot": ["--catalogue", str(tmp_path / "none.jsonl")],
            "eclip.data.cli": ["shard", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "s")],
            "eclip.train.cli": ["--preset", "demo", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")],
            }[command]
    with pytest.raises(SystemExit, match=missing):
        main(argv)
    assert not work and not (tmp_path / "d").exists() and not (tmp_path / "o").exists()

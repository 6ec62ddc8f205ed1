"""Import of eclip_kernels when the compiled extension is missing, built against another torch, or fails to
load (eclip_kernels/_extension.py). Each case imports a copy of the package in a fresh interpreter: the copy
gets its own _build_info.json or extension file, the installed package is not touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import eclip_kernels as ek
from eclip_kernels import _extension

PACKAGE = os.path.dirname(os.path.abspath(ek.__file__))
BUILT = bool(_extension.extension_files()) and _extension.is_loaded()
needs_build = pytest.mark.skipif(not BUILT, reason="eclip_kernels._C is not built here")

# Imports the package with every warning recorded, then prints what the tests check.
PROBE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import eclip_kernels as ek
    import eclip_kernels.ops, eclip_kernels.backends, eclip_kernels.nn  # nothing more on later imports
    ek.available_backends()
from eclip_kernels import _extension
print(json.dumps({
    "loaded": _extension.is_loaded(),
    "load_error": _extension.LOAD_ERROR,
    "warnings": [[w.category.__name__, str(w.message)] for w in caught
                 if issubclass(w.category, ek.ExtensionLoadWarning)],
    "cpu": [ek.available_backends()["cpu"].usable, ek.available_backends()["cpu"].reason],
}))
"""


def _copy_package(tmp_path, with_extension: bool = True):
    dest = tmp_path / "eclip_kernels"
    ignore = shutil.ignore_patterns("__pycache__", *( [] if with_extension else ["_C.*"]))
    shutil.copytree(PACKAGE, dest, ignore=ignore)
    return dest


def _run(tmp_path, require: bool = False, code: str = PROBE):
    env = {k: v for k, v in os.environ.items() if k != _extension.REQUIRE_ENV}
    env["PYTHONPATH"] = str(tmp_path)
    if require:
        env[_extension.REQUIRE_ENV] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def _probe(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_mismatch_helper_names_both_releases_and_the_fix():
    running = {"torch": "2.14.1+cu130", "cxx11_abi": True, "cuda": "13.0"}
    assert _extension.mismatch(None, running) is None
    assert _extension.mismatch(dict(running, with_cuda=True, python="3.11.7"), running) is None
    text = _extension.mismatch(dict(running, torch="2.11.0+cu130"), running)
    assert "built against torch 2.11.0+cu130" in text and "running torch 2.14.1+cu130" in text
    assert "rebuild with `pip install --no-build-isolation -e .`" in text
    assert "CXX11 ABI 0" in _extension.mismatch(dict(running, cxx11_abi=False), running)
    assert "CUDA none" in _extension.mismatch(dict(running, cuda=None), running)


@needs_build
def test_build_info_matches_the_running_torch():
    info = _extension.read_build_info()
    assert info is not None, "setup.py writes eclip_kernels/_build_info.json next to the extension"
    assert _extension.mismatch(info, _extension.running_torch()) is None


@needs_build
def test_built_against_another_torch_warns_once_and_does_not_load(tmp_path):
    dest = _copy_package(tmp_path)
    info = dict(_extension.read_build_info(), torch="2.11.0")
    (dest / "_build_info.json").write_text(json.dumps(info))
    got = _probe(tmp_path)
    assert not got["loaded"]
    assert len(got["warnings"]) == 1, got["warnings"]
    category, message = got["warnings"][0]
    assert category == "ExtensionLoadWarning"
    running = _extension.running_torch()["torch"]
    assert "built against torch 2.11.0 " in message and f"running torch {running} " in message
    assert "rebuild with `pip install --no-build-isolation -e .`" in message
    assert got["cpu"][0] is False and "built against torch 2.11.0" in got["cpu"][1]


@needs_build
def test_extension_that_fails_to_load_warns_with_the_loader_message(tmp_path):
    dest = _copy_package(tmp_path)
    for name in os.listdir(dest):
        if name.startswith("_C."):
            (dest / name).write_bytes(b"not a shared library")
    got = _probe(tmp_path)
    assert not got["loaded"] and len(got["warnings"]) == 1, got
    message = got["warnings"][0][1]
    assert "eclip_kernels._C" in message and "fails to load" in message
    assert "invalid ELF header" in message or "file too short" in message  # the loader's own words
    assert "rebuild with `pip install --no-build-isolation -e .`" in message


def test_not_built_is_silent_and_reported_by_available_backends(tmp_path):
    _copy_package(tmp_path, with_extension=False)
    (tmp_path / "eclip_kernels" / "_build_info.json").unlink(missing_ok=True)
    got = _probe(tmp_path)
    assert not got["loaded"] and got["warnings"] == []
    assert got["cpu"][0] is False and "eclip_kernels._C is not built" in got["cpu"][1]


@needs_build
def test_matching_build_loads_without_warning(tmp_path):
    _copy_package(tmp_path)
    got = _probe(tmp_path)
    assert got["loaded"] and got["warnings"] == [] and got["load_error"] is None


@needs_build
def test_require_extension_turns_the_warning_into_an_import_error(tmp_path):
    dest = _copy_package(tmp_path)
    (dest / "_build_info.json").write_text(json.dumps(dict(_extension.read_build_info(), torch="2.11.0")))
    result = _run(tmp_path, require=True, code="import eclip_kernels")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "built against torch 2.11.0" in result.stderr
    assert "ECLIP_KERNELS_REQUIRE_EXTENSION" in result.stderr


def test_require_extension_fails_when_not_built(tmp_path):
    _copy_package(tmp_path, with_extension=False)
    result = _run(tmp_path, require=True, code="import eclip_kernels")
    assert result.returncode != 0 and "eclip_kernels._C is not built" in result.stderr


SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
needs_source = pytest.mark.skipif(not os.path.isfile(SETUP), reason="not run from the source tree")


def _run_setup(tmp_path, stub: str):
    # What an isolated build environment looks like to setup.py: pip runs it with PYTHONNOUSERSITE=1 and a
    # site folder of its own named pip-build-env-*, which holds no torch, or some other torch.
    site_dir = tmp_path / "pip-build-env-test" / "site"
    (site_dir / "torch" / "utils").mkdir(parents=True)
    (site_dir / "torch" / "__init__.py").write_text(stub)
    (site_dir / "torch" / "utils" / "__init__.py").write_text("")
    (site_dir / "torch" / "utils" / "cpp_extension.py").write_text(
        "CUDA_HOME = BuildExtension = CppExtension = CUDAExtension = include_paths = None\n")
    env = dict(os.environ, PYTHONNOUSERSITE="1", PYTHONPATH=str(site_dir))
    return subprocess.run([sys.executable, SETUP, "--version"], cwd=os.path.dirname(SETUP), env=env,
                          capture_output=True, text=True, timeout=120)


@needs_source
@pytest.mark.parametrize("stub, why", [
    ("raise ImportError(\"No module named 'torch'\")", "isolated build environment, which has no torch"),
    ("__version__ = '2.99.0'", "isolated build environment with its own torch 2.99.0"),
])
def test_setup_refuses_an_isolated_build(tmp_path, stub, why):
    result = _run_setup(tmp_path, stub)
    assert result.returncode != 0
    assert "compiles against the torch installed in your environment" in result.stderr
    assert "`pip install --no-build-isolation .`" in result.stderr and why in result.stderr

"""Optional dependencies of the eclip commands, checked when a command starts rather than after the work.

``eclip-demo`` trains two models for minutes and then draws figures: without matplotlib it would die at the
end. Every command calls :func:`require` first with what it will import later.
"""

from __future__ import annotations

import importlib.util

# import name -> pip requirement
PACKAGES = {
    "timm": "timm",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "torchvision": "torchvision",
    "PIL": "pillow",
    "webdataset": "webdataset",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
}
# what the model layer and trainer import (the `train` extra of the package)
MODEL = ("timm", "transformers", "tokenizers")
TRAIN = MODEL + ("torchvision", "PIL", "webdataset", "tqdm")


class MissingDependencyError(SystemExit):
    """Raised (as a clean exit with a message) when a command's optional dependencies are not installed."""


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(command: str, *modules: str) -> None:
    """Stop ``command`` now, with the install command, if any of ``modules`` is missing."""
    absent = missing(*modules)
    if absent:
        pkgs = " ".join(PACKAGES.get(m, m) for m in absent)
        raise MissingDependencyError(
            f"{command} needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed: "
            f"pip install {pkgs}   (or: pip install \"eclip-kernels[train]\")"
        )

"""One way to define every operator of the package: ``torch.library.custom_op`` with a fake kernel, or, for
operators whose implementation is Triton kernels launched through ``wrap_triton``, ``torch.library.triton_op``
so that ``torch.compile`` traces into the launcher and sees the kernels instead of an opaque call."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch


def _triton_op_usable() -> bool:
    # triton_op (torch >= 2.6) inspects the kernels it wraps, which needs triton itself. Under the Triton
    # interpreter (TRITON_INTERPRET=1) kernels cannot be traced, only run, and triton_op's fake kernel would
    # run them on fake tensors: plain custom ops there.
    return (hasattr(torch.library, "triton_op") and importlib.util.find_spec("triton") is not None
            and os.environ.get("TRITON_INTERPRET", "0") != "1")


def define_op(name: str, fn: Callable, schema: str, fake: Callable, triton: bool = False):
    """Register ``fn`` as the operator ``name`` (no mutated arguments) and return it.

    ``fake`` is the fake (meta) kernel. A ``triton_op`` uses ``fn`` itself as its fake kernel (it runs the
    launcher on fake tensors, where wrapped kernel launches do nothing), so ``fake`` serves only the plain
    custom op; both must agree on shapes and dtypes (the opcheck tests compare them with real outputs).
    """
    if triton and _triton_op_usable():
        return torch.library.triton_op(name, fn, mutates_args=(), schema=schema)
    op = torch.library.custom_op(name, fn, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op

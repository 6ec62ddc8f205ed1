"""Property-based tests (hypothesis) of the Triton backend against the float64 reference (tests/_properties.py).

On a CUDA GPU they run there; without one, on CPU tensors through the Triton interpreter in their own
process, with the smaller profile:

    HYPOTHESIS_PROFILE=interpreter TRITON_INTERPRET=1 python -m pytest tests/test_properties_triton.py
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402

import eclip_kernels as ek  # noqa: E402
from _properties import (  # noqa: E402
    FOUND_CONTRASTIVE,
    FOUND_SLOT_ATTENTION,
    check_contrastive,
    check_siglip,
    check_slot_attention,
    contrastive_cases,
    siglip_cases,
    slot_attention_cases,
)

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("Triton tests need a CUDA GPU or TRITON_INTERPRET=1 (run them in their own pytest process)",
                allow_module_level=True)
if not ek.available_backends()["triton"].usable:
    pytest.skip(f"triton backend unusable: {ek.available_backends()['triton'].reason}", allow_module_level=True)

# bfloat16 tl.dot is wrong in the Triton interpreter (tests/test_slot_attention_triton.py probes it): GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SMALL = DEVICE == "cpu"  # the interpreter is slow: smaller shapes there


@given(slot_attention_cases(dtypes=DTYPES, max_queries=ek.backends.MAX_QUERIES["triton"],
                            max_tokens=40 if SMALL else 300, max_dim=24 if SMALL else 96))
def test_slot_attention_triton(case):
    check_slot_attention(case, "triton", DEVICE)


@given(contrastive_cases(dtypes=DTYPES, max_rows=40 if SMALL else 300, max_dim=24 if SMALL else 96))
def test_contrastive_triton(case):
    check_contrastive(case, "triton", DEVICE)


@given(siglip_cases(dtypes=DTYPES, max_rows=40 if SMALL else 300, max_dim=24 if SMALL else 96))
def test_siglip_triton(case):
    check_siglip(case, "triton", DEVICE)


@pytest.mark.parametrize("name", [n for n, c in sorted(FOUND_SLOT_ATTENTION.items())
                                  if c["queries"] <= ek.backends.MAX_QUERIES["triton"]])
def test_found_slot_attention_examples(name):
    check_slot_attention(FOUND_SLOT_ATTENTION[name], "triton", DEVICE)


@pytest.mark.parametrize("name", [n for n, c in sorted(FOUND_CONTRASTIVE.items()) if c["dtype"] in DTYPES])
def test_found_contrastive_examples(name):
    check_contrastive(FOUND_CONTRASTIVE[name], "triton", DEVICE)

"""Property-based tests (hypothesis) of the fused CPU backends against the float64 reference: see
tests/_properties.py for what is drawn and how results are compared. Profiles: tests/conftest.py
(HYPOTHESIS_PROFILE=ci by default: fixed seed; =long for a maintainer's search)."""

from __future__ import annotations

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

needs_cpu_kernels = pytest.mark.skipif(not ek.available_backends()["cpu"].usable,
                                       reason="eclip_kernels._C is not built")


@needs_cpu_kernels
@given(slot_attention_cases(dtypes=[torch.float32, torch.float64, torch.bfloat16]))
def test_slot_attention_cpu(case):
    check_slot_attention(case, "cpu")


@given(contrastive_cases(dtypes=[torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_contrastive_cpu(case):
    check_contrastive(case, "cpu")


@given(siglip_cases(dtypes=[torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_siglip_cpu(case):
    check_siglip(case, "cpu")


@needs_cpu_kernels
@pytest.mark.parametrize("name", [n for n, c in sorted(FOUND_SLOT_ATTENTION.items()) if c["dtype"] != torch.float16])
def test_found_slot_attention_examples(name):
    check_slot_attention(FOUND_SLOT_ATTENTION[name], "cpu")


@pytest.mark.parametrize("name", sorted(FOUND_CONTRASTIVE))
def test_found_contrastive_examples(name):
    check_contrastive(FOUND_CONTRASTIVE[name], "cpu")

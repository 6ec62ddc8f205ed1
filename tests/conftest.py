"""Shared pytest configuration: the hypothesis profiles of the property-based suites.

    HYPOTHESIS_PROFILE=ci           # default: fixed seed (derandomized), a few minutes in CI
    HYPOTHESIS_PROFILE=interpreter  # the Triton interpreter suite: fewer, smaller examples
    HYPOTHESIS_PROFILE=long         # a maintainer's search: many random examples, new ones every run
"""

from __future__ import annotations

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency; the property suites skip themselves without it
    settings = None

if settings is not None:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   print_blob=True)
    settings.register_profile("ci", max_examples=200, derandomize=True, **_common)
    settings.register_profile("interpreter", max_examples=30, derandomize=True, **_common)
    settings.register_profile("long", max_examples=1000, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

"""pytest-benchmark suite: forward, backward and forward+backward of slot attention, every usable backend
against the eager reference and torch.compile of it, at the SPEC shapes that fit this machine.

    python -m pytest bench/test_bench_slot_attention.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest

from cases import MODES, Case, shapes_for_this_machine, sync, variants_for

PARAMS = [
    pytest.param(shape, variant, mode, id=f"{shape.name}-{variant}-{mode}")
    for shape in shapes_for_this_machine()
    for variant in variants_for(shape)
    for mode in MODES
]


@pytest.mark.parametrize("shape, variant, mode", PARAMS)
def test_slot_attention(benchmark, shape, variant, mode):
    case = Case(variant, shape)
    benchmark.group = f"{shape.name} {mode}"
    benchmark.extra_info.update(shape=shape.describe(), variant=variant, mode=mode)
    for _ in range(2):  # warm-up (and compilation)
        case.forward_backward()
    sync(shape.device)

    if mode == "forward":
        def run():
            case.forward_no_grad()
            sync(shape.device)

        benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    elif mode == "backward":
        def setup():
            outputs = case.forward()
            sync(shape.device)
            return outputs, {}

        def run(out, ent):
            case.backward(out, ent)
            sync(shape.device)

        benchmark.pedantic(run, setup=setup, rounds=10, warmup_rounds=1)
    else:
        def run():
            case.forward_backward()
            sync(shape.device)

        benchmark.pedantic(run, rounds=10, warmup_rounds=1)

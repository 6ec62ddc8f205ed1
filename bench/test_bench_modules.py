"""pytest-benchmark suite: forward+backward of eclip_kernels.nn.SlotAttention and MultiHeadSlotAttention
(4 heads) against the PyPI slot-attention modules at the object-centric shapes that fit this machine; the
memory autograd keeps for backward is recorded in extra_info.

    python -m pytest bench/test_bench_modules.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from cases import sync
from modules import MODULE_SHAPES, forward_backward, make_inputs, make_modules, saved_bytes

PARAMS = [
    pytest.param(shape, label, id=f"{shape.name}-{label.split()[0]}")
    for shape in MODULE_SHAPES.values()
    if shape.device == "cpu" or torch.cuda.is_available()
    for label in make_modules(shape)
]


@pytest.mark.parametrize("shape, label", PARAMS)
def test_slot_attention_module(benchmark, shape, label):
    module = make_modules(shape)[label]
    inputs, grad = make_inputs(shape)
    benchmark.group = f"{shape.name} forward+backward"
    benchmark.extra_info.update(shape=shape.describe(), module=label,
                                saved_for_backward_mib=saved_bytes(module, inputs) / 2**20)

    def run():
        forward_backward(module, inputs, grad)
        sync(shape.device)

    benchmark.pedantic(run, rounds=15, warmup_rounds=2)

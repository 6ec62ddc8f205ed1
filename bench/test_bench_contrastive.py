"""pytest-benchmark suite: clip_loss and siglip_loss forward+backward of every usable backend against open_clip's
ClipLoss and SigLipLoss (B = 8192, D = 512 on the CPU; 6400 / 65536 with bf16 features on a GPU). Peak memory is
measured by bench/contrastive_table.py and bench/siglip_table.py, in fresh processes.

    python -m pytest bench/test_bench_contrastive.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import eclip_kernels as ek
from cases import sync
from contrastive_cases import make_features, make_loss_fn, make_siglip_features, make_siglip_loss_fn

SHAPES = [("cpu", 8192, 512, torch.float32)]
if torch.cuda.is_available():
    SHAPES += [("cuda", 6400, 512, torch.bfloat16), ("cuda", 65536, 512, torch.bfloat16)]


def _variants(device, batch):
    names = ["cpu"] if device == "cpu" else (["triton"] if ek.available_backends()["triton"].usable else [])
    if batch <= 16384:
        names.append("reference")
    try:
        import open_clip  # noqa: F401

        if batch <= 16384 or device == "cuda":
            names.append("open_clip")
    except ImportError:
        pass
    return names


PARAMS = [pytest.param(d, b, k, t, v, id=f"{d}-B{b}-{v}") for d, b, k, t in SHAPES for v in _variants(d, b)]


@pytest.mark.parametrize("device, batch, dim, dtype, variant", PARAMS)
def test_clip_loss(benchmark, device, batch, dim, dtype, variant):
    image, text, scale = make_features(batch, dim, dtype, device)
    loss_fn = make_loss_fn(variant, image, text, scale)

    def run():
        loss_fn().backward()
        image.grad = text.grad = scale.grad = None
        sync(device)

    benchmark.group = f"clip_loss {device} B={batch} D={dim} {str(dtype).replace('torch.', '')}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("device, batch, dim, dtype, variant", PARAMS)
def test_siglip_loss(benchmark, device, batch, dim, dtype, variant):
    image, text, scale, bias = make_siglip_features(batch, dim, dtype, device)
    loss_fn = make_siglip_loss_fn(variant, image, text, scale, bias)

    def run():
        loss_fn().backward()
        image.grad = text.grad = scale.grad = bias.grad = None
        sync(device)

    benchmark.group = f"siglip_loss {device} B={batch} D={dim} {str(dtype).replace('torch.', '')}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)

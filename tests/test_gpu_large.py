"""The public API at large shapes on a CUDA GPU, where the fused kernels take their multi-tile and
multi-program paths (many token tiles, many batch programs, many logit tiles), against the float64
reference, by the rules of tests/_helpers.py: float32 within 1e-5 of max |reference|; float16 / bfloat16
at most 2x PyTorch's own error at that dtype plus one ulp.

    python -m pytest tests/test_gpu_large.py              # on a GPU machine (scripts/gpu_check.sh runs it)

Skipped as a whole without a CUDA GPU. To check this file's own logic on a machine without one, the same
tests run on CPU tensors with the CPU backends (slow, minutes; not part of any suite):

    ECLIP_GPU_LARGE_DEVICE=cpu python -m pytest tests/test_gpu_large.py
"""

from __future__ import annotations

import os

import pytest
import torch

import eclip_kernels as ek
from _helpers import check_against_oracle, make_inputs, non_contiguous, rel_err, run, unit_features
from _helpers import loss_and_grads as _loss_and_grads
from eclip_kernels.backends import resolve_backend

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("ECLIP_GPU_LARGE_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("GPU-only tests at large shapes: no CUDA GPU visible", allow_module_level=True)
# The fused backends of the device; on the CPU (checking this file) the C++ / tiled ATen kernels.
FUSED = ("triton", "cuda") if DEVICE == "cuda" else ("cpu",)

T, D = 20, 512
# (B, N, T, D, Dv): many batch programs; many token tiles with few programs.
SLOT_SHAPES = {"B256-N196": (256, 196, T, D, D), "B4-N1024": (4, 1024, T, D, D)}


@pytest.fixture(autouse=True)
def exact_float32_products():
    """float32 kernels use exact (not TF32) products only at torch's default precision "highest"."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _needs(backend: str, dtype: torch.dtype, op: str, num_queries: int = 1) -> None:
    """Skip (with the reason) when the backend cannot run this call here."""
    try:
        chosen = resolve_backend(backend, torch.device(DEVICE), dtype, num_queries=num_queries, op=op)
    except (RuntimeError, ValueError, TypeError) as exc:
        pytest.skip(f"{backend} backend, {op}: {exc}")
    assert chosen == backend


def _slot_inputs(shape, dtype, masked=True, seed=0):
    q, k, v, mask = make_inputs(shape, dtype, device=DEVICE, masked=masked, seed=seed)
    if mask is not None:
        assert not mask[-1].any() and mask[0].any()  # one fully masked sample, the others partly masked
    return q, k, v, mask


# --- slot attention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", list(SLOT_SHAPES.values()), ids=list(SLOT_SHAPES))
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_slot_attention_fp32(backend, shape, masked):
    _needs(backend, torch.float32, "slot_attention", shape[2])
    q, k, v, mask = _slot_inputs(shape, torch.float32, masked, seed=1)
    check_against_oracle(q, k, v, mask, backend, eps=1e-8 if masked else 0.0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SLOT_SHAPES.values()), ids=list(SLOT_SHAPES))
def test_slot_attention_low_precision(backend, dtype, shape):
    _needs(backend, dtype, "slot_attention", shape[2])
    q, k, v, mask = _slot_inputs(shape, dtype, masked=True, seed=2)
    check_against_oracle(q, k, v, mask, backend, eps=1e-8)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_slot_attention_non_contiguous(backend, dtype):
    shape = SLOT_SHAPES["B256-N196"]
    _needs(backend, dtype, "slot_attention", shape[2])
    q, k, v, mask = _slot_inputs(shape, dtype, masked=True, seed=3)
    q_nc, k_nc, v_nc = non_contiguous(q, k, v)
    got, _ = check_against_oracle(q_nc, k_nc, v_nc, mask, backend, eps=1e-8)
    contiguous = run(q, k, v, mask, backend, eps=1e-8)
    torch.testing.assert_close(got[0], contiguous[0])
    torch.testing.assert_close(got[1], contiguous[1])


# --- contrastive losses -----------------------------------------------------------------------------------

CLIP_BATCH = 4096


def _check_losses(got, want, torch_own, dtype, names):
    for name, a, w, t in zip(names, got, want, torch_own):
        if dtype == torch.float32:
            err = rel_err(a, w)
            assert err <= 1e-5, f"{name}: relative error {err:.3g} > 1e-5"
        else:
            ours, theirs = rel_err(a, w), rel_err(t, w)
            assert ours <= 2 * theirs + torch.finfo(dtype).eps, f"{name}: error {ours:.3g} vs PyTorch {theirs:.3g}"


def _clip_ids(batch, seed=5):
    # about 4 samples per product id: many same-product pairs, spread over many tiles
    return torch.randint(0, batch // 4, (batch,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
def test_clip_loss_large_batch(backend, dtype, with_ids):
    _needs(backend, dtype, "contrastive")
    image, text = unit_features(CLIP_BATCH, D, dtype, seed=4, device=DEVICE)
    ids = _clip_ids(CLIP_BATCH) if with_ids else None
    s = torch.tensor(14.3, device=DEVICE)
    got = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, ids=ids, backend=backend), [image, text], s)
    want = _loss_and_grads(lambda i, t, s: ek.clip_loss(i.double(), t.double(), s.double(), ids=ids,
                                                        backend="reference"), [image, text], s)
    torch_own = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s.to(dtype), ids=ids, backend="reference"),
                                [image, text], s)
    _check_losses(got, want, torch_own, dtype, ["loss", "d_image", "d_text", "d_scale"])


@pytest.mark.parametrize("backend", FUSED)
def test_clip_loss_large_batch_non_contiguous(backend):
    _needs(backend, torch.bfloat16, "contrastive")
    image, text = unit_features(CLIP_BATCH, D, torch.bfloat16, seed=6, device=DEVICE)
    s = torch.tensor(14.3, device=DEVICE)
    image_nc, text_nc = image.T.contiguous().T, torch.cat([text, text], dim=1)[:, :D]
    assert not image_nc.is_contiguous() and not text_nc.is_contiguous()
    fn = lambda i, t, s: ek.clip_loss(i, t, s, backend=backend)  # noqa: E731
    for a, b in zip(_loss_and_grads(fn, [image_nc, text_nc], s), _loss_and_grads(fn, [image, text], s)):
        torch.testing.assert_close(a, b)


def _siglip_loss_and_grads(fn, image, text, scale, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale, bias)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
def test_siglip_loss_large_batch(backend, dtype, with_ids):
    _needs(backend, dtype, "contrastive")
    image, text = unit_features(CLIP_BATCH, D, dtype, seed=13, device=DEVICE)
    ids = _clip_ids(CLIP_BATCH, seed=14) if with_ids else None
    s, b = torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE)

    def loss(backend_, cast):
        return lambda i, t, s, b: ek.siglip_loss(cast(i), cast(t), cast(s), cast(b), ids=ids, backend=backend_)

    got = _siglip_loss_and_grads(loss(backend, lambda t: t), image, text, s, b)
    want = _siglip_loss_and_grads(loss("reference", lambda t: t.double()), image, text, s, b)
    torch_own = _siglip_loss_and_grads(loss("reference", lambda t: t.to(dtype)), image, text, s, b)
    _check_losses(got, want, torch_own, dtype, ["loss", "d_image", "d_text", "d_scale", "d_bias"])


@pytest.mark.parametrize("backend", FUSED)
def test_siglip_loss_of_a_rank_against_a_large_gathered_batch(backend):
    """The operator a rank runs: 512 images against 20000 gathered texts, positives at text i + 7000."""
    from eclip_kernels import reference
    from eclip_kernels.ops.siglip import OPS

    _needs(backend, torch.float32, "contrastive")
    (image,) = unit_features(512, D, torch.float32, seed=15, count=1, device=DEVICE)
    (texts,) = unit_features(BANK, D, torch.float32, seed=16, count=1, device=DEVICE)
    s, b = torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE)
    got = _siglip_loss_and_grads(lambda i, t, s, b: OPS[backend]["siglip_fwd"](i, t, s, b, None, None, 7000),
                                 image, texts, s, b)
    want = _siglip_loss_and_grads(lambda i, t, s, b: reference.siglip_loss_sum(
        i.double(), t.double(), s.double(), b.double(), None, None, 7000), image, texts, s, b)
    _check_losses(got, want, want, torch.float32, ["loss", "d_image", "d_text", "d_scale", "d_bias"])


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic_siglip_loss(backend):
    _needs(backend, torch.bfloat16, "contrastive")
    image, text = unit_features(CLIP_BATCH, D, torch.bfloat16, seed=17, device=DEVICE)
    ids = _clip_ids(CLIP_BATCH, seed=18)
    s, b = torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE)
    fn = lambda i, t, s, b: ek.siglip_loss(i, t, s, b, ids=ids, backend=backend)  # noqa: E731
    _assert_bitwise_repeats(*_deterministic_repeats(lambda: _siglip_loss_and_grads(fn, image, text, s, b)))


BANK = 20000


def _info_nce_inputs(dtype, seed=7, queries=512):
    query, positive, negatives = (unit_features(n, D, dtype, seed=seed + i, count=1, device=DEVICE)[0]
                                  for i, n in enumerate((queries, queries, BANK)))
    gen = torch.Generator().manual_seed(seed)
    qids = torch.randint(0, 5000, (queries,), generator=gen).to(DEVICE)
    nids = torch.randint(0, 5000, (BANK,), generator=gen).to(DEVICE)
    return [query, positive, negatives], qids, nids


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_info_nce_large_bank(backend, dtype):
    _needs(backend, dtype, "contrastive")
    tensors, qids, nids = _info_nce_inputs(dtype)
    assert (qids[:, None] == nids[None, :]).any(dim=1).float().mean() > 0.9  # most queries lose some negatives
    s = torch.tensor(14.3, device=DEVICE)

    def loss(backend_, cast):
        return lambda q, p, n, s: ek.info_nce(cast(q), cast(p), cast(n), cast(s), query_ids=qids, negative_ids=nids,
                                              backend=backend_)

    got = _loss_and_grads(loss(backend, lambda t: t), tensors, s)
    want = _loss_and_grads(loss("reference", lambda t: t.double()), tensors, s)
    torch_own = _loss_and_grads(loss("reference", lambda t: t.to(dtype)), tensors, s)
    _check_losses(got, want, torch_own, dtype, ["loss", "d_query", "d_positive", "d_negatives", "d_scale"])


# --- deterministic mode -----------------------------------------------------------------------------------


def _deterministic_repeats(fn):
    """fn() twice under torch.use_deterministic_algorithms(True), and once without."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = fn(), fn()
    finally:
        torch.use_deterministic_algorithms(before)
    return first, second, fn()


def _assert_bitwise_repeats(first, second, free):
    for i, (a, b, c) in enumerate(zip(first, second, free)):
        assert torch.equal(a, b), f"output {i} differs between two runs in deterministic mode"
        torch.testing.assert_close(a, c)  # and deterministic mode computes the same thing


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_clip_loss(backend, dtype):
    _needs(backend, dtype, "contrastive")
    image, text = unit_features(CLIP_BATCH, D, dtype, seed=8, device=DEVICE)
    ids = _clip_ids(CLIP_BATCH, seed=9)
    s = torch.tensor(14.3, device=DEVICE)
    _assert_bitwise_repeats(*_deterministic_repeats(
        lambda: _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, ids=ids, backend=backend), [image, text], s)))


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic_info_nce(backend):
    _needs(backend, torch.bfloat16, "contrastive")
    tensors, qids, nids = _info_nce_inputs(torch.bfloat16, seed=10)
    s = torch.tensor(14.3, device=DEVICE)
    fn = lambda q, p, n, s: ek.info_nce(q, p, n, s, query_ids=qids, negative_ids=nids, backend=backend)  # noqa: E731
    _assert_bitwise_repeats(*_deterministic_repeats(lambda: _loss_and_grads(fn, tensors, s)))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", list(SLOT_SHAPES.values()), ids=list(SLOT_SHAPES))
def test_deterministic_slot_attention(backend, shape):
    _needs(backend, torch.bfloat16, "slot_attention", shape[2])
    q, k, v, mask = _slot_inputs(shape, torch.bfloat16, masked=True, seed=11)
    gen = torch.Generator().manual_seed(12)
    grads = (torch.randn(q.shape[:2] + v.shape[2:], generator=gen).to(DEVICE),
             torch.randn(q.shape[:2], generator=gen).to(DEVICE))

    def once():
        out, ent, (dq, dk, dv) = run(q, k, v, mask, backend, eps=1e-8, grads=grads)
        return [out, ent, dq, dk, dv]

    _assert_bitwise_repeats(*_deterministic_repeats(once))

"""Contrastive losses on the Triton backend against the float64 reference.

On a CUDA GPU these run on the GPU; without one, on CPU tensors through the Triton interpreter, in their own
pytest process (TRITON_INTERPRET=1 must be set before Triton is imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_contrastive_triton.py
"""

from __future__ import annotations

import os

import pytest
import torch

import eclip_kernels as ek
from _helpers import loss_and_grads as _loss_and_grads
from _helpers import rel_err, unit_features

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("Triton tests need a CUDA GPU or TRITON_INTERPRET=1 (run them in their own pytest process)",
                allow_module_level=True)
if not ek.available_backends()["triton"].usable:
    pytest.skip(f"triton backend unusable: {ek.available_backends()['triton'].reason}", allow_module_level=True)

# bfloat16 tl.dot is wrong in the Triton interpreter (see test_slot_attention_triton.py): GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _features(n, dim, dtype, seed, count):
    return unit_features(n, dim, dtype, seed, count, device=DEVICE)


def _check(got, want, torch_own, dtype, names):
    for name, a, w, t in zip(names, got, want, torch_own):
        if dtype == torch.float32:
            assert rel_err(a, w) <= 1e-5, name
        else:
            assert rel_err(a, w) <= 2 * rel_err(t, w) + torch.finfo(dtype).eps, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, dim", [(1, 8), (5, 1), (37, 33), (70, 16)])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss(dtype, batch, dim, with_ids, scale):
    image, text = _features(batch, dim, dtype, batch + dim, 2)
    ids = (torch.randint(0, batch // 2 + 1, (batch,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
           if with_ids else None)
    s = torch.tensor(scale, device=DEVICE)
    got = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, ids=ids, backend="triton"), [image, text], s)
    want = _loss_and_grads(lambda i, t, s: ek.clip_loss(i.double(), t.double(), s.double(), ids=ids,
                                                        backend="reference"), [image, text], s)
    torch_own = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s.to(dtype), ids=ids, backend="reference"),
                                [image, text], s)
    _check(got, want, torch_own, dtype, ["loss", "d_image", "d_text", "d_scale"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("queries, bank", [(1, 1), (13, 50), (40, 3)])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
def test_info_nce(dtype, queries, bank, with_ids):
    query, positive = _features(queries, 33, dtype, 5, 2)
    (negatives,) = _features(bank, 33, dtype, 6, 1)
    gen = torch.Generator().manual_seed(2)
    qids = torch.randint(0, 6, (queries,), generator=gen).to(DEVICE) if with_ids else None
    nids = torch.randint(0, 6, (bank,), generator=gen).to(DEVICE) if with_ids else None
    s = torch.tensor(14.3, device=DEVICE)

    def run(backend, cast):
        return lambda q, p, n, s: ek.info_nce(cast(q), cast(p), cast(n), cast(s), query_ids=qids,
                                              negative_ids=nids, backend=backend)

    tensors = [query, positive, negatives]
    got = _loss_and_grads(run("triton", lambda t: t), tensors, s)
    want = _loss_and_grads(run("reference", lambda t: t.double()), tensors, s)
    torch_own = _loss_and_grads(run("reference", lambda t: t.to(dtype)), tensors, s)
    _check(got, want, torch_own, dtype, ["loss", "d_query", "d_positive", "d_negatives", "d_scale"])


def test_non_contiguous_and_deterministic_mode():
    image, text = _features(37, 33, torch.float32, 9, 2)
    image_nc = image.T.contiguous().T
    s = torch.tensor(14.3, device=DEVICE)
    base = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, backend="triton"), [image, text], s)
    strided = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, backend="triton"), [image_nc, text], s)
    for a, b in zip(strided, base):
        torch.testing.assert_close(a, b)
    torch.use_deterministic_algorithms(True)
    try:
        first = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, backend="triton"), [image, text], s)
        second = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, backend="triton"), [image, text], s)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(first, second, base):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)


def test_opcheck():
    from eclip_kernels.ops.contrastive import OPS

    image, text = (t.requires_grad_() for t in _features(7, 5, torch.float32, 12, 2))
    s = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    torch.library.opcheck(OPS["triton"]["clip_fwd"], (image, text, s, torch.tensor([0, 1, 1, 2, 3, 3, 4], device=DEVICE)))
    query, positive, negatives = (t.requires_grad_() for t in _features(4, 5, torch.float32, 13, 3))
    torch.library.opcheck(OPS["triton"]["rows_fwd"], (query, positive, negatives, s, None, None))


# --- launch geometries that take the multi-block and split paths (ECLIP_KERNELS_TRITON_GEOMETRY) -------------


@pytest.mark.parametrize("geometry", ["gpu:2", "gpu:64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_tiles_multi_block_and_split_paths(geometry, dtype, monkeypatch):
    """GPU block sizes at B = 300: with 2 target programs each program walks several row and column blocks
    (column partials read-modify-write, the register accumulator over many tiles); with 64 the backward
    splits the other side across programs and sums their partials."""
    from eclip_kernels.triton import contrastive as ct

    monkeypatch.setenv("ECLIP_KERNELS_TRITON_GEOMETRY", geometry)
    grids = []
    real = ct._bwd_grid

    def spy(*args):
        grids.append(real(*args))
        return grids[-1]

    monkeypatch.setattr(ct, "_bwd_grid", spy)
    batch, dim = 300, 40
    image, text = _features(batch, dim, dtype, 31, 2)
    ids = torch.randint(0, 120, (batch,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    s = torch.tensor(14.3, device=DEVICE)
    got = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, ids=ids, backend="triton"), [image, text], s)
    want = _loss_and_grads(lambda i, t, s: ek.clip_loss(i.double(), t.double(), s.double(), ids=ids,
                                                        backend="reference"), [image, text], s)
    torch_own = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s.to(dtype), ids=ids, backend="reference"),
                                [image, text], s)
    _check(got, want, torch_own, dtype, ["loss", "d_image", "d_text", "d_scale"])
    n_splits = [g[2] for g in grids]
    assert max(n_splits) > 1 if geometry == "gpu:64" else set(n_splits) == {1}


# --- gradients nobody asked for ----------------------------------------------------------------------------


def test_info_nce_with_a_no_grad_bank():
    """The inter-product loss: negatives from a momentum queue need no gradient (their sweep is skipped)."""
    query, positive = _features(20, 33, torch.float32, 32, 2)
    (bank,) = _features(70, 33, torch.float32, 33, 1)
    s = torch.tensor(14.3, device=DEVICE)

    def run(backend, cast):
        q, p = (cast(t).requires_grad_() for t in (query, positive))
        loss = ek.info_nce(q, p, cast(bank), cast(s), backend=backend)
        return [loss.detach(), *torch.autograd.grad(loss, (q, p))]

    for a, w in zip(run("triton", lambda t: t.clone()), run("reference", lambda t: t.double())):
        assert rel_err(a, w) <= 1e-5


@pytest.mark.parametrize("frozen", ["image", "text"])
def test_clip_loss_with_a_frozen_tower(frozen):
    image, text = _features(45, 33, torch.float32, 34, 2)
    s = torch.tensor(14.3, device=DEVICE, requires_grad=True)

    def run(backend, cast):
        i, t = cast(image).requires_grad_(frozen != "image"), cast(text).requires_grad_(frozen != "text")
        sc = cast(s.detach()).requires_grad_()
        loss = ek.clip_loss(i, t, sc, backend=backend)
        return [loss.detach(), *torch.autograd.grad(loss, [x for x in (i, t, sc) if x.requires_grad])]

    got, want = run("triton", lambda t: t.clone()), run("reference", lambda t: t.double())
    assert len(got) == 3
    for a, w in zip(got, want):
        assert rel_err(a, w) <= 1e-5


# --- opcheck of the backward operators ---------------------------------------------------------------------


@pytest.mark.parametrize("output_mask", [[True, True, True], [False, True, False]])
def test_opcheck_clip_backward(output_mask):
    from eclip_kernels.ops.contrastive import OPS

    image, text = _features(7, 5, torch.float32, 35, 2)
    s = torch.tensor(5.0, device=DEVICE)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4], device=DEVICE)
    loss, row_lse, col_lse = OPS["triton"]["clip_fwd"](image, text, s, ids)
    torch.library.opcheck(OPS["triton"]["clip_bwd"], (torch.ones_like(loss), image, text, s, ids, row_lse, col_lse,
                                                      output_mask))


@pytest.mark.parametrize("output_mask", [[True, True, True, True], [True, False, False, True]])
def test_opcheck_rows_backward(output_mask):
    from eclip_kernels.ops.contrastive import OPS

    query, positive, keys = _features(6, 5, torch.float32, 36, 3)
    s = torch.tensor(5.0, device=DEVICE)
    total, lse = OPS["triton"]["rows_fwd"](query, positive, keys, s, None, None)
    torch.library.opcheck(OPS["triton"]["rows_bwd"], (torch.ones_like(total), query, positive, keys, s, None, None,
                                                      lse, output_mask))

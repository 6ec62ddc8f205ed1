"""siglip_loss on the Triton backend against the float64 reference and open_clip's SigLipLoss.

On a CUDA GPU these run on the GPU; without one, on CPU tensors through the Triton interpreter, in their own
pytest process (TRITON_INTERPRET=1 must be set before Triton is imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_siglip_triton.py

Tolerances as in tests/test_contrastive_triton.py: float32 1e-5 relative to max |reference|; float16 /
bfloat16 at most 2x PyTorch's own error at that dtype plus one unit in the last place.
"""

from __future__ import annotations

import os

import pytest
import torch

import eclip_kernels as ek
from eclip_kernels import reference
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

try:
    from open_clip.loss import SigLipLoss
except ImportError:  # optional test dependency
    SigLipLoss = None

# bfloat16 tl.dot is wrong in the Triton interpreter (see test_slot_attention_triton.py): GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
NAMES = ["loss", "d_image", "d_text", "d_scale", "d_bias"]


def _features(n, dim, dtype, seed, count=2):
    return unit_features(n, dim, dtype, seed, count, device=DEVICE)


def _scalars(scale=10.0, bias=-10.0):
    return torch.tensor(scale, device=DEVICE), torch.tensor(bias, device=DEVICE)


def loss_and_grads(fn, image, text, scale, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale, bias)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _run(backend, ids=None, cast=lambda t: t):
    return lambda i, t, s, b: ek.siglip_loss(cast(i), cast(t), cast(s), cast(b), ids=ids, backend=backend)


def _check(got, want, torch_own, dtype, names=NAMES):
    for name, a, w, t in zip(names, got, want, torch_own):
        if dtype == torch.float32:
            assert rel_err(a, w) <= 1e-5, name
        else:
            assert rel_err(a, w) <= 2 * rel_err(t, w) + torch.finfo(dtype).eps, name


def _compare(image, text, s, b, ids, dtype):
    got = loss_and_grads(_run("triton", ids), image, text, s, b)
    want = loss_and_grads(_run("reference", ids, lambda t: t.double()), image, text, s, b)
    torch_own = loss_and_grads(_run("reference", ids, lambda t: t.to(dtype)), image, text, s, b)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    _check(got, want, torch_own, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, dim", [(1, 8), (5, 1), (37, 33), (70, 16)])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (1.0, 0.0), (100.0, -5.0)])
def test_siglip_loss(dtype, batch, dim, with_ids, scale, bias):
    image, text = _features(batch, dim, dtype, batch + dim)
    ids = (torch.randint(0, batch // 2 + 1, (batch,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
           if with_ids else None)
    _compare(image, text, *_scalars(scale, bias), ids, dtype)


@pytest.mark.skipif(SigLipLoss is None, reason="open_clip (open-clip-torch) is not installed")
@pytest.mark.parametrize("batch, dim", [(37, 33), (64, 128)])
def test_matches_open_clip(batch, dim):
    image, text = _features(batch, dim, torch.float32, 3)
    s, b = _scalars()
    got = loss_and_grads(_run("triton"), image, text, s, b)
    want = loss_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s, b), image, text, s, b)
    for name, a, w in zip(NAMES, got, want):
        assert rel_err(a, w) <= 1e-5, name


def test_non_contiguous_inputs():
    image, text = _features(37, 33, torch.float32, 9)
    s, b = _scalars()
    base = loss_and_grads(_run("triton"), image, text, s, b)
    strided = loss_and_grads(
        lambda i, t, s, b: ek.siglip_loss(torch.cat([i, i], dim=1)[:, :33], t.T.contiguous().T, s, b, backend="triton"),
        image, text, s, b)
    for a, w in zip(strided, base):
        torch.testing.assert_close(a, w)
    ids = torch.arange(37, device=DEVICE).repeat_interleave(2)[::2]  # stride-2 ids, all distinct
    assert not ids.is_contiguous()
    for a, w in zip(loss_and_grads(_run("triton", ids), image, text, s, b), base):
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("offset", [0, 9, 40])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
def test_operator_at_an_offset(offset, with_ids):
    """What a rank runs: its M = 21 images against N = 61 gathered texts, positives at text i + offset (or
    of equal ids across the whole bank)."""
    from eclip_kernels.ops.siglip import OPS

    (image,) = _features(21, 12, torch.float32, 10, 1)
    (texts,) = _features(61, 12, torch.float32, 11, 1)
    gen = torch.Generator().manual_seed(2)
    image_ids = torch.randint(0, 15, (21,), generator=gen).to(DEVICE) if with_ids else None
    text_ids = torch.randint(0, 15, (61,), generator=gen).to(DEVICE) if with_ids else None
    s, b = _scalars()
    got = loss_and_grads(lambda i, t, s, b: OPS["triton"]["siglip_fwd"](i, t, s, b, image_ids, text_ids, offset),
                         image, texts, s, b)
    want = loss_and_grads(lambda i, t, s, b: reference.siglip_loss_sum(i.double(), t.double(), s.double(), b.double(),
                                                                       image_ids, text_ids, offset),
                          image, texts, s, b)
    for name, a, w in zip(NAMES, got, want):
        assert rel_err(a, w) <= 1e-5, name


def test_deterministic():
    image, text = _features(45, 33, torch.float32, 12)
    s, b = _scalars()
    torch.use_deterministic_algorithms(True)
    try:
        first = loss_and_grads(_run("triton"), image, text, s, b)
        second = loss_and_grads(_run("triton"), image, text, s, b)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, w in zip(first, second):
        assert torch.equal(a, w)


# --- launch geometries that take the multi-block and split paths (ECLIP_KERNELS_TRITON_GEOMETRY) -------------


@pytest.mark.parametrize("geometry", ["gpu:2", "gpu:64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_tiles_multi_block_and_split_paths(geometry, dtype, monkeypatch):
    """GPU block sizes at B = 300 (odd, partial tiles): with 2 target programs each program walks several row
    and column blocks in the forward and every tile of the other side in the backward; with 64 the forward
    splits the columns and the backward splits the other side across programs, summing their partials."""
    from eclip_kernels.triton import siglip as ts

    monkeypatch.setenv("ECLIP_KERNELS_TRITON_GEOMETRY", geometry)
    grids = {"fwd": [], "bwd": []}
    for name, key in (("_fwd_grid", "fwd"), ("_bwd_grid", "bwd")):
        real = getattr(ts, name)

        def spy(*args, _real=real, _key=key):
            grids[_key].append(_real(*args))
            return grids[_key][-1]

        monkeypatch.setattr(ts, name, spy)
    batch, dim = 300, 40
    image, text = _features(batch, dim, dtype, 31)
    ids = torch.randint(0, 120, (batch,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _compare(image, text, *_scalars(), ids, dtype)
    fwd_rper, fwd_splits = grids["fwd"][0][0], grids["fwd"][0][3]
    bwd_splits = [g[2] for g in grids["bwd"]]
    if geometry == "gpu:2":
        assert fwd_rper > 1 and set(bwd_splits) == {1}
    else:
        assert fwd_splits > 1 and max(bwd_splits) > 1


# --- gradients nobody asked for ----------------------------------------------------------------------------


@pytest.mark.parametrize("needs", [(True, False, True, True), (False, True, False, False),
                                   (False, False, True, True), (True, True, False, True)])
def test_only_requested_gradients(needs):
    image, text = _features(45, 33, torch.float32, 34)
    s, b = _scalars()

    def run(backend, cast):
        leaves = [cast(t).requires_grad_(n) for t, n in zip((image, text, s, b), needs)]
        loss = ek.siglip_loss(*leaves, backend=backend)
        return [loss.detach(), *torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])]

    got, want = run("triton", lambda t: t.clone()), run("reference", lambda t: t.double())
    assert len(got) == 1 + sum(needs)
    for a, w in zip(got, want):
        assert rel_err(a, w) <= 1e-5


# --- opcheck of the operators ---------------------------------------------------------------------------------


def test_opcheck_forward():
    from eclip_kernels.ops.siglip import OPS

    image, text = (t.requires_grad_() for t in _features(7, 5, torch.float32, 12))
    (more,) = (t.requires_grad_() for t in _features(12, 5, torch.float32, 13, 1))
    s = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    b = torch.tensor(-2.0, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4], device=DEVICE)
    for args in ((image, text, s, b, ids, ids, 0), (image, more, s, b, None, None, 5)):
        torch.library.opcheck(OPS["triton"]["siglip_fwd"], args)


@pytest.mark.parametrize("output_mask", [[True, True, True, True], [False, True, False, True],
                                         [False, False, True, True]])
def test_opcheck_backward(output_mask):
    from eclip_kernels.ops.siglip import OPS

    image, text = _features(7, 5, torch.float32, 35)
    s, b = _scalars(5.0, -2.0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4], device=DEVICE)
    total = OPS["triton"]["siglip_fwd"](image, text, s, b, ids, ids, 0)
    torch.library.opcheck(OPS["triton"]["siglip_bwd"], (torch.ones_like(total), image, text, s, b, ids, ids, 0,
                                                        output_mask))

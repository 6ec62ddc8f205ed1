"""siglip_loss (the sigmoid loss of SigLIP) against the float64 reference, open_clip's SigLipLoss, and across 2
gloo processes (even and uneven ranks, a rank without rows).

Tolerance: 1e-5 relative to max |reference| in float32 (the issue's bound); float64 1e-10; bfloat16 / float16:
at most 2x PyTorch's own error at that dtype plus one unit in the last place (tests/_helpers.py).
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import eclip_kernels as ek
from eclip_kernels import reference
from eclip_kernels.aten import siglip as aten_siglip
from eclip_kernels.ops.siglip import OPS
from _helpers import rel_err, saved_tensor_shapes, unit_features

try:
    from open_clip.loss import SigLipLoss
except ImportError:  # optional test dependency
    SigLipLoss = None
needs_open_clip = pytest.mark.skipif(SigLipLoss is None, reason="open_clip (open-clip-torch) is not installed")

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
NAMES = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
# (logit_scale, logit_bias): open_clip's SigLIP initialization (exp(log 10), -10), no bias, a sharp scale
SCALE_BIAS = [(10.0, -10.0), (1.0, 0.0), (100.0, -5.0)]


@pytest.fixture(params=["one_tile", "many_tiles"])
def tile(request, monkeypatch):
    """The tiled kernels with their default tile and with tiles of 16 (odd B then spans partial tiles)."""
    if request.param == "many_tiles":
        monkeypatch.setattr(aten_siglip, "TILE", 16)
    return request.param


def _features(batch, dim, dtype=torch.float32, seed=0, n=2):
    return unit_features(batch, dim, dtype, seed, n)


def loss_and_grads(fn, image, text, scale, bias):
    """[loss, d_image, d_text, d_scale, d_bias] of ``fn(image, text, scale, bias)`` on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale, bias)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _oracle(ids=None):
    return lambda i, t, s, b: ek.siglip_loss(i.double(), t.double(), s.double(), b.double(), ids=ids,
                                             backend="reference")


def _assert_close(got, want, rtol, names=NAMES):
    for name, a, b in zip(names, got, want):
        err = rel_err(a, b)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


def _ids(batch, seed=1):
    return torch.randint(0, batch // 2 + 1, (batch,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch, dim", [(1, 8), (5, 1), (37, 33), (70, 16)])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("scale, bias", SCALE_BIAS)
def test_matches_float64_reference(tile, dtype, batch, dim, with_ids, scale, bias):
    image, text = _features(batch, dim, dtype, seed=batch + dim)
    ids = _ids(batch) if with_ids else None
    s, b = torch.tensor(scale), torch.tensor(bias)
    got = loss_and_grads(lambda i, t, s, b: ek.siglip_loss(i, t, s, b, ids=ids, backend="cpu"), image, text, s, b)
    want = loss_and_grads(_oracle(ids), image, text, s, b)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[3].dtype == torch.float32
    _assert_close(got, want, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_features(tile, dtype):
    image, text = _features(37, 33, dtype)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    got = loss_and_grads(lambda i, t, s, b: ek.siglip_loss(i, t, s, b, backend="cpu"), image, text, s, b)
    want = loss_and_grads(_oracle(), image, text, s, b)
    torch_own = loss_and_grads(lambda i, t, s, b: ek.siglip_loss(i, t, s.to(dtype), b.to(dtype), backend="reference"),
                               image, text, s, b)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, a, w, t in zip(NAMES, got, want, torch_own):
        # accumulated in float32: at most PyTorch's own error at the dtype (2x, plus one ulp of it)
        assert rel_err(a, w) <= 2 * rel_err(t, w) + torch.finfo(dtype).eps, name


@needs_open_clip
@pytest.mark.parametrize("batch, dim", [(1, 4), (37, 33), (64, 512), (300, 64)])
@pytest.mark.parametrize("scale, bias", SCALE_BIAS)
def test_matches_open_clip(tile, batch, dim, scale, bias):
    image, text = _features(batch, dim, seed=3)
    s, b = torch.tensor(scale), torch.tensor(bias)
    got = loss_and_grads(lambda i, t, s, b: ek.siglip_loss(i, t, s, b), image, text, s, b)
    want = loss_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s, b), image, text, s, b)
    _assert_close(got, want, 1e-5)


@needs_open_clip
def test_open_clip_call_convention_with_model_parameters():
    """open_clip's models hold log(1/tau) and the raw bias and return (logit_scale.exp(), logit_bias), which
    SigLipLoss takes as they are: the same arguments give the same loss and parameter gradients here."""
    image, text = _features(23, 16, seed=4)

    def grads(loss_fn):
        log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        bias = torch.nn.Parameter(torch.tensor(-10.0))
        loss = loss_fn(image, text, log_scale.exp(), bias)
        loss.backward()
        return [loss.detach(), log_scale.grad, bias.grad]

    _assert_close(grads(ek.siglip_loss), grads(SigLipLoss()), 1e-5, ["loss", "d_log_scale", "d_bias"])


def test_ids_positives_by_hand():
    image, text = _features(6, 8, seed=5)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])
    s, b = 10.0, -3.0
    loss = ek.siglip_loss(image, text, s, b, ids=ids)
    z = s * image.double() @ text.double().T + b
    terms = [-torch.nn.functional.logsigmoid(z[i, j] if ids[i] == ids[j] else -z[i, j])
             for i in range(6) for j in range(6)]
    assert abs(loss.item() - (torch.stack(terms).sum() / 6).item()) < 1e-5
    # unique ids are the diagonal positives of the call without ids
    torch.testing.assert_close(ek.siglip_loss(image, text, s, b, ids=torch.arange(6) * 7),
                               ek.siglip_loss(image, text, s, b), rtol=0, atol=0)


def test_no_bias_is_zero_bias():
    image, text = _features(9, 5, seed=6)
    torch.testing.assert_close(ek.siglip_loss(image, text, 10.0, None), ek.siglip_loss(image, text, 10.0, 0.0))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_contiguous_inputs(backend):
    image, text = _features(37, 33, seed=7)
    wide = torch.cat([image, image], dim=1)[:, :33]
    transposed = text.T.contiguous().T
    assert not wide.is_contiguous() and not transposed.is_contiguous()
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    fn = lambda i, t, s, b: ek.siglip_loss(i, t, s, b, ids=_ids(37), backend=backend)  # noqa: E731
    base = loss_and_grads(fn, image, text, s, b)
    strided = loss_and_grads(lambda i, t, s, b: fn(torch.cat([i, i], dim=1)[:, :33], t.T.contiguous().T, s, b),
                             image, text, s, b)
    for a, w in zip(strided, base):
        torch.testing.assert_close(a, w)
    # the leaves themselves non-contiguous: gradients come back in their shape
    got = loss_and_grads(fn, wide, transposed, s, b)
    for a, w in zip(got, base):
        torch.testing.assert_close(a, w)


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(aten_siglip, "TILE", 4)  # 7 rows: two tiles, one partial
    image, text = (t.requires_grad_() for t in _features(7, 5, torch.float64, seed=8))
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    for ids in (None, torch.tensor([0, 1, 0, 2, 3, 2, 0])):
        assert torch.autograd.gradcheck(lambda i, t, s, b: ek.siglip_loss(i, t, s, b, ids=ids, backend="cpu"),
                                        (image, text, s, b))
    # the operator a rank runs: its rows against more texts, its positives at an offset
    texts = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s, b: OPS["cpu"]["siglip_fwd"](i, t, s, b, None, None, 3),
                                    (image, texts, s, b))


def test_operator_at_an_offset_matches_the_reference(monkeypatch):
    """The rows of one rank (M images) against the gathered texts (N), positives at text i + offset."""
    monkeypatch.setattr(aten_siglip, "TILE", 16)
    (image,) = _features(21, 12, seed=9, n=1)
    (texts,) = _features(50, 12, seed=10, n=1)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    for offset in (0, 7, 29):
        got = loss_and_grads(lambda i, t, s, b: OPS["cpu"]["siglip_fwd"](i, t, s, b, None, None, offset),
                             image, texts, s, b)
        want = loss_and_grads(lambda i, t, s, b: reference.siglip_loss_sum(i.double(), t.double(), s.double(),
                                                                           b.double(), None, None, offset),
                              image, texts, s, b)
        _assert_close(got, want, 1e-5)


def test_opcheck():
    image, text = (t.requires_grad_() for t in _features(7, 5, seed=11))
    (more_text,) = (t.requires_grad_() for t in _features(12, 5, seed=12, n=1))
    s = torch.tensor(5.0, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    more_ids = torch.tensor([5, 0, 1, 1, 2, 3, 3, 4, 6, 0, 7, 1])
    for args in ((image, text, s, b, None, None, 0), (image, text, s, b, ids, ids, 0),
                 (image, more_text, s, b, None, None, 5), (image, more_text, s, b, ids, more_ids, 5)):
        torch.library.opcheck(OPS["cpu"]["siglip_fwd"], args)


@pytest.mark.parametrize("mask", [(True, True, True, True), (False, True, False, True), (True, False, True, False),
                                  (False, False, True, True)])
def test_opcheck_backward(mask):
    image, text = _features(7, 5, seed=13)
    s, b = torch.tensor(5.0), torch.tensor(-2.0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    total = OPS["cpu"]["siglip_fwd"](image, text, s, b, ids, ids, 0)
    torch.library.opcheck(OPS["cpu"]["siglip_bwd"], (torch.ones_like(total), image, text, s, b, ids, ids, 0,
                                                     list(mask)))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_only_requested_gradients_are_computed(needs, monkeypatch):
    """A frozen tower gets no gradient and costs no product for it; scale and bias gradients stay exact."""
    monkeypatch.setattr(aten_siglip, "TILE", 16)
    image, text = _features(30, 16, seed=14)
    calls = []
    real_addmm = torch.Tensor.addmm_

    def counting_addmm(self, *args, **kwargs):
        calls.append(self.shape)
        return real_addmm(self, *args, **kwargs)

    def grads(backend):
        leaves = [t.clone().requires_grad_(n) for t, n in zip((image, text), needs)]
        s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        loss = ek.siglip_loss(*leaves, s, b, backend=backend)
        return torch.autograd.grad(loss, [t for t in leaves if t.requires_grad] + [s, b])

    want = grads("reference")
    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm)
    got = grads("cpu")
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
    # one addmm_ per tile (2 x 2 tiles) for each feature gradient that is needed
    assert len(calls) == 4 * (needs[0] + needs[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_under_autocast_takes_the_features_in_the_autocast_dtype(dtype):
    gen = torch.Generator().manual_seed(15)
    image, text = (torch.randn(37, 16, generator=gen).requires_grad_() for _ in range(2))
    ids = torch.arange(37) // 2
    with torch.autocast("cpu", dtype=dtype):
        img, txt = (torch.nn.functional.normalize(t, dim=1) for t in (image, text))
        assert img.dtype == torch.float32
        loss = ek.siglip_loss(img, txt, 10.0, -10.0, ids=ids)
    assert loss.dtype == torch.float32
    loss.backward()
    assert image.grad.dtype == torch.float32 and text.grad.dtype == torch.float32
    rounded = [torch.nn.functional.normalize(t.detach(), dim=1).to(dtype) for t in (image, text)]
    torch.testing.assert_close(loss, ek.siglip_loss(*rounded, 10.0, -10.0, ids=ids), atol=0, rtol=0)


def test_backward_inside_autocast_is_not_autocast():
    image, text = _features(64, 32, seed=16)

    def grads(backward_in_autocast):
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            loss = ek.siglip_loss(i, t, 10.0, -10.0, backend="cpu")
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
        return i.grad, t.grad

    for inside, outside in zip(grads(True), grads(False)):
        assert torch.equal(inside, outside)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    image, text = _features(9, 6, seed=17)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 5])

    def loss_fn(i, t, s, b):
        return ek.siglip_loss(i, t, s, b, ids=ids) + ek.siglip_loss(i, t.flip(0), s, b)

    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    eager = loss_and_grads(loss_fn, image, text, s, b)
    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True), image, text, s, b)
    for a, w in zip(compiled, eager):
        torch.testing.assert_close(a, w)


def test_backward_keeps_nothing_of_size_BxB():
    batch = 37
    image, text = (t.requires_grad_() for t in _features(batch, 5, seed=18))
    s = torch.tensor(10.0, requires_grad=True)
    shapes = saved_tensor_shapes(lambda: ek.siglip_loss(image, text, s, -10.0, backend="cpu"))
    assert shapes and max(torch.Size(x).numel() for x in shapes) <= batch * 5, shapes
    assert any(torch.Size(x).numel() >= batch * batch for x in
               saved_tensor_shapes(lambda: ek.siglip_loss(image, text, s, -10.0, backend="reference")))


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
def test_no_op_allocates_more_than_a_tile_or_the_features(monkeypatch, with_ids):
    """Forward and backward at B = 300 with tiles of 64: no intermediate is larger than a 64 x 64 tile or a
    (B, D) gradient, while the reference makes B x B ones (the check can fail)."""
    monkeypatch.setattr(aten_siglip, "TILE", 64)
    batch, dim = 300, 8
    image, text = _features(batch, dim, seed=19)
    ids = _ids(batch) if with_ids else None
    bound = max(64 * 64, batch * dim)
    assert batch * batch > bound
    for backend, fits in (("cpu", True), ("reference", False)):
        mode = _LargestOutput()
        with mode:
            loss_and_grads(lambda i, t, s, b: ek.siglip_loss(i, t, s, b, ids=ids, backend=backend),
                           image, text, torch.tensor(10.0), torch.tensor(-10.0))
        assert (mode.largest <= bound) == fits, (backend, mode.largest)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda i, t: ek.siglip_loss(i, t[:-1], 1.0, 0.0), ValueError, "same shape"),
        (lambda i, t: ek.siglip_loss(i, t.double(), 1.0, 0.0), TypeError, "same dtype"),
        (lambda i, t: ek.siglip_loss(i[0], t[0], 1.0, 0.0), ValueError, "must have shape"),
        (lambda i, t: ek.siglip_loss(i, t.to("meta"), 1.0, 0.0), ValueError, "different devices"),
        (lambda i, t: ek.siglip_loss(i.long(), t.long(), 1.0, 0.0), TypeError, "floating-point"),
        (lambda i, t: ek.siglip_loss(i[:, :0], t[:, :0], 1.0, 0.0), ValueError, "no features"),
        (lambda i, t: ek.siglip_loss(i[:0], t[:0], 1.0, 0.0), ValueError, "at least one sample"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, 0.0, ids=torch.arange(3)), ValueError,
         "ids must be a 1-d tensor of length 5"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, 0.0, ids=torch.ones(5)), TypeError, "ids must be an integer tensor"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, 0.0, ids=torch.arange(5).to("meta")), ValueError, "ids is on meta"),
        (lambda i, t: ek.siglip_loss(i, t, torch.ones(2), 0.0), ValueError, "logit_scale must be"),
        (lambda i, t: ek.siglip_loss(i, t, "1", 0.0), TypeError, "logit_scale must be"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, torch.ones(2)), ValueError, "logit_bias must be"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, torch.tensor(1)), ValueError, "logit_bias must be"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, "0"), TypeError, "logit_bias must be"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, 0.0, backend="cuda"), (RuntimeError, ValueError), "backend 'cuda'"),
        (lambda i, t: ek.siglip_loss(i, t, 1.0, 0.0, backend="tpu"), ValueError, "unknown backend 'tpu'"),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    image, text = _features(5, 4)
    with pytest.raises(error, match=message):
        call(image, text)


# --- two gloo processes: even ranks (against open_clip), uneven ranks, a rank without rows -----------------

WORLD = 2
BATCH, DIM = 10, 6
SPLITS = [(5, 5), (6, 4), (10, 0), (0, 10)]  # rows of rank 0 and rank 1 (10 in all)
SCALE, BIAS = 10.0, -10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from eclip_kernels.losses import row_share

    def mine(t, split):
        start = sum(split[:rank])
        return t[start:start + split[rank]].clone()

    def leaves(split):
        return (mine(data["image"], split).requires_grad_(), mine(data["text"], split).requires_grad_(),
                torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True))

    try:
        group, out = dist.group.WORLD, {}
        for split in SPLITS:
            for backend in ("cpu", "reference"):
                for use_ids in (False, True):
                    i, t, s, b = leaves(split)
                    loss = ek.siglip_loss(i, t, s, b, ids=mine(data["ids"], split) if use_ids else None, group=group,
                                          backend=backend)
                    share = row_share(split[rank], group)
                    (share * loss).backward()
                    out[(split, backend, use_ids)] = (loss.detach(), share, i.grad, t.grad, s.grad, b.grad)
        # even ranks: the unweighted loss against open_clip's SigLipLoss(rank, world_size), both exchanges
        if SigLipLoss is not None:
            for impl in ("bidir", "gather"):
                for name, fn in (("ours", lambda i, t, s, b: ek.siglip_loss(i, t, s, b, group=group)),
                                 (impl, SigLipLoss(rank=rank, world_size=world, dist_impl=impl))):
                    i, t, s, b = leaves((5, 5))
                    loss = fn(i, t, s, b)
                    loss.backward()
                    out[("open_clip", name)] = (loss.detach(), i.grad, t.grad, s.grad, b.grad)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results():
    image, text = _features(BATCH, DIM, seed=20)
    data = dict(image=image, text=text, ids=torch.tensor([0, 1, 2, 0, 3, 4, 2, 5, 6, 1]))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(WORLD, _free_port(), data, results), nprocs=WORLD, join=True)
    return data, {r: results[r] for r in range(WORLD)}


@pytest.mark.slow
@pytest.mark.parametrize("use_ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}+{s[1]}")
def test_ranks_weighted_by_their_share_give_the_single_process_loss_and_gradients(gloo_results, split, backend,
                                                                                   use_ids):
    """Each rank backpropagates its loss times its share B_r / B_total: the weighted losses add up to the
    single-process loss of the concatenated batch, each rank gets exactly the single-process gradients of its
    rows (scale and bias gradients add up over ranks), and a rank without rows returns 0 and zero gradients."""
    data, results = gloo_results
    ids = data["ids"] if use_ids else None
    single = loss_and_grads(_oracle(ids), data["image"], data["text"], torch.tensor(SCALE), torch.tensor(BIAS))
    ranks = [results[r][(split, backend, use_ids)] for r in range(WORLD)]
    assert [float(r[1]) for r in ranks] == [b / sum(split) for b in split]
    assert rel_err(sum(r[1] * r[0] for r in ranks), single[0]) <= 1e-5
    assert rel_err(torch.cat([r[2] for r in ranks]), single[1]) <= 1e-5
    assert rel_err(torch.cat([r[3] for r in ranks]), single[2]) <= 1e-5
    assert rel_err(sum(r[4] for r in ranks), single[3]) <= 1e-5
    assert rel_err(sum(r[5] for r in ranks), single[4]) <= 1e-5
    for r, rows in zip(ranks, split):
        if rows == 0:  # no rows: loss 0 and zero gradients, not None
            assert r[0].item() == 0.0 and r[2].shape == (0, DIM) and r[4].item() == 0.0 and r[5].item() == 0.0


@pytest.mark.slow
@needs_open_clip
@pytest.mark.parametrize("impl", ["bidir", "gather"])
def test_even_ranks_match_open_clip_per_rank(gloo_results, impl):
    """Unweighted, on 5 + 5 rows: each rank's loss and every gradient equal open_clip's
    SigLipLoss(rank, world_size) on that rank (its default ring exchange and its all_gather), and the mean of
    the losses is the single-process loss (open_clip normalizes each rank's loss by its local batch)."""
    data, results = gloo_results
    for r in range(WORLD):
        _assert_close(results[r][("open_clip", "ours")], results[r][("open_clip", impl)], 1e-5)
    single = loss_and_grads(_oracle(), data["image"], data["text"], torch.tensor(SCALE), torch.tensor(BIAS))
    losses = torch.stack([results[r][("open_clip", "ours")][0] for r in range(WORLD)])
    assert rel_err(losses.mean(), single[0]) <= 1e-5
    # feature gradients: world_size x the single-process ones (DDP's averaging brings them back)
    grads = torch.cat([results[r][("open_clip", "ours")][1] for r in range(WORLD)])
    assert rel_err(grads, WORLD * single[1]) <= 1e-5

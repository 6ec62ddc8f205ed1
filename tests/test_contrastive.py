"""Contrastive losses (clip_loss, info_nce, MomentumQueue) against the float64 reference, open_clip's
ClipLoss, and across 2 gloo processes.

Tolerance: 1e-5 relative to max |reference| in float32 (the issue's bound); float64 1e-10.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eclip_kernels as ek
from eclip_kernels.aten import contrastive as aten_contrastive
from _helpers import loss_and_grads as _loss_and_grads
from _helpers import rel_err, unit_features

try:
    from open_clip.loss import ClipLoss
except ImportError:  # optional test dependency
    ClipLoss = None
needs_open_clip = pytest.mark.skipif(ClipLoss is None, reason="open_clip (open-clip-torch) is not installed")

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(params=["one_tile", "many_tiles"])
def tile(request, monkeypatch):
    """Run the tiled kernels with their default tile and with tiles of 16 (odd B then spans partial tiles)."""
    if request.param == "many_tiles":
        monkeypatch.setattr(aten_contrastive, "TILE", 16)
    return request.param


def _features(batch, dim, dtype=torch.float32, seed=0, n=2):
    return unit_features(batch, dim, dtype, seed, n)


def _assert_all_close(got, want, rtol, names):
    for name, a, b in zip(names, got, want):
        err = rel_err(a, b)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch, dim", [(1, 8), (5, 1), (37, 33), (70, 16)])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_matches_float64_reference(tile, dtype, batch, dim, with_ids, scale):
    image, text = _features(batch, dim, dtype, seed=batch + dim)
    ids = torch.randint(0, batch // 2 + 1, (batch,), generator=torch.Generator().manual_seed(1)) if with_ids else None
    s = torch.tensor(scale)

    def fused(i, t, s):
        return ek.clip_loss(i, t, s, ids=ids, backend="cpu")

    def oracle(i, t, s):
        return ek.clip_loss(i.double(), t.double(), s.double(), ids=ids, backend="reference")

    got = _loss_and_grads(fused, [image, text], s)
    want = _loss_and_grads(oracle, [image, text], s)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_all_close(got, want, RTOL[dtype], ["loss", "d_image", "d_text", "d_scale"])


def test_clip_loss_low_precision_features(tile):
    image, text = _features(37, 33, torch.bfloat16)
    s = torch.tensor(14.3)
    got = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s, backend="cpu"), [image, text], s)
    want = _loss_and_grads(lambda i, t, s: ek.clip_loss(i.double(), t.double(), s.double(), backend="reference"),
                           [image, text], s)
    torch_own = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s.bfloat16(), backend="reference"), [image, text], s)
    for name, a, w, t in zip(["loss", "d_image", "d_text", "d_scale"], got, want, torch_own):
        # accumulated in float32: at most PyTorch's own bfloat16 error (2x, plus one bfloat16 ulp)
        assert rel_err(a, w) <= 2 * rel_err(t, w) + torch.finfo(torch.bfloat16).eps, name


@needs_open_clip
@pytest.mark.parametrize("batch, dim", [(1, 4), (37, 33), (64, 512)])
def test_clip_loss_matches_open_clip(tile, batch, dim):
    image, text = _features(batch, dim, seed=3)
    s = torch.tensor(1 / 0.07)
    got = _loss_and_grads(lambda i, t, s: ek.clip_loss(i, t, s), [image, text], s)
    want = _loss_and_grads(lambda i, t, s: ClipLoss()(i, t, s), [image, text], s)
    _assert_all_close(got, want, 1e-5, ["loss", "d_image", "d_text", "d_scale"])


@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("queries, bank, dim", [(1, 1, 3), (13, 50, 33), (40, 17, 8)])
def test_info_nce_matches_float64_reference(tile, with_ids, dtype, queries, bank, dim):
    query, positive = _features(queries, dim, dtype, seed=5)
    (negatives,) = _features(bank, dim, dtype, seed=6, n=1)
    gen = torch.Generator().manual_seed(2)
    qids = torch.randint(0, 6, (queries,), generator=gen) if with_ids else None
    nids = torch.randint(0, 6, (bank,), generator=gen) if with_ids else None
    s = torch.tensor(14.3)

    def fused(q, p, n, s):
        return ek.info_nce(q, p, n, s, query_ids=qids, negative_ids=nids, backend="cpu")

    def oracle(q, p, n, s):
        return ek.info_nce(q.double(), p.double(), n.double(), s.double(), query_ids=qids, negative_ids=nids,
                           backend="reference")

    got = _loss_and_grads(fused, [query, positive, negatives], s)
    want = _loss_and_grads(oracle, [query, positive, negatives], s)
    _assert_all_close(got, want, RTOL[dtype], ["loss", "d_query", "d_positive", "d_negatives", "d_scale"])


def test_info_nce_ids_remove_exactly_the_same_product_negatives():
    query, positive = _features(4, 8, seed=7)
    (negatives,) = _features(6, 8, seed=8, n=1)
    qids, nids = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 5, 1, 6, 7])
    masked = ek.info_nce(query, positive, negatives, 10.0, query_ids=qids, negative_ids=nids)
    by_hand = []
    for i in range(4):
        keep = negatives[nids != qids[i]]
        by_hand.append(ek.info_nce(query[i:i + 1], positive[i:i + 1], keep, 10.0))
    torch.testing.assert_close(masked, torch.stack(by_hand).mean())


def test_clip_loss_ids_equal_removing_same_product_columns_by_hand():
    image, text = _features(5, 8, seed=9)
    ids = torch.tensor([0, 1, 0, 2, 1])
    loss = ek.clip_loss(image, text, 10.0, ids=ids)
    logits = 10.0 * image.double() @ text.double().T
    terms = []
    for i in range(5):
        keep = [j for j in range(5) if j == i or ids[j] != ids[i]]
        terms.append(torch.logsumexp(logits[i, keep], 0) - logits[i, i])
        terms.append(torch.logsumexp(logits[keep, i], 0) - logits[i, i])
    assert abs(loss.item() - (torch.stack(terms).sum() / 10).item()) < 1e-5


def test_gradcheck_float64():
    image, text = _features(6, 4, torch.float64, seed=10)
    ids = torch.tensor([0, 1, 0, 2, 3, 2])
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    image.requires_grad_()
    text.requires_grad_()
    assert torch.autograd.gradcheck(lambda i, t, s: ek.clip_loss(i, t, s, ids=ids, backend="cpu"), (image, text, s))
    query, positive, negatives = (t.requires_grad_() for t in _features(5, 4, torch.float64, seed=11, n=3))
    assert torch.autograd.gradcheck(
        lambda q, p, n, s: ek.info_nce(q, p, n, s, query_ids=torch.arange(5), negative_ids=torch.arange(5) % 3,
                                       backend="cpu"),
        (query, positive, negatives, s))


def test_opcheck():
    from eclip_kernels.ops.contrastive import OPS

    image, text = (t.requires_grad_() for t in _features(7, 5, seed=12))
    s = torch.tensor(5.0, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    for args in ((image, text, s, None), (image, text, s, ids)):
        torch.library.opcheck(OPS["cpu"]["clip_fwd"], args)
    query, positive, negatives = (t.requires_grad_() for t in _features(4, 5, seed=13, n=3))
    torch.library.opcheck(OPS["cpu"]["rows_fwd"], (query, positive, negatives, s, None, None))
    torch.library.opcheck(OPS["cpu"]["rows_fwd"], (query, positive, negatives, s, torch.arange(4), torch.arange(4)))


@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (True, False, True)])
def test_opcheck_backward_ops(mask):
    from eclip_kernels.ops.contrastive import OPS

    image, text = _features(7, 5, seed=15)
    s = torch.tensor(5.0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    loss, row_lse, col_lse = OPS["cpu"]["clip_fwd"](image, text, s, ids)
    torch.library.opcheck(OPS["cpu"]["clip_bwd"], (torch.ones_like(loss), image, text, s, ids, row_lse, col_lse,
                                                   list(mask)))
    query, positive, negatives = _features(4, 5, seed=16, n=3)
    total, lse = OPS["cpu"]["rows_fwd"](query, positive, negatives, s, None, None)
    torch.library.opcheck(OPS["cpu"]["rows_bwd"], (torch.ones_like(total), query, positive, negatives, s, None, None,
                                                   lse, [*mask, True]))


@pytest.mark.parametrize("needs", [(True, True, False), (False, True, True), (True, False, False)])
def test_only_requested_gradients_are_computed(needs, monkeypatch):
    """A frozen bank of negatives (a momentum queue) gets no gradient and costs no product for it."""
    query, positive, negatives = _features(30, 16, seed=17, n=3)
    calls = []
    real_addmm = torch.Tensor.addmm_

    def counting_addmm(self, *args, **kwargs):
        calls.append(self.shape)
        return real_addmm(self, *args, **kwargs)

    def grads(backend):
        leaves = [t.clone().requires_grad_(n) for t, n in zip((query, positive, negatives), needs)]
        loss = ek.info_nce(*leaves, 14.3, backend=backend)
        return torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])

    want = grads("reference")
    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm)
    got = grads("cpu")
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
    # one addmm_ per tile for each of grad_query and grad_keys that is needed
    assert len(calls) == needs[0] + needs[2]


def test_backward_inside_autocast_is_not_autocast():
    """backward() called inside an autocast region: the tiled kernels still accumulate in float32."""
    image, text = (t.requires_grad_() for t in _features(64, 32, seed=18))

    def grads(backward_in_autocast):
        i, t = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            loss = ek.clip_loss(i, t, 14.3, backend="cpu")
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
        return i.grad, t.grad

    for inside, outside in zip(grads(True), grads(False)):
        assert torch.equal(inside, outside)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    image, text = _features(9, 6, seed=14)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 5])

    def loss_fn(i, t, s):
        return ek.clip_loss(i, t, s, ids=ids) + ek.info_nce(i, t, t.flip(0), s)

    s = torch.tensor(7.0)
    eager = _loss_and_grads(loss_fn, [image, text], s)
    compiled = _loss_and_grads(torch.compile(loss_fn, fullgraph=True), [image, text], s)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_backward_keeps_nothing_of_size_BxB():
    from _helpers import saved_tensor_shapes

    batch = 37
    image, text = (t.requires_grad_() for t in _features(batch, 5, seed=15))
    shapes = saved_tensor_shapes(lambda: ek.clip_loss(image, text, 10.0, backend="cpu"))
    assert shapes and max(torch.Size(s).numel() for s in shapes) <= batch * 5, shapes
    assert any(torch.Size(s).numel() >= batch * batch for s in
               saved_tensor_shapes(lambda: ek.clip_loss(image, text, 10.0, backend="reference")))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda i, t: ek.clip_loss(i, t[:-1], 1.0), ValueError, "same shape"),
        (lambda i, t: ek.clip_loss(i, t.double(), 1.0), TypeError, "same dtype"),
        (lambda i, t: ek.clip_loss(i[0], t[0], 1.0), ValueError, "must have shape"),
        (lambda i, t: ek.clip_loss(i, t.to("meta"), 1.0), ValueError, "different devices"),
        (lambda i, t: ek.clip_loss(i.long(), t.long(), 1.0), TypeError, "floating-point"),
        (lambda i, t: ek.clip_loss(i, t, 1.0, ids=torch.arange(3)), ValueError, "ids must be a 1-d tensor of length 5"),
        (lambda i, t: ek.clip_loss(i, t, 1.0, ids=torch.ones(5)), TypeError, "ids must be an integer tensor"),
        (lambda i, t: ek.clip_loss(i, t, torch.ones(2)), ValueError, "logit_scale must be"),
        (lambda i, t: ek.clip_loss(i, t, "1"), TypeError, "logit_scale must be"),
        (lambda i, t: ek.clip_loss(i, t, 1.0, backend="cuda"), (RuntimeError, ValueError), "backend 'cuda'"),
        (lambda i, t: ek.info_nce(i, t[:-1], t, 1.0), ValueError, "same shape"),
        (lambda i, t: ek.info_nce(i, t, t[:, :3], 1.0), ValueError, "feature sizes differ"),
        (lambda i, t: ek.info_nce(i, t, t, 1.0, query_ids=torch.arange(5)), ValueError, "both query_ids"),
        (lambda i, t: ek.info_nce(i, t, t, 1.0, query_ids=torch.arange(5), negative_ids=torch.arange(4)),
         ValueError, "negative_ids must be a 1-d tensor of length 5"),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    image, text = _features(5, 4)
    with pytest.raises(error, match=message):
        call(image, text)


# --- MomentumQueue --------------------------------------------------------------------------------------


def test_momentum_queue_is_fifo_and_wraps():
    queue = ek.MomentumQueue(5, 3)
    assert (queue.ids == -1).all()
    torch.testing.assert_close(queue.features.norm(dim=1), torch.ones(5))
    first = torch.randn(3, 3)
    queue.enqueue(first, torch.tensor([10, 11, 12]))
    second = torch.randn(4, 3)
    queue.enqueue(second, torch.tensor([20, 21, 22, 23]))
    assert queue.ids.tolist() == [22, 23, 12, 20, 21]
    torch.testing.assert_close(queue.features[[3, 4, 0, 1]], second)
    assert int(queue.ptr) == 2
    queue.enqueue(torch.randn(7, 3), torch.arange(7))  # more than K: the last K stay
    assert sorted(queue.ids.tolist()) == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="features must have shape"):
        queue.enqueue(torch.randn(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        queue.enqueue(torch.randn(2, 3), torch.ones(2))
    assert set(queue.state_dict()) == {"features", "ids", "ptr"}


# --- two gloo processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world, port, image, text, ids, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = slice(rank * image.shape[0] // world, (rank + 1) * image.shape[0] // world)
        out = {}
        for backend in ("cpu", "reference"):
            for use_ids in (False, True):
                i = image[local].clone().requires_grad_()
                t = text[local].clone().requires_grad_()
                s = torch.tensor(14.3, requires_grad=True)
                loss = ek.clip_loss(i, t, s, ids=ids[local] if use_ids else None, group=dist.group.WORLD,
                                    backend=backend)
                loss.backward()
                out[(backend, use_ids)] = (loss.detach(), i.grad, t.grad, s.grad)
        if ClipLoss is not None:
            i = image[local].clone().requires_grad_()
            t = text[local].clone().requires_grad_()
            s = torch.tensor(14.3, requires_grad=True)
            loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(i, t, s)
            loss.backward()
            out["open_clip"] = (loss.detach(), i.grad, t.grad, s.grad)
        queue = ek.MomentumQueue(8, text.shape[1])
        queue.enqueue(text[local], ids[local], group=dist.group.WORLD)
        out["queue"] = (queue.features.clone(), queue.ids.clone())
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_the_single_process_loss():
    world, batch = 2, 10
    image, text = _features(batch, 6, seed=16)
    ids = torch.tensor([0, 1, 2, 0, 3, 4, 2, 5, 6, 1])
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(world, _free_port(), image, text, ids, results), nprocs=world, join=True)

    for use_ids in (False, True):
        single = _loss_and_grads(
            lambda i, t, s: ek.clip_loss(i, t, s, ids=ids if use_ids else None, backend="reference"),
            [image.double(), text.double()], torch.tensor(14.3, dtype=torch.float64))
        for backend in ("cpu", "reference"):
            ranks = [results[r][(backend, use_ids)] for r in range(world)]
            # each rank: the loss of its rows; their mean is the single-process loss
            assert rel_err(torch.stack([r[0] for r in ranks]).mean(), single[0]) <= 1e-5
            # feature gradients: world_size x the single-process gradient of the rank's rows
            for which in (1, 2):
                got = torch.cat([r[which] for r in ranks])
                assert rel_err(got, world * single[which]) <= 1e-5, (backend, use_ids, which)
            # logit_scale: the mean over ranks (what DDP averaging gives) is the single-process gradient
            assert rel_err(torch.stack([r[3] for r in ranks]).mean(), single[3]) <= 1e-5
    if ClipLoss is not None:
        for r in range(world):
            ours, theirs = results[r][("cpu", False)], results[r]["open_clip"]
            _assert_all_close(ours, theirs, 1e-5, ["loss", "d_image", "d_text", "d_scale"])
    # the queue holds both ranks' features in rank order (10 arrive, the last 8 stay), on every rank
    for r in range(world):
        features, queue_ids = results[r]["queue"]
        torch.testing.assert_close(features, text[2:])
        assert queue_ids.tolist() == ids[2:].tolist()


# --- ranks holding different numbers of rows --------------------------------------------------------------

UNEVEN_CLIP_SPLITS = [(6, 4), (10, 0), (0, 10)]  # rows of rank 0 and rank 1 (10 in all)
UNEVEN_INFO_NCE_SPLITS = [((5, 4), (3, 4)), ((9, 0), (0, 7)), ((0, 9), (7, 0))]  # (queries, negatives) per rank


def _uneven_worker(rank, world, port, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from eclip_kernels.losses import row_share

    def mine(t, split):
        start = sum(split[:rank])
        return t[start:start + split[rank]].clone()

    try:
        group, out = dist.group.WORLD, {}
        image, text, ids = data["image"], data["text"], data["ids"]
        for split in UNEVEN_CLIP_SPLITS:
            for backend in ("cpu", "reference"):
                for use_ids in (False, True):
                    i, t = mine(image, split).requires_grad_(), mine(text, split).requires_grad_()
                    s = torch.tensor(14.3, requires_grad=True)
                    loss = ek.clip_loss(i, t, s, ids=mine(ids, split) if use_ids else None, group=group,
                                        backend=backend)
                    share = row_share(split[rank], group)
                    (share * loss).backward()
                    out[("clip", split, backend, use_ids)] = (loss.detach(), share, i.grad, t.grad, s.grad)
        query, positive, negatives, neg_ids, qids = (data[k] for k in ("query", "positive", "negatives",
                                                                        "negative_ids", "query_ids"))
        for q_split, n_split in UNEVEN_INFO_NCE_SPLITS:
            for backend in ("cpu", "reference"):
                q, p = mine(query, q_split).requires_grad_(), mine(positive, q_split).requires_grad_()
                n = mine(negatives, n_split).requires_grad_()
                s = torch.tensor(14.3, requires_grad=True)
                loss = ek.info_nce(q, p, n, s, query_ids=mine(qids, q_split), negative_ids=mine(neg_ids, n_split),
                                   group=group, shared_negatives=data["queue"], shared_negative_ids=data["queue_ids"],
                                   backend=backend)
                share = row_share(q_split[rank], group)
                (share * loss).backward()
                out[("info_nce", q_split, backend)] = (loss.detach(), share, q.grad, p.grad, n.grad, s.grad)
        for split in [(3, 0), (0, 5), (4, 2)]:
            queue = ek.MomentumQueue(8, text.shape[1])
            queue.enqueue(mine(text[:sum(split)], split), mine(ids[:sum(split)], split), group=group)
            queue.enqueue(mine(image[:sum(split)], split), mine(ids[:sum(split)], split), group=group)
            out[("queue", split)] = (queue.features.clone(), queue.ids.clone(), int(queue.ptr))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_uneven_ranks_weighted_by_their_share_give_the_single_process_loss_and_gradients():
    """2 gloo ranks holding 6 + 4, 10 + 0 and 0 + 10 rows: each rank backpropagates its loss times its share
    B_r / B_total; the weighted losses add up to the single-process loss of the concatenated batch, each rank
    gets exactly the single-process gradient of its rows (the logit scale's adds up over ranks), and a rank
    without rows returns 0 and zero gradients. The same for info_nce (queries and negatives split
    differently, a queue shared by both ranks) and for MomentumQueue.enqueue."""
    world = 2
    image, text = _features(10, 6, seed=21)
    query, positive, negatives, queue = _features(9, 6, seed=22, n=3) + _features(4, 6, seed=23, n=1)
    negatives = negatives[:7]
    data = dict(image=image, text=text, ids=torch.tensor([0, 1, 2, 0, 3, 4, 2, 5, 6, 1]), query=query,
                positive=positive, negatives=negatives, query_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8]),
                negative_ids=torch.tensor([1, 2, 9, 3, 10, 8, 11]), queue=queue, queue_ids=torch.tensor([0, 12, 5, 13]))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_uneven_worker, args=(world, _free_port(), data, results), nprocs=world, join=True)

    def close(got, want, what):
        assert rel_err(got, want) <= 1e-5, what

    for use_ids in (False, True):
        single = _loss_and_grads(
            lambda i, t, s: ek.clip_loss(i, t, s, ids=data["ids"] if use_ids else None, backend="reference"),
            [image.double(), text.double()], torch.tensor(14.3, dtype=torch.float64))
        for split in UNEVEN_CLIP_SPLITS:
            for backend in ("cpu", "reference"):
                ranks = [results[r][("clip", split, backend, use_ids)] for r in range(world)]
                what = (split, backend, use_ids)
                assert [float(r[1]) for r in ranks] == [b / sum(split) for b in split], what
                close(sum(r[1] * r[0] for r in ranks), single[0], what)
                close(torch.cat([r[2] for r in ranks]), single[1], what)
                close(torch.cat([r[3] for r in ranks]), single[2], what)
                close(sum(r[4] for r in ranks), single[3], what)
                for r, rows in zip(ranks, split):
                    if rows == 0:  # no rows: loss 0 and zero gradients, not None
                        assert r[0].item() == 0.0 and r[2].shape == (0, 6) and r[4].item() == 0.0, what

    bank = torch.cat([negatives, queue]).double()
    bank_ids = torch.cat([data["negative_ids"], data["queue_ids"]])
    single = _loss_and_grads(
        lambda q, p, n, s: ek.info_nce(q, p, torch.cat([n, bank[7:]]), s, query_ids=data["query_ids"],
                                       negative_ids=bank_ids, backend="reference"),
        [query.double(), positive.double(), negatives.double()], torch.tensor(14.3, dtype=torch.float64))
    for q_split, n_split in UNEVEN_INFO_NCE_SPLITS:
        for backend in ("cpu", "reference"):
            ranks = [results[r][("info_nce", q_split, backend)] for r in range(world)]
            what = (q_split, n_split, backend)
            close(sum(r[1] * r[0] for r in ranks), single[0], what)
            close(torch.cat([r[2] for r in ranks]), single[1], what)
            close(torch.cat([r[3] for r in ranks]), single[2], what)
            close(torch.cat([r[4] for r in ranks]), single[3], what)  # each negative's gradient on its rank
            close(sum(r[5] for r in ranks), single[4], what)

    for split in [(3, 0), (0, 5), (4, 2)]:
        expected = ek.MomentumQueue(8, 6)
        expected.enqueue(text[:sum(split)], data["ids"][:sum(split)])
        expected.enqueue(image[:sum(split)], data["ids"][:sum(split)])
        for r in range(world):
            features, queue_ids, ptr = results[r][("queue", split)]
            written = expected.ids != -1
            torch.testing.assert_close(features[written], expected.features[written], rtol=0, atol=0)
            assert queue_ids.tolist() == expected.ids.tolist() and ptr == int(expected.ptr), (split, r)

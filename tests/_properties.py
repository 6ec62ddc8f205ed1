"""Property-based checks of every op and backend against the float64 reference (hypothesis).

The strategies draw what a fixed test matrix misses: sizes of 1 and odd sizes, T from 1 to the backend's
limit, masks with fully masked samples, eps and scale, strided and non-contiguous layouts (transposed
storage, slices, stride-0 expansions), every dtype the backend supports; for the losses, random B and D,
ids with many duplicates and logit scales up to open_clip's clamp (100); for the sigmoid loss also the logit
bias and the operator a rank runs (its rows against more texts, positives at an offset). Forward and every
gradient are
compared with the rules of tests/_helpers.py (float32: 1e-5 relative or at most 2x PyTorch's own float32
error on the same inputs, whichever is larger, for ill-conditioned draws; float16 / bfloat16: at most 2x
PyTorch's own error at that dtype plus one unit in the last place), with errors measured in units of the
largest output of the draw (``cancellation=1``): draws find degenerate problems whose exact outputs are 0
by cancellation (one valid token: A = 1 whatever q and k are, so dq = dk = 0 and ent = 0), where the fused
kernels' residue is rounding of their single-pass formulas (log A = log m - log S with terms of up to
|log 2^-126| = 87 nats) and a relative error of that residue means nothing. The dq, dk of such samples must
be noise (below 1e-3 of the largest output) and are left out of the relative comparison.

Used by tests/test_properties.py (cpu and reference, main suite) and tests/test_properties_triton.py
(the Triton interpreter, in its own process and its own smaller profile).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import eclip_kernels as ek
from _helpers import check_against_oracle, loss_and_grads, rel_err

LAYOUTS = ("contiguous", "transposed", "sliced", "broadcast")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t (B, X, Y) in another memory layout."""
    if layout == "transposed":
        out = t.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        out = torch.cat([t, t], dim=2)[:, :, : t.shape[2]]
    elif layout == "broadcast" and t.shape[0] == 1:
        out = t[:1].expand(t.shape)  # stride 0 over the batch
    else:
        out = t
    assert torch.equal(out, t)
    return out


@st.composite
def slot_attention_cases(draw, dtypes, max_queries=96, max_tokens=70, max_dim=40):
    batch = draw(st.integers(1, 4))
    case = dict(
        batch=batch,
        tokens=draw(st.integers(1, max_tokens)),
        queries=draw(st.integers(1, max_queries)),
        dim=draw(st.integers(1, max_dim)),
        dim_v=draw(st.integers(1, max_dim)),
        dtype=draw(st.sampled_from(dtypes)),
        masked=draw(st.sampled_from(["none", "random", "one_sample_all_masked"])),
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-3, 0.5])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        gain=draw(st.sampled_from([0.3, 1.0, 3.0])),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


def check_slot_attention(case: dict, backend: str, device: str = "cpu") -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    B, N, T, D, Dv = case["batch"], case["tokens"], case["queries"], case["dim"], case["dim_v"]
    q = torch.randn(B, T, D, generator=gen) * case["gain"]
    k = torch.randn(B, N, D, generator=gen)
    v = torch.randn(B, N, Dv, generator=gen)
    if case["layouts"][1] == "broadcast":  # one sample's tokens shared by the batch
        k = k[:1].expand(B, N, D).contiguous()
    mask = None
    if case["masked"] != "none":
        mask = torch.rand(B, N, generator=gen) > 0.4
        if case["masked"] == "one_sample_all_masked":
            mask[torch.randint(0, B, (), generator=gen)] = False
    q, k, v = (t.to(device=device, dtype=case["dtype"]) for t in (q, k, v))
    mask = mask.to(device) if mask is not None else None
    q, k, v = (relayout(t, layout) for t, layout in zip((q, k, v), case["layouts"]))
    valid = mask.sum(1) if mask is not None else torch.full((B,), N)
    # The fused backward takes c[t] = <g_out[t], out[t]> + g_ent[t] (ent[t] - 1) from the stored forward
    # outputs (SPEC section 2; FlashAttention's rowsum(dO * O)): the rounding of out (u = half an ulp of its
    # dtype) reaches every dlogit[:, t], and dk[i] = scale sum_t dlogit[i, t] q[t] adds T of them, each
    # times scale |q| |k| (dq alike). At sharp logits that bound, not the default floor, is the limit of the
    # algorithm: measured at T = 38, |logit| = 18, dk errs 1.4e-5 in float32 (PyTorch autograd 2e-6) and
    # 2.1e-3 in float16 (PyTorch 1.5e-4); tests/test_slot_attention*.py keep that example.
    dtype = case["dtype"]
    eff_scale = case["scale"] if case["scale"] is not None else D**-0.5
    u = torch.finfo(dtype).eps / 2
    bound = T * u * eff_scale * q.float().abs().max().item() * k.float().abs().max().item()
    default = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    check_against_oracle(q, k, v, mask, backend, scale=case["scale"], eps=case["eps"],
                         vs_torch=dtype == torch.float32, cancellation=1.0, noise_samples=valid == 1,
                         floor=None if dtype == torch.float64 else max(default, bound))


def _case(**kw):
    base = dict(batch=1, tokens=2, queries=38, dim=7, dim_v=1, dtype=torch.float32, masked="none", eps=0.0,
                scale=1.0, gain=3.0, layouts=["contiguous"] * 3, seed=0)
    base.update(kw)
    return base


# Draws the searches found (hypothesis "long" profile), kept as regular tests:
FOUND_SLOT_ATTENTION = {
    # sharp logits (|logit| ~ 18), many queries: dk at the algorithm's float32 limit (see the bound above)
    "sharp-logits-T38-fp32": _case(),
    "sharp-logits-T38-transposed-k": _case(layouts=["contiguous", "transposed", "contiguous"]),
    "sharp-logits-T38-fp16": _case(dtype=torch.float16),
    # one token: dq = dk = 0 and ent = 0 exactly; the kernels return rounding noise
    "one-token-T71": _case(batch=4, tokens=1, queries=71, dim=1, gain=1.0, scale=None),
    "one-token-fp16-T36": _case(tokens=1, queries=36, dim=3, gain=1.0, dtype=torch.float16),
    # one token, the other samples fully masked
    "one-token-masked-batch": _case(batch=4, tokens=1, queries=1, dim=1, gain=0.3,
                                    masked="one_sample_all_masked", scale=None),
}
FOUND_SLOT_ATTENTION["one-token-fp16-T36"]["note"] = (
    "PyTorch's own float16 computation overflows here (non-finite gradients): the comparison falls back to its "
    "float32 computation, rounded to float16")
FOUND_CONTRASTIVE = {
    # B = 1: the loss is exactly 0 (lse = positive); the residue is rounding of terms of size s
    "one-pair-clip": dict(kind="clip", rows=1, bank=1, dim=2, dtype=torch.float32, ids="none", scale=14.3,
                          transposed=False, seed=0),
    "one-query-one-negative": dict(kind="info_nce", rows=1, bank=1, dim=1, dtype=torch.float64, ids="none",
                                   scale=14.3, transposed=False, seed=0),
}


@st.composite
def contrastive_cases(draw, dtypes, max_rows=80, max_dim=48):
    rows = draw(st.integers(1, max_rows))
    return dict(
        kind=draw(st.sampled_from(["clip", "info_nce"])),
        rows=rows,
        bank=draw(st.integers(1, 2 * max_rows)),
        dim=draw(st.integers(1, max_dim)),
        dtype=draw(st.sampled_from(dtypes)),
        ids=draw(st.sampled_from(["none", "few_products", "unique"])),
        scale=draw(st.sampled_from([1.0, 14.3, 100.0])),
        transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _unit(rows, dim, gen):
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)


def check_contrastive(case: dict, backend: str, device: str = "cpu") -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, rows, dim = case["dtype"], case["rows"], case["dim"]
    n_products = {"none": None, "few_products": max(1, rows // 4), "unique": 10**6}[case["ids"]]

    def ids(n):
        return None if n_products is None else torch.randint(0, n_products, (n,), generator=gen).to(device)

    if case["kind"] == "clip":
        tensors = [_unit(rows, dim, gen), _unit(rows, dim, gen)]
        kw = {"ids": ids(rows)}

        def loss(backend_, cast):
            return lambda a, b, s: ek.clip_loss(cast(a), cast(b), cast(s), backend=backend_, **kw)
    else:
        tensors = [_unit(rows, dim, gen), _unit(rows, dim, gen), _unit(case["bank"], dim, gen)]
        kw = {"query_ids": ids(rows), "negative_ids": ids(case["bank"])} if n_products else {}

        def loss(backend_, cast):
            return lambda q, p, n, s: ek.info_nce(cast(q), cast(p), cast(n), cast(s), backend=backend_, **kw)

    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    if case["transposed"]:
        tensors = [t.T.contiguous().T for t in tensors]
    scale = torch.tensor(case["scale"], device=device)
    got = loss_and_grads(loss(backend, lambda t: t), tensors, scale)
    want = loss_and_grads(loss("reference", lambda t: t.double()), tensors, scale)
    torch_own = loss_and_grads(loss("reference", lambda t: t.to(dtype)), tensors, scale)
    floor = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    # Errors relative to max |reference|, but never to less than the logit scale s: the loss is a difference
    # of log-sum-exps and positives of size up to s, every gradient entry a sum of terms bounded by s (unit
    # features); where they cancel to ~0 (one sample, one feature) the residue is rounding of size-s terms,
    # and a relative error of the residue itself means nothing.
    magnitude = case["scale"]
    for i, (a, w, t) in enumerate(zip(got, want, torch_own)):
        ours, theirs = rel_err(a, w, magnitude), rel_err(t, w, magnitude)
        assert ours <= 2 * theirs + floor, f"output {i}: error {ours:.3g} vs PyTorch {dtype} error {theirs:.3g}"




@st.composite
def siglip_cases(draw, dtypes, max_rows=80, max_dim=48):
    """The sigmoid loss: through ``siglip_loss`` (one process; ids none, few products or unique), or through
    the registered operator as a rank runs it (``rows`` images against ``cols`` >= rows gathered texts, the
    positives at text ``i + offset``, or of equal ids across the whole bank)."""
    rows = draw(st.integers(1, max_rows))
    rank = draw(st.booleans())
    cols = draw(st.integers(rows, 2 * max_rows)) if rank else rows
    return dict(
        rank=rank,
        rows=rows,
        cols=cols,
        offset=draw(st.integers(0, cols - rows)),
        dim=draw(st.integers(1, max_dim)),
        dtype=draw(st.sampled_from(dtypes)),
        ids=draw(st.sampled_from(["none", "few_products", "unique"])),
        scale=draw(st.sampled_from([1.0, 10.0, 100.0])),
        bias=draw(st.sampled_from([-10.0, 0.0, 3.0])),
        transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_siglip(case: dict, backend: str, device: str = "cpu") -> None:
    from eclip_kernels import reference
    from eclip_kernels.ops.siglip import OPS

    gen = torch.Generator().manual_seed(case["seed"])
    dtype, rows, cols = case["dtype"], case["rows"], case["cols"]
    n_products = {"none": None, "few_products": max(1, rows // 4), "unique": 10**6}[case["ids"]]
    image, text = _unit(rows, case["dim"], gen), _unit(cols, case["dim"], gen)
    image_ids = text_ids = None
    if n_products is not None:
        text_ids = torch.randint(0, n_products, (cols,), generator=gen).to(device)
        image_ids = text_ids[case["offset"]:case["offset"] + rows] if case["rank"] else text_ids

    def loss(backend_, cast):
        if not case["rank"]:
            return lambda i, t, s, b: ek.siglip_loss(cast(i), cast(t), cast(s), cast(b), ids=image_ids,
                                                     backend=backend_)
        if backend_ == "reference":
            return lambda i, t, s, b: reference.siglip_loss_sum(cast(i), cast(t), cast(s), cast(b), image_ids,
                                                                text_ids, case["offset"])
        return lambda i, t, s, b: OPS[backend_]["siglip_fwd"](i, t, s, b, image_ids, text_ids, case["offset"])

    def loss_and_grads4(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward()
        return [out.detach()] + [t.grad for t in leaves]

    features = [t.to(device=device, dtype=dtype) for t in (image, text)]
    if case["transposed"]:
        features = [t.T.contiguous().T for t in features]
    scalars = [torch.tensor(case["scale"], device=device), torch.tensor(case["bias"], device=device)]
    got = loss_and_grads4(loss(backend, lambda t: t), features + scalars)
    want = loss_and_grads4(loss("reference", lambda t: t.double()), features + scalars)
    torch_own = loss_and_grads4(loss("reference", lambda t: t.to(dtype)), features + scalars)
    if not all(torch.isfinite(t).all() for t in torch_own):
        # PyTorch's own float16 computation overflows (a loss sum past 65504): its float32 computation on the
        # same rounded inputs instead, the gradients rounded to the dtype the backend returns them in
        torch_own = loss_and_grads4(loss("reference", lambda t: t.float()), features + scalars)
        torch_own = torch_own[:1] + [t.to(f.dtype) for t, f in zip(torch_own[1:3], features)] + torch_own[3:]
    floor = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    # Errors relative to max |reference|, but never to less than the size of the terms each output sums (its
    # condition): with G = d loss_sum / d z = -l sigmoid(-l z) (float64, from the inputs as rounded), the bias
    # gradient sums G, the scale gradient G <x, y>, a feature gradient's row s G y; terms of both signs
    # cancel (a positive's -sigmoid(-z) against the negatives' sigmoid(z)), and a relative error of the
    # residue means nothing. The loss sums positive terms: plain relative error. Below float32's smallest
    # normal / eps, an output is held in subnormals (or flushed to 0) by any float32 computation: that much is
    # absolute noise (seen: a lone positive at z = 90, whose gradient -sigmoid(-90) = 8e-40 is 0 in float32).
    subnormal = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps
    x, y = (f.double().cpu() for f in features)
    s, b = case["scale"], case["bias"]
    raw = x @ y.T
    z = s * raw + b
    positive = reference.siglip_positive(rows, cols, None if image_ids is None else image_ids.cpu(),
                                         None if text_ids is None else text_ids.cpu(), case["offset"], "cpu")
    g = torch.sigmoid(torch.where(positive, -z, z)).abs()
    norm = 1 if case["rank"] else rows
    magnitudes = [subnormal + m for m in (0.0, s * g.sum(1).max().item() / norm, s * g.sum(0).max().item() / norm,
                                          (g * raw.abs()).sum().item() / norm, g.sum().item() / norm)]
    for i, (a, w, t, m) in enumerate(zip(got, want, torch_own, magnitudes)):
        ours, theirs = rel_err(a, w, m), rel_err(t, w, m)
        assert ours <= 2 * theirs + floor, f"output {i}: error {ours:.3g} vs PyTorch {dtype} error {theirs:.3g}"

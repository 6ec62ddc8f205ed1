"""slot_attention on the CPU backends (reference and the C++ kernels) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import eclip_kernels as ek
from _helpers import (
    SHAPES,
    check_against_oracle,
    make_inputs,
    non_contiguous,
    oracle,
    rel_err,
    run,
    saved_tensor_shapes,
    upstream_grads,
)

CPU_BUILT = ek.available_backends()["cpu"].usable
needs_cpu_kernels = pytest.mark.skipif(not CPU_BUILT, reason="eclip_kernels._C is not built")

BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu_kernels)]
FUSED = [pytest.param("cpu", marks=needs_cpu_kernels)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-T{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_matches_float64_reference_fp32(backend, shape, masked, eps):
    q, k, v, mask = make_inputs(shape, torch.float32, masked=masked, seed=hash((shape, masked)) % 1000)
    check_against_oracle(q, k, v, mask, backend, eps=eps)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[3]], ids=["N197-T7-D33", "T64", "Dv17"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_float64_reference_other_dtypes(backend, dtype, shape, masked):
    q, k, v, mask = make_inputs(shape, dtype, masked=masked, seed=7)
    check_against_oracle(q, k, v, mask, backend, eps=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    q, k, v, mask = make_inputs((3, 41, 7, 33, 17), torch.float32, masked=True, seed=3)
    q_nc, k_nc, v_nc = non_contiguous(q, k, v)
    got, _ = check_against_oracle(q_nc, k_nc, v_nc, mask, backend, eps=1e-3)
    contiguous = run(q, k, v, mask, backend, eps=1e-3)
    torch.testing.assert_close(got[0], contiguous[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale(backend):
    q, k, v, mask = make_inputs((2, 30, 5, 12, 12), torch.float32, masked=True, seed=4)
    check_against_oracle(q, k, v, mask, backend, scale=0.37, eps=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_all_masked_sample_gives_zeros(backend, eps):
    q, k, v, _ = make_inputs((2, 9, 4, 6, 5), torch.float32, seed=5)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    grads = upstream_grads((2, 4, 5), (2, 4))
    out, ent, (dq, dk, dv) = run(q, k, v, mask, backend, eps=eps, grads=grads)
    for t in (out[1], ent[1], dq[1], dk[1], dv[1]):
        assert torch.isfinite(t).all()
        assert (t == 0).all()
    # the other sample is unaffected by its neighbour's mask
    alone = run(q[:1], k[:1], v[:1], mask[:1], backend, eps=eps)
    torch.testing.assert_close(out[:1], alone[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_get_zero_gradient_and_do_not_matter(backend):
    q, k, v, mask = make_inputs((2, 20, 5, 8, 8), torch.float32, masked=True, seed=6)
    mask[-1, :3] = True  # keep some valid tokens in every sample
    grads = upstream_grads((2, 5, 8), (2, 5))
    out, ent, (dq, dk, dv) = run(q, k, v, mask, backend, eps=1e-3, grads=grads)
    assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = torch.randn_like(k2[~mask]) * 100
    v2[~mask] = torch.randn_like(v2[~mask]) * 100
    out2, ent2, _ = run(q, k2, v2, mask, backend, eps=1e-3)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(ent, ent2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_underflow_with_eps_zero_is_finite(backend):
    # logits of standard deviation ~100 make many softmax weights underflow to exactly 0 in float32:
    # 0 log 0 must be 0, with no NaN in the gradients. Such logits amplify the rounding of the inputs to
    # float32 beyond 1e-5, so the error is compared with PyTorch's own float32 error on the same inputs.
    q, k, v, mask = make_inputs((2, 33, 7, 16, 8), torch.float32, masked=True, seed=8)
    got, _ = check_against_oracle(q, k, v, mask, backend, scale=12.0, eps=0.0, vs_torch=True)
    underflowed = ek.slot_attention_weights(q, k, scale=12.0, mask=mask)
    assert (underflowed[:1] == 0).float().mean() > 0.3  # the case is really exercised
    for t in got[2]:
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gradcheck_float64(backend, masked, eps):
    q, k, v, mask = make_inputs((2, 6, 3, 5, 4), torch.float64, masked=masked, seed=9)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return ek.slot_attention(q, k, v, eps=eps, mask=mask, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck_float64_reference(masked):
    q, k, v, mask = make_inputs((2, 6, 3, 5, 4), torch.float64, masked=masked, seed=9)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return ek.slot_attention(q, k, v, eps=1e-2, mask=mask, return_entropy=True, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_keeps_nothing_of_size_BxNxT(backend):
    batch, num_tokens, num_queries, dim, dim_v = 3, 29, 5, 11, 13
    q, k, v, mask = make_inputs((batch, num_tokens, num_queries, dim, dim_v), torch.float32, masked=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(backend):
        ek.slot_attention(q, k, v, mask=mask, return_entropy=True, backend=backend)

    fused = saved_tensor_shapes(fn, backend)
    assert fused, "autograd saved nothing: the op is not differentiable?"
    assert not any(num_tokens in s and num_queries in s for s in fused), fused
    assert max(torch.Size(s).numel() for s in fused) <= batch * num_tokens * max(dim, dim_v)
    # the check itself can fail: the reference keeps (B, N, T) tensors
    assert any(num_tokens in s and num_queries in s for s in saved_tensor_shapes(fn, "reference"))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_opcheck(backend, masked):
    from eclip_kernels.ops import slot_attention as ops

    q, k, v, mask = make_inputs((2, 13, 5, 7, 6), torch.float32, masked=masked, seed=10)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ops.forward_op(backend), (q, k, v, mask, 0.4, 1e-3))
    out, ent, col_sum, lse = ops.forward_op(backend)(q, k, v, mask, 0.4, 1e-3)
    grad_out, grad_ent = torch.randn_like(out), torch.randn_like(ent)
    bwd_args = (grad_out, grad_ent, q.detach(), k.detach(), v.detach(), mask, out.detach(), ent.detach(),
                col_sum, lse, 0.4, 1e-3)
    torch.library.opcheck(ops.backward_op(backend), bwd_args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    q, k, v, mask = make_inputs((2, 23, 7, 9, 5), torch.float32, masked=True, seed=11)

    def loss_fn(q, k, v, mask):
        out, ent = ek.slot_attention(q, k, v, eps=1e-3, mask=mask, return_entropy=True, backend=backend)
        return out.square().sum() + ent.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        loss = fn(qq, kk, vv, mask)
        loss.backward()
        results.append((loss.detach(), qq.grad, kk.grad, vv.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("num_queries", [65, 130])
def test_more_than_64_queries(backend, num_queries):
    q, k, v, mask = make_inputs((2, 40, num_queries, 12, 7), torch.float32, masked=True, seed=13)
    check_against_oracle(q, k, v, mask, backend, eps=1e-3)


def test_auto_backend_on_cpu_is_the_fused_kernel_when_built():
    q, k, v, mask = make_inputs((2, 10, 3, 4, 4), torch.float32, masked=True)
    auto = ek.slot_attention(q, k, v, mask=mask)
    named = ek.slot_attention(q, k, v, mask=mask, backend="cpu" if CPU_BUILT else "reference")
    assert torch.equal(auto, named)


def test_float64_reference_oracle_is_consistent_with_definition():
    # the oracle itself, against a direct loop over the SPEC formulas
    q, k, v, mask = make_inputs((2, 7, 3, 4, 5), torch.float64, masked=True, seed=12)
    out, ent, _ = oracle(q, k, v, mask, eps=0.01)
    scale = 4 ** -0.5
    for b in range(2):
        valid = [i for i in range(7) if mask[b, i]]
        m = {}
        for i in valid:
            logits = torch.stack([scale * (k[b, i] @ q[b, t]) for t in range(3)])
            M = torch.exp(logits - torch.logsumexp(logits, 0))
            m[i] = M + 0.01
        for t in range(3):
            total = sum(m[i][t] for i in valid) if valid else torch.tensor(0.0, dtype=torch.float64)
            if not valid:
                assert (out[b, t] == 0).all() and ent[b, t] == 0
                continue
            expect_out = sum(m[i][t] / total * v[b, i] for i in valid)
            expect_ent = -sum(m[i][t] / total * torch.log(m[i][t] / total) for i in valid)
            assert rel_err(out[b, t], expect_out) < 1e-12
            assert abs((ent[b, t] - expect_ent).item()) < 1e-12

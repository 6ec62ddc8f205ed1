"""slot_attention on the experimental CUDA C++ backend (csrc/cuda) against the float64 reference.

The kernels were written and resource-checked without a GPU: these tests are what verifies them. They run
on a CUDA GPU only (scripts/gpu_check.sh runs them); without one the module is skipped as a whole. The
tolerances are tests/_helpers.py's, as for the Triton backend: float32 within 1e-5 of max |reference|,
float64 within 1e-10, float16 / bfloat16 at most 2x PyTorch's own error at that dtype plus one ulp.

    python -m pytest tests/test_slot_attention_cuda.py
"""

from __future__ import annotations

import pytest
import torch

import eclip_kernels as ek
from _helpers import (
    SHAPES,
    check_against_oracle,
    make_inputs,
    non_contiguous,
    rel_err,
    run,
    saved_tensor_shapes,
    upstream_grads,
)

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("CUDA backend tests: no CUDA GPU visible", allow_module_level=True)
if not ek.available_backends()["cuda"].usable:
    pytest.skip(f"cuda backend unusable: {ek.available_backends()['cuda'].reason}", allow_module_level=True)

DEVICE = "cuda"
BACKEND = "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def exact_float32_products():
    """The oracle's float32 products in torch are exact only at matmul precision "highest"."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _inputs(shape, dtype, masked, seed=0):
    return make_inputs(shape, dtype, device=DEVICE, masked=masked, seed=seed)


# --- the op test matrix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-T{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_matches_float64_reference_fp32(shape, masked, eps):
    q, k, v, mask = _inputs(shape, torch.float32, masked, seed=sum(shape))
    check_against_oracle(q, k, v, mask, BACKEND, eps=eps)


# (B, N, T, D, Dv): odd sizes (element path), 16-byte multiples (vector path), T on both sides of 16, 32 and
# up to 64, Dv != D, several token tiles with a partial last one.
ODD_AND_ALIGNED = [
    (3, 197, 7, 33, 33),
    (2, 37, 64, 16, 24),
    (3, 50, 20, 33, 17),
    (2, 70, 17, 64, 128),
    (2, 33, 33, 40, 8),
    (1, 1, 1, 8, 8),
    (2, 65, 32, 24, 40),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_AND_ALIGNED, ids=lambda s: "B{}-N{}-T{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_matches_float64_reference_all_dtypes(dtype, shape, eps):
    q, k, v, mask = _inputs(shape, dtype, masked=True, seed=3)
    check_against_oracle(q, k, v, mask, BACKEND, eps=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    q, k, v, mask = _inputs((3, 41, 7, 33, 17), dtype, masked=True, seed=4)
    q_nc, k_nc, v_nc = non_contiguous(q, k, v)
    got, _ = check_against_oracle(q_nc, k_nc, v_nc, mask, BACKEND, eps=1e-3)
    torch.testing.assert_close(got[0], run(q, k, v, mask, BACKEND, eps=1e-3)[0])


def test_misaligned_storage_takes_the_element_path():
    """Rows of a multiple of 16 bytes, but the tensors start 4 bytes into their storage: no 16-byte loads."""
    q, k, v, mask = _inputs((2, 45, 9, 32, 64), torch.float32, masked=True, seed=5)
    q_off, k_off, v_off = (torch.empty(t.numel() + 1, device=DEVICE)[1:].view(t.shape).copy_(t) for t in (q, k, v))
    assert k_off.data_ptr() % 16 != 0
    got, _ = check_against_oracle(q_off, k_off, v_off, mask, BACKEND, eps=1e-3)
    torch.testing.assert_close(got[0], run(q, k, v, mask, BACKEND, eps=1e-3)[0])


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_all_masked_sample_gives_zeros(eps):
    q, k, v, _ = _inputs((2, 9, 4, 6, 5), torch.float32, masked=False, seed=5)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    grads = upstream_grads((2, 4, 5), (2, 4), device=DEVICE)
    out, ent, (dq, dk, dv) = run(q, k, v, mask, BACKEND, eps=eps, grads=grads)
    for t in (out[1], ent[1], dq[1], dk[1], dv[1]):
        assert torch.isfinite(t).all()
        assert (t == 0).all()
    alone = run(q[:1], k[:1], v[:1], mask[:1], BACKEND, eps=eps)
    torch.testing.assert_close(out[:1], alone[0])


def test_masked_tokens_get_zero_gradient_and_do_not_matter():
    q, k, v, mask = _inputs((2, 20, 5, 8, 8), torch.float32, masked=True, seed=6)
    mask[-1, :3] = True
    grads = upstream_grads((2, 5, 8), (2, 5), device=DEVICE)
    out, ent, (dq, dk, dv) = run(q, k, v, mask, BACKEND, eps=1e-3, grads=grads)
    assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = torch.randn_like(k2[~mask]) * 100
    v2[~mask] = torch.randn_like(v2[~mask]) * 100
    out2, ent2, _ = run(q, k2, v2, mask, BACKEND, eps=1e-3)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(ent, ent2)


def test_softmax_underflow_with_eps_zero_is_finite():
    q, k, v, mask = _inputs((2, 33, 7, 16, 8), torch.float32, masked=True, seed=8)
    got, _ = check_against_oracle(q, k, v, mask, BACKEND, scale=12.0, eps=0.0, vs_torch=True)
    for t in got[2]:
        assert torch.isfinite(t).all()


def test_explicit_scale():
    q, k, v, mask = _inputs((2, 30, 5, 12, 12), torch.float32, masked=True, seed=4)
    check_against_oracle(q, k, v, mask, BACKEND, scale=0.37, eps=0.0)


# --- gradients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gradcheck_float64(masked, eps):
    q, k, v, mask = _inputs((2, 6, 3, 5, 4), torch.float64, masked=masked, seed=9)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return ek.slot_attention(q, k, v, eps=eps, mask=mask, return_entropy=True, backend=BACKEND)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=lambda n: "".join("qkv"[i] for i in range(3) if n[i]))
def test_only_some_gradients_requested(needs):
    q, k, v, mask = _inputs((2, 45, 5, 17, 9), torch.float32, masked=True, seed=22)
    grads = upstream_grads((2, 5, 9), (2, 5), device=DEVICE)

    def grads_of(backend, cast):
        leaves = [cast(t).detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
        out, ent = ek.slot_attention(*leaves, mask=mask, eps=1e-3, return_entropy=True, backend=backend)
        loss = (out * grads[0].to(out.dtype)).sum() + (ent * grads[1].to(ent.dtype)).sum()
        return torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])

    got = grads_of(BACKEND, lambda t: t)
    want = grads_of("reference", lambda t: t.double())
    assert len(got) == sum(needs)
    for a, w in zip(got, want):
        assert rel_err(a, w) <= 1e-5


def test_backward_keeps_nothing_of_size_BxNxT():
    batch, num_tokens, num_queries = 3, 29, 5
    q, k, v, mask = _inputs((batch, num_tokens, num_queries, 11, 13), torch.float32, masked=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    shapes = saved_tensor_shapes(
        lambda: ek.slot_attention(q, k, v, mask=mask, return_entropy=True, backend=BACKEND)
    )
    assert shapes and not any(num_tokens in s and num_queries in s for s in shapes), shapes


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_opcheck(masked):
    from eclip_kernels.ops import slot_attention as ops

    q, k, v, mask = _inputs((2, 13, 5, 7, 6), torch.float32, masked=masked, seed=10)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ops.forward_op(BACKEND), (q, k, v, mask, 0.4, 1e-3))
    out, ent, col_sum, lse = ops.forward_op(BACKEND)(q, k, v, mask, 0.4, 1e-3)
    grad_out, grad_ent = torch.randn_like(out), torch.randn_like(ent)
    torch.library.opcheck(ops.backward_op(BACKEND), (grad_out, grad_ent, q.detach(), k.detach(), v.detach(), mask,
                                                     out.detach(), ent.detach(), col_sum, lse, 0.4, 1e-3))


def test_saved_statistics_match_the_cpu_op():
    """S, ent and the per-token log-sum-exp (lse: 0 on masked tokens) are the CPU op's."""
    from eclip_kernels.ops import slot_attention as ops

    q, k, v, mask = _inputs((3, 77, 9, 24, 16), torch.float64, masked=True, seed=12)
    got = ops.forward_op(BACKEND)(q, k, v, mask, 0.3, 1e-3)
    if not ek.available_backends()["cpu"].usable:
        pytest.skip("the CPU op is not built")
    want = ops.forward_op("cpu")(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.3, 1e-3)
    for name, a, w in zip(("out", "ent", "S", "lse"), got, want):
        assert a.dtype == w.dtype and a.shape == w.shape, name
        torch.testing.assert_close(a.cpu(), w, rtol=1e-10, atol=1e-12, msg=name)


# --- launch paths: token splits, Dv slices, dq beyond the register budget ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocks", ["1", "4096"], ids=["one-block-per-sample", "token-split"])
@pytest.mark.parametrize("shape", [(1, 300, 20, 64, 48), (2, 2000, 11, 32, 40)], ids=["B1-N300", "B2-N2000"])
def test_token_split_and_single_block_paths(dtype, blocks, shape, monkeypatch):
    """ECLIP_KERNELS_CUDA_TARGET_BLOCKS=1: one block walks every tile of its sample (dq in registers, written
    directly); =4096: the tokens are split (partial sums merged by the second kernels, dq through the slabs)."""
    monkeypatch.setenv("ECLIP_KERNELS_CUDA_TARGET_BLOCKS", blocks)
    q, k, v, mask = _inputs(shape, dtype, masked=True, seed=21)
    check_against_oracle(q, k, v, mask, BACKEND, eps=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocks", ["1", "4096"], ids=["one-block-per-sample", "token-split"])
def test_wide_rows_take_slices_and_the_dq_slab(dtype, blocks, monkeypatch):
    """T = 64 and D = Dv = 512: the forward's T x Dv accumulator takes two Dv slices, and the backward's T x D
    dq no longer fits the registers (read-add-write of the block's private slab)."""
    monkeypatch.setenv("ECLIP_KERNELS_CUDA_TARGET_BLOCKS", blocks)
    q, k, v, mask = _inputs((2, 100, 64, 512, 512), dtype, masked=True, seed=23)
    check_against_oracle(q, k, v, mask, BACKEND, eps=1e-8)


def test_deterministic_repeats():
    q, k, v, mask = _inputs((3, 700, 20, 64, 64), torch.bfloat16, masked=True, seed=11)
    grads = upstream_grads((3, 20, 64), (3, 20), device=DEVICE)
    first = run(q, k, v, mask, BACKEND, eps=1e-8, grads=grads)
    second = run(q, k, v, mask, BACKEND, eps=1e-8, grads=grads)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b)


# --- errors ------------------------------------------------------------------------------------------------------


def test_more_than_64_queries_raises():
    q, k, v, mask = _inputs((2, 40, 65, 12, 7), torch.float32, masked=True, seed=13)
    with pytest.raises(ValueError, match="at most 64 queries"):
        ek.slot_attention(q, k, v, mask=mask, backend=BACKEND)
    from eclip_kernels.ops import slot_attention as ops

    with pytest.raises(RuntimeError, match="at most 64 queries"):
        ops.forward_op(BACKEND)(q, k, v, mask, 0.3, 0.0)


def test_mixed_devices_raise():
    from eclip_kernels.ops import slot_attention as ops

    q, k, v, mask = _inputs((2, 10, 3, 8, 8), torch.float32, masked=True, seed=14)
    with pytest.raises(RuntimeError, match="mask must be"):
        ops.forward_op(BACKEND)(q, k, v, mask.cpu(), 0.3, 0.0)


def test_auto_still_picks_triton_on_cuda_tensors():
    from eclip_kernels.backends import resolve_backend

    if not ek.available_backends()["triton"].usable:
        pytest.skip("triton is not usable here")
    assert resolve_backend("auto", torch.device(DEVICE), torch.bfloat16, 20) == "triton"


# --- modules and torch.compile -------------------------------------------------------------------------------------


def test_modules_run_on_cuda_backend():
    from eclip_kernels.nn import InstanceSlotAttention, SlotAttention

    torch.manual_seed(0)
    reference = SlotAttention(4, 16, iters=2, backend="reference").to(DEVICE)
    fused = SlotAttention(4, 16, iters=2, backend=BACKEND).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    inputs = torch.randn(2, 30, 16, device=DEVICE)
    slots = torch.randn(2, 4, 16, device=DEVICE)
    torch.testing.assert_close(fused(inputs, slots=slots), reference(inputs, slots=slots), rtol=1e-5, atol=1e-5)

    layer = InstanceSlotAttention(16, backend=BACKEND).to(DEVICE)
    z, queries, hidden = (torch.randn(2, n, 16, device=DEVICE) for n in (19, 5, 5))
    out = layer(z, queries, hidden, return_entropy=True)
    layer.backend = "reference"
    want = layer(z, queries, hidden, return_entropy=True)
    torch.testing.assert_close(out.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, want.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    q, k, v, mask = _inputs((2, 23, 7, 9, 5), torch.float32, masked=True, seed=11)

    def loss_fn(q, k, v, mask):
        out, ent = ek.slot_attention(q, k, v, eps=1e-3, mask=mask, return_entropy=True, backend=BACKEND)
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

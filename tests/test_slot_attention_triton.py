"""slot_attention on the Triton backend against the float64 reference.

On a CUDA GPU these run on the GPU. Without one they run on CPU tensors through the Triton interpreter,
which needs TRITON_INTERPRET=1 before Triton is imported, so run them in their own pytest process:

    TRITON_INTERPRET=1 python -m pytest tests/test_slot_attention_triton.py

The interpreter is slow: shapes stay small there.
"""

from __future__ import annotations

import os

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

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip(
        "Triton tests need a CUDA GPU or TRITON_INTERPRET=1 (run them in their own pytest process)",
        allow_module_level=True,
    )
if not ek.available_backends()["triton"].usable:
    pytest.skip(f"triton backend unusable: {ek.available_backends()['triton'].reason}", allow_module_level=True)



def _interpreter_bf16_dot_is_exact() -> bool:
    """Triton 3.8's interpreter multiplies the raw bits of bfloat16 operands in tl.dot (a 16x16 product
    is off by ~1e10), so bfloat16 kernels can only be checked on a GPU there. Probe it rather than
    assume a version."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot16(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        offs = r[:, None] * 16 + r[None, :]
        tl.store(c_ptr + offs, tl.dot(tl.load(a_ptr + offs), tl.load(b_ptr + offs)))

    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    dot16[(1,)](a, b, c)
    return torch.allclose(c, a.float() @ b.float(), atol=1e-3)


BF16_SKIP = None
if DEVICE == "cpu" and not _interpreter_bf16_dot_is_exact():
    BF16_SKIP = "the Triton interpreter computes bfloat16 tl.dot wrongly (probed); bfloat16 runs on GPUs only"
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(BF16_SKIP is not None, reason=str(BF16_SKIP))),
    torch.float16,
]


def _inputs(shape, dtype, masked, seed=0):
    return make_inputs(shape, dtype, device=DEVICE, masked=masked, seed=seed)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-T{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_float64_reference_fp32(shape, masked):
    q, k, v, mask = _inputs(shape, torch.float32, masked, seed=sum(shape))
    check_against_oracle(q, k, v, mask, "triton", eps=1e-3 if masked else 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=["N197-T7-D33", "T64"])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_matches_float64_reference_all_dtypes(dtype, shape, eps):
    q, k, v, mask = _inputs(shape, dtype, masked=True, seed=3)
    check_against_oracle(q, k, v, mask, "triton", eps=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    q, k, v, mask = _inputs((3, 41, 7, 33, 17), dtype, masked=True, seed=4)
    q_nc, k_nc, v_nc = non_contiguous(q, k, v)
    got, _ = check_against_oracle(q_nc, k_nc, v_nc, mask, "triton", eps=1e-3)
    torch.testing.assert_close(got[0], run(q, k, v, mask, "triton", eps=1e-3)[0])


def test_all_masked_sample_gives_zeros():
    q, k, v, _ = _inputs((2, 9, 4, 6, 5), torch.float32, masked=False, seed=5)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    grads = upstream_grads((2, 4, 5), (2, 4), device=DEVICE)
    out, ent, (dq, dk, dv) = run(q, k, v, mask, "triton", eps=1e-3, grads=grads)
    for t in (out[1], ent[1], dq[1], dk[1], dv[1]):
        assert (t == 0).all()


def test_softmax_underflow_with_eps_zero_is_finite():
    q, k, v, mask = _inputs((2, 33, 7, 16, 8), torch.float32, masked=True, seed=8)
    got, _ = check_against_oracle(q, k, v, mask, "triton", scale=12.0, eps=0.0, vs_torch=True)
    for t in got[2]:
        assert torch.isfinite(t).all()


def test_backward_keeps_nothing_of_size_BxNxT():
    batch, num_tokens, num_queries = 3, 29, 5
    q, k, v, mask = _inputs((batch, num_tokens, num_queries, 11, 13), torch.float32, masked=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    shapes = saved_tensor_shapes(
        lambda: ek.slot_attention(q, k, v, mask=mask, return_entropy=True, backend="triton")
    )
    assert shapes and not any(num_tokens in s and num_queries in s for s in shapes), shapes


def test_opcheck():
    from eclip_kernels.ops import slot_attention as ops

    q, k, v, mask = _inputs((2, 13, 5, 7, 6), torch.float32, masked=True, seed=10)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ops.forward_op("triton"), (q, k, v, mask, 0.4, 1e-3))


def test_modules_run_on_triton():
    from eclip_kernels.nn import InstanceSlotAttention, SlotAttention

    torch.manual_seed(0)
    reference = SlotAttention(4, 16, iters=2, backend="reference").to(DEVICE)
    fused = SlotAttention(4, 16, iters=2, backend="triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    inputs = torch.randn(2, 30, 16, device=DEVICE)
    slots = torch.randn(2, 4, 16, device=DEVICE)
    torch.testing.assert_close(fused(inputs, slots=slots), reference(inputs, slots=slots), rtol=1e-5, atol=1e-5)

    layer = InstanceSlotAttention(16, backend="triton").to(DEVICE)
    z, queries, hidden = (torch.randn(2, n, 16, device=DEVICE) for n in (19, 5, 5))
    out = layer(z, queries, hidden, return_entropy=True)
    layer.backend = "reference"
    want = layer(z, queries, hidden, return_entropy=True)
    torch.testing.assert_close(out.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, want.entropy, rtol=1e-5, atol=1e-5)


# --- launch geometries that take the multi-tile and split paths (ECLIP_KERNELS_TRITON_GEOMETRY) ---------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("geometry", ["gpu:2", "gpu:64"])
@pytest.mark.parametrize("shape", [(3, 197, 7, 33, 33), (1, 300, 20, 64, 48)], ids=["B3-N197", "B1-N300"])
def test_gpu_tiles_multi_tile_and_split_paths(dtype, geometry, shape, monkeypatch):
    """GPU block sizes at small shapes: with 2 target programs every program walks several token tiles (the dq
    slab read-add-write across tiles); with 64 the forward splits the tokens and merges the partial sums."""
    from eclip_kernels.triton import slot_attention as sa

    monkeypatch.setenv("ECLIP_KERNELS_TRITON_GEOMETRY", geometry)
    splits = []
    real = sa._token_splits

    def spy(n_tiles, want):
        splits.append(real(n_tiles, want))
        return splits[-1]

    monkeypatch.setattr(sa, "_token_splits", spy)
    q, k, v, mask = _inputs(shape, dtype, masked=True, seed=21)
    check_against_oracle(q, k, v, mask, "triton", eps=1e-3)
    (fwd_per, fwd_n), (bwd_per, bwd_n) = splits
    if geometry == "gpu:2":
        assert fwd_per > 1 and bwd_per > 1
    else:
        assert fwd_n > 1  # partial sums through the merge kernel


# --- gradients nobody asked for ----------------------------------------------------------------------------


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True), (True, True, False)],
                         ids=lambda n: "".join("qkv"[i] for i in range(3) if n[i]))
def test_only_requested_gradients(needs):
    q, k, v, mask = _inputs((2, 45, 5, 17, 9), torch.float32, masked=True, seed=22)
    grads = upstream_grads((2, 5, 9), (2, 5), device=DEVICE)

    def grads_of(backend, cast):
        leaves = [cast(t).detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
        out, ent = ek.slot_attention(*leaves, mask=mask, eps=1e-3, return_entropy=True, backend=backend)
        loss = (out * grads[0].to(out.dtype)).sum() + (ent * grads[1].to(ent.dtype)).sum()
        return torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])

    got = grads_of("triton", lambda t: t)
    want = grads_of("reference", lambda t: t.double())
    assert len(got) == sum(needs)
    for a, w in zip(got, want):
        assert rel_err(a, w) <= 1e-5


# --- 64-bit offsets ------------------------------------------------------------------------------------------


def test_row_offsets_past_2_to_the_31():
    """k with a row stride of 2^29 + 16 elements: token 4 sits past element 2^31, where 32-bit offsets
    (rows * stride) wrap. The storage is allocated but never touched beyond the few rows used (virtual)."""
    if DEVICE != "cpu":
        pytest.skip("needs 8 GiB of (virtual) host memory; the GPU suite covers large shapes")
    num_tokens, dim, stride = 5, 16, 2**29 + 16
    q, k_small, v, _ = _inputs((1, num_tokens, 3, dim, 8), torch.float32, masked=False, seed=23)
    storage = torch.empty(stride * (num_tokens - 1) + dim, dtype=torch.float32)
    k = storage.as_strided((1, num_tokens, dim), (storage.numel(), stride, 1))
    for i in range(num_tokens):
        k[0, i] = k_small[0, i]
    assert k.stride(1) * (num_tokens - 1) >= 2**31
    got, _ = check_against_oracle(q, k, v, None, "triton")
    torch.testing.assert_close(got[0], run(q, k_small, v, None, "triton")[0])


# --- opcheck of the backward operator --------------------------------------------------------------------------


@pytest.mark.parametrize("output_mask", [[True, True, True], [False, True, False]])
def test_opcheck_backward(output_mask):
    from eclip_kernels.ops import slot_attention as ops

    q, k, v, mask = _inputs((2, 13, 5, 7, 6), torch.float32, masked=True, seed=24)
    out, ent, S, lse = ops.forward_op("triton")(q, k, v, mask, 0.4, 1e-3)
    grad_out, grad_ent = (t.float() for t in upstream_grads((2, 5, 6), (2, 5), device=DEVICE))
    torch.library.opcheck(ops.backward_op("triton"),
                          (grad_out, grad_ent, q, k, v, mask, out, ent, S, lse, 0.4, 1e-3, output_mask))

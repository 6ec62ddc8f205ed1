"""Shared checks of the slot-attention op against the float64 reference, for every backend's test file.

Tolerances:
* float64: 1e-10 relative (both sides compute in float64; differences are summation order only).
* float32: 1e-5 relative to max |reference| (the issue's bound; float32 accumulation over N <= 200 tokens
  and D <= 64 features stays near 1e-6).
* float16 / bfloat16: FlashAttention's rule: the error of the fused kernel against the float64 reference
  may be at most 2x the error of PyTorch's own computation at that dtype (the reference backend run in
  float16/bfloat16) on the same inputs, plus a floor of one unit in the last place of the output dtype
  times max |reference| for outputs where PyTorch's error happens to be ~0.
"""

from __future__ import annotations

import torch

import eclip_kernels as ek

FP32_RTOL = 1e-5
FP64_RTOL = 1e-10
LOW_PRECISION = (torch.float16, torch.bfloat16)

# (B, N, T, D, Dv): N=1, T=1, N=197, T=7, T=64, D=33, Dv != D.
SHAPES = [
    (2, 1, 1, 8, 8),
    (3, 197, 7, 33, 33),
    (2, 37, 64, 16, 24),
    (3, 50, 20, 33, 17),
    (1, 5, 3, 4, 9),
]


def make_inputs(shape, dtype, device="cpu", masked=False, seed=0, logit_gain=2.0):
    """Random q, k, v (and a random mask with one all-masked sample when masked and B > 1).

    q is scaled by ``logit_gain`` so that the softmax over queries is far from uniform.
    """
    batch, num_tokens, num_queries, dim, dim_v = shape
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, num_queries, dim, generator=gen) * logit_gain).to(device=device, dtype=dtype)
    k = torch.randn(batch, num_tokens, dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(batch, num_tokens, dim_v, generator=gen).to(device=device, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(batch, num_tokens, generator=gen) > 0.3
        mask[:, 0] = True  # at least one valid token ...
        if batch > 1:
            mask[-1] = False  # ... except in the last sample, which is all masked
        mask = mask.to(device)
    return q, k, v, mask


def upstream_grads(out_shape, ent_shape, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device)
    grad_ent = torch.randn(ent_shape, generator=gen, dtype=torch.float64).to(device)
    return grad_out, grad_ent


def run(q, k, v, mask, backend, scale=None, eps=0.0, grads=None):
    """Forward (out, ent) and, when grads=(grad_out, grad_ent) is given, (dq, dk, dv) via autograd."""
    q, k, v = (t.detach().requires_grad_(grads is not None) for t in (q, k, v))
    out, ent = ek.slot_attention(q, k, v, scale=scale, eps=eps, mask=mask, return_entropy=True, backend=backend)
    if grads is None:
        return out, ent, None
    grad_out, grad_ent = grads
    loss = (out * grad_out.to(out.dtype)).sum() + (ent * grad_ent.to(ent.dtype)).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out, ent, (dq, dk, dv)


def oracle(q, k, v, mask, scale=None, eps=0.0, grads=None):
    """The float64 reference on the same (rounded) inputs."""
    return run(q.double(), k.double(), v.double(), mask, "reference", scale, eps, grads)


def rel_err(actual, expected, magnitude: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, magnitude) (both 0 compares absolute error)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values"
    denom = max(expected.abs().max().item() if expected.numel() else 0.0, magnitude)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / denom if denom > 0 else err


def check_against_oracle(q, k, v, mask, backend, scale=None, eps=0.0, check_grads=True, vs_torch=False,
                         cancellation=0.0, noise_samples=None, floor=None):
    """Compare forward and gradients of a backend with the float64 reference, by the rules above.

    vs_torch=True applies the low-precision rule (at most 2x PyTorch's own error at the input dtype) to
    float32 too: for ill-conditioned inputs (huge logits), where rounding the inputs to float32 alone moves
    the exact result by more than 1e-5.
    cancellation > 0: errors are taken relative to at least ``cancellation`` x the largest reference value of
    any output (ent: relative to at least one nat), so that an output whose exact value is ~0 by
    cancellation (dq = dk = 0 and ent = 0 with one token) is not judged by the relative size of its
    rounding residue.
    noise_samples: optional (B,) bool, samples whose exact dq and dk are 0 whatever the inputs (one valid
    token: A = 1 for every query): there the kernels return rounding noise of their single-pass formulas, which
    must stay below 1e-3 x the largest output; their dq, dk rows are left out of the relative comparison.
    floor: the bound added to 2x PyTorch's error (low precision, vs_torch) or the float32 bound; default one
    ulp of float16 / bfloat16 and 1e-5 for float32; a caller that passes a larger one derives it.
    When PyTorch's own low-precision computation breaks down on the inputs (non-finite values: float16
    overflows in its (B, N, T) intermediates), its float32 computation on the same rounded inputs, rounded
    to the output dtype, is the comparison instead.
    """
    dtype = q.dtype
    grads = upstream_grads(q.shape[:2] + v.shape[2:], q.shape[:2], device=q.device) if check_grads else None
    got = run(q, k, v, mask, backend, scale, eps, grads)
    want = oracle(q, k, v, mask, scale, eps, grads)
    names = ["out", "ent"]
    got_list, want_list = [got[0], got[1]], [want[0], want[1]]
    if check_grads:
        names += ["dq", "dk", "dv"]
        got_list += list(got[2])
        want_list += list(want[2])

    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    largest = max(w.double().abs().max().item() for w in want_list if w.numel())
    rows = [slice(None)] * len(names)  # the samples each output is compared on
    if noise_samples is not None and check_grads and bool(noise_samples.any()):
        noise_samples = noise_samples.to(got_list[0].device)
        for i, name in enumerate(names):
            if name in ("dq", "dk"):
                noise = got_list[i][noise_samples].double().abs().max().item()
                assert noise <= 1e-3 * largest, f"{name}: {noise:.3g} where the exact gradient is 0"
                rows[i] = ~noise_samples
    got_list = [g[r] for g, r in zip(got_list, rows)]
    want_list = [w[r] for w, r in zip(want_list, rows)]
    global_magnitude = cancellation * largest
    # ent is a difference log S - (sum m log m) / S of terms of about a nat: with cancellation on, at least 1
    magnitudes = [1.0 if (name == "ent" and cancellation) else global_magnitude for name in names]
    if dtype in LOW_PRECISION or vs_torch:
        torch_own = run(q, k, v, mask, "reference", scale, eps, grads)
        torch_list = [torch_own[0], torch_own[1]] + (list(torch_own[2]) if check_grads else [])
        if not all(torch.isfinite(t).all() for t in torch_list):
            # the upstream gradient of out as the backend receives it: rounded to the dtype
            rounded = (grads[0].to(dtype).double(), grads[1]) if check_grads else None
            torch_own = run(q.float(), k.float(), v.float(), mask, "reference", scale, eps, rounded)
            torch_list = [torch_own[0], torch_own[1]] + (list(torch_own[2]) if check_grads else [])
            # rounded to the dtype the backend returns them in (ent is float32 for every input dtype)
            torch_list = [t if name == "ent" else t.to(dtype) for name, t in zip(names, torch_list)]
        torch_list = [t[r] for t, r in zip(torch_list, rows)]
        # float32 keeps its 1e-5 bound as a floor; float16/bfloat16 get one ulp of the output dtype.
        if floor is None:
            floor = torch.finfo(dtype).eps if dtype in LOW_PRECISION else FP32_RTOL
        for name, a, t, w, magnitude in zip(names, got_list, torch_list, want_list, magnitudes):
            ours, theirs = rel_err(a, w, magnitude), rel_err(t, w, magnitude)
            assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3g} vs PyTorch {dtype} error {theirs:.3g}"
    else:
        rtol = FP64_RTOL if dtype == torch.float64 else (floor if floor is not None else FP32_RTOL)
        for name, a, w, magnitude in zip(names, got_list, want_list, magnitudes):
            err = rel_err(a, w, magnitude)
            assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"
    return got, want


def non_contiguous(q, k, v):
    """Same values as q, k, v, as non-contiguous views (transposed storage, strided slices)."""
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_nc = torch.cat([k, k], dim=2)[:, :, : k.shape[2]]
    v_nc = v.transpose(0, 1).contiguous().transpose(0, 1)
    assert not k_nc.is_contiguous() and not v_nc.is_contiguous()
    return q_nc, k_nc, v_nc


def saved_tensor_shapes(fn, *args):
    """Shapes of every tensor autograd saves while running fn(*args)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return shapes



def unit_features(rows, dim, dtype=torch.float32, seed=0, count=2, device="cpu"):
    """`count` random (rows, dim) tensors with L2-normalized rows (the contrastive losses' inputs)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)
            .to(device=device, dtype=dtype) for _ in range(count)]


def loss_and_grads(fn, tensors, scale):
    """[loss, grad of each tensor..., grad of scale] of ``fn(*tensors, scale)``, on fresh leaf copies."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    scale = scale.detach().clone().requires_grad_()
    loss = fn(*tensors, scale)
    loss.backward()
    return [loss.detach()] + [t.grad for t in tensors] + [scale.grad]

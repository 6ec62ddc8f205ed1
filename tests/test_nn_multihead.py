"""eclip_kernels.nn.MultiHeadSlotAttention against the PyPI slot-attention module (1.5.x), its wrappers, and
its extras (mask, given slots, return_attn, implicit_grad, backends).

Tolerances:
* float32: 1e-5 relative to max |reference| (the bound of tests/test_nn.py). Both modules run the same float32
  ops except the attention step, whose fused kernel differs from einsum + softmax + l1-normalize by rounding
  only (~1e-7 relative); outputs and gradients pass through up to 3 iterations of GRU and MLP.
* float64: 1e-10 relative (both sides in float64; summation order only, ~1e-15, amplified by the iterations).
A gradient that is exactly 0 in exact arithmetic (to_q.bias: a constant added to every query of a head
shifts all logits of a token in that head equally, and the softmax over the slots ignores it) is rounding
noise in both modules, so its scale is at least 1e-3 of the largest parameter gradient.

The Triton test runs on a CUDA GPU, or on CPU tensors through the Triton interpreter in its own process:

    TRITON_INTERPRET=1 python -m pytest tests/test_nn_multihead.py -k triton
"""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

import eclip_kernels as ek
from eclip_kernels.nn import MultiHeadSlotAttention, SlotAttention
from _helpers import rel_err

CPU_BUILT = ek.available_backends()["cpu"].usable
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not CPU_BUILT, reason="_C not built"))]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# (num_slots, dim, heads, dim_head, iters, eps, hidden_dim)
CONFIGS = [
    (5, 32, 4, 8, 3, 1e-8, 128),
    (7, 33, 3, 11, 2, 1e-3, 20),   # odd sizes everywhere
    (3, 16, 1, 16, 1, 1e-8, 64),   # one head: no fold copy
    (4, 24, 2, 5, 0, 1e-8, 128),   # iters=0 (the PyPI module allows it: the initial slots are returned)
]
CONFIG_IDS = ["slots{}-dim{}-heads{}-dh{}-iters{}-eps{}-hidden{}".format(*c) for c in CONFIGS]


@pytest.fixture
def pypi():
    return pytest.importorskip("slot_attention", reason="the PyPI package slot-attention is not installed")


def _pair(pypi, config, backend="auto", seed=0, dtype=torch.float32):
    """(theirs, ours), each built right after torch.manual_seed(seed): no state_dict copy, so equal weights
    show that the parameters are initialized in the same order from the same draws."""
    num_slots, dim, heads, dim_head, iters, eps, hidden_dim = config
    torch.manual_seed(seed)
    theirs = pypi.MultiHeadSlotAttention(num_slots, dim, heads=heads, dim_head=dim_head, iters=iters, eps=eps,
                                         hidden_dim=hidden_dim)
    torch.manual_seed(seed)
    ours = MultiHeadSlotAttention(num_slots, dim, heads=heads, dim_head=dim_head, iters=iters, eps=eps,
                                  hidden_dim=hidden_dim, backend=backend)
    return theirs.to(dtype), ours.to(dtype)


def _run(module, inputs, seed, grad_seed=123, **kwargs):
    """Forward with the RNG at `seed` (the initial-slot draw), backward of a random projection of the output."""
    x = inputs.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, **kwargs)
    slots = out[0] if isinstance(out, tuple) else out
    gen = torch.Generator().manual_seed(grad_seed)
    slots.backward(torch.randn(slots.shape, generator=gen, dtype=torch.float64).to(slots))
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return slots.detach(), x.grad, grads


def _assert_grads_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    floor = 1e-3 * max(w.abs().max().item() for w in want.values())
    for name, w in want.items():
        err = (got[name].double() - w.double()).abs().max().item()
        assert err <= rtol * max(w.abs().max().item(), floor), f"{name}: error {err:.3g}"


def test_constructor_signature_matches_pypi(pypi):
    theirs = inspect.signature(pypi.MultiHeadSlotAttention.__init__).parameters
    ours = inspect.signature(MultiHeadSlotAttention.__init__).parameters
    positional = [p for p in ours.values() if p.kind != inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in theirs.values()]
    assert [p.name for p in ours.values() if p.kind == inspect.Parameter.KEYWORD_ONLY] == ["backend"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("num_slots", [None, 9], ids=["default_slots", "override9"])
def test_matches_pypi_module_float32(pypi, backend, config, num_slots):
    theirs, ours = _pair(pypi, config, backend)
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), f"{name}: different initial weights for the same seed"
    inputs = torch.randn(3, 37, config[1])
    out_t, dx_t, grads_t = _run(theirs, inputs, seed=7, num_slots=num_slots)
    out_o, dx_o, grads_o = _run(ours, inputs, seed=7, num_slots=num_slots)
    assert out_o.shape == (3, num_slots or config[0], config[1])
    assert rel_err(out_o, out_t) <= RTOL[torch.float32]
    if config[4] == 0:  # no iteration: the slots do not depend on the inputs
        assert dx_o is None and dx_t is None
        assert set(grads_o) == {"slots_mu", "slots_logsigma"}
    else:
        assert rel_err(dx_o, dx_t) <= RTOL[torch.float32]
    _assert_grads_close(grads_o, grads_t, RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_matches_pypi_module_float64(pypi, backend, config):
    theirs, ours = _pair(pypi, config, backend, dtype=torch.float64)
    inputs = torch.randn(2, 29, config[1], dtype=torch.float64)
    out_t, dx_t, grads_t = _run(theirs, inputs, seed=5)
    out_o, dx_o, grads_o = _run(ours, inputs, seed=5)
    assert out_o.dtype == torch.float64
    assert rel_err(out_o, out_t) <= RTOL[torch.float64]
    assert rel_err(dx_o, dx_t) <= RTOL[torch.float64]
    _assert_grads_close(grads_o, grads_t, RTOL[torch.float64])


def test_triton_backend_matches_pypi_module(pypi):
    """At a tiny size (the interpreter is slow): forward and every gradient, float32."""
    if torch.cuda.is_available():
        device = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        pytest.skip("the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (run -k triton in its own process)")
    if not ek.available_backends()["triton"].usable:
        pytest.skip(f"triton backend unusable: {ek.available_backends()['triton'].reason}")
    config = (3, 16, 2, 8, 2, 1e-8, 32)
    theirs, ours = _pair(pypi, config, "triton")
    theirs, ours = theirs.to(device), ours.to(device)
    inputs = torch.randn(2, 9, 16, device=device)
    out_t, dx_t, grads_t = _run(theirs, inputs, seed=3)
    out_o, dx_o, grads_o = _run(ours, inputs, seed=3)
    assert rel_err(out_o, out_t) <= RTOL[torch.float32]
    assert rel_err(dx_o, dx_t) <= RTOL[torch.float32]
    _assert_grads_close(grads_o, grads_t, RTOL[torch.float32])


def test_state_dict_loads_both_ways_strictly(pypi):
    theirs, ours = _pair(pypi, CONFIGS[1])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    inputs = torch.randn(2, 21, CONFIGS[1][1])
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))  # small: the module stays as well conditioned as at init
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(1)
    want = theirs(inputs)
    torch.manual_seed(1)
    assert rel_err(ours(inputs), want) <= RTOL[torch.float32]

    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.manual_seed(2)
    want = theirs(inputs)
    torch.manual_seed(2)
    assert rel_err(ours(inputs), want) <= RTOL[torch.float32]
    # and not with another head split of the same width: the shapes differ and strict loading says so
    other = MultiHeadSlotAttention(7, 33, heads=1, dim_head=11, iters=2, eps=1e-3, hidden_dim=20)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_matches_pypi_on_the_unpadded_tokens(pypi, backend):
    """A padded sample with its padding masked gives what the PyPI module gives on the unpadded sample (same
    seed: the same (1, num_slots, dim) initial draw)."""
    theirs, ours = _pair(pypi, CONFIGS[1], backend)
    inputs = torch.randn(1, 40, CONFIGS[1][1])
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[:, :27] = True
    out_t, dx_t, grads_t = _run(theirs, inputs[:, :27], seed=4)
    out_o, dx_o, grads_o = _run(ours, inputs, seed=4, mask=mask)
    assert rel_err(out_o, out_t) <= RTOL[torch.float32]
    assert rel_err(dx_o[:, :27], dx_t) <= RTOL[torch.float32]
    assert torch.all(dx_o[:, 27:] == 0), "masked tokens must get no gradient"
    _assert_grads_close(grads_o, grads_t, RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_equals_dropping_the_masked_tokens_per_sample(backend):
    torch.manual_seed(0)
    module = MultiHeadSlotAttention(4, 16, heads=3, dim_head=5, iters=2, backend=backend)
    inputs = torch.randn(3, 30, 16)
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[0, 20:] = False
    mask[2, ::3] = False
    slots = torch.randn(3, 4, 16)
    masked = module(inputs, mask=mask, slots=slots)
    for b in range(3):
        alone = module(inputs[b:b + 1, mask[b]], slots=slots[b:b + 1])
        assert rel_err(masked[b], alone[0]) <= RTOL[torch.float32], f"sample {b}"
    all_valid = module(inputs, mask=torch.ones(3, 30, dtype=torch.bool), slots=slots)
    assert rel_err(all_valid, module(inputs, slots=slots)) <= RTOL[torch.float32]


def _attention_by_hand(module, inputs, slots, mask=None):
    """The attention (B, heads, num_slots, N) of one iteration from `slots`, written out in float64."""
    m = copy.deepcopy(module).double()
    x, s = m.norm_input(inputs.double()), m.norm_slots(slots.double())
    split = lambda t: t.unflatten(-1, (m.heads, m.dim_head)).transpose(1, 2)  # noqa: E731  (B, H, L, dh)
    q, k = split(m.to_q(s)), split(m.to_k(x))
    attn = (q @ k.transpose(-1, -2) * m.dim_head ** -0.5).softmax(dim=-2) + m.eps   # softmax over the slots
    if mask is not None:
        attn = attn * mask[:, None, None, :]
    return attn / attn.sum(-1, keepdim=True)                                          # mean over the tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_slots_and_return_attn(backend):
    torch.manual_seed(0)
    module = MultiHeadSlotAttention(4, 16, heads=3, dim_head=6, iters=2, eps=1e-3, backend=backend)
    inputs, slots = torch.randn(2, 30, 16), torch.randn(2, 6, 16)
    mask = torch.rand(2, 30) > 0.3
    state = torch.get_rng_state()
    out, attn = module(inputs, slots=slots, mask=mask, return_attn=True)
    assert torch.equal(torch.get_rng_state(), state), "given slots must not draw from the RNG"
    assert out.shape == (2, 6, 16) and attn.shape == (2, 3, 6, 30)
    assert not attn.requires_grad
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 6))
    assert torch.all(attn.masked_select(~mask[:, None, None, :]) == 0)
    torch.testing.assert_close(out, module(inputs, slots=slots, mask=mask))  # return_attn changes nothing else
    # the attention of the LAST iteration: the one computed from the slots after the first
    one = copy.deepcopy(module)
    one.iters = 1
    before_last = one(inputs, slots=slots, mask=mask)
    assert rel_err(attn, _attention_by_hand(module, inputs, before_last, mask)) <= RTOL[torch.float32]
    assert MultiHeadSlotAttention(4, 16, iters=0)(inputs, return_attn=True)[1] is None


def test_implicit_grad_differentiates_only_the_last_iteration():
    torch.manual_seed(0)
    module = MultiHeadSlotAttention(4, 16, heads=2, dim_head=8, iters=3)
    inputs, slots = torch.randn(2, 30, 16), torch.randn(2, 4, 16)
    x = inputs.clone().requires_grad_()
    out = module(x, slots=slots, implicit_grad=True)
    out.square().sum().backward()
    implicit = (out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in module.named_parameters()
                                               if p.grad is not None})
    module.zero_grad(set_to_none=True)

    # the same computation, written out: two iterations without autograd, then one from detached slots
    two = copy.deepcopy(module)
    two.iters = 2
    one = copy.deepcopy(module)
    one.iters = 1
    with torch.no_grad():
        start = two(inputs, slots=slots)
    x = inputs.clone().requires_grad_()
    out = one(x, slots=start)
    out.square().sum().backward()
    assert rel_err(implicit[0], out.detach()) <= RTOL[torch.float32]
    assert rel_err(implicit[1], x.grad) <= RTOL[torch.float32]
    _assert_grads_close(implicit[2], {n: p.grad for n, p in one.named_parameters() if p.grad is not None},
                        RTOL[torch.float32])
    assert "slots_mu" not in implicit[2] and "slots_logsigma" not in implicit[2]
    torch.testing.assert_close(module(inputs, slots=slots), implicit[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    """Inputs, initial slots and the four projections' weights, through 2 iterations with a mask (one
    sample has every token masked but one)."""
    torch.manual_seed(0)
    module = MultiHeadSlotAttention(3, 6, heads=2, dim_head=3, iters=2, eps=1e-8, hidden_dim=4,
                                    backend=backend).double()
    inputs = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    slots = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True], [False, False, True, False, False]])
    names = ["to_q.weight", "to_k.weight", "to_v.weight", "combine_heads.weight"]
    params = dict(module.named_parameters())
    weights = [params[n].detach().clone().requires_grad_() for n in names]

    def fn(x, s, *ws):
        return torch.func.functional_call(module, {**params, **dict(zip(names, ws))}, (x,),
                                          {"slots": s, "mask": mask})

    assert torch.autograd.gradcheck(fn, (inputs, slots, *weights))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_is_finite_and_close_to_float32(dtype, backend):
    torch.manual_seed(0)
    module = MultiHeadSlotAttention(5, 32, heads=4, dim_head=8, iters=3, backend=backend)
    inputs, slots = torch.randn(2, 40, 32), torch.randn(2, 5, 32)
    x = inputs.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = module(x, slots=slots)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    want = module(inputs, slots=slots)
    # a few bf16/fp16 roundings through 3 GRU/MLP iterations: a loose sanity bound, not a precision claim
    assert rel_err(out.float(), want) < (0.1 if dtype == torch.bfloat16 else 0.02)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_module(backend):
    torch.manual_seed(0)
    module = MultiHeadSlotAttention(4, 16, heads=2, dim_head=8, iters=2, backend=backend)
    inputs, slots = torch.randn(2, 30, 16), torch.randn(2, 4, 16)
    mask = torch.rand(2, 30) > 0.2
    compiled = torch.compile(module, fullgraph=True)
    eager_x, comp_x = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
    eager, comp = module(eager_x, slots=slots, mask=mask), compiled(comp_x, slots=slots, mask=mask)
    eager.sum().backward()
    comp.sum().backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(comp_x.grad, eager_x.grad)


# --- the PyPI package's wrappers around our modules ------------------------------------------------------


def _module_pairs(pypi):
    """(label, theirs, ours) for both drop-ins, built from the same seed (equal weights)."""
    torch.manual_seed(0)
    theirs_sa = pypi.SlotAttention(4, 16, iters=2)
    torch.manual_seed(0)
    ours_sa = SlotAttention(4, 16, iters=2)
    theirs_mh, ours_mh = _pair(pypi, (4, 16, 2, 8, 2, 1e-8, 32))
    return [("SlotAttention", theirs_sa, ours_sa), ("MultiHeadSlotAttention", theirs_mh, ours_mh)]


def _wrapped_run(wrapper, inputs, seed, **kwargs):
    """Outputs of wrapper(inputs) with the RNG at `seed` and the gradient of the inputs for the sum of the
    floating outputs."""
    x = inputs.clone().requires_grad_()
    torch.manual_seed(seed)
    outs = wrapper(x, **kwargs)
    floating = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
    sum(o.sum() for o in floating).backward()
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], x.grad


def _assert_outputs_close(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w.is_floating_point():
            assert rel_err(g, w) <= RTOL[torch.float32], f"output {i}"
        else:
            assert torch.equal(g, w), f"output {i}"


def test_adaptive_slot_wrapper(pypi):
    inputs = torch.randn(3, 25, 16)
    for label, theirs, ours in _module_pairs(pypi):
        torch.manual_seed(1)
        wrapped_t = pypi.AdaptiveSlotWrapper(theirs, temperature=0.5)
        torch.manual_seed(1)
        wrapped_o = pypi.AdaptiveSlotWrapper(ours, temperature=0.5)
        got, dx_o = _wrapped_run(wrapped_o, inputs, seed=2)
        want, dx_t = _wrapped_run(wrapped_t, inputs, seed=2)
        keep = got[1]  # hard 0/1 plus the straight-through soft - soft.detach() (rounding residue)
        assert keep.shape == (3, 4) and torch.allclose(keep, keep.round(), atol=1e-6), label
        _assert_outputs_close(got, want)
        assert rel_err(dx_o, dx_t) <= RTOL[torch.float32], label
        # and with our extras passed through the wrapper's **slot_kwargs
        slots = torch.randn(3, 6, 16)
        mask = torch.ones(3, 25, dtype=torch.bool)
        got, _ = _wrapped_run(wrapped_o, inputs, seed=2, slots=slots, mask=mask)
        assert got[0].shape == (3, 6, 16) and got[1].shape == (3, 6), label


def test_ortho_slot_wrapper(pypi):
    inputs = torch.randn(2, 25, 16)
    for label, theirs, ours in _module_pairs(pypi):
        got, dx_o = _wrapped_run(pypi.OrthoSlotWrapper(ours), inputs, seed=3)
        want, dx_t = _wrapped_run(pypi.OrthoSlotWrapper(theirs), inputs, seed=3)
        _assert_outputs_close(got, want)
        assert rel_err(dx_o, dx_t) <= RTOL[torch.float32], label
        # a tuple from return_attn passes through: (slots, attn, ortho_loss)
        slots, attn, loss = pypi.OrthoSlotWrapper(ours)(inputs, slots=torch.randn(2, 4, 16), return_attn=True)
        assert attn.shape[-2:] == (4, 25) and loss.dim() == 0, label


def test_meta_slot_attention(pypi):
    pytest.importorskip("vector_quantize_pytorch")
    inputs = torch.randn(3, 25, 16)
    for label, theirs, ours in _module_pairs(pypi):
        torch.manual_seed(4)
        meta_t = pypi.MetaSlotAttention(theirs, codebook_size=8)
        meta_o = pypi.MetaSlotAttention(ours, codebook_size=8)
        meta_o.load_state_dict(meta_t.state_dict(), strict=True)  # the codebook, and our module's weights
        for step in range(2):  # the first call initializes the codebook by k-means, the second uses it
            got, dx_o = _wrapped_run(meta_o, inputs, seed=5 + step)
            want, dx_t = _wrapped_run(meta_t, inputs, seed=5 + step)
            dedup, keep, vq_loss = got
            assert dedup.shape == (3, 4, 16) and keep.dtype == torch.bool and vq_loss.numel() == 1, label
            _assert_outputs_close(got, want)
            assert rel_err(dx_o, dx_t) <= RTOL[torch.float32], f"{label}, call {step}"
        for (name, a), (_, b) in zip(meta_o.state_dict().items(), meta_t.state_dict().items()):
            assert rel_err(a.double(), b.double()) <= RTOL[torch.float32], name


# --- bad arguments -----------------------------------------------------------------------------------------


def _bad_forward(**kwargs):
    module = MultiHeadSlotAttention(4, 16, heads=2, dim_head=8)
    inputs = kwargs.pop("inputs", torch.randn(2, 5, 16))
    return module(inputs, **kwargs)


@pytest.mark.parametrize("make, error, message", [
    (lambda: MultiHeadSlotAttention(0, 16), ValueError, "num_slots must be an int >= 1"),
    (lambda: MultiHeadSlotAttention(4, 0), ValueError, "dim must be an int >= 1"),
    (lambda: MultiHeadSlotAttention(4, 16, heads=0), ValueError, "heads must be an int >= 1"),
    (lambda: MultiHeadSlotAttention(4, 16, heads=2.0), ValueError, "heads must be an int >= 1"),
    (lambda: MultiHeadSlotAttention(4, 16, dim_head=0), ValueError, "dim_head must be an int >= 1"),
    (lambda: MultiHeadSlotAttention(4, 16, iters=-1), ValueError, "iters must be an int >= 0"),
    (lambda: MultiHeadSlotAttention(4, 16, eps=-1.0), ValueError, "eps must be a number >= 0"),
    (lambda: MultiHeadSlotAttention(4, 16, hidden_dim=0), ValueError, "hidden_dim must be an int >= 1"),
    (lambda: _bad_forward(inputs=torch.randn(3, 16)), ValueError, r"inputs must have shape \(B, N, 16\)"),
    (lambda: _bad_forward(inputs=torch.randn(2, 5, 8)), ValueError, r"inputs must have shape \(B, N, 16\)"),
    (lambda: _bad_forward(inputs=torch.ones(2, 5, 16, dtype=torch.long)), TypeError, "floating-point"),
    (lambda: _bad_forward(num_slots=0), ValueError, "num_slots must be an int >= 1"),
    (lambda: _bad_forward(slots=torch.randn(2, 4, 8)), ValueError, r"slots must have shape \(B, num_slots, 16\)"),
    (lambda: _bad_forward(slots=torch.randn(3, 4, 16)), ValueError, "with B=2"),
    (lambda: _bad_forward(slots=torch.randn(2, 4, 16), num_slots=5), ValueError, "num_slots=5, got"),
    (lambda: _bad_forward(slots=[[0.0]]), TypeError, "slots must be a tensor"),
    (lambda: _bad_forward(slots=torch.ones(2, 4, 16, dtype=torch.long)), TypeError, "slots must be a floating"),
    (lambda: _bad_forward(mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
     r"mask must have shape \(B, N\) = \(2, 5\)"),
    (lambda: _bad_forward(mask=torch.ones(2, 5)), TypeError, "mask must have dtype torch.bool"),
    (lambda: _bad_forward(mask=[[True] * 5] * 2), TypeError, "mask must be a bool tensor"),
])
def test_rejects_bad_arguments_clearly(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_named_backend_that_cannot_run_raises():
    module = MultiHeadSlotAttention(4, 16, heads=2, dim_head=8, backend="cuda")
    with pytest.raises((ValueError, RuntimeError), match="backend 'cuda'"):
        module(torch.randn(2, 5, 16))

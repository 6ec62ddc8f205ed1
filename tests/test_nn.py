"""eclip_kernels.nn: SlotAttention against the PyPI slot-attention module, InstanceSlotAttention against a
plain-PyTorch transcription of ECLIP Eq. 2-5.

Equivalence tolerance: 1e-5 relative to max |reference| in float32 (the issue's bound). Both modules run
the same float32 ops except the attention step, whose fused kernel differs from einsum + softmax by
rounding only (~1e-7 relative); gradients pass through up to 3 iterations of GRU and MLP.
"""

from __future__ import annotations

import copy

import pytest
import torch

import eclip_kernels as ek
from eclip_kernels.nn import InstanceSlotAttention, SlotAttention
from _helpers import rel_err

CPU_BUILT = ek.available_backends()["cpu"].usable
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not CPU_BUILT, reason="_C not built"))]
RTOL = 1e-5

try:
    from slot_attention import SlotAttention as PyPISlotAttention
except ImportError:  # optional test dependency
    PyPISlotAttention = None
needs_pypi = pytest.mark.skipif(PyPISlotAttention is None, reason="the PyPI package slot-attention is not installed")

# (num_slots, dim, iters, eps, hidden_dim)
CONFIGS = [
    (5, 32, 3, 1e-8, 128),
    (7, 33, 2, 1e-3, 20),
    (3, 16, 1, 1e-8, 64),
    (4, 24, 0, 1e-8, 128),
]


def _pair(config, backend, seed=0):
    num_slots, dim, iters, eps, hidden_dim = config
    torch.manual_seed(seed)
    theirs = PyPISlotAttention(num_slots, dim, iters=iters, eps=eps, hidden_dim=hidden_dim)
    ours = SlotAttention(num_slots, dim, iters=iters, eps=eps, hidden_dim=hidden_dim, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run(module, inputs, seed, **kwargs):
    """Forward with the RNG at `seed` (the initial-slot draw), backward of a random projection."""
    x = inputs.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, **kwargs)
    gen = torch.Generator().manual_seed(123)
    out.backward(torch.randn(out.shape, generator=gen))
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _assert_grads_close(got: dict, want: dict) -> None:
    """Each gradient within RTOL of max |reference|; a gradient that is exactly 0 in exact arithmetic (the
    bias of to_q: adding a constant to every query shifts all logits of a token equally, and the softmax over
    the queries ignores it) is rounding noise in both modules, so the scale is at least 1e-3 of the largest
    parameter gradient."""
    floor = 1e-3 * max(w.abs().max().item() for w in want.values())
    for name, w in want.items():
        err = (got[name].double() - w.double()).abs().max().item()
        assert err <= RTOL * max(w.abs().max().item(), floor), f"{name}: error {err:.3g}"


@needs_pypi
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "slots{}-dim{}-iters{}-eps{}-hidden{}".format(*c))
@pytest.mark.parametrize("num_slots", [None, 9], ids=["default_slots", "override9"])
def test_matches_pypi_module(backend, config, num_slots):
    theirs, ours = _pair(config, backend)
    inputs = torch.randn(3, 37, config[1])
    out_t, dx_t, grads_t = _run(theirs, inputs, seed=7, num_slots=num_slots)
    out_o, dx_o, grads_o = _run(ours, inputs, seed=7, num_slots=num_slots)
    assert out_o.shape == (3, num_slots or config[0], config[1])
    assert rel_err(out_o, out_t) <= RTOL
    if config[2] == 0:  # no iteration: the slots do not depend on the inputs
        assert dx_o is None and dx_t is None
    else:
        assert rel_err(dx_o, dx_t) <= RTOL
    assert grads_o.keys() == grads_t.keys() and len(grads_t) > 0
    _assert_grads_close(grads_o, grads_t)


@needs_pypi
def test_state_dict_round_trip_both_ways():
    theirs, ours = _pair(CONFIGS[1], "auto")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p))
    theirs.load_state_dict(ours.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_mask_equals_dropping_the_masked_tokens():
    torch.manual_seed(0)
    module = SlotAttention(4, 16, iters=2)
    inputs = torch.randn(2, 30, 16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False
    slots = torch.randn(2, 4, 16)
    masked = module(inputs, mask=mask, slots=slots)
    first = module(inputs[:1, :20], slots=slots[:1])
    assert rel_err(masked[0], first[0]) <= RTOL
    assert rel_err(masked[1], module(inputs[1:], slots=slots[1:])[0]) <= RTOL


def test_given_slots_and_return_attn():
    torch.manual_seed(0)
    module = SlotAttention(4, 16, iters=2, eps=1e-3)
    inputs, slots = torch.randn(2, 30, 16), torch.randn(2, 6, 16)
    state = torch.get_rng_state()
    out, attn = module(inputs, slots=slots, return_attn=True)
    assert torch.equal(torch.get_rng_state(), state), "given slots must not draw from the RNG"
    assert out.shape == (2, 6, 16) and attn.shape == (2, 6, 30)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6))
    assert SlotAttention(4, 16, iters=0)(inputs, return_attn=True)[1] is None
    with pytest.raises(ValueError, match="slots must have shape"):
        module(inputs, slots=torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="inputs must have shape"):
        module(torch.randn(2, 30, 8))


def test_implicit_grad_differentiates_only_the_last_iteration():
    torch.manual_seed(0)
    module = SlotAttention(4, 16, iters=3)
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
    assert rel_err(implicit[0], out.detach()) <= RTOL
    assert rel_err(implicit[1], x.grad) <= RTOL
    _assert_grads_close(implicit[2], {n: p.grad for n, p in one.named_parameters() if p.grad is not None})
    assert "slots_mu" not in implicit[2]
    torch.testing.assert_close(module(inputs, slots=slots), implicit[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_is_finite_and_close_to_float32(dtype, backend):
    torch.manual_seed(0)
    module = SlotAttention(5, 32, iters=3, eps=1e-8, backend=backend)
    inputs = torch.randn(2, 40, 32)
    slots = torch.randn(2, 5, 32)
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
    module = SlotAttention(4, 16, iters=2, backend=backend)
    inputs, slots = torch.randn(2, 30, 16), torch.randn(2, 4, 16)
    compiled = torch.compile(module, fullgraph=True)
    eager_x, comp_x = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
    eager, comp = module(eager_x, slots=slots), compiled(comp_x, slots=slots)
    eager.sum().backward()
    comp.sum().backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(comp_x.grad, eager_x.grad)


# --- InstanceSlotAttention ------------------------------------------------------------------------------


def _eq2_to_5(layer, z, queries, hidden, mask=None):
    """ECLIP Eq. 2-5 written out in float64."""
    w = {name: p.double() for name, p in layer.named_parameters()}
    z, queries, hidden = z.double(), queries.double(), hidden.double()
    zk = z @ w["to_k.weight"].T + w["to_k.bias"]                     # Z W_z
    qq = (queries + hidden) @ w["to_q.weight"].T + w["to_q.bias"]     # (Q + H) W_q
    zv = z @ w["to_v.weight"].T + w["to_v.bias"]                     # W_v z_i
    sim = zk @ qq.transpose(1, 2) / layer.dim ** 0.5                  # (B, N, T), Eq. 2
    m = sim.softmax(dim=-1)                                           # over the T queries, Eq. 3
    if mask is not None:
        m = m * mask[..., None]
    delta = (m.transpose(1, 2) @ zv) / m.sum(dim=1)[..., None]        # Eq. 4
    return hidden + delta @ w["to_out.weight"].T + w["to_out.bias"]   # Eq. 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_slot_attention_matches_eq2_to_5(backend):
    torch.manual_seed(0)
    layer = InstanceSlotAttention(24, backend=backend)
    z, queries, hidden = torch.randn(3, 41, 24), torch.randn(3, 7, 24), torch.randn(3, 7, 24)
    mask = torch.rand(3, 41) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        got = layer(z, queries, hidden, mask=m)
        assert rel_err(got, _eq2_to_5(layer, z, queries, hidden, m)) <= RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_slot_attention_gradients_match_float64_transcription(backend):
    torch.manual_seed(1)
    layer = InstanceSlotAttention(16, backend=backend)
    inputs = [torch.randn(2, 23, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    grad = torch.randn(2, 5, 16)
    ours = [t.clone().requires_grad_() for t in inputs]
    layer(*ours).backward(grad)
    ours_grads = {f"input{i}": t.grad for i, t in enumerate(ours)}
    ours_grads.update({n: p.grad.clone() for n, p in layer.named_parameters()})
    layer.zero_grad()
    ref_layer = copy.deepcopy(layer).double()
    ref = [t.double().requires_grad_() for t in inputs]
    _eq2_to_5(ref_layer, *ref).backward(grad.double())
    ref_grads = {f"input{i}": t.grad for i, t in enumerate(ref)}
    ref_grads.update({n: p.grad for n, p in ref_layer.named_parameters()})
    _assert_grads_close(ours_grads, ref_grads)


def test_instance_slot_attention_extras_and_shared_projection():
    torch.manual_seed(2)
    layers = [InstanceSlotAttention(16) for _ in range(3)]
    z, queries, hidden = torch.randn(2, 19, 16), torch.randn(2, 5, 16), torch.zeros(2, 5, 16)
    kv = InstanceSlotAttention.project_kv(layers, z)
    for layer, (k, v) in zip(layers, kv):
        torch.testing.assert_close(k, layer.to_k(z))
        torch.testing.assert_close(v, layer.to_v(z))
        direct = layer(z, queries, hidden, return_entropy=True, return_attn=True)
        shared = layer(None, queries, hidden, k=k, v=v, return_entropy=True, return_attn=True)
        torch.testing.assert_close(shared.hidden, direct.hidden)
        torch.testing.assert_close(shared.entropy, direct.entropy)
        assert direct.attn.shape == (2, 19, 5)
        torch.testing.assert_close(direct.attn.sum(1), torch.ones(2, 5))
        hidden = direct.hidden
    with pytest.raises(ValueError, match="z is required"):
        layers[0](None, queries, hidden)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_slot_attention_compiles_and_runs_under_autocast(backend):
    torch.manual_seed(3)
    layer = InstanceSlotAttention(16, eps=1e-8, backend=backend)
    z, queries, hidden = torch.randn(2, 19, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = torch.rand(2, 19) > 0.2

    def step(z, queries, hidden):
        out = layer(z, queries, hidden, mask=mask, return_entropy=True)
        return out.hidden, out.entropy

    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(z, queries, hidden), step(z, queries, hidden)):
        torch.testing.assert_close(got, want)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            h, ent = step(z, queries, hidden)
        assert torch.isfinite(h).all() and torch.isfinite(ent).all()
        assert rel_err(h.float(), step(z, queries, hidden)[0]) < (0.05 if dtype == torch.bfloat16 else 0.01)


@pytest.mark.parametrize("make, error, message", [
    (lambda: SlotAttention(0, 16), ValueError, "num_slots must be an int >= 1"),
    (lambda: SlotAttention(4, 0), ValueError, "dim must be an int >= 1"),
    (lambda: SlotAttention(4, 16, iters=-1), ValueError, "iters must be an int >= 0"),
    (lambda: SlotAttention(4, 16, eps=-1.0), ValueError, "eps must be a number >= 0"),
    (lambda: SlotAttention(4, 16)(torch.randn(3, 16)), ValueError, r"inputs must have shape \(B, N, 16\)"),
    (lambda: SlotAttention(4, 16)(torch.ones(2, 5, 16, dtype=torch.long)), TypeError, "floating-point"),
    (lambda: SlotAttention(4, 16)(torch.randn(2, 5, 16), num_slots=0), ValueError, "num_slots must be an int"),
    (lambda: InstanceSlotAttention(0), ValueError, "dim must be an int >= 1"),
    (lambda: InstanceSlotAttention(16)(torch.randn(2, 5, 8), torch.randn(2, 3, 16), torch.randn(2, 3, 16)),
     ValueError, r"z must have shape \(B, N, 16\)"),
    (lambda: InstanceSlotAttention(16)(torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(2, 4, 16)),
     ValueError, "queries and hidden must have the same shape"),
])
def test_modules_reject_bad_arguments_clearly(make, error, message):
    with pytest.raises(error, match=message):
        make()

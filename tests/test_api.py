"""Input checks, backend reports, slot_attention_weights and entropy_regularizer."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import eclip_kernels as ek
from _helpers import make_inputs, oracle, rel_err

CPU_BUILT = ek.available_backends()["cpu"].usable
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not CPU_BUILT, reason="_C not built"))]


def _inputs(batch=2, num_tokens=6, num_queries=3, dim=4, dim_v=5):
    return make_inputs((batch, num_tokens, num_queries, dim, dim_v), torch.float32, masked=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda q, k, v, m: (q[0], k, v, m), ValueError, "q must have shape"),
        (lambda q, k, v, m: (q, k[..., None], v, m), ValueError, "k must have shape"),
        (lambda q, k, v, m: (q, k, v[0], m), ValueError, "v must have shape"),
        (lambda q, k, v, m: (q, k[:1], v[:1], m[:1]), ValueError, "batch sizes differ"),
        (lambda q, k, v, m: (q, k[..., :3], v, m), ValueError, "feature sizes differ"),
        (lambda q, k, v, m: (q, k, v[:, :4], m), ValueError, "with the B and N of k"),
        (lambda q, k, v, m: (q, k, v, m[:, :4]), ValueError, "mask must have shape"),
        (lambda q, k, v, m: (q, k, v, m.float()), TypeError, "mask must have dtype torch.bool"),
        (lambda q, k, v, m: (q, k, v, m.tolist()), TypeError, "mask must be a bool tensor"),
        (lambda q, k, v, m: (q, k.double(), v, m), TypeError, "same dtype"),
        (lambda q, k, v, m: (q.long(), k, v, m), TypeError, "floating-point"),
        (lambda q, k, v, m: (q, k.to("meta"), v, m), ValueError, "different devices"),
        (lambda q, k, v, m: (q, k, v, m.to("meta")), ValueError, "different devices"),
        (lambda q, k, v, m: (q, k[:, :0], v[:, :0], m[:, :0]), ValueError, "empty dimension"),
        (lambda q, k, v, m: (q, k.numpy(), v, m), TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_error(backend, mutate, error, message):
    q, k, v, mask = mutate(*_inputs())
    with pytest.raises(error, match=message):
        ek.slot_attention(q, k, v, mask=mask, backend=backend)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=-1.0), "eps must be finite and >= 0"),
    (dict(eps=float("nan")), "eps must be finite"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(scale=-0.5), "scale must be finite and > 0"),
    (dict(backend="tpu"), "unknown backend 'tpu'"),
])
def test_bad_scalars_raise(kwargs, message):
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=message):
        ek.slot_attention(q, k, v, mask=mask, **kwargs)


@pytest.mark.skipif(not CPU_BUILT, reason="_C not built")
def test_cpu_backend_rejects_unsupported_dtype():
    q, k, v, _ = _inputs()
    with pytest.raises(TypeError, match="backend 'cpu' does not support float16 inputs"):
        ek.slot_attention(q.half(), k.half(), v.half(), backend="cpu")


def test_query_limit_of_a_backend_is_named_in_the_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # makes triton accept CPU tensors, so T is what is checked
    if not ek.available_backends()["triton"].built:
        pytest.skip("triton is not installed")
    q, k, v, _ = _inputs(num_queries=65)
    with pytest.raises(ValueError, match="backend 'triton' supports at most 64 queries"):
        ek.slot_attention(q, k, v, backend="triton")


def test_backend_on_wrong_device_raises():
    q, k, v, _ = _inputs()
    with pytest.raises((ValueError, RuntimeError), match="backend 'cuda'"):
        ek.slot_attention(q, k, v, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, _ = _inputs()
    with pytest.raises((ValueError, RuntimeError), match="backend 'triton'"):
        ek.slot_attention(q, k, v, backend="triton")


def test_available_backends_report():
    report = ek.available_backends()
    assert set(report) == {"reference", "cpu", "cuda", "triton"}
    assert report["reference"].usable
    for name, status in report.items():
        assert isinstance(status, ek.BackendStatus) and status.reason, name
        assert status.usable <= status.built, name
    if not torch.cuda.is_available():
        assert not report["cuda"].usable
        assert "no CUDA GPU" in report["cuda"].reason or "without" in report["cuda"].reason or "not built" in report["cuda"].reason


# --- slot_attention_weights ---------------------------------------------------------------------------


def test_weights_columns_are_distributions_over_valid_tokens():
    q, k, _, mask = make_inputs((3, 17, 5, 8, 8), torch.float64, masked=True, seed=2)
    attn = ek.slot_attention_weights(q, k, eps=1e-3, mask=mask)
    assert attn.shape == (3, 17, 5)
    assert (attn[~mask] == 0).all()
    sums = attn.sum(1)
    torch.testing.assert_close(sums[:2], torch.ones_like(sums[:2]))
    assert (sums[2] == 0).all()  # the all-masked sample


def test_weights_agree_with_fused_output():
    q, k, v, mask = make_inputs((2, 17, 5, 8, 6), torch.float64, masked=True, seed=3)
    attn = ek.slot_attention_weights(q, k, eps=1e-3, mask=mask)
    out, _, _ = oracle(q, k, v, mask, eps=1e-3)
    assert rel_err(torch.einsum("bnt,bnv->btv", attn, v), out) < 1e-12


# --- entropy_regularizer ------------------------------------------------------------------------------


def _eq10_loop(ent, positive, num_tokens):
    total = 0.0
    for b in range(ent.shape[0]):
        r = int(positive[b])
        total += ent[b, r].item()
        for j in range(ent.shape[1]):
            if j != r:
                total += (math.log(max(int(num_tokens[b]), 1)) if num_tokens is not None else 0.0) - ent[b, j].item()
    return total / ent.shape[0]


@pytest.mark.parametrize("num_tokens_kind", ["tensor", "int", "none"])
def test_entropy_regularizer_matches_eq10(num_tokens_kind):
    q, k, v, mask = make_inputs((4, 23, 6, 8, 8), torch.float64, masked=True, seed=4)
    _, ent = ek.slot_attention(q, k, v, mask=mask, return_entropy=True)
    positive = torch.tensor([0, 5, 2, 3])
    counts = {"tensor": mask.sum(1), "int": 23, "none": None}[num_tokens_kind]
    loss = ek.entropy_regularizer(ent, positive, num_tokens=counts)
    loop_counts = {"tensor": mask.sum(1), "int": [23] * 4, "none": None}[num_tokens_kind]
    assert loss.shape == () and loss.dtype == torch.float64
    assert abs(loss.item() - _eq10_loop(ent, positive, loop_counts)) < 1e-12


def test_entropy_regularizer_gradient_sign():
    ent = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    positive = torch.tensor([1, 0, 3])
    ek.entropy_regularizer(ent, positive, num_tokens=10).backward()
    expect = torch.full((3, 4), -1.0 / 3, dtype=torch.float64)
    expect[torch.arange(3), positive] = 1.0 / 3
    torch.testing.assert_close(ent.grad, expect)


@pytest.mark.parametrize("args, error, message", [
    ((torch.rand(3), torch.tensor([0, 1, 2])), ValueError, "ent must be"),
    ((torch.rand(3, 4), torch.tensor([0, 1])), ValueError, "positive_index must be a tensor of shape"),
    ((torch.rand(3, 4), torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer tensor"),
    ((torch.rand(3, 4), torch.tensor([0, 1, 2]), 0), ValueError, "num_tokens must be >= 1"),
    ((torch.rand(3, 4), torch.tensor([0, 1, 2]), torch.ones(2)), ValueError, "num_tokens must be"),
])
def test_entropy_regularizer_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        ek.entropy_regularizer(*args)


def test_package_works_without_the_extension():
    # A None entry in sys.modules makes `import eclip_kernels._C` fail, as on a machine without the build.
    code = (
        "import sys; sys.modules['eclip_kernels._C'] = None\n"
        "import torch, eclip_kernels as ek\n"
        "status = ek.available_backends()\n"
        "assert status['reference'].usable and not status['cpu'].usable, status\n"
        "q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 6)\n"
        "assert ek.slot_attention(q, k, v).shape == (2, 3, 6)\n"
        "assert ek.nn.SlotAttention(3, 4)(torch.randn(2, 5, 4)).shape == (2, 3, 4)\n"
        "try:\n"
        "    ek.slot_attention(q, k, v, backend='cpu')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ECLIP_KERNELS_REQUIRE_EXTENSION"}  # CI sets it
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "backend 'cpu' is not available: eclip_kernels._C is not built" in result.stdout

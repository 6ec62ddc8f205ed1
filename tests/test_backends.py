"""Backend choice of ``auto`` and the precision policy under torch.autocast (README "Precision and backend
choice"). CUDA routing is checked without a GPU: the device capability lookup and ``torch.cuda.is_available``
are replaced, and only the choice is checked, not a launch."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import eclip_kernels as ek
from eclip_kernels import _extension, backends, reference
from eclip_kernels.ops import contrastive as contrastive_ops
from eclip_kernels.ops import slot_attention as slot_ops

CPU_BUILT = ek.available_backends()["cpu"].usable
TRITON_IMPORTS = backends._triton_import_error() is None
CUDA0 = torch.device("cuda", 0)
needs_cpu = pytest.mark.skipif(not CPU_BUILT, reason="_C not built")
needs_triton = pytest.mark.skipif(not TRITON_IMPORTS, reason="triton does not import here")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test starts with no fallback reported yet (each reason is reported once per process)."""
    monkeypatch.setattr(backends, "_WARNED", set())


def fake_gpu(monkeypatch, capability):
    """Pretend a CUDA GPU of this compute capability is present (for the choice only)."""
    monkeypatch.setattr(backends, "_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def fallback_messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ek.BackendFallbackWarning)]


def resolve(*args, **kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chosen = backends.resolve_backend(*args, **kwargs)
    return chosen, fallback_messages(record)


def resolve_call(*args):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chosen = backends.resolve_call(*args)
    return chosen, fallback_messages(record)


# --- 1a. Triton counts only when `import triton` succeeds ---------------------------------------------------


@pytest.fixture
def broken_triton(tmp_path, monkeypatch):
    """A `triton` package that is found on sys.path but fails to import, as a broken install."""
    package = tmp_path / "triton"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libtriton.so: undefined symbol (broken build)')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    backends._triton_import_error.cache_clear()
    yield
    backends._triton_import_error.cache_clear()


def test_broken_triton_install_is_not_available(broken_triton, monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    status = ek.available_backends()["triton"]
    assert not status.built and not status.usable
    assert "import triton" in status.reason and "broken build" in status.reason
    # auto on CUDA tensors: slot attention on the reference, losses on the tiled kernels, with the reason
    chosen, messages = resolve("auto", CUDA0, torch.bfloat16, 8, "slot_attention")
    assert chosen == "reference" and len(messages) == 1 and "broken build" in messages[0]
    chosen, messages = resolve("auto", CUDA0, torch.bfloat16, 1, "contrastive")
    assert chosen == "cuda" and len(messages) == 1 and "broken build" in messages[0]
    with pytest.raises(RuntimeError, match="backend 'triton' is not available.*broken build"):
        backends.resolve_backend("triton", CUDA0, torch.float32, 8)


def test_triton_import_is_tried_once(broken_triton):
    for _ in range(3):
        backends._triton_import_error()
    info = backends._triton_import_error.cache_info()
    assert info.misses == 1 and info.hits == 2


# --- 1b. compute capability ---------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("op", backends.OPS)
@pytest.mark.parametrize("capability, dtype, fused", [
    ((9, 0), torch.bfloat16, True),
    ((8, 0), torch.bfloat16, True),
    ((8, 6), torch.float16, True),
    ((7, 5), torch.float32, True),
    ((7, 5), torch.float16, True),
    ((7, 5), torch.bfloat16, False),   # bfloat16 needs >= 8.0
    ((7, 0), torch.float16, False),    # Triton kernels need >= 7.5
    ((7, 0), torch.float32, False),
])
def test_auto_on_cuda_uses_triton_only_where_the_device_supports_the_dtype(monkeypatch, op, capability, dtype,
                                                                           fused):
    fake_gpu(monkeypatch, capability)
    chosen, messages = resolve("auto", CUDA0, dtype, 8, op)
    fallback = "reference" if op == "slot_attention" else "cuda"
    assert chosen == ("triton" if fused else fallback)
    assert len(messages) == (0 if fused else 1)
    if not fused:
        assert f"{capability[0]}.{capability[1]}" in messages[0]
        assert ("8.0" if capability >= (7, 5) else "7.5") in messages[0]


@needs_triton
def test_named_triton_checks_the_capability(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    assert backends.resolve_backend("triton", CUDA0, torch.float16, 8) == "triton"
    with pytest.raises(TypeError, match="bfloat16 needs >= 8.0"):
        backends.resolve_backend("triton", CUDA0, torch.bfloat16, 8)
    fake_gpu(monkeypatch, (7, 0))
    with pytest.raises(RuntimeError, match="compute capability >= 7.5"):
        backends.resolve_backend("triton", CUDA0, torch.float32, 8, "contrastive")


def test_capability_is_read_once_per_device_index(monkeypatch):
    calls = []

    def capability(index):
        calls.append(index)
        return (8, 0) if index == 0 else (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    backends._capability_of_index.cache_clear()
    try:
        assert backends._device_capability(torch.device("cuda", 0)) == (8, 0)
        assert backends._device_capability(torch.device("cuda", 0)) == (8, 0)
        assert backends._device_capability(torch.device("cuda", 1)) == (7, 5)
        assert calls == [0, 1]
    finally:
        backends._capability_of_index.cache_clear()


@needs_triton
@pytest.mark.parametrize("capability, usable, words", [
    ((9, 0), True, "compute capability 9.0"),
    ((7, 5), True, "bfloat16 needs >= 8.0"),
    ((7, 0), False, "need >= 7.5"),
])
def test_available_backends_reports_the_capability(monkeypatch, capability, usable, words):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake_gpu(monkeypatch, capability)
    status = ek.available_backends()["triton"]
    assert status.built and status.usable == usable and words in status.reason, status


# --- 1c. fallback warnings ----------------------------------------------------------------------------------


@needs_triton
def test_more_than_64_queries_on_cuda_warns_once(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    with pytest.warns(ek.BackendFallbackWarning, match="at most 64 queries, got T=65"):
        assert backends.resolve_backend("auto", CUDA0, torch.bfloat16, 65) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: silent
        assert backends.resolve_backend("auto", CUDA0, torch.bfloat16, 65) == "reference"
    with pytest.warns(ek.BackendFallbackWarning, match="T=100"):  # another reason: reported
        backends.resolve_backend("auto", CUDA0, torch.bfloat16, 100)


@needs_cpu
def test_float16_slot_attention_on_cpu_warns_once_and_matches_the_reference():
    q, k, v = torch.randn(2, 5, 8).half(), torch.randn(2, 9, 8).half(), torch.randn(2, 9, 6).half()
    with pytest.warns(ek.BackendFallbackWarning, match="cpu slot-attention kernels have no float16 kernel"):
        out = ek.slot_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ek.slot_attention(q, k, v)
    torch.testing.assert_close(out, ek.slot_attention(q, k, v, backend="reference"))
    torch.testing.assert_close(again, out)


def test_extension_not_loaded_on_cpu_warns(monkeypatch):
    monkeypatch.setattr(_extension, "is_loaded", lambda: False)
    chosen, messages = resolve("auto", torch.device("cpu"), torch.float32, 8)
    assert chosen == "reference" and len(messages) == 1 and "eclip_kernels._C is not loaded" in messages[0]
    # the contrastive losses' cpu path needs no extension: nothing to report
    assert resolve("auto", torch.device("cpu"), torch.float32, 1, "contrastive") == ("cpu", [])


@needs_cpu
def test_no_warning_when_the_fused_backend_runs_or_none_exists():
    for args in [("auto", torch.device("cpu"), torch.float32, 200),            # cpu: any T
                 ("auto", torch.device("cpu"), torch.bfloat16, 8),
                 ("auto", torch.device("cpu"), torch.float16, 1, "contrastive"),
                 ("auto", torch.device("meta"), torch.float32, 8),              # no fused backend there
                 ("auto", torch.device("meta"), torch.float32, 1, "contrastive")]:
        chosen, messages = resolve(*args)
        assert messages == [], args
        assert chosen == ("reference" if args[1].type == "meta" else "cpu")


def test_named_backend_never_falls_back():
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors"):
        backends.resolve_backend("cpu", CUDA0, torch.float32, 8, "contrastive")
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        backends.resolve_backend("cuda", torch.device("cpu"), torch.float32, 1, "contrastive")


# --- 1d. contrastive losses on CUDA: tiled ATen, never the B x B reference ---------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_contrastive_on_cuda_without_triton_uses_the_tiled_kernels(monkeypatch, dtype):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(backends, "_triton_import_error", lambda: "the triton package is not installed")
    monkeypatch.setattr(_extension, "cuda_sources_built", lambda: False)  # needs no extension
    chosen, messages = resolve("auto", CUDA0, dtype, 1, "contrastive")
    assert chosen == "cuda" and len(messages) == 1
    assert "triton package is not installed" in messages[0] and "tiled ATen" in messages[0]
    assert backends.resolve_backend("cuda", CUDA0, dtype, 1, "contrastive") == "cuda"
    assert contrastive_ops.OPS["cuda"]["clip_fwd"] is contrastive_ops.OPS["cpu"]["clip_fwd"]
    # slot attention's cuda backend is the C++ kernels of the extension, which this (pretended) build lacks
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        backends.resolve_backend("cuda", CUDA0, torch.float32, 8)


def test_available_backends_states_each_family(monkeypatch):
    report = ek.available_backends()
    for name in ("cpu", "cuda"):
        assert "slot attention:" in report[name].reason and "contrastive losses: tiled ATen" in report[name].reason
    fake_gpu(monkeypatch, (9, 0))
    assert "contrastive losses: tiled ATen, no extension needed, runs on CUDA tensors" in \
        ek.available_backends()["cuda"].reason


# --- 1e. torch.compile(fullgraph=True) with a fallback warning while tracing --------------------------------


@needs_cpu
@pytest.mark.slow
def test_compile_fullgraph_with_fallback_warning_and_autocast():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, generator=gen).half() for n in (5, 9, 9))
    image, text = (torch.randn(6, 8, generator=gen) for _ in range(2))

    def fn(q, k, v, image, text):
        out = ek.slot_attention(q, k, v)                       # float16 on CPU: reference, with a warning
        with torch.autocast("cpu", dtype=torch.bfloat16):      # float32 features taken in bfloat16
            loss = ek.clip_loss(F.normalize(image, dim=1), F.normalize(text, dim=1), 10.0)
        return out, loss

    results = []
    for f in (torch.compile(fn, fullgraph=True), fn):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_()]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out, loss = f(q, k, v, *leaves)
        loss.backward()
        results.append((out, loss, *(t.grad for t in leaves), fallback_messages(record)))
    (c_out, c_loss, c_gi, c_gt, c_msgs), (e_out, e_loss, e_gi, e_gt, _) = results
    assert any("no float16 kernel" in m for m in c_msgs), c_msgs
    assert c_loss.dtype == torch.float32 and c_gi.dtype == torch.float32
    torch.testing.assert_close(c_out, e_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(c_loss, e_loss)
    torch.testing.assert_close(c_gi, e_gi)
    torch.testing.assert_close(c_gt, e_gt)


# --- 2. precision policy under autocast ---------------------------------------------------------------------


@pytest.fixture
def slot_spy(monkeypatch):
    """Records (backend, q/k/v dtypes, autocast on inside) of every fused slot-attention forward."""
    calls = []
    original = slot_ops.forward_op

    def forward_op(backend):
        op = original(backend)

        def spy(q, k, v, *args):
            calls.append((backend, q.dtype, k.dtype, v.dtype))
            return op(q, k, v, *args)

        return spy

    monkeypatch.setattr(slot_ops, "forward_op", forward_op)
    return calls


@pytest.fixture
def loss_spy(monkeypatch):
    """Records (op name, feature dtypes, autocast on inside) of the contrastive kernels of every backend."""
    calls = []
    for backend in ("cpu", "triton"):
        for name in ("clip_fwd", "rows_fwd"):
            op = contrastive_ops.OPS[backend][name]

            def spy(*args, _op=op, _name=name, _backend=backend):
                features = [a for a in args[:3] if a.dim() == 2]
                calls.append((_backend, _name, [t.dtype for t in features], torch.is_autocast_enabled("cpu")))
                return _op(*args)

            monkeypatch.setitem(contrastive_ops.OPS[backend], name, spy)
    return calls


def _attention_leaves(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, n, 16, generator=gen) * g).to(dtype).requires_grad_()
            for n, g in ((7, 2.0), (23, 1.0), (23, 1.0))]


@needs_cpu
def test_slot_attention_under_bf16_autocast_runs_the_cpu_kernel_in_bf16(slot_spy):
    leaves = _attention_leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ent = ek.slot_attention(*leaves, eps=1e-8, return_entropy=True)
    assert slot_spy == [("cpu", torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    assert out.dtype == torch.bfloat16 and ent.dtype == torch.float32
    (out.float().square().sum() + ent.sum()).backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()
    # the same as the kernel on the inputs rounded to bfloat16
    want = ek.slot_attention(*(t.detach().bfloat16() for t in leaves), eps=1e-8)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@needs_cpu
def test_slot_attention_outside_autocast_casts_nothing(slot_spy):
    leaves = _attention_leaves()
    ek.slot_attention(*leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        ek.slot_attention(*leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ek.slot_attention(*(t.double() for t in leaves))        # float64: left alone, as autocast does
    assert slot_spy == [("cpu", torch.float32, torch.float32, torch.float32)] * 2 + \
        [("cpu", torch.float64, torch.float64, torch.float64)]


@needs_cpu
def test_float16_autocast_on_cpu_runs_the_cpu_kernel_in_float32(slot_spy):
    leaves = _attention_leaves()
    with pytest.warns(ek.BackendFallbackWarning, match="under float16 autocast.*'cpu' in float32"):
        with torch.autocast("cpu", dtype=torch.float16):
            out = ek.slot_attention(*leaves)
    assert slot_spy == [("cpu", torch.float32, torch.float32, torch.float32)] and out.dtype == torch.float32
    # a named backend without a kernel for the autocast dtype takes the inputs' own dtype, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.float16):
            ek.slot_attention(*leaves, backend="cpu")
    assert slot_spy[-1] == ("cpu", torch.float32, torch.float32, torch.float32)


def test_reference_under_autocast_computes_in_float32_from_the_rounded_inputs(monkeypatch):
    seen = []
    original = reference.slot_attention

    def spy(q, *args):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return original(q, *args)

    monkeypatch.setattr(reference, "slot_attention", spy)
    leaves = _attention_leaves(seed=3)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out, ent = ek.slot_attention(*leaves, eps=1e-8, return_entropy=True, backend="reference")
        assert seen[-1] == (torch.float32, False)
        assert out.dtype == dtype and ent.dtype == torch.float32
        rounded = [t.detach().to(dtype).float() for t in leaves]
        want_out, want_ent = original(*rounded, leaves[0].shape[-1] ** -0.5, 1e-8, None)
        torch.testing.assert_close(out, want_out.to(dtype), atol=0, rtol=0)
        torch.testing.assert_close(ent, want_ent, atol=0, rtol=0)
        out.float().sum().backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)
    # outside autocast the reference computes in the input dtype (the oracle of PyTorch's own rounding)
    ek.slot_attention(*(t.detach().bfloat16() for t in leaves), backend="reference")
    assert seen[-1] == (torch.bfloat16, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_loss_under_autocast_takes_normalized_features_in_the_autocast_dtype(loss_spy, dtype):
    gen = torch.Generator().manual_seed(1)
    image, text = (torch.randn(37, 16, generator=gen).requires_grad_() for _ in range(2))
    ids = torch.arange(37) // 2
    with torch.autocast("cpu", dtype=dtype):
        img, txt = F.normalize(image, dim=1), F.normalize(text, dim=1)
        assert img.dtype == torch.float32  # what autocast gives: the reason for the cast
        loss = ek.clip_loss(img, txt, 20.0, ids=ids)
    assert loss_spy == [("cpu", "clip_fwd", [dtype, dtype], False)]  # the kernel runs with autocast off
    assert loss.dtype == torch.float32
    loss.backward()
    assert image.grad.dtype == torch.float32 and text.grad.dtype == torch.float32
    # exactly the kernel on the rounded features, outside autocast
    rounded = [F.normalize(t.detach(), dim=1).to(dtype) for t in (image, text)]
    torch.testing.assert_close(loss, ek.clip_loss(*rounded, 20.0, ids=ids), atol=0, rtol=0)


def test_info_nce_under_autocast(loss_spy):
    gen = torch.Generator().manual_seed(2)
    query, positive, negatives = (torch.randn(n, 16, generator=gen).requires_grad_() for n in (5, 5, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ek.info_nce(query, positive, negatives, 10.0)
    assert loss_spy == [("cpu", "rows_fwd", [torch.bfloat16] * 3, False)] and loss.dtype == torch.float32
    loss.backward()
    assert all(t.grad.dtype == torch.float32 for t in (query, positive, negatives))
    want = ek.info_nce(*(t.detach().bfloat16() for t in (query, positive, negatives)), 10.0)
    torch.testing.assert_close(loss, want, atol=0, rtol=0)
    # outside autocast: nothing cast
    ek.info_nce(query, positive, negatives, 10.0)
    assert loss_spy[-1] == ("cpu", "rows_fwd", [torch.float32] * 3, False)


def test_reference_loss_under_autocast_is_float32_math():
    gen = torch.Generator().manual_seed(4)
    image, text = (F.normalize(torch.randn(9, 8, generator=gen), dim=1) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ek.clip_loss(image, text, 50.0, backend="reference")
    want = reference.clip_loss(image.bfloat16().float(), text.bfloat16().float(), torch.tensor(50.0), None)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, atol=0, rtol=0)


@needs_triton
def test_cuda_choice_under_autocast(monkeypatch):
    """resolve_call is what slot_attention / clip_loss consult: (backend, dtype the inputs are cast to)."""
    fake_gpu(monkeypatch, (9, 0))
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert resolve_call("auto", CUDA0, f32, 20, "slot_attention", bf16) == (("triton", bf16), [])
    assert resolve_call("auto", CUDA0, f32, 1, "contrastive", f16) == (("triton", f16), [])
    assert resolve_call("auto", CUDA0, f32, 20, "slot_attention", None) == (("triton", f32), [])
    chosen, messages = resolve_call("auto", CUDA0, f32, 65, "slot_attention", bf16)
    assert chosen == ("reference", bf16) and "T=65" in messages[0]
    fake_gpu(monkeypatch, (7, 5))
    chosen, messages = resolve_call("auto", CUDA0, f32, 20, "slot_attention", bf16)
    assert chosen == ("triton", f32) and "under bfloat16 autocast" in messages[0]
    chosen, messages = resolve_call("auto", CUDA0, f32, 1, "contrastive", bf16)
    assert chosen == ("cuda", bf16) and "tiled ATen" in messages[0]
    assert resolve_call("triton", CUDA0, f32, 20, "slot_attention", bf16) == (("triton", f32), [])
    assert resolve_call("auto", CUDA0, f32, 20, "slot_attention", f16) == (("triton", f16), [])


@needs_cpu
def test_modules_under_autocast(slot_spy, monkeypatch):
    """The modules keep their documented behaviour: fused kernels where they take the dtype, float32
    otherwise (the cpu kernel for float16 on CPU, the reference computed in float32 with autocast off)."""
    torch.manual_seed(0)
    module = ek.nn.SlotAttention(4, 16, iters=1, eps=1e-8)
    inputs, slots = torch.randn(2, 30, 16), torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(inputs, slots=slots)
    assert slot_spy[-1] == ("cpu", torch.bfloat16, torch.bfloat16, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ek.BackendFallbackWarning)
        with torch.autocast("cpu", dtype=torch.float16):
            out = module(inputs, slots=slots)
    assert slot_spy[-1] == ("cpu", torch.float32, torch.float32, torch.float32) and torch.isfinite(out).all()

    seen = []
    original = reference.slot_attention
    monkeypatch.setattr(reference, "slot_attention",
                        lambda q, *a: seen.append((q.dtype, torch.is_autocast_enabled("cpu"))) or original(q, *a))
    module.backend = "reference"
    with torch.autocast("cpu", dtype=torch.float16):
        module(inputs, slots=slots)
    assert seen == [(torch.float32, False)]


def test_mixed_input_dtypes_are_accepted_under_autocast_only(loss_spy, slot_spy):
    """As a matrix product under autocast: bfloat16 q from a Linear and float32 k, v are fine there."""
    leaves = _attention_leaves(seed=5)
    mixed = (leaves[0].bfloat16(), leaves[1], leaves[2])
    with pytest.raises(TypeError, match="same dtype"):
        ek.slot_attention(*mixed)
    image, text = torch.randn(6, 8), torch.randn(6, 8).bfloat16()
    with pytest.raises(TypeError, match="same dtype"):
        ek.clip_loss(image, text, 10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ek.slot_attention(*mixed, backend="reference")
        loss = ek.clip_loss(image, text, 10.0)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss_spy[-1] == ("cpu", "clip_fwd", [torch.bfloat16] * 2, False)
    if CPU_BUILT:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ek.slot_attention(*mixed)
        assert slot_spy[-1] == ("cpu", torch.bfloat16, torch.bfloat16, torch.bfloat16)


# --- 1f. the experimental CUDA C++ slot-attention kernels ------------------------------------------------------


@pytest.mark.skipif(not _extension.cuda_sources_built(), reason="eclip_kernels._C was built without CUDA sources")
def test_cuda_build_registers_the_slot_attention_kernels():
    for op in ("eclip_kernels::slot_attention_fwd", "eclip_kernels::slot_attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    status = ek.available_backends()["cuda"]
    assert status.built and "experimental" in status.reason and "not yet verified on a GPU" in status.reason
    assert status.usable == torch.cuda.is_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_keeps_triton_while_the_cuda_kernels_are_experimental(monkeypatch, dtype):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(backends, "_cuda_slot_attention_registered", lambda: True)
    monkeypatch.setattr(backends, "_triton_import_error", lambda: None)
    monkeypatch.setattr(_extension, "cuda_sources_built", lambda: True)
    assert not backends.CUDA_SLOT_ATTENTION_VERIFIED
    assert resolve("auto", CUDA0, dtype, 20) == ("triton", [])
    # named, they run (float64 too, which the Triton kernels do not take)
    for named_dtype in (dtype, torch.float64):
        assert backends.resolve_backend("cuda", CUDA0, named_dtype, 20) == "cuda"
    with pytest.raises(ValueError, match="at most 64 queries"):
        backends.resolve_backend("cuda", CUDA0, dtype, 65)
    # once verified on a GPU, auto would take them
    monkeypatch.setattr(backends, "CUDA_SLOT_ATTENTION_VERIFIED", True)
    assert resolve("auto", CUDA0, dtype, 20) == ("cuda", [])


def test_named_cuda_backend_without_its_kernels_says_so(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(_extension, "cuda_sources_built", lambda: True)
    monkeypatch.setattr(backends, "_cuda_slot_attention_registered", lambda: False)
    with pytest.raises(RuntimeError, match="no slot-attention kernel in this build"):
        backends.resolve_backend("cuda", CUDA0, torch.float32, 8)

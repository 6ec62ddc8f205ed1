"""What the Triton launchers would launch on a GPU, checked without one.

The launchers run on ``device="meta"`` tensors with ``JITFunction.run`` replaced by a recorder (the capture
of ``eclip_kernels.triton.aot``) under the geometry of a GPU: which kernels, which grid, which constexprs.
That shows the launch logic (grid sizes, token splits, precision, skipped gradients, device guard) that the
interpreter tests cannot reach at GPU sizes. The numerics of every mode are checked against the float64
reference by the interpreter tests (tests/test_*_triton.py) and on a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

triton = pytest.importorskip("triton")

from eclip_kernels.triton import _launch, aot  # noqa: E402
from eclip_kernels.triton import contrastive as ct  # noqa: E402
from eclip_kernels.triton import siglip as sg  # noqa: E402
from eclip_kernels.triton import slot_attention as sa  # noqa: E402

H100_PROGRAMS = 2 * 132


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def recorded(programs=H100_PROGRAMS, gpu_tiles=True):
    """Yields the list of (kernel name, grid, kwargs, args) of every launch inside the block."""
    sink = []
    with _launch.override_geometry(gpu_tiles, programs), aot._recording(sink):
        launches = []
        yield launches
    launches.extend((k.__name__, g, kw, a) for k, a, kw, g in sink)


def grid_size(grid):
    size = 1
    for g in grid:
        size *= g
    return size


# --- geometry and the test hook ------------------------------------------------------------------------------


def test_geometry_env_hook(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(_launch.GEOMETRY_ENV, raising=False)
    assert _launch.geometry(cpu) == _launch.Geometry(False, 8)
    monkeypatch.setenv(_launch.GEOMETRY_ENV, "gpu:2")
    assert _launch.geometry(cpu) == _launch.Geometry(True, 2)
    monkeypatch.setenv(_launch.GEOMETRY_ENV, "small:5")
    assert _launch.geometry(cpu) == _launch.Geometry(False, 5)
    for bad in ("gpu", "gpu:0", "big:3", "gpu:x"):
        monkeypatch.setenv(_launch.GEOMETRY_ENV, bad)
        with pytest.raises(ValueError, match="ECLIP_KERNELS_TRITON_GEOMETRY"):
            _launch.geometry(cpu)
    with _launch.override_geometry(True, 7):  # the override wins over the environment
        assert _launch.geometry(cpu) == _launch.Geometry(True, 7)


# --- no grid overshoot ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [8, 216, 264, 7, 100])
@pytest.mark.parametrize("rows, cols", [(6400, 6400), (65536, 65536), (200, 71936), (64, 64), (1, 5), (4096, 300)])
def test_contrastive_forward_grid_fits_one_round(target, rows, cols):
    cfg = ct._pick_config(512, torch.bfloat16, "ieee", torch.device("meta"))._replace(target=target)
    rper, n_r, cper, n_c = ct._fwd_grid(rows, cols, cfg)
    assert n_r * n_c <= target
    # every block is covered, no split is empty
    assert (n_r - 1) * rper < triton.cdiv(rows, cfg.fwd_m) <= n_r * rper
    assert (n_c - 1) * cper < triton.cdiv(cols, cfg.fwd_n) <= n_c * cper


def test_contrastive_forward_grid_at_h100_is_not_272_programs():
    # The review case: 264 program slots on an H100; the former formula launched 16 x 17 = 272 programs.
    with recorded() as launches:
        a = meta(65536, 512)
        ct.clip_loss_fwd(a, meta(65536, 512), meta((), dtype=torch.float32), None)
    grids = [g for name, g, _, _ in launches if name == "_fwd_tiles_kernel"]
    assert grids and grid_size(grids[0]) <= H100_PROGRAMS


@pytest.mark.parametrize("rows, cols", [(6400, 6400), (200, 71936), (71936, 200), (64, 64)])
def test_contrastive_backward_grid_fits_one_round_unless_own_blocks_do(rows, cols):
    cfg = ct._pick_config(512, torch.bfloat16, "ieee", torch.device("meta"))._replace(target=H100_PROGRAMS)
    n_ob, tper, n_s, n_dr = ct._bwd_grid(rows, cols, 512, cfg)
    assert n_s == 1 or n_ob * n_s * n_dr <= H100_PROGRAMS
    assert (n_s - 1) * tper < triton.cdiv(cols, cfg.bwd_n) <= n_s * tper


@pytest.mark.parametrize("batch, tokens, queries, dim", [(200, 196, 20, 512), (64, 4096, 7, 256), (1, 196, 20, 512),
                                                       (1024, 196, 20, 512), (3, 5000, 11, 64)])
def test_slot_attention_forward_splits_tokens_only_to_fill_the_device(batch, tokens, queries, dim):
    with recorded() as launches:
        sa.slot_attention_fwd(meta(batch, queries, dim), meta(batch, tokens, dim), meta(batch, tokens, dim),
                              None, dim**-0.5, 0.0)
    (name, grid, kwargs, args), *rest = launches
    assert name == "_slot_attn_fwd_kernel"
    n_splits, n_dv = grid[1], grid[2]
    assert grid[0] == batch
    assert kwargs["SPLIT"] == (n_splits > 1)
    if batch * n_dv >= H100_PROGRAMS:
        assert n_splits == 1  # the batch fills the device: no split, no partial sums
    else:
        assert grid_size(grid) <= H100_PROGRAMS
    assert [r[0] for r in rest] == (["_slot_attn_fwd_merge_kernel"] if n_splits > 1 else [])
    if batch == 64:  # the object-centric shape: 64 samples alone would leave 3/4 of the device idle
        assert n_splits > 1
    # bf16 at T <= 32: the whole of Dv in one accumulator, k read once
    if dim <= 512 and queries <= 32:
        assert n_dv == 1


# --- precision policy inside the kernels ---------------------------------------------------------------------


def _precisions(dtype):
    """PREC constexpr of every launch of both families' forward and backward."""
    with recorded() as launches:
        q, k = meta(4, 20, 64, dtype=dtype), meta(4, 196, 64, dtype=dtype)
        out, ent, S, lse = sa.slot_attention_fwd(q, k, k, None, 0.125, 0.0)
        sa.slot_attention_bwd(out, ent, q, k, k, None, out, ent, S, lse, 0.125, 0.0)
        a, s = meta(300, 64, dtype=dtype), meta((), dtype=torch.float32)
        _, r, c = ct.clip_loss_fwd(a, a, s, None)
        ct.clip_loss_bwd(s, a, a, s, None, r, c)
    return {kw["PREC"] for _, _, kw, _ in launches if "PREC" in kw}


def test_float32_products_follow_torch_matmul_precision(monkeypatch):
    with aot._matmul_precision("highest"):
        assert _precisions(torch.float32) == {"ieee"}
    for value in ("high", "medium"):
        with aot._matmul_precision(value):
            assert _precisions(torch.float32) == {"tf32"}
            assert _precisions(torch.bfloat16) == {"ieee"}  # ignored by tl.dot for 16-bit operands


def test_tf32_only_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(_launch, "_capability", lambda device: (7, 5))
    with aot._matmul_precision("high"):
        assert _launch.dot_precision(torch.float32, torch.device("cuda")) == "ieee"
    monkeypatch.setattr(_launch, "_capability", lambda device: (8, 0))
    with aot._matmul_precision("high"):
        assert _launch.dot_precision(torch.float32, torch.device("cuda")) == "tf32"


# --- gradients nobody asked for are not computed -------------------------------------------------------------


def _bwd_launches(fn):
    with recorded() as launches:
        fn()
    return [(name, kw) for name, _, kw, _ in launches if "bwd" in name]


def test_no_grad_bank_of_negatives_costs_no_sweep():
    # info_nce against a momentum queue: the keys need no gradient
    q, k, s = meta(200, 512), meta(71936, 512), meta((), dtype=torch.float32)
    _, lse = ct.contrastive_rows_fwd(q, q, k, s, None, None)
    full = _bwd_launches(lambda: ct.contrastive_rows_bwd(s, q, q, k, s, None, None, lse))
    no_keys = _bwd_launches(lambda: ct.contrastive_rows_bwd(s, q, q, k, s, None, None, lse,
                                                            output_mask=(True, True, False, True)))
    assert len(full) == 2 and len(no_keys) == 1  # the keys' sweep is gone
    assert no_keys[0][1]["NEED_OWN"] and no_keys[0][1]["LSE_OWN"]
    grads = ct.contrastive_rows_bwd(s, q, q, k, s, None, None, lse, output_mask=(True, True, False, True))
    assert grads[2].numel() == 0 and grads[0].shape == q.shape


def test_clip_loss_backward_runs_only_the_sweeps_it_needs():
    a, s = meta(6400, 512), meta((), dtype=torch.float32)
    _, r, c = ct.clip_loss_fwd(a, a, s, None)

    def sweeps(mask):
        return [(kw["NEED_OWN"], kw["WRITE_GS"]) for _, kw in
                _bwd_launches(lambda: ct.clip_loss_bwd(s, a, a, s, None, r, c, output_mask=mask))]

    assert sweeps((True, True, True)) == [(True, True), (True, False)]
    assert sweeps((False, True, False)) == [(True, False)]  # frozen image tower: the text sweep only
    assert sweeps((True, False, False)) == [(True, False)]
    assert sweeps((False, False, True)) == [(False, True)]  # only the temperature learns


def test_siglip_backward_runs_only_the_sweeps_it_needs():
    a, s = meta(6400, 512), meta((), dtype=torch.float32)

    def sweeps(mask):
        return [(kw["NEED_OWN"], kw["WRITE_SB"]) for _, kw in
                _bwd_launches(lambda: sg.siglip_loss_bwd(s, a, a, s, s, None, None, 0, output_mask=mask))]

    assert sweeps((True, True, True, True)) == [(True, True), (True, False)]
    assert sweeps((False, True, True, False)) == [(True, True)]  # frozen image tower: the text sweep only
    assert sweeps((True, False, False, False)) == [(True, False)]
    assert sweeps((False, False, True, True)) == [(False, True)]  # only the scale and bias learn
    assert sweeps((False, False, False, False)) == []
    grads = sg.siglip_loss_bwd(s, a, a, s, s, None, None, 0, output_mask=(False, True, False, True))
    assert [tuple(g.shape) for g in grads] == [(0,), (6400, 512), (0,), ()]


def test_siglip_of_a_rank_sweeps_each_side_with_its_own_offset():
    """One rank's 512 images against 65536 gathered texts, positives at text i + 1536: the forward and the
    image sweep see diag = +1536, the text sweep -1536; the scale-only sweep is one program along D."""
    img, txt, s = meta(512, 512), meta(65536, 512), meta((), dtype=torch.float32)
    with recorded() as launches:
        sg.siglip_loss_fwd(img, txt, s, s, None, None, 1536)
        sg.siglip_loss_bwd(s, img, txt, s, s, None, None, 1536)
    diag = {name: [] for name, _, _, _ in launches}
    for name, grid, kwargs, args in launches:
        kernel = {"_siglip_fwd_kernel": sg._siglip_fwd_kernel, "_siglip_bwd_kernel": sg._siglip_bwd_kernel}[name]
        diag[name].append(args[kernel.arg_names.index("diag")])
        assert grid_size(grid) <= H100_PROGRAMS or name == "_siglip_bwd_kernel"
    assert diag == {"_siglip_fwd_kernel": [1536], "_siglip_bwd_kernel": [1536, -1536]}
    with recorded() as launches:
        sg.siglip_loss_bwd(s, img, txt, s, s, None, None, 1536, output_mask=(False, False, True, True))
    (_, grid, kwargs, _), = launches
    assert grid[2] == 1 and not kwargs["NEED_OWN"]


@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_slot_attention_backward_compiles_out_unneeded_gradients(mask):
    q, k = meta(8, 20, 64), meta(8, 196, 64)
    out, ent, S, lse = sa.slot_attention_fwd(q, k, k, None, 0.125, 0.0)
    launches = _bwd_launches(lambda: sa.slot_attention_bwd(out, ent, q, k, k, None, out, ent, S, lse, 0.125, 0.0,
                                                           output_mask=mask))
    (_, kw), = launches
    assert (kw["NEED_DQ"], kw["NEED_DK"], kw["NEED_DV"]) == mask
    grads = sa.slot_attention_bwd(out, ent, q, k, k, None, out, ent, S, lse, 0.125, 0.0, output_mask=mask)
    for g, need, like in zip(grads, mask, (q, k, k)):
        assert g.shape == (like.shape if need else (0,))


# --- device guard --------------------------------------------------------------------------------------------


def test_device_guard_targets_the_tensors_device():
    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("module", [sa, ct, sg])
def test_every_launch_happens_inside_the_device_guard(module, monkeypatch):
    state = {"inside": 0, "devices": []}

    @contextlib.contextmanager
    def guard(device):
        state["devices"].append(device)
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    monkeypatch.setattr(module, "device_guard", guard)
    from triton.runtime.jit import JITFunction

    seen = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.append(state["inside"])

    q, k, s = meta(3, 7, 32), meta(3, 50, 32), meta((), dtype=torch.float32)
    monkeypatch.setattr(_launch, "_torch_wrap_triton", None)
    with _launch.override_geometry(True, 16):
        JITFunction.run = run
        try:
            if module is sa:
                out, ent, S, lse = sa.slot_attention_fwd(q, k, k, None, 0.2, 0.0)
                sa.slot_attention_bwd(out, ent, q, k, k, None, out, ent, S, lse, 0.2, 0.0)
            elif module is sg:
                a = meta(40, 32)
                sg.siglip_loss_fwd(a, a, s, s, None, None, 0)
                sg.siglip_loss_bwd(s, a, a, s, s, None, None, 0)
            else:
                a = meta(40, 32)
                _, r, c = ct.clip_loss_fwd(a, a, s, None)
                ct.clip_loss_bwd(s, a, a, s, None, r, c)
        finally:
            JITFunction.run = original
    assert seen and all(x == 1 for x in seen)
    assert all(d == torch.device("meta") for d in state["devices"])


# --- torch.compile sees the kernels --------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_compile_traces_into_the_triton_ops(monkeypatch):
    """AOTAutograd (the level where torch.compile hands graphs to Inductor) decomposes every Triton operator,
    forward and backward ones, into its kernel launches: the captured graph holds triton_kernel_wrapper nodes
    and no opaque eclip_kernels op. Fake CUDA tensors: no GPU is needed to trace."""
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eclip_kernels.ops import contrastive as contrastive_ops
    from eclip_kernels.ops import slot_attention as slot_ops

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    fwd, bwd = slot_ops.forward_op("triton"), slot_ops.backward_op("triton")
    ops = contrastive_ops.OPS["triton"]

    def step(q, k, v, image, text, scale):
        out, ent, S, lse = fwd(q, k, v, None, 0.125, 0.0)
        dq, dk, dv = bwd(out, ent, q, k, v, None, out, ent, S, lse, 0.125, 0.0, [True, True, True])
        loss, row_lse, col_lse = ops["clip_fwd"](image, text, scale, None)
        d_img, d_txt, d_scale = ops["clip_bwd"](loss, image, text, scale, None, row_lse, col_lse, [True, True, True])
        rows, lse_r = ops["rows_fwd"](image, text, text, scale, None, None)
        grads = ops["rows_bwd"](rows, image, text, text, scale, None, None, lse_r, [True, True, True, True])
        return dq, dk, dv, d_img, d_txt, d_scale, *grads

    for module in (sa, ct):  # no CUDA runtime to switch devices with
        monkeypatch.setattr(module, "device_guard", lambda device: contextlib.nullcontext())
    with FakeTensorMode(), _launch.override_geometry(True, H100_PROGRAMS):
        dev = "cuda"
        q = torch.randn(4, 20, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(4, 196, 64, device=dev, dtype=torch.bfloat16)
        image = torch.randn(32, 64, device=dev, dtype=torch.bfloat16)
        scale = torch.full((), 10.0, device=dev)
        aot_function(step, fw_compiler=capture)(q, k, k, image, image, scale)
    (graph,) = graphs
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    launched = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert not [t for t in targets if "eclip_kernels" in t], targets  # no opaque call left
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    def name(kernel):  # a JITFunction, possibly behind wrappers
        while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
            kernel = kernel.fn
        return kernel.__name__

    names = {name(kernel_side_table.get_kernel(n.kwargs["kernel_idx"])) for n in launched}
    assert names == {"_slot_attn_fwd_kernel", "_slot_attn_fwd_merge_kernel", "_slot_attn_bwd_kernel",
                     "_fwd_tiles_kernel", "_fwd_finalize_kernel", "_bwd_kernel"}


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_compile_traces_into_the_siglip_triton_ops(monkeypatch):
    """The same for the sigmoid loss's operators: forward and backward become their kernel launches."""
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eclip_kernels.ops import siglip as siglip_ops

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    ops = siglip_ops.OPS["triton"]

    def step(image, text, scale, bias, ids):
        total = ops["siglip_fwd"](image, text, scale, bias, ids, ids, 0)
        return (total, *ops["siglip_bwd"](total, image, text, scale, bias, None, None, 3, [True, True, True, True]))

    monkeypatch.setattr(sg, "device_guard", lambda device: contextlib.nullcontext())
    with FakeTensorMode(), _launch.override_geometry(True, H100_PROGRAMS):
        image = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
        scale = torch.full((), 10.0, device="cuda")
        aot_function(step, fw_compiler=capture)(image, image, scale, scale, torch.arange(32, device="cuda"))
    (graph,) = graphs
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "eclip_kernels" in t], targets
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    def name(kernel):  # a JITFunction, possibly behind wrappers
        while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
            kernel = kernel.fn
        return kernel.__name__

    launched = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    names = [name(kernel_side_table.get_kernel(n.kwargs["kernel_idx"])) for n in launched]
    assert sorted(names) == ["_siglip_bwd_kernel", "_siglip_bwd_kernel", "_siglip_fwd_kernel"]


# --- the ahead-of-time check itself --------------------------------------------------------------------------


def test_aot_compiles_for_a_gpu_target_and_reads_resources(tmp_path):
    out = tmp_path / "aot.json"
    assert aot.main(["--arch", "90", "--dtypes", "bf16", "--cases", "eclip-tiny", "--json", str(out), "--check",
                     "--quiet"]) == 0
    import json

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["kernel"] for r in rows} >= {"_slot_attn_fwd_kernel", "_slot_attn_bwd_kernel"}
    assert all(r["arch"] == 90 and 0 < r["regs"] <= 255 and "error" not in r for r in rows)
    assert report["errors"] == 0 and report["launches"] == len(rows)


def test_aot_check_fails_on_a_spill_at_a_headline_case(monkeypatch, capsys):
    real = aot.resources

    def spilling(cubin):
        res = real(cubin)
        res["stack"] = 16
        return res

    monkeypatch.setattr(aot, "resources", spilling)
    args = ["--arch", "80", "--dtypes", "bf16", "--quiet", "--check"]
    assert aot.main(args + ["--cases", "eclip-tiny"]) == 0  # not a headline case: reported, not enforced
    assert aot.main(args + ["--cases", "eclip-b"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_aot_rejects_unknown_arguments():
    for bad in (["--arch", "75"], ["--dtypes", "int8"], ["--cases", "nope"]):
        with pytest.raises(SystemExit):
            aot.main(bad)

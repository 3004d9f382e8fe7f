"""DB-LLM: the FDB reference (refquant/spec/dbllm.py), its format, the wiring unit, and a short CPU distillation.

FDB has no original code (the paper, arXiv 2402.11960, is re-implemented); these tests pin what
follows from its formulas: at initialisation FDB is the nearest point of a 2-bit grid re-coded as
two {0, 1} planes, so it reproduces any matrix on its grid exactly and is never worse than 2-bit
RTN with the same groups; the scale step never increases the layer-wise objective; the bit
accounting and the serializer are exact.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refquant as rq
from refquant import pipeline
from refquant.spec import dbllm as fdb
from refquant.spec import formats
from refquant.spec.quantizer import QuantSpec

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def weights(draw, max_rows=6, max_cols=70):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 300.0]))
    W = np.random.default_rng(seed).standard_t(3, size=(rows, cols)) * scale
    return W


group_sizes = st.sampled_from([None, 1, 7, 16, 128])


# --------------------------------------------------------------------------------------------- FDB init


@SETTINGS
@given(W=weights(), gs=group_sizes, sym=st.booleans())
def test_fdb_init_is_2bit_rtn_on_the_same_grid(W, gs, sym):
    """With the zero-point offset the FDB grid c + {-s, 0, s, 2s} is RTN's s (q - z): every weight takes a
    nearest grid point, so the error is never worse than 2-bit RTN's (equal up to rounding)."""
    f = rq.dbllm(W, group_size=gs, sym=sym)
    r = rq.rtn(W, QuantSpec(bits=2, group_size=gs, sym=sym))
    e_f, e_r = np.abs(W - f.dequantize()), np.abs(W - r.dequantize())
    s = r.scale[:, r.g_idx]
    assert np.all(e_f <= e_r + 8 * np.finfo(float).eps * (np.abs(W) + s))
    assert np.sum(e_f**2) <= np.sum(e_r**2) * (1 + 1e-12) + 1e-300
    # off exact ties, the same grid point: values within float rounding of RTN's
    assert np.allclose(f.dequantize(), r.dequantize(), rtol=0, atol=1e-12 * np.max(np.abs(W)) + 1e-300) or \
        np.all(np.abs(np.abs(W - f.dequantize()) - e_r) <= 1e-9 * s)


@SETTINGS
@given(W=weights(), gs=group_sizes)
def test_fdb_init_scales_are_the_papers(W, gs):
    """a1 = 2 s, a2 = -s (paper, Sec. 3.2) with the 2-bit step s; the planes are the paper's Heaviside rules."""
    f = rq.dbllm(W, group_size=gs)
    s = -f.a2
    assert np.array_equal(f.a1, 2 * s) and np.all(s > 0)
    g = rq.quantizer.group_index(W.shape[1], gs)
    r = W - f.offset[:, g]
    b1 = (r - (f.a1[:, g] + f.a2[:, g]) / 2) >= 0
    b2 = -(r - f.a1[:, g] * b1 - f.a2[:, g] / 2) >= 0
    assert np.array_equal(f.b1, b1) and np.array_equal(f.b2, b2)


@st.composite
def on_grid(draw, offset):
    """A matrix on an FDB grid with dyadic steps (exact arithmetic), each (row, group) holding both extremes."""
    rows, n_groups, gs = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    s = rng.integers(1, 64, size=(rows, n_groups)) * 2.0**-8
    if offset == "zero_point":
        z = rng.integers(0, 4, size=(rows, n_groups)).astype(float)
        c = s * (1 - z)
    else:
        c = np.zeros((rows, n_groups))
    q = rng.integers(0, 4, size=(rows, n_groups * gs))  # index into the grid c + s * {-1, 0, 1, 2}
    for g in range(n_groups):  # both ends of the grid present in every group: min/max give back s
        q[:, g * gs] = 0
        q[:, g * gs + 1] = 3
    gidx = np.arange(n_groups * gs) // gs
    W = c[:, gidx] + s[:, gidx] * (q - 1)
    return W, gs


@SETTINGS
@given(data=st.data(), offset=st.sampled_from(fdb.OFFSETS))
def test_fdb_reproduces_a_matrix_on_its_grid_exactly(data, offset):
    W, gs = data.draw(on_grid(offset))
    if offset == "none":  # the no-offset grid [-s, 2s] contains 0: -s and 2s present give back s
        pass
    f = rq.dbllm(W, group_size=gs, offset=offset)
    assert np.array_equal(f.dequantize(), W)
    assert f.info["objective"] == 0.0


@SETTINGS
@given(W=weights(), gs=group_sizes)
def test_fdb_split_is_nearest_point_of_the_uniform_grid_without_offset(W, gs):
    f = rq.dbllm(W, group_size=gs, offset="none")
    g = rq.quantizer.group_index(W.shape[1], gs)
    s = -f.a2[:, g]
    grid = np.stack([-s, 0 * s, s, 2 * s])
    best = np.min(np.abs(W[None] - grid), axis=0)
    assert np.all(np.abs(W - f.dequantize()) <= best + 4 * np.finfo(float).eps * (np.abs(W) + s))


# --------------------------------------------------------------------------------------------- the scale step


def _spd(n, seed):
    X = np.random.default_rng(seed).normal(size=(3 * n, n))
    return X.T @ X / (3 * n)


@SETTINGS
@given(W=weights(max_cols=40), gs=group_sizes, offset=st.sampled_from(fdb.OFFSETS), use_H=st.booleans(),
       seed=st.integers(0, 1000))
def test_scale_step_never_increases_the_objective_with_fixed_planes(W, gs, offset, use_H, seed):
    H = _spd(W.shape[1], seed) if use_H else None
    f = rq.dbllm(W, group_size=gs, offset=offset)
    before = fdb.fdb_objective(W, f, H)
    g = fdb.fdb_step(W, f, H, resplit=False)
    assert fdb.fdb_objective(W, g, H) <= before * (1 + 1e-12) + 1e-300
    assert np.array_equal(g.b1, f.b1) and np.array_equal(g.b2, f.b2)


def test_scale_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(3, 20))
    H = _spd(20, 1)
    f = rq.dbllm(W, group_size=8)
    grad = fdb.fdb_scale_gradient(W, f, H)
    eps = 1e-6
    for key in ("a1", "a2", "offset"):
        for r, gi in ((0, 0), (2, 2), (1, 1)):
            def moved(d):
                parts = {"a1": f.a1.copy(), "a2": f.a2.copy(), "offset": f.offset.copy()}
                parts[key][r, gi] += d
                return formats.DualBinaryWeight(f.b1, f.b2, parts["a1"], parts["a2"], parts["offset"], 8)

            fd = (fdb.fdb_objective(W, moved(eps), H) - fdb.fdb_objective(W, moved(-eps), H)) / (2 * eps)
            assert grad[key][r, gi] != 0
            assert abs(fd - grad[key][r, gi]) <= 1e-6 * max(1.0, abs(fd))


def test_steps_lower_the_objective_from_the_init():
    W = np.random.default_rng(0).normal(size=(16, 256))
    H = _spd(256, 2)
    f = rq.dbllm(W, H, group_size=128, steps=3, resplit=False)
    assert f.info["objective"] < f.info["objective_init"]


# --------------------------------------------------------------------------------------------- format


@SETTINGS
@given(W=weights(), gs=group_sizes, offset=st.sampled_from(fdb.OFFSETS))
def test_bit_accounting_and_serialisation_round_trip(W, gs, offset, tmp_path_factory):
    f = rq.dbllm(W, group_size=gs, offset=offset, steps=1)
    rows, cols = W.shape
    n_groups = 1 if gs is None else -(-cols // gs)
    assert f.bits_per_weight == 2.0
    assert f.storage_bits == 2 * rows * cols + rows * n_groups * 16 * (3 if offset == "zero_point" else 2)
    assert f.storage_bits >= f.bits_per_weight * f.numel
    tensors, meta = f.to_tensors()
    json.dumps(meta)
    g = formats.from_tensors(tensors, meta)
    assert isinstance(g, formats.DualBinaryWeight)
    assert np.array_equal(g.dequantize(), f.dequantize())
    assert g.dequantize().tobytes() == f.dequantize().tobytes()
    assert np.array_equal(g.b1, f.b1) and np.array_equal(g.b2, f.b2) and g.group_size == f.group_size
    path = tmp_path_factory.mktemp("fmt") / "w.safetensors"
    formats.save(f, path)
    assert formats.load(path).dequantize().tobytes() == f.dequantize().tobytes()


def test_g128_storage_cost():
    f = rq.dbllm(np.random.default_rng(0).normal(size=(4, 256)), group_size=128)
    assert f.storage_bits_per_weight == pytest.approx(2 + 48 / 128)
    f = rq.dbllm(np.random.default_rng(0).normal(size=(4, 256)), group_size=128, offset="none")
    assert f.storage_bits_per_weight == pytest.approx(2 + 32 / 128)


def test_format_rejects_bad_fields():
    b = np.zeros((2, 4), dtype=bool)
    a = np.ones((2, 1))
    with pytest.raises(ValueError, match="boolean"):
        formats.DualBinaryWeight(b.astype(np.uint8), b, a, a)
    with pytest.raises(ValueError, match="a2 must have shape"):
        formats.DualBinaryWeight(b, b, a, np.ones((2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        formats.DualBinaryWeight(b, b[:, :3], a, a)


# --------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_a_clear_error(bad):
    W = np.ones((3, 8))
    W[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.dbllm(W)
    H = np.eye(8)
    H[0, 0] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.dbllm(np.ones((3, 8)), H, steps=1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="2-D"):
        rq.dbllm(np.ones(8))
    with pytest.raises(ValueError, match="empty"):
        rq.dbllm(np.ones((0, 8)))
    with pytest.raises(ValueError, match="in_features"):
        rq.dbllm(np.ones((2, 8)), np.eye(7), steps=1)
    with pytest.raises(ValueError, match="offset"):
        rq.dbllm(np.ones((2, 8)), offset="mean")
    with pytest.raises(ValueError, match="steps"):
        rq.dbllm(np.ones((2, 8)), steps=-1)
    with pytest.raises(ValueError, match="sym"):
        rq.dbllm(np.ones((2, 8)), sym=True, offset="none")


@pytest.mark.parametrize("offset", fdb.OFFSETS)
@pytest.mark.parametrize("gs", [None, 4])
def test_zero_rows_and_constant_groups_are_finite(offset, gs):
    W = np.zeros((4, 12))
    W[1] = 0.7  # constant row
    W[2, :4] = -3.0  # one constant group, zeros elsewhere
    W[3] = np.linspace(-1, 1, 12)
    f = rq.dbllm(W, np.eye(12), group_size=gs, offset=offset, steps=2)
    W_hat = f.dequantize()
    assert np.all(np.isfinite(W_hat)) and np.all(np.isfinite(f.a1)) and np.all(np.isfinite(f.a2))
    assert np.array_equal(W_hat[0], np.zeros(12))  # a zero row stays zero
    assert np.all(np.isfinite([f.info["objective"], f.info["objective_init"]]))


def test_caller_rng_untouched():
    state = np.random.get_state()[1].copy()
    rq.dbllm(np.random.default_rng(0).normal(size=(4, 40)), np.eye(40), steps=2)
    assert np.array_equal(np.random.get_state()[1], state)


# --------------------------------------------------------------------------------------------- the wiring unit


def test_wiring_unit_options_and_validation():
    cfg = pipeline.QuantConfig.of("dbllm", wbits=2, group_size=128)
    assert cfg.weight_spec() == QuantSpec(bits=2, group_size=128)
    with pytest.raises(ValueError, match="--wbits 2"):
        pipeline.QuantConfig.of("dbllm", wbits=4)
    with pytest.raises(ValueError, match="fdb_offset"):
        pipeline.QuantConfig.of("dbllm", wbits=2, fdb_offset="mean")
    assert pipeline.QuantConfig.from_dict(cfg.to_dict()) == cfg
    rows = pipeline.METHODS["dbllm"].study_rows("binarization")
    assert rows and rows[0][2].group_size == 128 and rows[0][2].wbits == 2


def test_golden_suite_reference_runs_and_judges():
    """The suite's reference run passes its own parity rule and a corrupted result fails it."""
    from refquant import golden
    from refquant.methods import dbllm as unit

    rng = np.random.default_rng(0)
    arrays = {"W": rng.normal(size=(6, 64)), "X_int": rng.integers(-100, 100, size=(2, 16, 64)), "x_exp": np.array(6)}
    params = {"group_size": 16, "offset": "zero_point", "sym": False, "steps": 2, "use_H": True}
    ref = unit.golden_run(params, arrays, golden.reference_ops(), lambda a: a, np.asarray)
    case = type("Case", (), {"params": params})()
    assert unit.golden_compare(case, arrays, ref, ref, unit.PARITY_RULE)["ok"]
    bad = dict(ref, a1=ref["a1"] * (1 + 1e-6))
    assert not unit.golden_compare(case, arrays, ref, bad, unit.PARITY_RULE)["ok"]
    bad = dict(ref, b1=1 - ref["b1"])
    assert not unit.golden_compare(case, arrays, ref, bad, unit.PARITY_RULE)["ok"]


def test_numpy_pipeline_is_fdb_of_every_linear():
    from refquant import llama, runs

    fp, q = llama.load(runs.DEFAULT_MODEL), llama.load(runs.DEFAULT_MODEL)
    cfg = pipeline.QuantConfig.of("dbllm", wbits=2, group_size=128)
    res = pipeline.quantize_model(pipeline.NumpyRunner(q), cfg, None)
    for i in (0, fp.config.num_hidden_layers - 1):
        for name in llama.LINEARS:
            want = rq.dbllm(fp.layers[i][name], group_size=128)
            np.testing.assert_array_equal(q.layers[i][name], want.dequantize())
            got = res.layers[i].quantized[name]
            assert isinstance(got, formats.DualBinaryWeight) and np.array_equal(got.b1, want.b1)


# --------------------------------------------------------------------------------------------- torch


torch = pytest.importorskip("torch")
from refquant.backends import get_backend, torch_dbllm  # noqa: E402


@pytest.mark.parametrize("gs,offset,sym,steps,use_H", [(16, "zero_point", False, 0, False), (None, "none", False, 0, False),
                                                       (7, "zero_point", True, 0, False), (16, "zero_point", False, 2, True),
                                                       (16, "none", False, 2, False)])
def test_torch_twin_matches_the_reference(gs, offset, sym, steps, use_H):
    W = np.random.default_rng(1).normal(size=(8, 50))
    H = _spd(50, 3) if use_H else None
    ref = rq.dbllm(W, H, group_size=gs, sym=sym, offset=offset, steps=steps)
    got = get_backend("torch").dbllm(torch.from_numpy(W), None if H is None else torch.from_numpy(H), group_size=gs,
                                     sym=sym, offset=offset, steps=steps)
    assert np.array_equal(got.b1.numpy(), ref.b1) and np.array_equal(got.b2.numpy(), ref.b2)
    if steps == 0:
        assert got.dequantize().numpy().tobytes() == ref.dequantize().tobytes()
    assert np.allclose(got.a1.numpy(), ref.a1, rtol=1e-12, atol=0)
    assert got.info["objective"] == pytest.approx(ref.info["objective"], rel=1e-10)
    from refquant.backends import torch_formats
    assert torch_formats.dequantize(ref, dtype=torch.float64).numpy().tobytes() == ref.dequantize().tobytes()


def test_fdb_linear_forward_is_the_format_and_gradients_flow():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 6, bias=False).double()
    fmt = get_backend("torch").dbllm(lin.weight, group_size=8)
    mod = torch_dbllm.FDBLinear(lin.weight, fmt.a1, fmt.a2, fmt.offset, 8, param_dtype=torch.float64)
    x = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = mod(x)
    assert torch.equal(mod.quantized_weight().detach(), fmt.dequantize())
    y.square().sum().backward()
    assert mod.a1.grad is not None and mod.a1.grad.abs().sum() > 0
    assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    assert mod.to_format().dequantize().tobytes() == fmt.dequantize().numpy().tobytes()


def test_dad_loss_weights_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 11, generator=g)
    t[0, 0] = torch.tensor([30.0] + [0.0] * 10)  # a confident token (low entropy)
    s = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    plain, st_ = torch_dbllm.dad_loss(s, t, weighting="none")
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1).reshape(-1, 11), torch.log_softmax(t, -1).reshape(-1, 11),
                                    log_target=True, reduction="batchmean")
    assert plain.item() == pytest.approx(kl.item(), rel=1e-5)
    dad, _ = torch_dbllm.dad_loss(s, t, weighting="teacher", gamma=1.0)
    dad.backward()
    assert s.grad[0, 0].abs().sum() < s.grad[0, 1].abs().sum()  # the confident token counts less
    same, stats = torch_dbllm.dad_loss(t.clone(), t, weighting="teacher")
    assert same.item() == pytest.approx(0.0, abs=1e-6) and stats["kl"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        torch_dbllm.dad_loss(s, t, weighting="focal")
    bad = t.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        torch_dbllm.dad_loss(s, bad)


# --------------------------------------------------------------------------------------------- full model (CPU)


@pytest.fixture(scope="module")
def tiny_teacher():
    from refquant import runs, torch_pipeline

    return torch_pipeline.load_model(str(runs.DEFAULT_MODEL), dtype=torch.float32)


@pytest.mark.slow
def test_torch_pipeline_matches_numpy_and_resumes(tmp_path):
    """The torch layer loop gives the reference's planes (float64 twin on float32 weights), and a crashed
    run resumes to the same result (the loop's resume with the dual-binary serializer)."""
    from pipeline_helpers import crash_then_resume, quantize_run

    from refquant import llama, runs

    cfg = pipeline.QuantConfig.of("dbllm", wbits=2, group_size=128)
    ids = np.random.default_rng(0).integers(0, 4096, size=(2, 16))
    whole = quantize_run(cfg, ids, tmp_path / "a")
    resumed = crash_then_resume(cfg, ids, tmp_path / "b", crash_after=1)
    fp = llama.load(runs.DEFAULT_MODEL)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        a = whole.model.get_submodule(name).weight.detach().numpy()
        b = resumed.model.get_submodule(name).weight.detach().numpy()
        assert np.array_equal(a, b)
        i, lin = int(name.split(".")[2]), name.split(".", 3)[3]
        want = rq.dbllm(fp.layers[i][lin], group_size=128).dequantize().astype(np.float32)
        assert np.array_equal(a, want)


def test_short_distillation_lowers_the_loss_and_resumes_identically(tmp_path, tiny_teacher):
    """Four DAD steps on the tiny model (CPU): the loss over the second pass through the windows is
    below the first pass's; stopping after two steps and resuming from the checkpoint gives the same
    parameters and history as an uninterrupted run."""
    from refquant import distill

    teacher = tiny_teacher
    init = distill.fdb_init(teacher, group_size=128)
    cfg = distill.DistillConfig(steps=4, batch_size=2, lr=1e-4, scale_lr=2e-3, schedule="constant", save_every=2)
    windows = np.random.default_rng(0).integers(0, 4096, size=(4, 24))
    whole = distill.make_student(teacher, init, cfg)
    hist = distill.distill(teacher, whole, windows, cfg, out_dir=tmp_path / "a")
    assert hist[-1]["step"] == 4 and all(np.isfinite(h["loss"]) for h in hist)
    first = [h["loss"] for h in hist[:2]]  # epoch 0: all four windows
    last = [h["loss"] for h in hist[2:]]  # epoch 1: the same four windows, after training
    assert np.mean(last) < np.mean(first), hist
    part = distill.make_student(teacher, init, cfg)
    distill.distill(teacher, part, windows, cfg, out_dir=tmp_path / "b", stop_after=2)
    with pytest.raises(FileExistsError, match="resume"):
        distill.distill(teacher, distill.make_student(teacher, init, cfg), windows, cfg, out_dir=tmp_path / "b")
    resumed = distill.make_student(teacher, init, cfg)  # a fresh process: only the checkpoint survives
    hist_b = distill.distill(teacher, resumed, windows, cfg, out_dir=tmp_path / "b", resume=True)
    assert [h["loss"] for h in hist_b] == [h["loss"] for h in hist]
    for (n, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    other = distill.DistillConfig(steps=4, batch_size=2, lr=2e-4, scale_lr=2e-3, schedule="constant", save_every=2)
    with pytest.raises(ValueError, match="other settings"):
        distill.distill(teacher, distill.make_student(teacher, init, other), windows, other, out_dir=tmp_path / "b",
                        resume=True)
    assert distill.plot_loss(hist, tmp_path / "loss.png") and (tmp_path / "loss.png").stat().st_size > 1000
    fmts = torch_dbllm.merge_fdb(whole)
    assert len(fmts) == 4 * 7 and all(isinstance(f, formats.DualBinaryWeight) for f in fmts.values())
    name = "model.layers.0.mlp.up_proj"
    assert np.array_equal(whole.get_submodule(name).weight.detach().numpy(), fmts[name].dequantize())


def test_batch_order_is_a_per_epoch_permutation():
    from refquant import distill

    seen = np.concatenate([distill.batch_indices(k, 3, 6, seed=1) for k in range(2)])
    assert sorted(seen.tolist()) == list(range(6))
    assert np.array_equal(distill.batch_indices(5, 3, 6, 1), distill.batch_indices(5, 3, 6, 1))


@pytest.mark.slow
def test_cli_quantize_then_distill(tmp_path, capsys):
    """`refquant quantize --method dbllm` then `refquant distill --init` (2 steps, no data files needed:
    the training windows come from the data dir only when set)."""
    import os

    from refquant import cli

    if not os.environ.get("REFQUANT_DATA_DIR"):
        pytest.skip("REFQUANT_DATA_DIR not set")
    init = tmp_path / "init"
    assert cli.main(["quantize", "--method", "dbllm", "--wbits", "2", "--out", str(init), "--backend", "torch",
                     "--device", "cpu"]) == 0
    rec = json.loads((init / "refquant.json").read_text())
    assert rec["config"]["method"] == "dbllm"
    out = tmp_path / "dad"
    assert cli.main(["distill", "--init", str(init), "--out", str(out), "--steps", "2", "--nsamples", "2",
                     "--train-seqlen", "32", "--distill-batch-size", "1", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["bits"]["paper"] == 2.0 and res["bits"]["stored"] > 2.0
    assert (out / "distill" / "loss.png").exists() and (out / "model.safetensors").exists()
    assert (out / "quantized" / "layer_003.json").exists()

"""The SmoothQuant / AWQ / AWEQ backend ops (``backends/equalization_ops.py``) against the float64 reference.

Default run (CPU): the torch ops on seeded problems, the golden cases built in memory with the
parity rules of ``tools/make_golden.py`` (and, once ``golden/`` holds them, the stored cases), input
errors, global-state hygiene. ``-m gpu``: the same on CUDA, plus the pipeline on a bf16 model.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refquant import backends  # noqa: E402
from refquant.backends.protocols import AWQOps, EqualizationOps  # noqa: E402
from refquant import QuantSpec, aweq, awq, equalize, golden, smoothquant  # noqa: E402
from refquant.spec.stats import ChannelStats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NP = backends.get_backend("numpy")
TB = backends.get_backend("torch")
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
AWQ_SPEC = QuantSpec(bits=3, group_size=32, rule="awq")


def make_golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "tools" / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MG = make_golden_module()


def problem(seed=0, tokens=96, n=64, outs=(48, 16)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3, tokens // 3, n)) * np.exp(rng.uniform(-2, 2, size=n))
    Ws = [rng.standard_t(4, size=(o, n)) * 0.05 for o in outs]
    return X, Ws


def t(a, device="cpu"):
    return torch.as_tensor(np.asarray(a)).to(device)


def host(a):
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# registration and the numpy backend (= the reference)


def test_both_backends_have_the_equalization_and_awq_families():
    from refquant.backends import equalization_ops as E

    for be, eq, aw in ((NP, E.NumpyEqualizationOps, E.NumpyAWQOps), (TB, E.TorchEqualizationOps, E.TorchAWQOps)):
        assert isinstance(be, EqualizationOps) and isinstance(be, AWQOps), be
        assert isinstance(be, eq) and isinstance(be, aw)  # composed from this module's mixins
        for op in ("smooth_scales", "equalization_scales", "bias_correction", "scale_weight", "fold_into_norm",
                   "fold_into_linear"):
            assert getattr(type(be), op) is getattr(eq, op), (be, op)
        for op in ("awq_linear_stats", "awq_search_scale", "awq_search_scale_stats", "awq_search_clip", "apply_clip"):
            assert getattr(type(be), op) is getattr(aw, op), (be, op)
    assert NP.awq_linear_stats() == ("inputs",)
    assert set(TB.awq_linear_stats()) == {"H", "mean_abs"}
    # the equalization mixin alone is no AWQ backend
    assert not isinstance(E.TorchEqualizationOps(), AWQOps) and isinstance(E.TorchEqualizationOps(), EqualizationOps)


def test_numpy_ops_are_the_reference():
    X, Ws = problem()
    a = np.abs(X).reshape(-1, X.shape[-1]).max(axis=0)
    np.testing.assert_array_equal(NP.smooth_scales(a, Ws, 0.85), smoothquant.smooth_scales(a, Ws, 0.85))
    r = np.ptp(X.reshape(-1, X.shape[-1]), axis=0)
    np.testing.assert_array_equal(NP.equalization_scales(r, Ws), aweq.equalization_scales(r, Ws))
    res, ref = NP.awq_search_scale(X, Ws, AWQ_SPEC), awq.search_scale(X, Ws, AWQ_SPEC)
    np.testing.assert_array_equal(res.losses, ref.losses)
    c, cref = NP.awq_search_clip(X, Ws[0], AWQ_SPEC, n_sample_tokens=40), awq.search_clip(X, Ws[0], AWQ_SPEC, n_sample_tokens=40)
    np.testing.assert_array_equal(c.max_val, cref.max_val)


# ---------------------------------------------------------------------------------------------
# torch ops vs the reference (CPU)


def run_ops_parity(device):
    X, Ws = problem(1)
    n = X.shape[-1]
    flat = X.reshape(-1, n)
    a, r, m = np.abs(flat).max(axis=0), np.ptp(flat, axis=0), flat.mean(axis=0)
    for W32 in (False, True):  # float64 weights: bit-identical scales; float32 weights: the same formula on them
        Wt = [t(W.astype(np.float32) if W32 else W, device) for W in Ws]
        Wr = [host(W) for W in Wt]
        s_t = TB.smooth_scales(t(a.astype(np.float32), device), Wt, 0.85)
        assert s_t.dtype == torch.float64 and s_t.device.type == device
        np.testing.assert_array_equal(host(s_t), smoothquant.smooth_scales(a.astype(np.float32).astype(np.float64), Wr, 0.85))
        e_t = TB.equalization_scales(r, Wt)
        np.testing.assert_array_equal(host(e_t), aweq.equalization_scales(r, Wr))
        sw = TB.scale_weight(Wt[0], e_t)
        assert sw.dtype == (torch.float32 if W32 else torch.float64)
        np.testing.assert_allclose(host(sw), equalize.scale_weight(Wr[0], host(e_t)), rtol=6e-8 if W32 else 0)
        g = np.linspace(0.5, 2, n)
        np.testing.assert_allclose(host(TB.fold_into_norm(t(g, device), e_t)), equalize.fold_into_norm(g, host(e_t)),
                                   rtol=0)
        Wp, bp = TB.fold_into_linear(t(Ws[1].T.copy(), device), e_t[:16], t(np.arange(n, dtype=float), device))
        Wp_r, bp_r = equalize.fold_into_linear(Ws[1].T.copy(), host(e_t)[:16], np.arange(n, dtype=float))
        np.testing.assert_array_equal(host(Wp), Wp_r)
        np.testing.assert_array_equal(host(bp), bp_r)
        Wq = [host(TB.rtn(W, aweq.weight_spec(4)).dequantize()) for W in Wt]
        b_t = TB.bias_correction(Wt[0], t(Wq[0], device), m)
        np.testing.assert_allclose(host(b_t), aweq.bias_correction(Wr[0], Wq[0], m), rtol=1e-12, atol=1e-15)
    # AWQ scale search, linear block: the Gram route equals the reference's outputs route
    for duo in (False, True):
        res = TB.awq_search_scale(t(X, device), [t(W, device) for W in Ws], AWQ_SPEC, duo_scaling=duo, chunk=2)
        ref = awq.search_scale(X, Ws, AWQ_SPEC, duo_scaling=duo)
        assert res.best_ratio == ref.best_ratio
        np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-10)
        np.testing.assert_allclose(host(res.scales), ref.scales, rtol=1e-13)
    # ... a compared block (a small gated MLP), evaluated chunk by chunk
    Wd = np.random.default_rng(2).normal(size=(24, 48)) * 0.1

    def mlp_np(Xb, ws):
        return (Xb @ ws[0].T / (1 + np.exp(-(Xb @ ws[0].T))) * (Xb @ ws[1][:48].T)) @ Wd.T

    Wd_t = t(Wd, device)

    def mlp_t(Xb, ws):
        return (torch.nn.functional.silu(Xb @ ws[0].T) * (Xb @ ws[1][:48].T)) @ Wd_t.T

    Ws2 = [Ws[0], np.concatenate([Ws[1], Ws[1], Ws[1]])]
    res = TB.awq_search_scale(t(X, device), [t(W, device) for W in Ws2], AWQ_SPEC, block=mlp_t, chunk=1)
    ref = awq.search_scale(X, Ws2, AWQ_SPEC, block=mlp_np)
    assert res.best_ratio == ref.best_ratio
    np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-9)
    # from pipeline statistics (Hessian + mean |x| of the torch channel stats)
    st = TB.channel_stats(("H", "mean_abs"), n)
    for j in range(X.shape[0]):
        st.add(t(X[j:j + 1], device).float())
    res = TB.awq_search_scale_stats(st, [t(W, device) for W in Ws], AWQ_SPEC, n_sequences=X.shape[0])
    Xf = X.astype(np.float32).astype(np.float64)
    ref = awq.search_scale(Xf, Ws, AWQ_SPEC)
    assert res.best_ratio == ref.best_ratio
    np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-5)  # H accumulated in float32
    ref_np = NP.awq_search_scale_stats(_np_stats(Xf), Ws, AWQ_SPEC)
    np.testing.assert_array_equal(ref_np.losses, ref.losses)
    # clip search: same candidates, same errors (float64 on every backend), strided sample
    for n_tok in (512, 40):
        for spec in (AWQ_SPEC, QuantSpec(bits=4, group_size=None, rule="awq"), QuantSpec(bits=3, group_size=24, rule="awq")):
            c = TB.awq_search_clip(t(X, device), t(Ws[0], device), spec, n_sample_tokens=n_tok)
            cref = awq.search_clip(X, Ws[0], spec, n_sample_tokens=n_tok)
            np.testing.assert_allclose(host(c.max_val), cref.max_val, rtol=1e-15)
            np.testing.assert_allclose(host(c.losses), cref.losses, rtol=1e-12)
            np.testing.assert_array_equal(host(TB.apply_clip(t(Ws[0], device), c.max_val, spec.group_size)),
                                          awq.apply_clip(Ws[0], cref.max_val, spec.group_size))


def _np_stats(X):
    st = ChannelStats(("inputs",), X.shape[-1])
    for j in range(X.shape[0]):
        st.add(X[j:j + 1])
    return st


def test_torch_ops_match_the_reference_cpu():
    run_ops_parity("cpu")


def equalization_case_grid():
    """(suite, shape, name, params, slow) of the SmoothQuant, AWQ and AWEQ golden suites."""
    return [(m, *c) for m in ("smoothquant", "awq", "aweq") for c in golden.SUITES[m].cases()]


def in_memory_golden_reports(device="cpu", everything=False):
    """SmoothQuant / AWQ / AWEQ cases of tools/make_golden.py, generated here, run on the torch backend."""
    inputs = {shape: MG.make_inputs(shape) for shape in ("llama4096", "odd1000", "nasty256")}
    reports = []
    for method, shape, name, params, _ in equalization_case_grid():
        if not everything and shape == "llama4096" and method == "awq" and params["clip_n_sample_tokens"] == 512:
            continue  # 4096-wide Grams cost seconds on a CPU: the strided-sample case covers that shape by default
        case = golden.GoldenCase(name=f"{method}/{name}", method=method, file="", sha256="", params=params,
                                 rule=golden.SUITES[method].rule(params))
        arrays = inputs[shape]
        expected = dict(arrays, **golden.run_case(case, arrays))
        got = golden.run_case(case, arrays, TB, to_device=lambda a: torch.as_tensor(a).to(device), to_numpy=TB.to_numpy)
        reports.append(golden.compare_backend(case, arrays, expected, got, MG.parity_rules()))
    return reports


def test_golden_cases_built_in_memory_meet_the_parity_rules():
    reports = in_memory_golden_reports()
    bad = [r for r in reports if not r["ok"]]
    assert len(reports) >= 30 and not bad, bad


@pytest.mark.slow
def test_all_golden_cases_built_in_memory_meet_the_parity_rules():
    reports = in_memory_golden_reports(everything=True)
    bad = [r for r in reports if not r["ok"]]
    assert len(reports) == len(list(equalization_case_grid())) and not bad, bad


def test_a_broken_backend_fails_the_parity_rules():
    """The comparison can fail: scales off by one ulp, a wrong bias, a clip choice off by one step."""
    inputs = MG.make_inputs("nasty256")
    cases = {m: next(c for c in equalization_case_grid() if c[0] == m and c[1] == "nasty256")
             for m in ("smoothquant", "awq", "aweq")}
    for method, (_, _, name, params, _) in cases.items():
        case = golden.GoldenCase(name=name, method=method, file="", sha256="", params=params,
                                 rule=golden.SUITES[method].rule(params))
        expected = dict(inputs, **golden.run_case(case, inputs))
        got = {k: np.array(v, copy=True) for k, v in expected.items()}
        assert golden.compare_backend(case, inputs, expected, got, MG.parity_rules())["ok"]
        if method == "awq":
            got["losses"][3] *= 1.01
        elif method == "aweq":
            got["bias"][0] += 1e-3 * abs(expected["bias"]).max()
        else:
            got["s"] = np.nextafter(got["s"], np.inf)
        assert not golden.compare_backend(case, inputs, expected, got, MG.parity_rules())["ok"], method


def test_stored_golden_cases_pass_on_torch_cpu():
    try:
        manifest = golden.load_manifest()
    except golden.GoldenError:
        pytest.skip("no golden manifest")
    mine = [c for c in golden.cases(manifest=manifest) if c.method in ("smoothquant", "awq", "aweq")]
    if not mine:
        pytest.skip("golden/ has no SmoothQuant/AWQ/AWEQ cases yet (regenerate with tools/make_golden.py)")
    reports = golden.parity_check(TB, methods=["smoothquant", "awq", "aweq"], to_device=torch.as_tensor,
                                  to_numpy=TB.to_numpy)
    bad = [r for r in reports if not r["ok"]]
    assert reports and not bad, bad


@pytest.mark.parametrize("n, block", [(40, 16), (97, 20), (130, 64), (30, 16)])
def test_awq_quadratic_form_from_the_lower_blocks(n, block):
    """AWQ's linear-group loss ``tr(D S D^T)`` from the blocks of S on and below the diagonal equals the
    full product to float64 rounding (uneven spans; one span when n < 2 * block)."""
    from refquant.backends import equalization_ops

    g = torch.Generator().manual_seed(n)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    S = X.t() @ X
    D = torch.randn(12, n, generator=g, dtype=torch.float64)
    full = float(((D @ S) * D).sum())
    got = float(equalization_ops._quadratic_form(D, S, block=block))
    assert abs(got - full) <= 1e-12 * abs(full)
    if n >= 2 * block:  # blocked: the blocks above the diagonal are never read
        spans = equalization_ops._tq.triangle_blocks(n, block)
        S_poisoned = S.clone()
        for i, (a0, a1) in enumerate(spans):
            S_poisoned[a0:a1, a1:] = float("nan")
        got = float(equalization_ops._quadratic_form(D, S_poisoned, block=block))
        assert abs(got - full) <= 1e-12 * abs(full)


def test_input_errors_are_clear():
    X, Ws = problem()
    Wt = [t(W) for W in Ws]
    with pytest.raises(ValueError, match="list of"):
        TB.smooth_scales(t(np.ones(64)), Wt[0], 0.5)
    with pytest.raises(ValueError, match="in_features"):
        TB.equalization_scales(np.ones(64), [Wt[0], Wt[0][:, :32]])
    with pytest.raises(ValueError, match="alpha"):
        TB.smooth_scales(t(np.ones(64)), Wt, 1.5)
    with pytest.raises(ValueError, match="strictly positive"):
        TB.scale_weight(Wt[0], t(-np.ones(64)))
    with pytest.raises(ValueError, match="channels|shape"):
        TB.awq_search_scale(t(X[..., :32]), Wt, AWQ_SPEC)
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        TB.awq_search_scale(t(bad), Wt, AWQ_SPEC)
    with pytest.raises(ValueError, match="n_grid"):
        TB.awq_search_scale(t(X), Wt, AWQ_SPEC, n_grid=0)
    with pytest.raises(ValueError, match="spec"):
        TB.awq_search_clip(t(X), Wt[0], "4bit")
    with pytest.raises(ValueError, match="per-tensor"):
        TB.awq_search_clip(t(X), Wt[0], QuantSpec(bits=4, per_tensor=True))
    W0 = Ws[0].copy()
    W0[3, :32] = 0
    with pytest.raises(ValueError, match="duo_scaling"):
        TB.awq_search_scale(t(X), [t(W0)], AWQ_SPEC, duo_scaling=True)
    with pytest.raises(ValueError, match="max_val"):
        TB.apply_clip(Wt[0], t(np.ones((3, 2))), 32)
    with pytest.raises(ValueError, match="n_sequences"):
        TB.awq_search_scale_stats(None, Wt, AWQ_SPEC)


def test_no_global_state_change():
    X, Ws = problem()
    rng_before = torch.get_rng_state().clone()
    prec_before = torch.get_float32_matmul_precision()
    TB.awq_search_scale(t(X).float(), [t(W).float() for W in Ws], AWQ_SPEC)
    TB.awq_search_clip(t(X).float(), t(Ws[0]).float(), AWQ_SPEC)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_float32_matmul_precision() == prec_before


# ---------------------------------------------------------------------------------------------
# GPU (pytest -m gpu)


def signed_codes(qw):
    """``codes - zero`` per weight, on the host (AWQ's zero-point ties shift codes and zero together)."""
    codes, zero, g = (host(a).astype(np.int64) for a in (qw.codes, qw.zero, qw.g_idx))
    return codes - zero[:, g]


@gpu
@needs_cuda
def test_gpu_torch_ops_match_the_reference():
    run_ops_parity("cuda")


@gpu
@needs_cuda
def test_gpu_golden_cases_meet_the_parity_rules():
    reports = in_memory_golden_reports("cuda", everything=True)
    bad = [r for r in reports if not r["ok"]]
    assert not bad, bad
    try:  # and the stored cases, once golden/ holds them (what `refquant preflight` runs)
        stored = golden.parity_check(TB, methods=["smoothquant", "awq", "aweq"],
                                     to_device=lambda a: torch.as_tensor(a).cuda(), to_numpy=TB.to_numpy)
    except golden.GoldenError:
        stored = []
    assert not [r for r in stored if not r["ok"]]


@gpu
@needs_cuda
@pytest.mark.parametrize("method,kw", [("smoothquant", dict(wbits=8, abits=8, quantize_bmm_input=True)),
                                       ("awq", dict(wbits=4)), ("aweq", dict(wbits=8, abits=8, act_mode="per_tensor"))])
def test_gpu_pipeline_on_a_bf16_model_matches_the_cpu_float32_run(method, kw):
    """The pipeline on CUDA in bf16 (the real-model setting) quantizes like the float32 CPU run."""
    from refquant import torch_pipeline as tp
    from refquant import llama, pipeline, runs

    ids = np.random.default_rng(0).integers(0, 4096, size=(4, 256))
    cfg = pipeline.QuantConfig.of(method=method, **kw)
    cpu = tp.load_model(str(runs.DEFAULT_MODEL), dtype=torch.float32)
    res_cpu = pipeline.quantize_model(tp.HFRunner(cpu, batch_size=2), cfg, ids)
    gpu_model = tp.load_model(str(runs.DEFAULT_MODEL), dtype=torch.bfloat16)
    res_gpu = pipeline.quantize_model(tp.HFRunner(gpu_model, device="cuda", batch_size=2), cfg, ids)
    for i in range(len(res_cpu.layers)):
        for n in llama.LINEARS:
            qa, qb = (signed_codes(r.layers[i].quantized[n]) for r in (res_cpu, res_gpu))
            # bf16 weights and activations vs float32: codes move by at most one step, and mostly not at all
            assert (np.abs(qa - qb) <= 1).mean() > 0.99 and (qa == qb).mean() > 0.6, (i, n, (qa == qb).mean())
        if method == "awq":  # the bf16 search picks a ratio that is (near) optimal for the float32 losses
            for g, r in res_cpu.layers[i].info["awq"]["groups"].items():
                k = round(res_gpu.layers[i].info["awq"]["groups"][g]["ratio"] * 20)
                assert r["losses"][k] <= 1.05 * min(r["losses"]), (i, g, k, r["losses"])
    assert res_gpu.layers[0].act_quant == res_cpu.layers[0].act_quant

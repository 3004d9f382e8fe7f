"""SliM-LLM (refquant/spec/slim.py): allocation search, SQC + GPTQ, the sym quirk, the mixed format."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import refquant as rq
from refquant.spec import formats, slim

FAST = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _case(seed: int, rows: int = 6, cols: int = 64, samples: int = 2, tokens: int = 40):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(rows, cols)) * rng.uniform(0.5, 2.0, size=(1, cols))
    X = rng.normal(size=(samples, tokens, cols)) * rng.uniform(0.2, 3.0, size=(1, 1, cols))
    return W, rq.hessian(X), X


# ------------------------------------------------------------------------------------------ allocation

@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]))
def test_allocation_mean_width_is_the_target_exactly(seed, bits):
    W, H, X = _case(seed)
    r = slim.slim_search(W, H, X, bits=bits, group_size=8)
    for gb in (r.group_bits, r.search_bits):
        assert gb.dtype == np.int64 and gb.shape == (8,)
        assert gb.sum() == bits * 8 and gb.mean() == bits
        assert set(gb.tolist()) <= {bits - 1, bits, bits + 1}
        assert (gb == bits - 1).sum() == (gb == bits + 1).sum() == r.k
    assert r.errors.shape == (2, 8 // 2 - 1)
    assert r.k == int(np.argmin(r.errors.mean(axis=0))) + 1
    # the applied allocation is the trial k re-ranked by the damped salience; the search's by the first one
    assert np.array_equal(r.search_bits, slim.allocation(slim.salience_order(r.salience), r.k, bits))
    assert np.array_equal(r.group_bits, slim.allocation(slim.salience_order(r.applied_salience), r.k, bits))
    assert np.array_equal(rq.slim_allocate(W, H, X, bits=bits, group_size=8), r.group_bits)


@given(n=st.integers(4, 40), bits=st.integers(2, 7), seed=st.integers(0, 100))
@settings(max_examples=25, deadline=None)
def test_every_trial_is_symmetric(n, bits, seed):
    order = np.random.default_rng(seed).permutation(n)
    for k in range(1, n // 2):
        gb = slim.allocation(order, k, bits)
        assert (gb == bits - 1).sum() == k and (gb == bits + 1).sum() == k and gb.mean() == bits
        assert set(np.nonzero(gb == bits - 1)[0]) == set(order[:k].tolist())
        assert set(np.nonzero(gb == bits + 1)[0]) == set(order[-k:].tolist())


def test_trial_errors_match_a_hand_computed_kl():
    W, H, X = _case(3)
    S = slim.group_salience(W, slim._upper(slim.salience_hessian(H), W.shape), 8)
    order = slim.salience_order(S)
    errors = slim.trial_errors(W, X, order, 3, 8)
    W_hat = slim.trial_weight(W, slim.allocation(order, 2, 3), 8)
    z_q, z = X[1] @ W_hat.T, X[1] @ W.T
    p_q = np.exp(z_q) / np.exp(z_q).sum(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    p_q, p = np.maximum(p_q, 1e-6), np.maximum(p, 1e-6)
    assert errors[1, 1] == pytest.approx(float(np.sum(p_q * np.log(p_q / p))), rel=1e-10)
    assert slim.kl_error(z, z) == 0.0


def test_salience_uses_the_absolute_damping_and_the_raw_weight():
    W, H, X = _case(5)
    H[3, :] = 0  # a dead input: set to 1, then + 0.01
    H[:, 3] = 0
    Hs = slim.salience_hessian(H)
    assert Hs[3, 3] == 1.01 and Hs[0, 0] == H[0, 0] + 0.01 and Hs[0, 1] == H[0, 1]
    U = slim.upper_cholesky_of_inverse(Hs.copy())
    S = slim.group_salience(W, U, 8)
    assert S[0] == pytest.approx(np.sum(W[:, :8] ** 2 / np.diag(U)[None, :8] ** 2), rel=1e-14)


def test_rtn_groups_are_min_max_asymmetric_and_the_binarizer_uncentred():
    w = np.array([[0.5, 1.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    b1 = slim.rtn_group(w, 1)
    s, z = np.abs(w).mean(axis=1), w.mean(axis=1)
    assert np.array_equal(b1, np.sign(w - z[:, None]) * s[:, None] + z[:, None])
    assert np.array_equal(b1[1], w[1])  # sign(0) = 0: a row equal to its mean stays
    q2 = slim.rtn_group(w, 2)  # range [min(x,0), max(x,0)], scale = range / 3
    assert q2[0, 3] == pytest.approx(-1.0) and q2[0, 2] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ SQC + GPTQ

def _gb(first: int, bits: int, n: int = 8) -> np.ndarray:
    gb = np.full(n, bits)
    gb[0] = first
    gb[-1] = 2 * bits - first
    return gb


@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4]))
@example(seed=3699, bits=3)  # the asymmetric quantizer lands on the midpoint zero and the same scale in every row
def test_sym_quirk_gives_the_midpoint_zero_before_the_first_full_width_group(seed, bits):
    W, H, _ = _case(seed)
    gb = _gb(bits - 1, bits)
    quirk = rq.slim_llm(W, H, bits=bits, group_bits=gb, group_size=8, sym_quirk=True)
    plain = rq.slim_llm(W, H, bits=bits, group_bits=gb, group_size=8, sym_quirk=False)
    maxq = 2 ** (bits - 1) - 1
    assert np.all(quirk.zero[:, 0] == (maxq + 1) / 2)
    if np.array_equal(quirk.zero[:, 0], plain.zero[:, 0]) and np.array_equal(quirk.scale[:, 0], plain.scale[:, 0]):
        assert np.array_equal(quirk.codes, plain.codes)  # the same first-group quantizer: nothing else differs
    else:
        assert not np.array_equal(quirk.dequantize(), plain.dequantize())
    # the first group at `bits` switches the quantizer to asymmetric for good: the same grid rules after it
    assert np.array_equal(quirk.zero[:, 1:] == np.round(quirk.zero[:, 1:]), np.ones_like(quirk.zero[:, 1:], bool))
    # a layer that starts at full width never sees the quirk
    gb2 = _gb(bits, bits)
    gb2[1] = bits - 1
    a = rq.slim_llm(W, H, bits=bits, group_bits=gb2, group_size=8, sym_quirk=True)
    b = rq.slim_llm(W, H, bits=bits, group_bits=gb2, group_size=8, sym_quirk=False)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.zero, b.zero)


def test_sym_quirk_is_inert_at_two_bits():
    W, H, _ = _case(11)
    gb = _gb(1, 2)
    a = rq.slim_llm(W, H, bits=2, group_bits=gb, group_size=8, sym_quirk=True)
    b = rq.slim_llm(W, H, bits=2, group_bits=gb, group_size=8, sym_quirk=False)
    assert np.array_equal(a.dequantize(), b.dequantize())


@FAST
@given(seed=st.integers(0, 10_000))
def test_lambda_one_is_a_no_op(seed):
    W, H, _ = _case(seed)
    gb = _gb(2, 3)
    ref = rq.slim_llm(W, H, bits=3, group_bits=gb, group_size=8)
    original = slim.salient_mask
    try:
        slim.salient_mask = lambda F: np.zeros(F.shape, dtype=bool)  # no salient element at all
        plain = rq.slim_llm(W, H, bits=3, group_bits=gb, group_size=8)
    finally:
        slim.salient_mask = original
    assert np.array_equal(ref.codes, plain.codes) and np.allclose(ref.scale, plain.scale, rtol=0, atol=0)


def test_lambda_changes_the_range_choice_somewhere():
    W, H, _ = _case(2, rows=16)
    W[:, 3] *= 20  # salient columns
    gb = _gb(2, 3)
    a = rq.slim_llm(W, H, bits=3, group_bits=gb, group_size=8, lambda_salience=1.0)
    b = rq.slim_llm(W, H, bits=3, group_bits=gb, group_size=8, lambda_salience=50.0)
    assert not np.array_equal(a.scale, b.scale)


def test_sqc_never_worse_than_min_max_on_the_first_group():
    W, H, _ = _case(4, rows=12)
    q = rq.slim_llm(W, H, bits=3, group_bits=_gb(3, 3), group_size=8, sym_quirk=False)
    w = W[:, :8]
    spec = rq.QuantSpec(bits=3)
    s0, z0 = rq.quantizer.find_params(w, spec)
    base = np.sum(np.abs(rq.quantizer.fake_quantize(w, s0[:, None], z0[:, None], 7) - w) ** 2.4, axis=1)
    got = np.sum(np.abs(rq.quantizer.fake_quantize(w, q.scale[:, :1], q.zero[:, :1], 7) - w) ** 2.4, axis=1)
    assert np.all(got <= base)
    assert np.all(q.scale[:, 0] / s0 <= 1.1 + 1e-12) and np.all(q.scale[:, 0] / s0 >= 0.9 - 1e-12)


def test_one_bit_group_parameters_are_mean_abs_and_mean():
    W, H, _ = _case(8)
    q = rq.slim_llm(W, H, bits=2, group_bits=_gb(1, 2), group_size=8)
    assert np.array_equal(q.scale[:, 0], np.abs(W[:, :8]).mean(axis=1))
    assert np.array_equal(q.zero[:, 0], W[:, :8].mean(axis=1))
    assert set(np.unique(q.codes[:, :8]).tolist()) <= {0, 1, 2}


def test_range_factors_are_the_codes_101_in_order():
    p = slim.range_factors()
    assert p.shape == (101,) and p[0] == 1 and p[1] == 1 + 0.1 / 50 and p[50] == 1.1 and p[51] == 1 - 0.1 / 50
    assert p[-1] == pytest.approx(0.9, abs=1e-15)


def test_salient_mask_and_its_fallback():
    F = np.ones((4, 8))
    assert not slim.salient_mask(F).any()  # std 0: no |z| > 2 (the original crashes here)
    F[1, 2] = 100.0
    m = slim.salient_mask(F)
    assert m[1, 2] and m.sum() == 1
    rng = np.random.default_rng(0)
    F = rng.exponential(size=(16, 16))
    z = (F - F.mean()) / F.std(ddof=1)
    assert np.array_equal(slim.salient_mask(F), F >= F[np.abs(z) > 2].min())


def test_salience_damp_keeps_dead_columns_and_zero_skips_the_step():
    W, H, _ = _case(9)
    H[5, :] = 0
    H[:, 5] = 0
    gb = _gb(3, 3)
    kept = rq.slim_llm(W, H, bits=3, group_bits=gb, group_size=8, salience_damp=0.01)
    zeroed = rq.slim_llm(W, H, bits=3, group_bits=gb, group_size=8, salience_damp=0.0)
    W0 = W.copy()
    W0[:, 5] = 0
    again = rq.slim_llm(W0, H, bits=3, group_bits=gb, group_size=8, salience_damp=0.0)
    assert np.array_equal(zeroed.codes, again.codes)
    assert not np.array_equal(kept.codes, zeroed.codes)


# ------------------------------------------------------------------------------------------ format

def test_bit_accounting_and_round_trip(tmp_path):
    W, H, X = _case(1, cols=60)  # 8 groups, the last one partial (4 columns)
    gb = rq.slim_allocate(W, H, X, bits=2, group_size=8)
    q = rq.slim_llm(W, H, bits=2, group_bits=gb, group_size=8)
    assert isinstance(q, rq.MixedWeight) and q.bits_per_weight == 2.0
    widths = np.array([8] * 7 + [4])
    expected = int(np.sum(6 * widths * gb)) + 6 * 8 * 32 + 8 * 8
    ties = [g for g in range(8) if gb[g] == 1 and (q.codes[:, 8 * g:8 * g + widths[g]] == 1).any()]
    expected += sum(6 * int(widths[g]) for g in ties)
    assert q.storage_bits == expected
    tensors, meta = q.to_tensors()
    back = formats.from_tensors(tensors, meta)
    assert np.array_equal(back.dequantize(), q.dequantize()) and np.array_equal(back.group_bits, q.group_bits)
    formats.save(q, tmp_path / "w.safetensors")
    assert np.array_equal(formats.load(tmp_path / "w.safetensors").dequantize(), q.dequantize())


def test_tie_codes_cost_a_mask():
    codes = np.array([[0, 1, 2, 0], [2, 2, 0, 0]], dtype=np.uint8)
    q = formats.MixedWeight(codes, np.ones((2, 2)), np.zeros((2, 2)), np.array([1, 1]), 2)
    assert np.array_equal(q.dequantize(), np.array([[-1.0, 0.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]))
    assert q.storage_bits == 2 * 2 * 1 + 2 * 2 * 1 + 2 * 2 + 2 * 2 * 32 + 16  # group 0 has a tie: + its mask
    with pytest.raises(ValueError, match="group_bits"):
        formats.MixedWeight(codes, np.ones((2, 2)), np.zeros((2, 2)), np.array([1, 9]), 2)


def test_dequantize_is_exactly_what_gptq_quantized():
    W, H, _ = _case(6)
    q = rq.slim_llm(W, H, bits=3, group_bits=_gb(2, 3), group_size=8, sym_quirk=False)
    # column 0 sees no GPTQ update: its dequantized value is the group's grid applied to W itself
    want = rq.quantizer.fake_quantize(W[:, 0], q.scale[:, 0], q.zero[:, 0], 3)
    assert np.array_equal(q.dequantize()[:, 0], want)
    # the 1-bit path: sign(w - mean) * mean|w| + mean on column 0
    q1 = rq.slim_llm(W, H, bits=2, group_bits=_gb(1, 2), group_size=8)
    z, s = W[:, :8].mean(axis=1), np.abs(W[:, :8]).mean(axis=1)
    assert np.array_equal(q1.dequantize()[:, 0], np.sign(W[:, 0] - z) * s + z)
    assert q.info["loss"] > 0 and q.info["percdamp"] == 0.01


# ------------------------------------------------------------------------------------------ errors

def test_bad_inputs_are_refused_with_advice():
    W, H, X = _case(0)
    with pytest.raises(ValueError, match="at least 4 groups"):
        rq.slim_allocate(W, H, X, bits=3, group_size=32)
    with pytest.raises(ValueError, match="bits must be an integer in 2..7"):
        rq.slim_allocate(W, H, X, bits=1, group_size=8)
    with pytest.raises(ValueError, match="bits must be an integer in 2..7"):
        rq.slim_llm(W, H, bits=8, group_bits=np.full(8, 8), group_size=8)
    with pytest.raises(ValueError, match="n_samples, tokens, in_features"):
        rq.slim_allocate(W, H, X[0], bits=3, group_size=8)
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        rq.slim_allocate(W, H, bad, bits=3, group_size=8)
    with pytest.raises(ValueError, match="one width per group"):
        rq.slim_llm(W, H, bits=3, group_bits=np.full(7, 3), group_size=8)
    with pytest.raises(ValueError, match="1..8"):
        rq.slim_llm(W, H, bits=3, group_bits=np.full(8, 0), group_size=8)
    with pytest.raises(ValueError, match="lambda_salience"):
        rq.slim_llm(W, H, bits=3, group_bits=np.full(8, 3), group_size=8, lambda_salience=np.nan)
    with pytest.raises(ValueError, match="group_size"):
        rq.slim_llm(W, H, bits=3, group_bits=np.full(8, 3), group_size=None)
    Wn = W.copy()
    Wn[0, 0] = np.inf
    with pytest.raises(ValueError):
        rq.slim_llm(Wn, H, bits=3, group_bits=np.full(8, 3), group_size=8)


def test_inputs_are_not_modified_and_the_global_rng_is_untouched():
    W, H, X = _case(12)
    W0, H0, X0 = W.copy(), H.copy(), X.copy()
    state = np.random.get_state()[1].copy()
    gb = rq.slim_allocate(W, H, X, bits=3, group_size=8)
    rq.slim_llm(W, H, bits=3, group_bits=gb, group_size=8)
    assert np.array_equal(W, W0) and np.array_equal(H, H0) and np.array_equal(X, X0)
    assert np.array_equal(np.random.get_state()[1], state)


# ------------------------------------------------------------------------------------------ torch twin (CPU)

def test_torch_twin_matches_the_reference_on_cpu():
    torch = pytest.importorskip("torch")
    from refquant import backends

    be = backends.get_backend("torch")
    W, H, X = _case(21, rows=10)
    r = slim.slim_search(W, H, X, bits=3, group_size=8)
    t = be.slim_search(torch.as_tensor(W), torch.as_tensor(H), torch.as_tensor(X), bits=3, group_size=8)
    assert t.k == r.k and np.array_equal(t.group_bits, r.group_bits)
    assert np.max(np.abs(t.errors - r.errors)) <= 1e-4 * np.max(np.abs(r.errors))
    for bits, gb in ((3, _gb(2, 3)), (2, _gb(1, 2))):
        ref = rq.slim_llm(W, H, bits=bits, group_bits=gb, group_size=8)
        got = be.slim_llm(torch.as_tensor(W), torch.as_tensor(H), bits=bits, group_bits=gb, group_size=8)
        assert np.array_equal(be.to_numpy(got.codes), ref.codes)
        assert np.allclose(be.to_numpy(got.dequantize()), ref.dequantize(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ pipeline

@pytest.mark.slow
def test_pipeline_quantizes_each_linear_from_the_fp_layer_inputs():
    pytest.importorskip("torch")
    from refquant import llama, pipeline, runs

    fp, q = llama.load(runs.DEFAULT_MODEL), llama.load(runs.DEFAULT_MODEL)
    ids = np.random.default_rng(0).integers(0, 4096, size=(2, 32))
    cfg = pipeline.QuantConfig.of("slim", wbits=3, group_size=64)
    runner = pipeline.NumpyRunner(q)
    records = []

    class Stop(Exception):
        pass

    def first_layer_only(record, layer):
        records.append(record)
        raise Stop

    with pytest.raises(Stop):
        pipeline.quantize_model(runner, cfg, ids, on_layer=first_layer_only)
    X0 = runner.embed(ids)
    n0 = llama.rms_norm(X0, fp.layers[0]["input_layernorm"], fp.config.rms_norm_eps)
    W = fp.layers[0]["self_attn.q_proj"]
    acc = rq.HessianAccumulator(W.shape[1])
    for j in range(n0.shape[0]):
        acc.add_batch(n0[j:j + 1])
    gb = rq.slim_allocate(W, acc.H, n0, bits=3, group_size=64)
    want = rq.slim_llm(W, acc.H, bits=3, group_bits=gb, group_size=64)
    got = records[0].quantized["self_attn.q_proj"]
    assert records[0].info["slim"]["self_attn.q_proj"]["group_bits"] == gb.tolist()
    assert np.array_equal(got.group_bits, gb) and np.array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(q.layers[0]["self_attn.q_proj"], want.dequantize())
    with pytest.raises(ValueError, match="group-size"):
        pipeline.QuantConfig.of("slim", wbits=3, group_size=None)


def test_torch_format_twin_dequantizes_bit_for_bit():
    torch = pytest.importorskip("torch")
    from refquant.backends import torch_formats

    W, H, _ = _case(13)
    q = rq.slim_llm(W, H, bits=2, group_bits=_gb(1, 2), group_size=8)
    assert np.array_equal(torch_formats.dequantize(q, dtype=torch.float64).numpy(), q.dequantize())

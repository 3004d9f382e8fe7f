"""AWEQ: equalization factors (eq. (10)), objective (eq. (8)), bias correction (eq. (11)-(15)), ablations."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refquant.spec.aweq import (
    ABLATIONS,
    AWE_ONLY,
    BC_ONLY,
    FULL,
    PLAIN,
    ActivationStats,
    AWEQConfig,
    aweq_linears,
    bias_correction,
    equalization_objective,
    equalization_scales,
    equalized_range,
    quantize_activation,
    quantize_weight,
    update_stats,
    weight_range,
    weight_spec,
)
from refquant.spec.equalize import fold_into_norm

SETTINGS = settings(max_examples=40, deadline=None)


def site(seed, tokens=48, n=24, outs=(12, 6)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(tokens, n)) * np.exp(rng.uniform(-3, 4, size=n)) + rng.normal(size=n)
    Ws = [rng.normal(size=(o, n)) * np.exp(rng.uniform(-2, 2, size=n)) for o in outs]
    return X, Ws


def channel_range(A, axis=0):
    return A.max(axis=axis) - A.min(axis=axis)


def range_equality_error(scales_fn, seed):
    """max_i |range(X_i / s_i) / range(W_i s_i) - 1| and |range(X_i / s_i) / sqrt(r^X r^W) - 1| on data."""
    X, Ws = site(seed)
    s = scales_fn(channel_range(X), Ws)
    r_xhat = channel_range(X / s)
    r_what = channel_range(np.concatenate([W * s for W in Ws]))
    target = np.sqrt(channel_range(X) * weight_range(Ws))
    return max(np.abs(r_xhat / r_what - 1).max(), np.abs(r_xhat / target - 1).max())


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_after_equalization_activation_range_equals_weight_range(seed):
    assert range_equality_error(equalization_scales, seed) < 1e-12


def test_the_range_property_detects_a_wrong_formula():
    def inverted(x_range, Ws):  # sqrt(r^X r^W) / r^X: the factor the wrong way round
        return np.sqrt(x_range * weight_range(Ws)) / x_range
    assert range_equality_error(inverted, 0) > 1e-2


def test_equalization_scale_by_hand():
    Ws = [np.array([[1.0, -1.0, 0.0], [3.0, 1.0, 0.0]]), np.array([[-1.0, 0.0, 0.0]])]
    # r^W over the row-concatenation: [3 - (-1), 1 - (-1), 0] = [4, 2, 0]
    np.testing.assert_array_equal(weight_range(Ws), [4.0, 2.0, 0.0])
    s = equalization_scales(np.array([16.0, 0.0, 5.0]), Ws)
    # channel 0: sqrt(16 * 4) / 4 = 2; channel 1: r^X = 0 -> 1; channel 2: r^W = 0 -> 1
    np.testing.assert_array_equal(s, [2.0, 1.0, 1.0])


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_objective_eq8_not_worse_than_identity(seed, n):
    rng = np.random.default_rng(seed)
    r_x = np.exp(rng.uniform(-8, 8, size=n))
    W = rng.normal(size=(5, n)) * np.exp(rng.uniform(-4, 4, size=n))
    s = equalization_scales(r_x, [W])
    r_w = weight_range([W])
    f_eq, f_one = equalization_objective(r_x, r_w, s), equalization_objective(r_x, r_w, np.ones(n))
    assert f_eq <= f_one * (1 + 1e-12)
    # eq. (9) via its stronger form r^X_i / s_i = s_i r^W_i for every channel: the same channel sets both maxima
    np.testing.assert_allclose(r_x / s, s * r_w, rtol=1e-12)
    np.testing.assert_allclose(f_eq, (r_x * r_w).max(), rtol=1e-12)  # = max_i r^X_i r^W_i


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_streaming_stats_equal_batch_stats(seed, n_batches):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(size=(rng.integers(1, 4), rng.integers(1, 6), 5)) * 3 + 1 for _ in range(n_batches)]
    stats = None
    for b in batches:
        stats = update_stats(stats, b)
    allx = np.concatenate([b.reshape(-1, 5) for b in batches])
    assert stats.count == allx.shape[0]
    np.testing.assert_array_equal(stats.x_min, allx.min(axis=0))
    np.testing.assert_array_equal(stats.x_max, allx.max(axis=0))
    np.testing.assert_array_equal(stats.range, allx.max(axis=0) - allx.min(axis=0))
    np.testing.assert_allclose(stats.mean, allx.mean(axis=0), rtol=1e-12, atol=1e-14)


def test_bias_correction_sign_convention():
    W = np.array([[1.0, 2.0]])
    W_q = np.array([[1.5, 2.0]])  # eps = [[0.5, 0]]
    b = bias_correction(W, W_q, np.array([4.0, 7.0]))
    np.testing.assert_array_equal(b, [-2.0])  # -eps E[x]: the bias to ADD to x W_q^T
    x = np.array([4.0, 7.0])
    assert x @ W_q.T + b == x @ W.T


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 3, 4, 8]))
def test_bias_correction_zero_mean_error_on_calibration_set(seed, bits):
    X, Ws = site(seed)
    W = Ws[0]
    W_q = quantize_weight(W, weight_spec(bits)).dequantize()
    b = bias_correction(W, W_q, update_stats(None, X).mean)
    err = (X @ W_q.T + b - X @ W.T).mean(axis=0)
    scale = np.abs(X).max() * np.abs(W).sum(axis=1).max()
    assert np.abs(err).max() <= 1e-12 * scale
    assert np.abs((X @ W_q.T - X @ W.T).mean(axis=0)).max() > 1e3 * np.abs(err).max()  # there was a bias to remove


BC_SEEDS = list(range(40))


def _bc_trial(seed, n_cal=128, n_fresh=128, n=32, out=16, bits=4):
    rng = np.random.default_rng(seed)
    mu, sd = rng.normal(size=n) * 0.5, rng.uniform(0.5, 2.0, size=n)
    W = rng.normal(size=(out, n))
    X_cal = mu + sd * rng.normal(size=(n_cal, n))
    X_new = mu + sd * rng.normal(size=(n_fresh, n))
    W_q = quantize_weight(W, weight_spec(bits)).dequantize()
    b = bias_correction(W, W_q, update_stats(None, X_cal).mean)
    before = np.linalg.norm((X_new @ W_q.T - X_new @ W.T).mean(axis=0))
    after = np.linalg.norm((X_new @ W_q.T + b - X_new @ W.T).mean(axis=0))
    return after < before


def test_bias_correction_generalises_to_fresh_samples():
    """Statistical: inputs with per-channel means ~ N(0, 0.5^2), stds in [0.5, 2], 128 calibration and
    128 fresh tokens, 4-bit per-tensor weights. The mean output error on the fresh tokens must shrink in
    at least 95% of the 40 fixed seeds (observed: 2000 of 2000 seeds)."""
    wins = sum(_bc_trial(s) for s in BC_SEEDS)
    assert wins >= 0.95 * len(BC_SEEDS), f"bias correction helped in only {wins}/{len(BC_SEEDS)} trials"


def test_weight_quantizer_is_eq_1_2_per_tensor():
    W = np.array([[-1.0, 0.5], [2.0, 0.25]])
    qw = quantize_weight(W, weight_spec(3))
    step = (2.0 - (-1.0)) / 7  # eq. (2)
    np.testing.assert_allclose(qw.scale, step)
    np.testing.assert_allclose(qw.zero, round(1.0 / step))  # Z = round(-x_min / Step)
    W_hat = qw.dequantize()
    np.testing.assert_allclose(W_hat, step * (np.clip(np.round(W / step) + 2, 0, 7) - 2))
    assert qw.scale.shape == (2, 1) and np.all(qw.scale == qw.scale[0, 0])


def test_activation_quantizer_dynamic_and_static():
    x = np.array([[-1.0, 0.2], [3.0, 0.9]])
    step = 4.0 / 255
    np.testing.assert_allclose(quantize_activation(x, 8), step * (np.round(x / step) + round(1 / step)) - step * round(1 / step))
    # static range narrower than x: clamped to the grid ends; Z = round(1 / (2/255)) = round(127.5) = 128
    q = quantize_activation(x, 8, static_range=(-1.0, 1.0))
    step = 2.0 / 255
    np.testing.assert_allclose([q.min(), q.max()], [-128 * step, 127 * step])
    np.testing.assert_array_equal(quantize_activation(x, 8, static_range=(-1.0, 3.0)), quantize_activation(x, 8))


def test_ablation_switches():
    assert [c.name for c in ABLATIONS] == ["plain", "+BC", "+AWE", "AWEQ"]
    X, Ws = site(5)
    stats = update_stats(None, X)
    spec = weight_spec(8)
    plain = aweq_linears(Ws, stats, spec, PLAIN)
    np.testing.assert_array_equal(plain.scales, np.ones(X.shape[1]))
    assert plain.biases is None
    np.testing.assert_array_equal(plain.quantized[0].dequantize(), quantize_weight(Ws[0], spec).dequantize())
    bc = aweq_linears(Ws, stats, spec, BC_ONLY)
    np.testing.assert_allclose(bc.biases[0], bias_correction(Ws[0], plain.quantized[0].dequantize(), stats.mean))
    awe = aweq_linears(Ws, stats, spec, AWE_ONLY)
    np.testing.assert_array_equal(awe.scales, equalization_scales(stats.range, Ws))
    assert awe.biases is None
    full = aweq_linears(Ws, stats, spec, FULL)
    np.testing.assert_array_equal(full.scales, awe.scales)
    # corrected equalized quantized layer: zero mean output error on the calibration set
    for W, qw, b in zip(Ws, full.quantized, full.biases):
        err = ((X / full.scales) @ qw.dequantize().T + b - X @ W.T).mean(axis=0)
        assert np.abs(err).max() <= 1e-10 * np.abs(X @ W.T).max()
    assert AWEQConfig() == FULL


def test_awe_folds_into_rmsnorm_and_reduces_activation_quant_error():
    """End to end at matrix level: an outlier channel makes per-tensor W8A8 bad; AWE fixes most of it."""
    rng = np.random.default_rng(11)
    n = 64
    X = rng.normal(size=(256, n))
    X[:, 7] *= 200.0  # the outlier channel the paper's Figure 1 shows
    W = rng.normal(size=(32, n)) * 0.05
    stats = update_stats(None, X)
    res = aweq_linears([W], stats, weight_spec(8), FULL)
    gamma = np.ones(n)
    assert np.all(fold_into_norm(gamma, res.scales) == 1 / res.scales)
    ref = X @ W.T
    plain = quantize_activation(X, 8) @ quantize_weight(W, weight_spec(8)).dequantize().T
    x_hat = X / res.scales
    eq = quantize_activation(x_hat, 8, static_range=equalized_range(stats, res.scales)) @ res.quantized[0].dequantize().T + res.biases[0]
    assert ((eq - ref) ** 2).mean() < 0.2 * ((plain - ref) ** 2).mean()


@pytest.mark.parametrize("case", ["zero_channel", "constant_channel", "zero_weight_column", "fp16_max"])
def test_nasty_inputs(case):
    X, Ws = site(2)
    if case == "zero_channel":
        X[:, 1] = 0.0
    elif case == "constant_channel":
        X[:, 1] = 3.0
    elif case == "zero_weight_column":
        for W in Ws:
            W[:, 4] = 0.0
    else:
        X = np.clip(X * 1e4, -6.5e4, 6.5e4)
    stats = update_stats(None, X)
    res = aweq_linears(Ws, stats, weight_spec(4), FULL)
    assert np.all(np.isfinite(res.scales)) and np.all(res.scales > 0)
    assert all(np.all(np.isfinite(b)) for b in res.biases)
    if case in ("zero_channel", "constant_channel"):
        assert res.scales[1] == 1.0
    if case == "zero_weight_column":
        assert res.scales[4] == 1.0


def test_errors():
    X, Ws = site(3)
    with pytest.raises(ValueError, match="non-finite"):
        update_stats(None, np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="empty"):
        update_stats(None, np.zeros((0, 4)))
    stats = update_stats(None, X)
    with pytest.raises(ValueError, match="in_features"):
        update_stats(stats, X[:, :3])
    with pytest.raises(ValueError, match=">= 0"):
        equalization_scales(-np.ones(X.shape[1]), Ws)
    with pytest.raises(ValueError, match="one entry per input channel"):
        equalization_scales(np.ones(3), Ws)
    with pytest.raises(ValueError, match="non-finite"):
        equalization_scales(np.full(X.shape[1], np.inf), Ws)
    with pytest.raises(ValueError, match="same shape"):
        bias_correction(Ws[0], Ws[1], stats.mean)
    with pytest.raises(ValueError, match="x_mean"):
        bias_correction(Ws[0], Ws[0], stats.mean[:3])
    with pytest.raises(ValueError, match="ActivationStats"):
        aweq_linears(Ws, {"mean": stats.mean}, weight_spec(8))
    with pytest.raises(ValueError, match="channels"):
        aweq_linears([W[:, :3] for W in Ws], stats, weight_spec(8))
    with pytest.raises(ValueError, match="static_range"):
        quantize_activation(X, 8, static_range=(1.0, -1.0))
    assert isinstance(stats, ActivationStats)

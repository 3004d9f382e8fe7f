"""SmoothQuant smoothing factors (Sec. 4, migration strength), calibration statistic and W8A8 fake quantization."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refquant.spec.smoothquant import (
    ALPHA_LLAMA,
    DEFAULT_ALPHA,
    fake_quant_linear,
    quantize_weight,
    smooth_norm_linears,
    smooth_scales,
    update_act_absmax,
    weight_absmax,
)

SETTINGS = settings(max_examples=40, deadline=None)


def site(seed, n=16, outs=(8, 4), tokens=32):
    """Calibration activations with outlier channels and a few linears sharing them."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(tokens, n)) * np.exp(rng.uniform(-2, 4, size=n))
    Ws = [rng.normal(size=(o, n)) * np.exp(rng.uniform(-2, 1, size=n)) for o in outs]
    return X, Ws


def per_channel_absmax(A, axis=0):
    return np.abs(A).max(axis=axis)


def smoothing_property_error(scales_fn, seed, alpha):
    """Max relative deviation from: max|X_j / s_j| = a^(1-alpha) w^(1-alpha), max|W_j s_j| = a^alpha w^alpha."""
    X, Ws = site(seed)
    a, w = per_channel_absmax(X), weight_absmax(Ws)
    s = scales_fn(a, Ws, alpha)
    err_x = np.abs(per_channel_absmax(X / s) / (a ** (1 - alpha) * w ** (1 - alpha)) - 1).max()
    err_w = np.abs(np.max([per_channel_absmax(W * s) for W in Ws], axis=0) / (a ** alpha * w ** alpha) - 1).max()
    return max(err_x, err_w)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_smoothed_maxima_follow_the_paper(seed, alpha):
    """The issue's property: no clamp is active here (all maxima well above 1e-5)."""
    assert smoothing_property_error(smooth_scales, seed, alpha) < 1e-12


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_alpha_half_balances_activation_and_weight_maxima(seed):
    X, Ws = site(seed)
    s = smooth_scales(per_channel_absmax(X), Ws, 0.5)
    np.testing.assert_allclose(per_channel_absmax(X / s), np.max([per_channel_absmax(W * s) for W in Ws], axis=0), rtol=1e-12)


def test_the_property_detects_a_wrong_formula():
    def swapped(a, Ws, alpha):
        return a ** (1 - alpha) / weight_absmax(Ws) ** alpha
    assert smoothing_property_error(smooth_scales, 1, 0.85) < 1e-12
    assert smoothing_property_error(swapped, 1, 0.85) > 1e-2


def test_clamps_of_the_original():
    Ws = [np.array([[1.0, 0.0, 2.0]]), np.array([[-3.0, 0.0, 0.5]])]
    a = np.array([4.0, 9.0, 0.0])
    s = smooth_scales(a, Ws, 0.5)
    # w = max over rows of both linears: [3, 0 -> 1e-5, 2]
    np.testing.assert_allclose(weight_absmax(Ws), [3.0, 1e-5, 2.0])
    np.testing.assert_allclose(s, [2 / np.sqrt(3), 3 / np.sqrt(1e-5), 1e-5])  # a = 0 -> s = 0 -> clamped 1e-5
    assert smooth_scales(a, Ws, 0.0)[2] == 0.5  # 0^0 = 1 as in torch.pow, so s = 1 / w = 1 / 2
    np.testing.assert_allclose(smooth_scales(a, Ws, 1.0), [4.0, 9.0, 1e-5])


def test_default_alphas():
    assert ALPHA_LLAMA == 0.85
    assert DEFAULT_ALPHA == 0.5


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_smoothing_a_norm_site_leaves_the_layer_output_unchanged(seed):
    X, Ws = site(seed)
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2, size=X.shape[1])

    def rms(x, g):
        return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + 1e-6) * g

    res = smooth_norm_linears(gamma, Ws, per_channel_absmax(rms(X, gamma)), ALPHA_LLAMA)
    for W, Ws_ in zip(Ws, res.weights):
        ref = rms(X, gamma) @ W.T
        np.testing.assert_allclose(rms(X, res.norm_weight) @ Ws_.T, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_streaming_channel_absmax(seed, n_batches):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(size=(2, rng.integers(1, 5), 6)) * 5 for _ in range(n_batches)]
    running = None
    for b in batches:
        running = update_act_absmax(running, b)
    np.testing.assert_array_equal(running, np.abs(np.concatenate([b.reshape(-1, 6) for b in batches])).max(axis=0))


def test_weight_quantization_per_channel_and_per_tensor():
    W = np.array([[1.0, -0.3, 0.26], [0.02, 0.01, -0.04]])
    qc = quantize_weight(W, 8, "per_channel").dequantize()
    np.testing.assert_allclose(qc[0], np.round(W[0] * 127) / 127)
    np.testing.assert_allclose(qc[1], np.round(W[1] / (0.04 / 127)) * (0.04 / 127))
    qt = quantize_weight(W, 8, "per_tensor").dequantize()
    np.testing.assert_allclose(qt, np.round(W * 127) / 127)
    q4 = quantize_weight(W, 4, "per_channel").dequantize()
    np.testing.assert_allclose(q4[0], np.round(W[0] * 7) / 7)


def test_w8a8_linear_forward():
    rng = np.random.default_rng(0)
    x, W, b = rng.normal(size=(3, 5, 8)), rng.normal(size=(4, 8)), rng.normal(size=4)
    W_hat = quantize_weight(W, 8).dequantize()
    y = fake_quant_linear(x, W_hat, 8, "per_token", bias=b)
    delta = np.abs(x).max(axis=-1, keepdims=True) / 127
    np.testing.assert_allclose(y, (np.round(x / delta) * delta) @ W_hat.T + b, rtol=1e-12)
    yq = fake_quant_linear(x, W_hat, 8, "per_token", bias=b, quantize_output=True)
    d_out = np.abs(y).max(axis=-1, keepdims=True) / 127
    np.testing.assert_allclose(yq, np.round(y / d_out) * d_out, rtol=1e-12)


@pytest.mark.parametrize("x_absmax, Ws, alpha, match", [
    (np.array([1.0, np.nan]), [np.ones((2, 2))], 0.5, "non-finite"),
    (np.array([1.0, -1.0]), [np.ones((2, 2))], 0.5, ">= 0"),
    (np.array([1.0, 1.0, 1.0]), [np.ones((2, 2))], 0.5, "one entry per input channel"),
    (np.array([1.0, 1.0]), [np.ones((2, 2))], 1.5, "alpha"),
    (np.array([1.0, 1.0]), [np.array([[1.0, np.inf]])], 0.5, "non-finite"),
    (np.array([1.0, 1.0]), [], 0.5, "empty"),
])
def test_bad_input_raises(x_absmax, Ws, alpha, match):
    with pytest.raises(ValueError, match=match):
        smooth_scales(x_absmax, Ws, alpha)


def test_bad_quantization_input_raises():
    with pytest.raises(ValueError, match="granularity"):
        quantize_weight(np.ones((2, 2)), 8, "per_group")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(np.array([[np.nan, 1.0]]), 8)
    with pytest.raises(ValueError, match="in_features"):
        fake_quant_linear(np.ones((2, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        update_act_absmax(None, np.array([[np.inf, 1.0]]))
    with pytest.raises(ValueError, match="in_features"):
        update_act_absmax(np.ones(3), np.ones((2, 2)))

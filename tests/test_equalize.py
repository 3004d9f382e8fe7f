"""Per-channel equalization identity (AWEQ eq. (3), SmoothQuant Sec. 4, AWQ eq. (4): W S and S^-1 X)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refquant.spec.equalize import (
    fold_into_layernorm,
    fold_into_linear,
    fold_into_norm,
    scale_activation,
    scale_weight,
    scale_weights,
)

SETTINGS = settings(max_examples=40, deadline=None)


def rms_norm(x, gamma, eps=1e-6):
    """LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * gamma."""
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * gamma


def layer_norm(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def silu(z):
    return z / (1 + np.exp(-z))


def problem(seed, tokens, n, outs):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(tokens, n)) * rng.uniform(0.01, 100, size=n)
    Ws = [rng.normal(size=(o, n)) for o in outs]
    s = np.exp(rng.uniform(-7, 7, size=n))  # scales from 1e-3 to 1e3
    return X, Ws, s


def rel_err(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


dims = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(1, 24),
                 st.lists(st.integers(1, 12), min_size=1, max_size=3))


@SETTINGS
@given(dims)
def test_identity_X_Sinv_times_S_W(d):
    X, Ws, s = problem(*d)
    Xs = scale_activation(X, s)
    for W, Wsc in zip(Ws, scale_weights(Ws, s)):
        assert rel_err(Xs @ Wsc.T, X @ W.T) < 1e-12


def test_scale_weight_scales_columns_not_rows():
    W = np.arange(6.0).reshape(2, 3)
    s = np.array([1.0, 2.0, 4.0])
    np.testing.assert_array_equal(scale_weight(W, s), [[0, 2, 8], [3, 8, 20]])
    np.testing.assert_array_equal(scale_activation(np.ones((1, 3)), s), [[1, 0.5, 0.25]])


def _invariance_error(scale_w, scale_x, seed=0):
    X, Ws, s = problem(seed, 8, 6, [6])
    W = Ws[0]
    return rel_err(scale_x(X, s) @ scale_w(W, s).T, X @ W.T)


def test_the_identity_check_detects_wrong_conventions():
    """The invariance property fails for the classic mistakes, so it can catch them."""
    assert _invariance_error(scale_weight, scale_activation) < 1e-12
    assert _invariance_error(lambda W, s: W * s[:, None], scale_activation) > 1e-3  # rows instead of columns
    assert _invariance_error(lambda W, s: W / s, scale_activation) > 1e-3  # divide instead of multiply
    assert _invariance_error(scale_weight, lambda X, s: X * s) > 1e-3


@SETTINGS
@given(dims)
def test_fold_into_rmsnorm_leaves_output_unchanged(d):
    X, Ws, s = problem(*d)
    gamma = np.random.default_rng(d[0]).uniform(0.1, 3, size=X.shape[1])
    before = rms_norm(X, gamma)
    after_gamma = fold_into_norm(gamma, s)
    np.testing.assert_allclose(rms_norm(X, after_gamma), before / s, rtol=1e-12)
    for W, Wsc in zip(Ws, scale_weights(Ws, s)):
        assert rel_err(rms_norm(X, after_gamma) @ Wsc.T, before @ W.T) < 1e-11


@SETTINGS
@given(dims)
def test_fold_into_layernorm_leaves_output_unchanged(d):
    X, Ws, s = problem(*d)
    rng = np.random.default_rng(d[0] + 1)
    gamma, beta = rng.uniform(0.1, 3, size=X.shape[1]), rng.normal(size=X.shape[1])
    g2, b2 = fold_into_layernorm(gamma, beta, s)
    for W, Wsc in zip(Ws, scale_weights(Ws, s)):
        assert rel_err(layer_norm(X, g2, b2) @ Wsc.T, layer_norm(X, gamma, beta) @ W.T) < 1e-11


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 10), st.integers(1, 12), st.integers(1, 12), st.booleans())
def test_fold_into_linear_chain(seed, tokens, n_in, n_mid, with_bias):
    """fc2(fc1(x)) unchanged with fc1 rows / s (and its bias) and fc2 columns * s (scale_fc_fc)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(tokens, n_in))
    W1, W2 = rng.normal(size=(n_mid, n_in)), rng.normal(size=(5, n_mid))
    b1 = rng.normal(size=n_mid) if with_bias else None
    s = np.exp(rng.uniform(-5, 5, size=n_mid))
    W1s, b1s = fold_into_linear(W1, s, b1)
    h = X @ W1.T + (0 if b1 is None else b1)
    hs = X @ W1s.T + (0 if b1s is None else b1s)
    assert rel_err(hs * s, h) < 1e-12
    assert rel_err(hs @ scale_weight(W2, s).T, h @ W2.T) < 1e-12
    assert (b1s is None) == (b1 is None)


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_fold_into_up_proj_leaves_llama_mlp_unchanged(seed):
    """down(silu(gate x) * up x): up_proj rows / s, down_proj columns * s (llm-awq up_proj -> down_proj)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(7, 8))
    Wg, Wu, Wd = rng.normal(size=(12, 8)), rng.normal(size=(12, 8)), rng.normal(size=(8, 12))
    s = np.exp(rng.uniform(-4, 4, size=12))
    Wu_s, _ = fold_into_linear(Wu, s)
    ref = (silu(X @ Wg.T) * (X @ Wu.T)) @ Wd.T
    out = (silu(X @ Wg.T) * (X @ Wu_s.T)) @ scale_weight(Wd, s).T
    assert rel_err(out, ref) < 1e-12


def test_fold_into_linear_touches_only_the_last_rows():
    """Fused qkv -> o: only the last len(s) rows (the v part) are divided."""
    W = np.ones((5, 2))
    b = np.ones(5)
    s = np.array([2.0, 4.0])
    W2, b2 = fold_into_linear(W, s, b)
    np.testing.assert_array_equal(W2[:, 0], [1, 1, 1, 0.5, 0.25])
    np.testing.assert_array_equal(b2, [1, 1, 1, 0.5, 0.25])
    np.testing.assert_array_equal(W, np.ones((5, 2)))  # input untouched


def test_functions_are_pure():
    X, Ws, s = problem(3, 4, 5, [3])
    copies = [X.copy(), Ws[0].copy(), s.copy()]
    scale_activation(X, s)
    scale_weights(Ws, s)
    fold_into_norm(np.ones(5), s)
    fold_into_linear(Ws[0].T.copy(), s[:3])
    for a, b in zip([X, Ws[0], s], copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (np.array([1.0, np.nan, 1.0]), "non-finite"),
    (np.array([1.0, np.inf, 1.0]), "non-finite"),
    (np.array([1.0, 0.0, 1.0]), "strictly positive"),
    (np.array([1.0, -2.0, 1.0]), "strictly positive"),
    (np.array([1.0, 1.0]), "in_features=3"),
    (np.ones((3, 1)), "1-D"),
])
def test_bad_scales_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        scale_weight(np.ones((2, 3)), bad)


def test_bad_weights_and_activations_raise():
    s = np.ones(3)
    with pytest.raises(ValueError, match="list"):
        scale_weights(np.ones((2, 3)), s)
    with pytest.raises(ValueError, match="empty"):
        scale_weights([], s)
    with pytest.raises(ValueError, match="same input"):
        scale_weights([np.ones((2, 3)), np.ones((2, 4))], s)
    with pytest.raises(ValueError, match="non-finite"):
        scale_weights([np.array([[1.0, np.nan, 1.0]])], s)
    with pytest.raises(ValueError, match="2-D"):
        scale_weight(np.ones(3), s)
    with pytest.raises(ValueError, match="empty"):
        scale_activation(np.ones((0, 3)), s)
    with pytest.raises(ValueError, match="non-finite"):
        scale_activation(np.array([[1.0, np.inf, 0.0]]), s)
    with pytest.raises(ValueError, match="out_features"):
        fold_into_linear(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="b_prev"):
        fold_into_linear(np.ones((2, 3)), np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="1-D gain"):
        fold_into_norm(np.ones((3, 1)), s)

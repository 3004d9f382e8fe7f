"""Activation fake quantization (SmoothQuant fake_quant.py: per-token / per-tensor absmax, static)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refquant.spec.actquant import (
    activation_absmax,
    quantize_activation,
    static_scale_from_absmax,
    update_activation_absmax,
)

SETTINGS = settings(max_examples=40, deadline=None)


def activations(seed, shape):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(2, size=shape) * np.exp(rng.uniform(-3, 3, size=shape[-1]))
    return x


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


def test_known_values_per_token_8bit():
    x = np.array([[1.0, -0.5, 0.3], [0.0, 0.0, 0.0], [-254.0, 1.0, 0.6]])
    q = quantize_activation(x, 8, "per_token")
    # row 0: Delta = 1/127; 0.3*127 = 38.1 -> 38; -0.5*127 = -63.5 -> -64 (half to even)
    np.testing.assert_allclose(q[0], [1.0, -64 / 127, 38 / 127], rtol=1e-15)
    np.testing.assert_array_equal(q[1], [0, 0, 0])  # Delta = 1e-5/127, everything is 0
    # row 2: Delta = 2; 1/2 = 0.5 -> 0 (half to even), 0.6/2 = 0.3 -> 0
    np.testing.assert_array_equal(q[2], [-254.0, 0.0, 0.0])


def test_known_values_per_tensor_4bit():
    x = np.array([[7.0, 1.4], [-0.5, 3.5]])
    q = quantize_activation(x, 4, "per_tensor")  # qmax 7, Delta = 1
    np.testing.assert_array_equal(q, [[7.0, 1.0], [-0.0, 4.0]])  # 3.5 -> 4 (half to even), -0.5 -> -0


@SETTINGS
@given(st.integers(0, 2**32 - 1), shapes, st.sampled_from([8, 6, 4, 3]))
def test_per_token_is_absmax_rounding_per_row(seed, shape, bits):
    x = activations(seed, shape)
    q = quantize_activation(x, bits, "per_token")
    qmax = 2 ** (bits - 1) - 1
    rows, qrows = x.reshape(-1, shape[-1]), q.reshape(-1, shape[-1])
    for r, qr in zip(rows, qrows):
        delta = max(np.abs(r).max(), 1e-5) / qmax
        codes = qr / delta
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)  # on the grid
        assert np.abs(codes).max() <= qmax + 1e-9
        assert np.abs(qr - r).max() <= delta / 2 * (1 + 1e-9)  # round to nearest
        np.testing.assert_allclose(np.abs(qr).max(), np.abs(r).max(), rtol=1e-12)  # absmax is on the grid
    assert q.shape == x.shape


@SETTINGS
@given(st.integers(0, 2**32 - 1), shapes, st.sampled_from([8, 6, 4]))
def test_per_tensor_dynamic_uses_one_scale(seed, shape, bits):
    x = activations(seed, shape)
    q = quantize_activation(x, bits, "per_tensor")
    qmax = 2 ** (bits - 1) - 1
    delta = max(np.abs(x).max(), 1e-5) / qmax
    np.testing.assert_allclose(q, np.round(x / delta) * delta, rtol=0, atol=delta * 1e-9)
    # ... which equals static quantization with the absmax of this very tensor
    np.testing.assert_array_equal(q, quantize_activation(x, bits, "per_tensor", static_scale_from_absmax(activation_absmax(x), bits)))


def test_per_token_differs_from_per_tensor():
    x = np.array([[100.0, 1.0], [1.0, 0.3]])
    assert not np.array_equal(quantize_activation(x, 4, "per_token"), quantize_activation(x, 4, "per_tensor"))


def test_static_scale_clamps_out_of_range_values():
    delta = static_scale_from_absmax(1.0, 8)
    assert delta == pytest.approx(1 / 127)
    q = quantize_activation(np.array([[0.5, 3.0, -3.0]]), 8, "per_tensor", static_scale=delta)
    np.testing.assert_allclose(q, [[64 / 127, 1.0, -1.0]])  # clamped to +-qmax * Delta
    assert static_scale_from_absmax(0.0, 8) == pytest.approx(1e-5 / 127)  # the absmax floor


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_streaming_absmax_equals_batch_absmax(seed, n_batches):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(size=(rng.integers(1, 6), 4)) * 10 for _ in range(n_batches)]
    running = None
    for b in batches:
        running = update_activation_absmax(running, b)
    assert running == np.abs(np.concatenate(batches)).max()


def test_input_is_not_modified_and_dtype_is_float64():
    x = np.array([[1.25, -3.0]], dtype=np.float32)
    x0 = x.copy()
    q = quantize_activation(x, 8)
    np.testing.assert_array_equal(x, x0)
    assert q.dtype == np.float64


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=np.array([[1.0, np.nan]]), bits=8), "non-finite"),
    (dict(x=np.array([[1.0, np.inf]]), bits=8), "non-finite"),
    (dict(x=np.zeros((0, 3)), bits=8), "empty"),
    (dict(x=np.ones((2, 2)), bits=8, mode="per_channel"), "mode"),
    (dict(x=np.ones((2, 2)), bits=8, mode="per_token", static_scale=0.1), "per_tensor"),
    (dict(x=np.ones((2, 2)), bits=8, mode="per_tensor", static_scale=0.0), "positive"),
    (dict(x=np.ones((2, 2)), bits=1), "bits"),
    (dict(x=np.ones((2, 2)), bits=9), "bits"),
])
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_activation(**kwargs)


def test_bad_calibration_input_raises():
    with pytest.raises(ValueError, match="non-finite"):
        update_activation_absmax(None, np.array([np.nan]))
    with pytest.raises(ValueError, match="running"):
        update_activation_absmax(-1.0, np.ones(2))
    with pytest.raises(ValueError, match="non-finite"):
        static_scale_from_absmax(float("inf"), 8)

"""Hessian accumulation (refquant.hessian, HessianAccumulator): H = 2/n * sum x x^T with n the
number of *sequences* (the original's running mean over add_batch calls), streaming == one-shot,
and validation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import CALIBRATION_KINDS, fast, make_calibration, seeds

import refquant as rq


def test_hand_case_normalises_by_sequences_not_tokens():
    """2 sequences x 3 tokens of the single feature 1: sum x x^T = 6; H = 2/2 * 6 = 6 (a
    per-token mean would give 2/6 * 6 = 2)."""
    # (the original scales X by sqrt(2 / n) before x x^T, so sqrt(2)^2 rounds: approx, not ==)
    assert rq.hessian(np.ones((2, 3, 1)))[0, 0] == pytest.approx(6.0, rel=1e-15)
    assert rq.hessian(np.ones((3, 1)))[0, 0] == pytest.approx(6.0, rel=1e-15)  # 2-D: one sequence
    assert rq.hessian(np.ones((6, 1, 1)))[0, 0] == pytest.approx(2.0, rel=1e-15)  # 6 sequences


@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 7), seeds)
@fast(60)
def test_3d_input_is_2_over_n_sequences_times_xtx(n, tokens, cols, seed):
    X = np.random.default_rng(seed).standard_normal((n, tokens, cols))
    flat = X.reshape(-1, cols)
    H = rq.hessian(X)
    assert H.dtype == np.float64 and H.shape == (cols, cols)
    np.testing.assert_allclose(H, 2 / n * flat.T @ flat, rtol=1e-12, atol=1e-12)
    assert np.array_equal(H, H.T)


@given(st.integers(1, 9), st.integers(1, 7), seeds)
@fast(40)
def test_2d_input_counts_as_one_sequence(tokens, cols, seed):
    X = np.random.default_rng(seed).standard_normal((tokens, cols))
    np.testing.assert_allclose(rq.hessian(X), 2 * X.T @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(rq.hessian(X), rq.hessian(X[None]))
    acc = rq.HessianAccumulator(cols)
    acc.add_batch(X)
    acc.add_batch(X)
    assert acc.nsamples == 2
    np.testing.assert_allclose(acc.H, 2 * X.T @ X, rtol=1e-12, atol=1e-12)  # mean of two equal ones


@given(st.lists(st.integers(1, 4), min_size=1, max_size=6), st.integers(1, 6), st.integers(1, 8),
       st.sampled_from(CALIBRATION_KINDS), seeds)
@fast(60)
def test_streaming_equals_one_shot(batches, tokens, cols, kind, seed):
    """Feeding the sequences in batches of any sizes gives the one-shot H (to rounding)."""
    n = sum(batches)
    X = make_calibration(kind, cols, seed, n_seq=n)[:, :tokens].astype(np.float64)
    acc = rq.HessianAccumulator(cols)
    start = 0
    for b in batches:
        acc.add_batch(X[start:start + b])
        start += b
    assert acc.nsamples == n
    H = rq.hessian(X)
    np.testing.assert_allclose(acc.H, H, rtol=1e-10, atol=1e-12 * np.abs(H).max())


def test_float16_and_float32_inputs_accumulate_in_float64():
    X = make_calibration("fp16", 5, seed=0, n_seq=2)
    assert X.dtype == np.float16
    H = rq.hessian(X)
    X64 = X.astype(np.float64).reshape(-1, 5)
    assert H.dtype == np.float64 and np.isfinite(H).all()
    np.testing.assert_allclose(H, X64.T @ X64, rtol=1e-12)


def test_dead_input_channel_gives_zero_row_and_column():
    X = np.random.default_rng(0).standard_normal((2, 8, 4))
    X[..., 1] = 0
    H = rq.hessian(X)
    assert (H[1] == 0).all() and (H[:, 1] == 0).all()


@pytest.mark.parametrize(
    "X",
    [
        np.ones((2, 3, 5)),  # 5 features for a 4-feature accumulator
        np.ones((3, 3)),
        np.array([[1.0, np.nan, 0, 0]]),
        np.array([[[1.0, 0, np.inf, 0]]]),
        np.zeros((0, 4)),
        np.zeros((2, 0, 4)),
        np.ones(4),
    ],
)
def test_accumulator_rejects_bad_batches(X):
    acc = rq.HessianAccumulator(4)
    with pytest.raises(ValueError):
        acc.add_batch(X)
    assert acc.nsamples == 0 and (acc.H == 0).all()


@pytest.mark.parametrize("X", [np.ones(3), np.array([[np.nan, 1.0]]), np.zeros((0, 3)), [[1.0, 2.0]]])
def test_hessian_rejects_bad_input(X):
    with pytest.raises(ValueError):
        rq.hessian(X)


@pytest.mark.parametrize("n", [0, -1])
def test_accumulator_needs_positive_in_features(n):
    with pytest.raises(ValueError):
        rq.HessianAccumulator(n)

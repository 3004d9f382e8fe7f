"""The shared binarization primitives (refquant/spec/binarize.py): masked statistics, the XNOR binarizer,
residual binarization, BiLLM's search building blocks; hand-checked cases and properties."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import WEIGHT_KINDS, fast, make_weight, seeds

from refquant.spec import binarize as B
from refquant.spec import formats as F


def test_xnor_hand_checked():
    """Row [0, 0, 4]: mean 4/3, alpha = (4/3 + 4/3 + 8/3) / 3 = 16/9 -> [-4/9, -4/9, 28/9];
    row [1, 3]: mean 2, alpha 1 -> reproduced; a value at the mean keeps the mean (sign(0) = 0)."""
    x = np.array([[0.0, 0.0, 4.0]])
    mean, alpha = B.row_mean_alpha(x)
    assert mean[0] == pytest.approx(4 / 3) and alpha[0] == pytest.approx(16 / 9)
    np.testing.assert_allclose(B.xnor(x, mean, alpha), [[-4 / 9, -4 / 9, 28 / 9]], rtol=1e-15)
    y = np.array([[1.0, 3.0], [2.0, 2.0]])
    m, a = B.row_mean_alpha(y)
    assert np.array_equal(B.xnor(y, m, a), y)
    z = np.array([[-1.0, 0.0, 1.0]])  # the middle value equals the mean 0: sign 0, value 0
    m, a = B.row_mean_alpha(z)
    assert np.array_equal(B.sign0(z - m[:, None]), [[-1, 0, 1]])
    assert np.array_equal(B.xnor(z, m, a), [[-2 / 3, 0.0, 2 / 3]])


def test_masked_statistics_and_empty_rows():
    x = np.array([[1.0, 100.0, 3.0], [5.0, 6.0, 7.0]])
    mask = np.array([[True, False, True], [False, False, False]])
    mean, alpha = B.row_mean_alpha(x, mask)
    assert np.array_equal(mean, [2.0, 0.0]) and np.array_equal(alpha, [1.0, 0.0])
    total, signs, alphas, means = B.residual_binarize(x, mask, 2)
    assert np.array_equal(total, [[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])  # exact after order 1; zero off the mask
    assert np.array_equal(signs[0], [[-1, 0, 1], [0, 0, 0]])
    assert alphas[1][0] == 0.0 and means[1][0] == 0.0


def test_residual_order_two_hand_checked():
    """[0, 1, 2, 7]: mean 2.5, alpha (2.5 + 1.5 + 0.5 + 4.5) / 4 = 2.25 -> [0.25, 0.25, 0.25, 4.75];
    residual [-0.25, 0.75, 1.75, 2.25]: mean 1.125, alpha (1.375 + 0.375 + 0.625 + 1.125) / 4 = 0.875
    -> [0.25, 0.25, 2, 2]; total [0.5, 0.5, 2.25, 6.75]."""
    x = np.array([[0.0, 1.0, 2.0, 7.0]])
    total, signs, alphas, means = B.residual_binarize(x, np.ones_like(x, dtype=bool), 2)
    assert np.array_equal(total, [[0.5, 0.5, 2.25, 6.75]])
    assert (alphas[0][0], means[0][0], alphas[1][0], means[1][0]) == (2.25, 2.5, 0.875, 1.125)
    assert np.array_equal(signs[0], [[-1, -1, -1, 1]]) and np.array_equal(signs[1], [[-1, -1, 1, 1]])


@st.composite
def masked(draw):
    kind = draw(st.sampled_from([k for k in WEIGHT_KINDS if k != "fp16"]))
    x = make_weight(kind, draw(st.integers(1, 6)), draw(st.integers(1, 24)), draw(seeds))
    rng = np.random.default_rng(draw(seeds))
    return x, rng.random(x.shape) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))


@given(masked())
@fast(60)
def test_residual_error_never_increases_with_the_order(problem):
    """Each order adds the L2-optimal alpha for its signs: the masked error never grows."""
    x, mask = problem
    errs = [B.residual_error(x, mask, k) for k in (1, 2, 3, 4)]
    base = np.where(mask, x ** 2, 0.0).sum(axis=1)
    tol = 1e-12 * (base + 1e-300)
    assert np.all(errs[0] <= base + tol)
    for a, b in zip(errs, errs[1:]):
        assert np.all(b <= a + tol)
    total = B.residual_binarize(x, mask, 3)[0]
    assert np.all(total[~mask] == 0) and np.all(np.isfinite(total))


@given(st.integers(1, 6), st.integers(1, 8), seeds)
@fast(60)
def test_binarizer_reproduces_a_mean_plus_minus_alpha_matrix_exactly(rows, half, seed):
    """Rows of equally many ``m + a`` and ``m - a`` (dyadic values, exact sums) come back exactly,
    with or without a mask around them, and through the minimal format."""
    rng = np.random.default_rng(seed)
    m = rng.integers(-64, 65, size=rows) / 8.0
    a = rng.integers(0, 33, size=rows) / 16.0
    s = np.concatenate([np.ones((rows, half)), -np.ones((rows, half))], axis=1)
    s = np.take_along_axis(s, rng.permuted(np.tile(np.arange(2 * half), (rows, 1)), axis=1), axis=1)
    x = m[:, None] + a[:, None] * s
    mean, alpha = B.row_mean_alpha(x)
    assert np.array_equal(B.xnor(x, mean, alpha), x)
    assert np.array_equal(B.residual_binarize(x, np.ones_like(x, dtype=bool), 1)[0], x)
    assert np.array_equal(F.binarize_rows(x).dequantize(), x)
    wide = np.concatenate([x, rng.standard_normal((rows, 3))], axis=1)
    mask = np.zeros(wide.shape, dtype=bool)
    mask[:, :2 * half] = True
    assert np.array_equal(B.residual_binarize(wide, mask, 1)[0][:, :2 * half], x)


def test_binarize_rows_still_the_minimal_format():
    """formats.binarize_rows forwards to the shared statistics, unchanged (sign(0) = +1 there)."""
    W = make_weight("normal", 5, 9, seed=3)
    bw = F.binarize_rows(W)
    mean = W.mean(axis=1)
    assert np.array_equal(bw.mean, mean)
    assert np.array_equal(bw.alpha, np.abs(W - mean[:, None]).mean(axis=1))
    assert np.array_equal(bw.signs, W - mean[:, None] >= 0)


def test_split_levels_are_torch_linspace_float32():
    levels = B.split_levels()
    assert levels.shape == (81,) and levels[0] == np.float32(0.1) and levels[-1] == np.float32(0.9)
    torch = pytest.importorskip("torch")
    assert np.array_equal(levels, torch.linspace(0.10, 0.90, 81).numpy().astype(np.float64))


def test_column_ranking_ties_lower_index_first_and_candidates():
    T = np.array([[0.5, -2.0, 2.0, 0.5], [1.0, 0.0, 0.0, 0.5]])  # column sums 1.5, 2, 2, 1
    assert list(B.column_ranking(T)) == [1, 2, 0, 3]
    assert B.salient_candidates(128) == list(range(1, 50))
    assert B.salient_candidates(50) == list(range(1, 50))
    assert B.salient_candidates(20) == list(range(1, 20))
    assert B.salient_candidates(1) == [1]


@given(st.integers(2, 6), st.integers(2, 30), seeds)
@fast(30)
def test_search_objectives_match_a_direct_evaluation(rows, cols, seed):
    """The batched objectives equal the objective evaluated candidate by candidate from the masks."""
    T = make_weight("normal", rows, cols, seed)
    ranking = B.column_ranking(T)
    ks = B.salient_candidates(cols)
    errs = B.salient_column_errors(T, ranking, ks)
    for k, e in zip(ks, errs):
        M = np.zeros(T.shape, dtype=bool)
        M[:, ranking[:k]] = True
        approx = B.residual_binarize(T, M, 2)[0] + B.residual_binarize(T, ~M, 2)[0]
        assert e == pytest.approx(np.mean((T - approx) ** 2), rel=1e-12, abs=1e-300)
    M = np.zeros(T.shape, dtype=bool)
    M[:, ranking[:1]] = True
    ps = B.split_thresholds(T, M)
    assert np.all(np.diff(ps) >= 0)
    serr = B.split_errors(T, M, ps)
    i = B.first_argmin(serr)
    assert serr[i] == serr.min() and np.all(serr[:i] > serr[i])

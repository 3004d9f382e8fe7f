"""Round-to-nearest (refquant.rtn): properties over generated (and deliberately nasty) weights,
the group layout, idempotence where it really holds, and the bits-per-weight accounting."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import WEIGHT_KINDS, fast, make_weight, quant_specs, rtn_problems, seeds, weights

import refquant as rq
from refquant.spec.quantizer import find_params, group_slices, quantize

ALL_RULES = ("gptq", "awq", "absmax")


def per_column(a, qw):
    """Expand a (rows, n_groups) parameter to (rows, in_features) through g_idx."""
    return a[:, qw.g_idx]


# ---------------------------------------------------------------------------------------------
# Basic invariants
# ---------------------------------------------------------------------------------------------


@given(rtn_problems(rules=ALL_RULES))
@fast(250)
def test_codes_are_integers_in_range_and_shapes_are_right(problem):
    W, spec = problem
    qw = rq.rtn(W, spec)
    rows, cols = W.shape
    n_groups = 1 if spec.group_size is None else -(-cols // spec.group_size)
    assert qw.codes.dtype.kind in "ui"
    assert qw.codes.shape == (rows, cols)
    assert qw.scale.shape == qw.zero.shape == (rows, n_groups)
    assert qw.codes.min() >= 0 and qw.codes.max() <= spec.maxq
    assert qw.g_idx.tolist() == [j // spec.group_size if spec.group_size else 0 for j in range(cols)]
    W_hat = qw.dequantize()
    assert W_hat.dtype == np.float64 and W_hat.shape == (rows, cols)
    assert np.isfinite(W_hat).all() and np.isfinite(qw.scale).all() and (qw.scale > 0).all()


@given(rtn_problems(rules=ALL_RULES))
@fast(300)
def test_error_is_at_most_half_a_step_inside_the_grid_range(problem):
    """|w - Q(w)| <= scale/2 for every w in [scale * (0 - zero), scale * (maxq - zero)]; weights
    outside that range (clipped ones) are only checked to land on the nearest end."""
    W, spec = problem
    W = W.astype(np.float64)
    qw = rq.rtn(W, spec)
    s, z = per_column(qw.scale, qw), per_column(qw.zero, qw)
    lo, hi = s * (0 - z), s * (spec.maxq - z)
    err = np.abs(W - qw.dequantize())
    tol = 1e-9 * s + 1e-12 * np.abs(W)
    inside = (W >= lo) & (W <= hi)
    assert (err[inside] <= s[inside] / 2 + tol[inside]).all()
    W_hat = qw.dequantize()
    assert np.allclose(W_hat[W < lo], lo[W < lo], rtol=1e-12, atol=0)
    assert np.allclose(W_hat[W > hi], hi[W > hi], rtol=1e-12, atol=0)


@given(rtn_problems(rules=ALL_RULES))
@fast(200)
def test_dequantized_values_lie_on_the_grid(problem):
    """W_hat = scale * (codes - zero) and re-quantizing W_hat with the same scale/zero gives the
    same codes (Q is idempotent for fixed parameters)."""
    W, spec = problem
    qw = rq.rtn(W, spec)
    s, z = per_column(qw.scale, qw), per_column(qw.zero, qw)
    W_hat = qw.dequantize()
    assert np.array_equal(W_hat, s * (qw.codes.astype(np.float64) - z))
    assert np.array_equal(quantize(W_hat, s, z, spec.maxq), qw.codes.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# Idempotence of rtn itself (parameters recomputed from W_hat)
# ---------------------------------------------------------------------------------------------


def _stored_pairs(qw):
    """(rows, columns, row index, group) of every stored (row, group) parameter pair -- the whole
    matrix once for per-tensor."""
    rows, cols = qw.shape
    if qw.spec.per_tensor:
        return [(slice(None), slice(None), 0, 0)]
    return [(r, sl, r, g) for r in range(rows) for g, sl in enumerate(group_slices(cols, qw.spec.group_size))]


def _range_is_reproduced(qw, codes, zero):
    """Is the grid range [scale * -zero, scale * (maxq - zero)] also the range the quantizer sees
    in W_hat? Then recomputed parameters equal the first ones (scale to rounding, zero exactly)."""
    maxq = qw.spec.maxq
    low_end = codes.min() == 0
    high_end = codes.max() == maxq
    if qw.spec.rule == "gptq":  # the range is forced to contain 0, which is on the grid
        low_end |= zero == 0
        high_end |= zero == maxq
    return bool(low_end and high_end)


@given(rtn_problems(rules=("gptq", "awq", "absmax"), allow_mse=False, allow_sym=False))
@fast(300)
def test_rtn_is_idempotent_when_the_grid_range_is_reproduced(problem):
    """rtn(rtn(W).dequantize()) == rtn(W) -- same codes and zero points, scales equal to rounding
    -- for every (row, group) whose first-pass codes reach both ends of the range the quantizer
    will see again: code 0 (or, for the GPTQ rule's range-contains-0, zero == 0) and code maxq
    (or zero == maxq). For the absmax rule that is always the case. It is NOT true in general:
    a rounding tie at the max can leave the top code unused (then the new range is smaller), the
    MSE search shrinks again, and the symmetric grid never reproduces its range (see the
    counterexample test below)."""
    W, spec = problem
    qw = rq.rtn(W, spec)
    qw2 = rq.rtn(qw.dequantize(), spec)
    W_hat, W_hat2 = qw.dequantize(), qw2.dequantize()
    for rs, cs, r, g in _stored_pairs(qw):
        if spec.rule != "absmax" and not _range_is_reproduced(qw, qw.codes[rs, cs], qw.zero[r, g]):
            continue
        assert np.array_equal(qw2.codes[rs, cs], qw.codes[rs, cs])
        assert qw2.zero[r, g] == qw.zero[r, g]
        assert qw2.scale[r, g] == pytest.approx(qw.scale[r, g], rel=1e-12)
        np.testing.assert_allclose(W_hat2[rs, cs], W_hat[rs, cs], rtol=1e-12, atol=0)


def test_rtn_is_idempotent_on_generic_asymmetric_data():
    """On Gaussian data the condition above holds for every (row, group), so the whole result
    is reproduced (this keeps the conditional property from being vacuous)."""
    W = make_weight("normal", 16, 256, seed=7)
    for gs in (None, 32, 100):
        spec = rq.QuantSpec(bits=4, group_size=gs)
        qw = rq.rtn(W, spec)
        qw2 = rq.rtn(qw.dequantize(), spec)
        assert np.array_equal(qw2.codes, qw.codes)
        assert np.array_equal(qw2.zero, qw.zero)
        np.testing.assert_allclose(qw2.dequantize(), qw.dequantize(), rtol=1e-12, atol=0)


def test_rtn_is_not_idempotent_on_the_symmetric_grid():
    """The symmetric grid [-8, 7] * 2 absmax / 15 does not reproduce its own range: [-7.5, 7.5]
    -> [-8, 7] (absmax grows to 8) -> scale 16/15 -> [-8.53, 7.47]."""
    spec = rq.QuantSpec(bits=4, sym=True)
    W_hat = rq.rtn(np.array([[-7.5, 7.5]]), spec).dequantize()
    assert W_hat.tolist() == [[-8.0, 7.0]]
    W_hat2 = rq.rtn(W_hat, spec).dequantize()
    assert W_hat2 == pytest.approx(np.array([[-8 * 16 / 15, 7 * 16 / 15]]), rel=1e-14)


def test_rtn_is_not_idempotent_when_a_tie_leaves_the_top_code_unused():
    """Asymmetric 4 bits, row [-0.5, 2.5]: scale = 3/15 = 0.2, zero = round(2.5) = 2 (tie to
    even), and 2.5 / 0.2 = 12.5 -> 12 -> code 14, not 15; the second pass sees max 2.4."""
    spec = rq.QuantSpec(bits=4)
    qw = rq.rtn(np.array([[-0.5, 2.5]]), spec)
    assert qw.codes.tolist() == [[0, 14]] and qw.zero.tolist() == [[2.0]]
    qw2 = rq.rtn(qw.dequantize(), spec)
    assert not np.allclose(qw2.scale, qw.scale)


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------


@given(st.data())
@fast(150)
def test_groups_are_independent(data):
    """Changing the values of one group changes no other group's codes, scale or zero (and with
    per-row parameters, no other row of the same group either)."""
    spec = data.draw(quant_specs(rules=ALL_RULES, group_sizes=st.integers(1, 16), allow_per_tensor=False))
    W = data.draw(weights(max_cols=48, group_size=spec.group_size)).astype(np.float64)
    slices = group_slices(W.shape[1], spec.group_size)
    g = data.draw(st.integers(0, len(slices) - 1))
    r = data.draw(st.integers(0, W.shape[0] - 1))
    W2 = W.copy()
    rng = np.random.default_rng(data.draw(seeds))
    W2[r, slices[g]] = rng.standard_normal(W2[r, slices[g]].shape) * 10.0 ** rng.uniform(-3, 3)
    a, b = rq.rtn(W, spec), rq.rtn(W2, spec)
    other_cols = np.ones(W.shape[1], bool)
    other_cols[slices[g]] = False
    other_groups = np.arange(len(slices)) != g
    other_rows = np.arange(W.shape[0]) != r
    assert np.array_equal(a.codes[:, other_cols], b.codes[:, other_cols])
    assert np.array_equal(a.scale[:, other_groups], b.scale[:, other_groups])
    assert np.array_equal(a.zero[:, other_groups], b.zero[:, other_groups])
    assert np.array_equal(a.codes[other_rows], b.codes[other_rows])
    assert np.array_equal(a.scale[other_rows], b.scale[other_rows])


@given(rtn_problems(rules=ALL_RULES, group_sizes=st.integers(1, 40), allow_per_tensor=False))
@fast(150)
def test_each_group_is_per_channel_rtn_of_its_slice(problem):
    """Group g (including a last, partial group when group_size does not divide in_features) is
    exactly per-channel RTN of the column slice W[:, g*gs : min((g+1)*gs, in_features)]."""
    W, spec = problem
    qw = rq.rtn(W, spec)
    per_channel = rq.QuantSpec(bits=spec.bits, sym=spec.sym, mse=spec.mse, rule=spec.rule)
    slices = group_slices(W.shape[1], spec.group_size)
    assert qw.n_groups == len(slices) == -(-W.shape[1] // spec.group_size)
    for g, sl in enumerate(slices):
        ref = rq.rtn(W[:, sl], per_channel)
        assert np.array_equal(qw.codes[:, sl], ref.codes)
        assert np.array_equal(qw.scale[:, g], ref.scale[:, 0])
        assert np.array_equal(qw.zero[:, g], ref.zero[:, 0])


def test_last_partial_group_hand_case():
    """[1, 2, 3 | 4, 5, -6 | 7] with group_size 3, 4-bit asym: the last group is the single
    column [7] (scale 7/15, zero 0), not padded, merged or dropped."""
    W = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, -6.0, 7.0]])
    qw = rq.rtn(W, rq.QuantSpec(bits=4, group_size=3))
    assert qw.n_groups == 3
    assert qw.g_idx.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert qw.scale[0].tolist() == pytest.approx([3 / 15, 11 / 15, 7 / 15], rel=1e-15)
    assert qw.zero[0].tolist() == [0.0, 8.0, 0.0]  # round(6 / (11/15)) = round(8.18) = 8
    assert qw.dequantize()[0, 6] == pytest.approx(7.0, rel=1e-14)


@given(rtn_problems(rules=ALL_RULES, group_sizes=st.none(), allow_per_tensor=True))
@fast(80)
def test_per_tensor_uses_one_pair_for_the_whole_matrix(problem):
    W, spec = problem
    qw = rq.rtn(W, spec)
    if not spec.per_tensor:
        assert np.array_equal(qw.scale[:, 0], find_params(W.astype(np.float64), spec)[0])
        return
    s, z = find_params(W.astype(np.float64).reshape(1, -1), rq.QuantSpec(
        bits=spec.bits, sym=spec.sym, mse=spec.mse, rule=spec.rule))
    assert (qw.scale == s[0]).all() and (qw.zero == z[0]).all()


# ---------------------------------------------------------------------------------------------
# Dtypes, validation, nasty inputs
# ---------------------------------------------------------------------------------------------


@given(rtn_problems(rules=ALL_RULES, kinds=("normal", "dynamic_range", "outlier_channel", "ties")))
@fast(60)
def test_computes_in_float64_whatever_the_input_dtype(problem):
    W, spec = problem
    for dtype in (np.float16, np.float32):
        Wd = W.astype(dtype)
        if not np.isfinite(Wd).all():
            continue
        a, b = rq.rtn(Wd, spec), rq.rtn(Wd.astype(np.float64), spec)
        assert a.scale.dtype == np.float64
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scale, b.scale)


@pytest.mark.parametrize(
    "W",
    [
        np.array([[1.0, np.nan]]),
        np.array([[np.inf, 1.0]]),
        np.array([[1.0, -np.inf]], dtype=np.float16),
        np.zeros((0, 4)),
        np.zeros((4, 0)),
        np.ones(4),
        np.ones((2, 2, 2)),
        [[1.0, 2.0]],
    ],
)
def test_bad_weights_raise_value_error(W):
    with pytest.raises(ValueError):
        rq.rtn(W, rq.QuantSpec(bits=4))


def test_spec_must_be_a_quantspec():
    with pytest.raises(ValueError):
        rq.rtn(np.ones((2, 2)), {"bits": 4})


@given(rtn_problems(kinds=WEIGHT_KINDS, rules=ALL_RULES, max_rows=6, max_cols=64))
@fast(300)
def test_nasty_weights_give_finite_results(problem):
    """Every nasty kind (all-zero rows/groups, 1e-6..1e4 dynamic range, a 100x outlier channel,
    fp16-magnitude float16 input, ties, one-signed and constant rows) gives finite, in-range output
    (RuntimeWarnings from refquant are errors in this suite)."""
    W, spec = problem
    qw = rq.rtn(W, spec)
    W_hat = qw.dequantize()
    assert np.isfinite(W_hat).all()
    assert np.isfinite(qw.scale).all() and (qw.scale > 0).all()
    # 0 is always on the grid (zero is an integer code): zero weights stay exactly zero
    assert (W_hat[W == 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# Storage accounting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape, expected",
    [
        (dict(bits=4, group_size=128), (8, 256), 4 + 32 / 128),  # 4.25
        (dict(bits=4, group_size=128, sym=True), (8, 256), 4 + 16 / 128),  # 4.125: constant zero
        (dict(bits=3, group_size=128), (8, 256), 3.25),
        (dict(bits=4), (8, 256), 4 + 32 / 256),  # per channel: one pair per row
        (dict(bits=4, sym=True), (8, 256), 4 + 16 / 256),
        (dict(bits=4, per_tensor=True), (8, 256), 4 + 32 / (8 * 256)),  # one pair in all
        (dict(bits=8, per_tensor=True, sym=True), (8, 256), 8 + 16 / (8 * 256)),
        (dict(bits=4, group_size=128), (8, 200), 4 + 8 * 2 * 32 / (8 * 200)),  # partial group
        (dict(bits=4, group_size=128, rule="awq"), (8, 256), 4.25),
        (dict(bits=8, rule="absmax"), (8, 256), 8 + 16 / 256),  # zero = qmax is a constant
    ],
)
def test_storage_bits_per_weight(kwargs, shape, expected):
    W = make_weight("normal", *shape, seed=0)
    qw = rq.rtn(W, rq.QuantSpec(**kwargs))
    assert qw.storage_bits_per_weight == pytest.approx(expected, rel=1e-15)
    assert qw.storage_bits == round(expected * shape[0] * shape[1])
    assert qw.bits_per_weight == kwargs["bits"]  # the papers' convention: the code width
    assert qw.bits == kwargs["bits"]


def test_storage_bits_with_narrow_zero_points():
    qw = rq.rtn(make_weight("normal", 4, 256, seed=0), rq.QuantSpec(bits=4, group_size=128))
    assert qw.storage_bits_with(scale_bits=16, zero_bits=4) == pytest.approx(4 + 20 / 128)
    assert qw.storage_bits_with(scale_bits=32, zero_bits=32) == pytest.approx(4.5)


# ---------------------------------------------------------------------------------------------
# Heavier variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@given(rtn_problems(kinds=WEIGHT_KINDS, rules=ALL_RULES, max_rows=64, max_cols=512))
@fast(1000)
def test_slow_nasty_weights_larger(problem):
    test_nasty_weights_give_finite_results.hypothesis.inner_test(problem)
    test_error_is_at_most_half_a_step_inside_the_grid_range.hypothesis.inner_test(problem)

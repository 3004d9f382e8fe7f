"""The shared uniform quantizer (refquant.quantizer): faithfulness to IST-DASLab/gptq quant.py on
hand-computed cases, the AWQ and absmax range rules, the MSE shrink search, and QuantSpec
validation.

Hand cases are chosen so that the arithmetic is exact in float64 and so that each one fails on a
plausible wrong quantizer (textbook [-7, 7] symmetric grid, round-half-away-from-zero, an
integer/clamped zero point, no forced 0 in the range, an expanding MSE search, ...).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import WEIGHT_KINDS, fast, quant_specs, rtn_problems, weights

import refquant as rq
from refquant.spec.quantizer import dequantize, fake_quantize, find_params, group_index, group_slices, quantize


def fq(x, spec):
    """Fake-quantize the rows of x with their own parameters; returns (W_hat, codes, scale, zero)."""
    x = np.asarray(x, dtype=np.float64)
    scale, zero = find_params(x, spec)
    codes = quantize(x, scale[:, None], zero[:, None], spec.maxq)
    return dequantize(codes, scale[:, None], zero[:, None]), codes, scale, zero


# ---------------------------------------------------------------------------------------------
# GPTQ rule, hand-computed
# ---------------------------------------------------------------------------------------------


def test_sym_4bit_grid_is_minus8_to_plus7_times_2absmax_over_15():
    """absmax 7.5 gives scale = 2 * 7.5 / 15 = 1 exactly; the grid is [-8, 7] * scale, so +absmax
    is clipped to +7 and -absmax (-7.5, a tie) rounds half-to-even to -8. Ties 0.5 -> 0, 1.5 -> 2,
    2.5 -> 2 (round half to even, as torch.round)."""
    spec = rq.QuantSpec(bits=4, sym=True)
    x = [[-7.5, 7.5, 3.2, 0.5, -0.5, 1.5, 2.5, -2.5]]
    W_hat, codes, scale, zero = fq(x, spec)
    assert scale.tolist() == [1.0]
    assert zero.tolist() == [8.0]
    assert codes.tolist() == [[0, 15, 11, 8, 8, 10, 10, 6]]
    assert W_hat.tolist() == [[-8.0, 7.0, 3.0, 0.0, 0.0, 2.0, 2.0, -2.0]]


def test_sym_positive_absmax_is_clipped_to_7_of_7_5():
    """+absmax lands on 7 * scale = (7 / 7.5) * absmax, not on absmax ([-7, 7] grid) -- for any
    absmax attained by a positive entry."""
    spec = rq.QuantSpec(bits=4, sym=True)
    for a in (0.3, 1.0, 2.7, 1234.5):
        W_hat, codes, scale, zero = fq([[-a / 3, a]], spec)
        assert scale[0] == pytest.approx(2 * a / 15, rel=1e-15)
        assert codes[0, 1] == 15
        assert W_hat[0, 1] == pytest.approx(7 / 7.5 * a, rel=1e-14)


def test_sym_one_signed_rows_keep_xmin_zero():
    """The original only mirrors xmin where xmin < 0: a row with no negative entry keeps the range
    [0, xmax], so scale = xmax / 15 and everything above 7 * scale is clipped (a quirk of the
    original, reproduced)."""
    spec = rq.QuantSpec(bits=4, sym=True)
    W_hat, codes, scale, zero = fq([[0.0, 1.0, 2.0, 3.0]], spec)
    assert scale.tolist() == pytest.approx([0.2])
    assert zero.tolist() == [8.0]
    assert codes.tolist() == [[8, 13, 15, 15]]
    assert W_hat[0].tolist() == pytest.approx([0.0, 1.0, 1.4, 1.4])
    # all-negative row: mirrored, grid [-8, 7] * 2 * 3 / 15
    W_hat, codes, scale, zero = fq([[-3.0, -1.0]], spec)
    assert scale.tolist() == pytest.approx([0.4])
    assert codes.tolist() == [[0, 6]]  # -3 / 0.4 = -7.5 -> -8 (tie to even); -2.5 -> -2


def test_sym_zero_point_is_half_of_maxq_plus_one():
    for bits in range(1, 9):
        spec = rq.QuantSpec(bits=bits, sym=True)
        _, _, _, zero = fq([[-1.0, 2.0]], spec)
        assert zero.tolist() == [(2**bits) / 2]


def test_asym_zero_is_rounded_and_kept_float():
    """x = [-1, 3.5]: scale = 4.5 / 15 = 0.3, zero = round(1 / 0.3) = round(3.33) = 3 (a float);
    the grid shifts: -1 -> -0.9 and 3.5 -> 12 * 0.3 = 3.6 (above the max)."""
    spec = rq.QuantSpec(bits=4)
    W_hat, codes, scale, zero = fq([[-1.0, 3.5, 0.0, 1.0]], spec)
    assert scale.tolist() == pytest.approx([0.3], rel=1e-15)
    assert zero.dtype.kind == "f" and zero.tolist() == [3.0]
    assert codes.tolist() == [[0, 15, 3, 6]]
    assert W_hat[0].tolist() == pytest.approx([-0.9, 3.6, 0.0, 0.9], rel=1e-14)


def test_asym_range_is_forced_to_contain_zero():
    spec = rq.QuantSpec(bits=4)
    # all positive: xmin = 0, zero = 0, scale = max / 15
    _, codes, scale, zero = fq([[1.5, 3.0]], spec)
    assert scale.tolist() == pytest.approx([0.2]) and zero.tolist() == [0.0]
    assert codes.tolist() == [[8, 15]]  # 1.5 / 0.2 = 7.5 -> 8 (tie to even)
    # all negative: xmax = 0, zero = maxq
    _, codes, scale, zero = fq([[-3.0, -1.5]], spec)
    assert scale.tolist() == pytest.approx([0.2]) and zero.tolist() == [15.0]
    assert codes.tolist() == [[0, 7]]  # -7.5 -> -8 (tie to even) + 15


def test_all_zero_row_uses_minus1_plus1():
    """An all-zero row gets the range [-1, 1]: scale = 2 / maxq; asym zero = round(maxq / 2)
    (7.5 -> 8 at 4 bits), sym zero = (maxq + 1) / 2. Codes equal the zero, values are 0."""
    for sym in (False, True):
        for bits in (2, 3, 4, 8):
            spec = rq.QuantSpec(bits=bits, sym=sym)
            W_hat, codes, scale, zero = fq(np.zeros((2, 5)), spec)
            maxq = 2**bits - 1
            assert scale == pytest.approx(np.full(2, 2 / maxq), rel=1e-15)
            assert zero.tolist() == [float(np.round(maxq / 2)) if not sym else (maxq + 1) / 2] * 2
            assert (codes == zero[:, None]).all() and (W_hat == 0).all()


def test_per_tensor_is_one_pair_over_the_whole_matrix():
    spec = rq.QuantSpec(bits=3, per_tensor=True)
    x = np.array([[0.5, 1.0], [-2.0, 0.25], [0.0, 5.0]])
    scale, zero = find_params(x, spec)
    assert scale.tolist() == [7.0 / 7] * 3
    assert zero.tolist() == [2.0] * 3


@given(rtn_problems(kinds=WEIGHT_KINDS, rules=("gptq",), allow_mse=False, group_sizes=st.none()))
@fast(300)
def test_range_contains_zero_and_covers_the_row(problem):
    """For the GPTQ rule without MSE: the zero point is an integer in [0, maxq] (so 0 is exactly
    on the grid), the scale is positive and finite, and the grid [scale * (0 - zero),
    scale * (maxq - zero)] covers [min(x, 0), max(x, 0)] to within scale / 2 -- except the
    symmetric grid on a row with no negative entry (xmin stays 0, see the hand case above)."""
    W, spec = problem
    x = W.astype(np.float64)
    flat = x.reshape(1, -1) if spec.per_tensor else x
    scale, zero = find_params(x, spec)
    assert np.isfinite(scale).all() and (scale > 0).all()
    assert (zero == np.round(zero)).all() and (zero >= 0).all() and (zero <= spec.maxq).all()
    assert (fake_quantize(np.zeros_like(x), scale[:, None], zero[:, None], spec.maxq) == 0).all()
    lo = scale * (0 - zero)
    hi = scale * (spec.maxq - zero)
    if spec.per_tensor:
        lo, hi, scale = lo[:1], hi[:1], scale[:1]
    xmin = np.minimum(flat.min(axis=1), 0)
    xmax = np.maximum(flat.max(axis=1), 0)
    tol = scale * (0.5 + 1e-9)
    assert (lo <= xmin + tol).all()
    covered = ~np.asarray(spec.sym & (xmin == 0) & (xmax > 0))
    assert (hi[covered] >= xmax[covered] - tol[covered]).all()


# ---------------------------------------------------------------------------------------------
# MSE shrink search
# ---------------------------------------------------------------------------------------------


def _oracle_mse_params(row, bits, sym, norm=2.4, grid=100, maxshrink=0.8):
    """Independent scalar re-statement of the original's MSE range search for one row."""
    maxq = 2**bits - 1
    xmin, xmax = min(min(row), 0.0), max(max(row), 0.0)
    if sym:
        xmax = max(abs(xmin), xmax)
        if xmin < 0:
            xmin = -xmax
    if xmin == 0 and xmax == 0:
        xmin, xmax = -1.0, 1.0
    scale = (xmax - xmin) / maxq
    zero = (maxq + 1) / 2 if sym else float(round(-xmin / scale))
    best = math.inf
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s = (p * xmax - p * xmin) / maxq
        z = (maxq + 1) / 2 if sym else float(round(-(p * xmin) / s))
        err = 0.0
        for v in row:
            q = min(max(round(v / s) + z, 0), maxq)
            err += abs(s * (q - z) - v) ** norm
        if err < best:
            best, scale, zero = err, s, z
    return scale, zero, best


def _err(x, scale, zero, maxq, norm=2.4):
    return (np.abs(fake_quantize(x, scale[:, None], zero[:, None], maxq) - x) ** norm).sum(axis=1)


@given(st.data())
@fast(100)
def test_mse_search_matches_scalar_oracle(data):
    """find_params(mse=True) picks, per row, the candidate p = 1 - i/100, i < 80, with the
    smallest sum |Q(x) - x|^2.4 (first one wins ties), as the original does."""
    bits = data.draw(st.integers(2, 8))
    sym = data.draw(st.booleans())
    x = data.draw(weights(kinds=("normal", "outlier_channel", "ties", "nonneg", "dynamic_range"),
                          max_rows=3, max_cols=24)).astype(np.float64)
    spec = rq.QuantSpec(bits=bits, sym=sym, mse=True)
    scale, zero = find_params(x, spec)
    for r in range(x.shape[0]):
        s, z, best = _oracle_mse_params(x[r].tolist(), bits, sym)
        assert scale[r] == pytest.approx(s, rel=1e-12)
        assert zero[r] == z


def test_mse_search_tries_exactly_int_maxshrink_times_grid_candidates():
    """grid=4, maxshrink=0.5 tries p in {1, 0.75} only. Row [0.4, 0.4, 0.4, 1] at 1 bit (levels
    0 and p): the error falls from p=1 to p=0.75 to p=0.5, so the search must stop at 0.75."""
    x = np.array([[0.4, 0.4, 0.4, 1.0]])
    spec = rq.QuantSpec(bits=1, mse=True, grid=4, maxshrink=0.5)
    scale, zero = find_params(x, spec)

    def err(p):
        return sum(abs(v - p * min(max(round(v / p), 0), 1)) ** 2.4 for v in x[0])

    assert err(0.5) < err(0.75) < err(1.0)
    assert scale.tolist() == [0.75] and zero.tolist() == [0.0]


@given(rtn_problems(rules=("gptq",), allow_mse=False, allow_per_tensor=True, group_sizes=st.none()))
@fast(200)
def test_mse_search_only_shrinks_and_never_worsens(problem):
    """Against plain min/max: the MSE range is p * [xmin, xmax] with p <= 1 (scale never grows),
    the symmetric zero is unchanged, and the norm-2.4 error is never larger."""
    W, spec = problem
    x = W.astype(np.float64)
    mse_spec = rq.QuantSpec(bits=spec.bits, sym=spec.sym, per_tensor=spec.per_tensor, mse=True)
    s0, z0 = find_params(x, spec)
    s1, z1 = find_params(x, mse_spec)
    assert (s1 <= s0).all()
    if spec.sym:
        assert (z1 == z0).all()
    flat = x.reshape(1, -1) if spec.per_tensor else x
    k = 1 if spec.per_tensor else x.shape[0]
    e0 = _err(flat, s0[:k], z0[:k], spec.maxq)
    e1 = _err(flat, s1[:k], z1[:k], spec.maxq)
    assert (e1 <= e0).all()


def test_mse_search_keeps_the_first_candidate_on_ties():
    """An all-zero row has error 0 for every candidate: the strict '<' keeps p = 1, i.e. the
    [-1, 1] fallback range (a '<=' search would end at p = 0.21)."""
    for sym in (False, True):
        scale, zero = find_params(np.zeros((2, 6)), rq.QuantSpec(bits=4, sym=sym, mse=True))
        assert scale.tolist() == pytest.approx([2 / 15] * 2, rel=1e-15)
        assert zero.tolist() == [8.0, 8.0]


def test_mse_search_shrinks_when_it_helps():
    """Four values near 0.2 and a lone max 1 at 2 bits: min/max puts the cluster between the
    levels 0 and 1/3; shrinking (strictly) lowers the norm-2.4 error."""
    x = np.array([[0.21, 0.22, 0.2, 0.23, 1.0]])
    s0, z0 = find_params(x, rq.QuantSpec(bits=2))
    s1, z1 = find_params(x, rq.QuantSpec(bits=2, mse=True))
    assert s1[0] < s0[0]
    assert _err(x, s1, z1, 3)[0] < _err(x, s0, z0, 3)[0]


# ---------------------------------------------------------------------------------------------
# Other range rules
# ---------------------------------------------------------------------------------------------


def test_awq_rule_uses_raw_min_max_and_clamps_the_zero():
    """llm-awq: x = [0.5, 1, 2] at 4 bits: scale = (2 - 0.5) / 15 = 0.1, zero = -round(5) = -5
    clamped to 0; 2.0 -> code 20 -> clamped 15 -> 1.5 (the range does not contain 0)."""
    spec = rq.QuantSpec(bits=4, rule="awq")
    W_hat, codes, scale, zero = fq([[0.5, 1.0, 2.0]], spec)
    assert scale.tolist() == pytest.approx([0.1], rel=1e-15)
    assert zero.tolist() == [0.0]
    assert codes.tolist() == [[5, 10, 15]]
    assert W_hat[0].tolist() == pytest.approx([0.5, 1.0, 1.5], rel=1e-14)
    # mixed signs: x = [-1, 2.75]: scale = 3.75 / 15 = 0.25, zero = -round(-4) = 4; ties to even
    W_hat, codes, scale, zero = fq([[-1.0, 2.75, 0.375, 0.625]], spec)
    assert scale.tolist() == [0.25] and zero.tolist() == [4.0]
    assert codes.tolist() == [[0, 15, 6, 6]]  # 1.5 -> 2 and 2.5 -> 2


def test_awq_rule_floors_the_range_at_1e_5():
    spec = rq.QuantSpec(bits=4, rule="awq")
    W_hat, codes, scale, zero = fq([[0.0, 0.0], [2.0, 2.0]], spec)
    assert scale.tolist() == pytest.approx([1e-5 / 15, 1e-5 / 15])
    # constant row 2.0: zero = -round(2 / (1e-5/15)) clamps to 0; 2.0 saturates at code 15
    assert zero.tolist() == [0.0, 0.0]
    assert codes.tolist() == [[0, 0], [15, 15]]


def test_absmax_rule_is_smoothquant_round_w_over_scale():
    """SmoothQuant: scale = absmax / qmax, W_hat = round(W / scale) * scale; at 4 bits qmax = 7,
    so x = [-1, 0.5, 0.25] -> [-7, 3.5 -> 4, 1.75 -> 2] / 7; codes are shifted by zero = qmax."""
    spec = rq.QuantSpec(bits=4, rule="absmax")
    assert spec.maxq == 14
    W_hat, codes, scale, zero = fq([[-1.0, 0.5, 0.25]], spec)
    assert scale.tolist() == pytest.approx([1 / 7], rel=1e-15)
    assert zero.tolist() == [7.0]
    assert codes.tolist() == [[0, 11, 9]]
    assert W_hat[0].tolist() == pytest.approx([-1.0, 4 / 7, 2 / 7], rel=1e-14)
    # +absmax maps exactly (symmetric grid [-7, 7]); all-zero row uses the 1e-5 floor
    W_hat, codes, scale, zero = fq([[0.0, 3.0], [0.0, 0.0]], spec)
    assert W_hat[0, 1] == pytest.approx(3.0, rel=1e-14) and codes[0, 1] == 14
    assert scale[1] == pytest.approx(1e-5 / 7)


@given(rtn_problems(rules=("awq", "absmax"), allow_per_tensor=True))
@fast(150)
def test_other_rules_give_integer_codes_and_finite_params(problem):
    W, spec = problem
    qw = rq.rtn(W, spec)
    assert np.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert (qw.zero == np.round(qw.zero)).all() and (qw.zero >= 0).all() and (qw.zero <= spec.maxq).all()
    assert np.isfinite(qw.dequantize()).all()


# ---------------------------------------------------------------------------------------------
# Groups helpers
# ---------------------------------------------------------------------------------------------


def test_group_layout_last_group_is_partial():
    assert group_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert group_slices(5, None) == [slice(0, 5)]
    assert group_index(3, None).tolist() == [0, 0, 0]
    assert group_slices(3, 8) == [slice(0, 3)]


# ---------------------------------------------------------------------------------------------
# QuantSpec validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=0),
        dict(bits=9),
        dict(bits=16),
        dict(bits=-4),
        dict(bits=True),
        dict(bits=4.0),
        dict(bits="4"),
        dict(bits=4, group_size=0),
        dict(bits=4, group_size=-1),
        dict(bits=4, group_size=2.5),
        dict(bits=4, group_size=True),
        dict(bits=4, group_size="128"),
        dict(bits=4, group_size=128, per_tensor=True),
        dict(bits=4, rule="nf4"),
        dict(bits=4, rule="awq", sym=True),
        dict(bits=1, rule="absmax"),
        dict(bits=4, rule="awq", mse=True),
        dict(bits=4, mse=True, grid=0),
        dict(bits=4, mse=True, maxshrink=0.0),
        dict(bits=4, mse=True, maxshrink=1.5),
        dict(bits=4, mse=True, norm=0.0),
    ],
)
def test_quantspec_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        rq.QuantSpec(**kwargs)


def test_quantspec_float_group_size_is_rejected():
    """group_size=128.0 used to be stored as a float and fail later with a TypeError."""
    with pytest.raises(ValueError, match="group_size"):
        rq.QuantSpec(bits=4, group_size=128.0)


@pytest.mark.parametrize("kwargs", [{"blocksize": 2.5}, {"blocksize": True}, {"percdamp": "0.01"},
                                    {"act_order": "yes"}, {"static_groups": 1}])
def test_gptq_rejects_mistyped_arguments(kwargs):
    W, H = np.ones((2, 8)), np.eye(8)
    with pytest.raises(ValueError):
        rq.gptq(W, H, rq.QuantSpec(bits=4), **kwargs)


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantspec_accepts_every_width_and_numpy_ints(bits):
    assert rq.QuantSpec(bits=bits).maxq == 2**bits - 1
    assert rq.QuantSpec(bits=np.int64(bits), group_size=np.int64(32)).maxq == 2**bits - 1


@given(quant_specs(rules=("gptq", "awq", "absmax")))
@fast(50)
def test_quantize_returns_exact_integer_codes_in_range(spec):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 17)) * 5
    scale, zero = find_params(x, spec)
    q = quantize(x, scale[:, None], zero[:, None], spec.maxq)
    assert (q == np.round(q)).all() and q.min() >= 0 and q.max() <= spec.maxq

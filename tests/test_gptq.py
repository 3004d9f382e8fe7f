"""GPTQ (refquant.gptq): reductions to RTN, act-order bookkeeping, the original's group-parameter
quirks, the proxy loss against RTN, dead columns, damping escalation and input validation."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    HESSIAN_KINDS,
    WEIGHT_KINDS,
    fast,
    gptq_problems,
    integer_pd_hessian,
    make_hessian,
    make_weight,
    quant_specs,
    weights,
    well_conditioned_x,
)

import refquant as rq
from refquant.spec.quantizer import find_params


def same(a: rq.QuantizedWeight, b: rq.QuantizedWeight):
    """Bit-identical codes, scale, zero and g_idx."""
    assert np.array_equal(a.codes, b.codes)
    assert np.array_equal(a.scale, b.scale)
    assert np.array_equal(a.zero, b.zero)
    assert np.array_equal(a.g_idx, b.g_idx)


def proxy_loss(W, W_hat, H):
    """tr((W - W_hat) H (W - W_hat)^T), the layer-wise loss GPTQ minimises (eq. (1))."""
    E = np.asarray(W, dtype=np.float64) - W_hat
    return float(np.einsum("ij,jk,ik->", E, H, E))


def damped_U(H, percdamp=0.01):
    """Upper U with (H + damp I)^-1 = U^T U, computed independently of refquant."""
    Hd = H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))
    return np.linalg.cholesky(np.linalg.inv(Hd)).T


# ---------------------------------------------------------------------------------------------
# Reductions to RTN
# ---------------------------------------------------------------------------------------------

diag_problem = gptq_problems(hessian_kinds=("diagonal",), max_cols=40)


@given(diag_problem)
@fast(250)
def test_diagonal_hessian_without_act_order_is_rtn(problem):
    """With a positive diagonal H, U is diagonal, no error is propagated, and GPTQ is exactly RTN
    -- per channel, per tensor and with (dynamic or static) groups, for every blocksize."""
    problem["act_order"] = False
    qw = rq.gptq(**problem)
    same(qw, rq.rtn(problem["W"], problem["spec"]))


@given(diag_problem)
@fast(200)
def test_diagonal_hessian_with_act_order_is_rtn_for_row_params_and_static_groups(problem):
    """Act-order with per-channel parameters (from the full rows) or static groups (original
    column order) is still exactly RTN in the original column order."""
    problem["act_order"] = True
    if problem["spec"].group_size is not None:
        problem["static_groups"] = True
    same(rq.gptq(**problem), rq.rtn(problem["W"], problem["spec"]))


@given(gptq_problems(hessian_kinds=("diagonal",), group_sizes=st.integers(1, 12), allow_per_tensor=False))
@fast(200)
def test_diagonal_hessian_act_order_dynamic_groups_is_rtn_of_the_permuted_matrix(problem):
    """Act-order with dynamic groups groups *consecutive permuted* columns: the result is RTN of
    W[:, perm] with the columns put back (codes[:, invperm]) and g_idx[perm[k]] == k // gs."""
    problem.update(act_order=True, static_groups=False)
    W, H, gs = problem["W"], problem["H"], problem["spec"].group_size
    qw = rq.gptq(**problem)
    perm = np.argsort(-np.diag(H), kind="stable")
    assert np.array_equal(qw.info["perm"], perm)
    ref = rq.rtn(W[:, perm], problem["spec"])
    invperm = np.argsort(perm)
    assert np.array_equal(qw.codes, ref.codes[:, invperm])
    assert np.array_equal(qw.scale, ref.scale) and np.array_equal(qw.zero, ref.zero)
    assert np.array_equal(qw.g_idx[perm], np.arange(W.shape[1]) // gs)
    np.testing.assert_array_equal(qw.dequantize(), ref.dequantize()[:, invperm])


@given(st.data())
@fast(150)
def test_single_column_is_rtn(data):
    spec = data.draw(quant_specs(rules=("gptq",)))
    W = data.draw(weights(cols=1, max_rows=8))
    h = data.draw(st.floats(1e-6, 1e6))
    qw = rq.gptq(W, np.array([[h]]), spec, act_order=data.draw(st.booleans()),
                 static_groups=spec.group_size is not None and data.draw(st.booleans()))
    same(qw, rq.rtn(W, spec))


# ---------------------------------------------------------------------------------------------
# Act-order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gs", [None, 5])
def test_act_order_equals_the_permuted_problem_put_back(seed, gs):
    """gptq(W, H, act_order=True) == gptq(W[:, perm], H[perm][:, perm]) with the columns put back
    (per-channel parameters; dynamic groups are then consecutive permuted groups on both sides).
    H has small integer entries, so both sides do bit-identical arithmetic; one column has a 100x
    diagonal and must be processed first."""
    rows, cols = 5, 23
    rng = np.random.default_rng(seed)
    spike = int(rng.integers(cols))
    H = integer_pd_hessian(cols, seed, spike=spike)
    W = rng.standard_normal((rows, cols))
    spec = rq.QuantSpec(bits=3, group_size=gs)
    qw = rq.gptq(W, H, spec, blocksize=8, act_order=True)
    perm = qw.info["perm"]
    assert perm[0] == spike
    assert np.array_equal(perm, np.argsort(-np.diag(H), kind="stable"))
    ref = rq.gptq(W[:, perm], H[perm][:, perm], spec, blocksize=8, act_order=False)
    invperm = np.argsort(perm)
    assert np.array_equal(qw.codes, ref.codes[:, invperm])
    assert np.array_equal(qw.scale, ref.scale) and np.array_equal(qw.zero, ref.zero)
    assert np.array_equal(qw.g_idx, ref.g_idx[invperm])
    assert np.array_equal(qw.dequantize(), ref.dequantize()[:, invperm])
    assert qw.info["loss"] == ref.info["loss"]


def test_act_order_ties_are_broken_stably_lower_index_first():
    """Equal diagonals keep their column order (the original's torch.argsort is not stable; the
    reference fixes the order). With H = c I act-order changes nothing at all."""
    d = np.array([3, 1, 3, 2, 1, 3, 2, 2, 1, 3] * 7, dtype=np.float64)  # 70 columns, many ties
    H = np.diag(d) + 0.01 * np.ones((70, 70))
    W = make_weight("normal", 4, 70, seed=1)
    perm = rq.gptq(W, H, rq.QuantSpec(bits=4), act_order=True).info["perm"]
    key = list(zip(-d[perm], perm))
    assert key == sorted(key)
    H = 2.5 * np.eye(70)
    for gs in (None, 16):
        a = rq.gptq(W, H, rq.QuantSpec(bits=4, group_size=gs), act_order=True)
        b = rq.gptq(W, H, rq.QuantSpec(bits=4, group_size=gs), act_order=False)
        assert a.info["perm"].tolist() == list(range(70))
        same(a, b)


def test_act_order_dynamic_groups_cost_a_g_idx_and_static_ones_do_not():
    rows, cols, gs = 8, 64, 16
    W = make_weight("normal", rows, cols, seed=2)
    H = make_hessian("dynamic_range", cols, seed=2)
    spec = rq.QuantSpec(bits=4, group_size=gs)
    dyn = rq.gptq(W, H, spec, act_order=True)
    assert not np.array_equal(dyn.g_idx, np.arange(cols) // gs)
    # 4 bits + 4 groups * 32 bits per row / 64 columns + ceil(log2 4) = 2 bits per column / 8 rows
    assert dyn.bits_per_weight == 4  # the papers' convention: the code width
    assert dyn.storage_bits_per_weight == pytest.approx(4 + 32 / gs + 2 / rows)
    static = rq.gptq(W, H, spec, act_order=True, static_groups=True)
    assert np.array_equal(static.g_idx, np.arange(cols) // gs)
    assert static.storage_bits_per_weight == pytest.approx(4 + 32 / gs)
    assert rq.gptq(W, H, rq.QuantSpec(bits=4, sym=True), act_order=True).storage_bits_per_weight == pytest.approx(4 + 16 / 64)


# ---------------------------------------------------------------------------------------------
# Group parameters: where the reference follows the code
# ---------------------------------------------------------------------------------------------


def test_per_channel_params_come_from_full_rows_before_dead_zeroing():
    """group_size=None: scale/zero are computed once from the original rows, dead columns
    included (their weights are zeroed only afterwards)."""
    W = np.array([[0.5, -1.0, 9.0, 0.25], [0.1, 0.2, -7.0, 0.3]])
    H = np.diag([1.0, 2.0, 0.0, 3.0])  # column 2 (holding the row extremes) is dead
    spec = rq.QuantSpec(bits=4)
    qw = rq.gptq(W, H, spec)
    s, z = find_params(W, spec)
    assert np.array_equal(qw.scale[:, 0], s) and np.array_equal(qw.zero[:, 0], z)
    W0 = W.copy()
    W0[:, 2] = 0
    assert not np.allclose(qw.scale[:, 0], find_params(W0, spec)[0])
    assert (qw.dequantize()[:, 2] == 0).all()


def test_static_groups_come_from_original_order_after_dead_zeroing():
    W = np.array([[0.5, -1.0, 9.0, 0.25, 2.0, -0.5], [0.1, 0.2, -7.0, 0.3, 0.0, 1.0]])
    H = np.diag([1.0, 2.0, 0.0, 3.0, 5.0, 4.0])
    spec = rq.QuantSpec(bits=4, group_size=3)
    W0 = W.copy()
    W0[:, 2] = 0
    for act_order in (False, True):
        same(rq.gptq(W, H, spec, act_order=act_order, static_groups=True), rq.rtn(W0, spec))


def _block_start_state(W, Q, U, k):
    """W after the updates of the first k (quantized) columns: W[:, k:] - E U[:k, k:], where the
    scaled errors E solve E U[:k, :k] = (W - Q)[:, :k] (every update to column c comes from the
    earlier columns through row U[m, c])."""
    E = np.linalg.solve(U[:k, :k].T, (W - Q)[:, :k].T).T if k else np.zeros((W.shape[0], 0))
    return W[:, k:] - E @ U[:k, k:]


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_group_params_come_from_the_block_start_weights(seed):
    """The original's quirk for group_size < blocksize: a group starting at column j takes its
    min/max from W as it was at the start of j's block (only earlier blocks' lazy updates
    applied), not from the weights with the updates of the block's earlier columns. The scales
    are checked against an independent reconstruction of both states; the two differ here, so
    an implementation refreshing from the up-to-date weights fails."""
    rows, cols, gs, bs = 6, 24, 4, 12
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols))
    H = rq.hessian(well_conditioned_x(cols, rng, n_seq=2))
    spec = rq.QuantSpec(bits=3, group_size=gs)
    qw = rq.gptq(W, H, spec, blocksize=bs)
    Q, U = qw.dequantize(), damped_U(H)
    differs = False
    for g, j in enumerate(range(0, cols, gs)):
        k = (j // bs) * bs
        stale = _block_start_state(W, Q, U, k)[:, j - k:j - k + gs]
        s, z = find_params(stale, spec)
        np.testing.assert_allclose(qw.scale[:, g], s, rtol=1e-9)
        assert np.array_equal(qw.zero[:, g], z)
        fresh = _block_start_state(W, Q, U, j)[:, :gs]
        differs |= not np.allclose(find_params(fresh, spec)[0], s, rtol=1e-6)
    assert differs


@pytest.mark.parametrize("seed", range(3))
def test_blocksize_is_only_a_batching_choice_when_group_starts_are_block_starts(seed):
    """Lazy batch updates (eq. (4)) are exact: per channel any blocksize gives the same result;
    with dynamic groups so does every blocksize that divides group_size (fresh parameters at
    every group start). A blocksize larger than the group size does not (the quirk above)."""
    rows, cols = 6, 32
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols))
    H = rq.hessian(well_conditioned_x(cols, rng, n_seq=2))
    for gs, sizes in ((None, (1, 5, 32, 128)), (8, (1, 2, 4, 8))):
        spec = rq.QuantSpec(bits=3, group_size=gs)
        runs = [rq.gptq(W, H, spec, blocksize=b) for b in sizes]
        for r in runs[1:]:
            assert np.array_equal(r.codes, runs[0].codes)
            np.testing.assert_allclose(r.scale, runs[0].scale, rtol=1e-10)
            assert r.info["loss"] == pytest.approx(runs[0].info["loss"], rel=1e-9)
    spec = rq.QuantSpec(bits=3, group_size=8)
    assert not np.allclose(rq.gptq(W, H, spec, blocksize=32).scale, rq.gptq(W, H, spec, blocksize=8).scale)


# ---------------------------------------------------------------------------------------------
# Quality: the proxy loss against RTN
# ---------------------------------------------------------------------------------------------

RATE_SPECS = [
    dict(bits=4),
    dict(bits=3, group_size=16),
    dict(bits=2, group_size=16, sym=True),
]


def test_gptq_beats_rtn_on_the_proxy_loss_in_the_large_majority_of_cases():
    """Family: seeds 0..39, W 8x32 standard normal, H = refquant.hessian of correlated Gaussian X
    (2 sequences of 72 tokens), specs 4-bit per channel, 3-bit g16 asym, 2-bit g16 sym, each with
    and without act-order (240 problems). Threshold: GPTQ's proxy loss tr(E H E^T) (with the
    undamped H) is strictly below RTN's in at least 95% of the problems, and the median ratio is
    below 0.85. (Measured when written: 100% and ~0.73.)"""
    wins, ratios = 0, []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((8, 32))
        H = rq.hessian(well_conditioned_x(32, rng, n_seq=2))
        for kw in RATE_SPECS:
            spec = rq.QuantSpec(**kw)
            rtn_loss = proxy_loss(W, rq.rtn(W, spec).dequantize(), H)
            for act_order in (False, True):
                loss = proxy_loss(W, rq.gptq(W, H, spec, act_order=act_order).dequantize(), H)
                wins += loss < rtn_loss
                ratios.append(loss / rtn_loss)
    assert wins / len(ratios) >= 0.95
    assert np.median(ratios) < 0.85


def test_info_loss_is_the_sum_of_scaled_squared_errors():
    """info['loss'] = sum (w - q)^2 / U_jj^2 / 2 over the *updated* columns; for a diagonal H
    (no updates) that is sum (W - W_hat)^2 * (H_jj + damp) / 2, with damp = percdamp times the
    mean diagonal taken *after* dead columns got H_jj = 1 (here that mean is dominated by them)."""
    W = make_weight("normal", 4, 10, seed=3)
    d = np.arange(1.0, 11.0) * 1e-3
    d[[2, 7]] = 0.0  # dead
    qw = rq.gptq(W, np.diag(d), rq.QuantSpec(bits=3))
    damp = 0.01 * np.where(d == 0, 1.0, d).mean()
    live = d > 0
    expected = (((W - qw.dequantize())[:, live] ** 2) * (d[live] + damp)).sum() / 2
    assert qw.info["loss"] == pytest.approx(expected, rel=1e-12)
    assert qw.info["percdamp"] == 0.01


# ---------------------------------------------------------------------------------------------
# Dead columns, determinism, nasty inputs
# ---------------------------------------------------------------------------------------------


@given(gptq_problems(hessian_kinds=("dead_columns", "diagonal_dead", "all_dead")))
@fast(200)
def test_dead_columns_come_out_exactly_zero(problem):
    qw = rq.gptq(**problem)
    dead = np.diag(problem["H"]) == 0
    assert dead.any()
    W_hat = qw.dequantize()
    assert (W_hat[:, dead] == 0).all()
    assert np.isfinite(W_hat).all()


@given(gptq_problems(max_cols=24))
@fast(40)
def test_deterministic(problem):
    a = rq.gptq(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in problem.items()})
    b = rq.gptq(**problem)
    same(a, b)
    assert a.info["loss"] == b.info["loss"] or np.isnan(a.info["loss"]) and np.isnan(b.info["loss"])
    assert np.array_equal(a.info["perm"], b.info["perm"])


def test_inputs_are_not_modified():
    W = make_weight("normal", 4, 12, seed=4)
    H = make_hessian("dead_columns", 12, seed=4)
    W0, H0 = W.copy(), H.copy()
    rq.gptq(W, H, rq.QuantSpec(bits=4, group_size=4), act_order=True, static_groups=True)
    assert np.array_equal(W, W0) and np.array_equal(H, H0)


@given(gptq_problems(weight_kinds=WEIGHT_KINDS, hessian_kinds=HESSIAN_KINDS, max_cols=40))
@fast(300)
def test_nasty_inputs_give_finite_results_or_a_clear_error(problem):
    """Dead columns, near-singular H, all-zero rows/groups, 1e-6..1e4 dynamic range, a 100x
    outlier channel and fp16 magnitudes (float16 W): finite codes/scales/values, or (only for a
    near-singular H) HessianNotPositiveDefinite. RuntimeWarnings from refquant are errors."""
    try:
        qw = rq.gptq(**problem)
    except rq.HessianNotPositiveDefinite:
        assert not np.all(np.linalg.eigvalsh(problem["H"]) > 0)
        return
    W_hat = qw.dequantize()
    assert np.isfinite(W_hat).all()
    assert np.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert qw.codes.min() >= 0 and qw.codes.max() <= problem["spec"].maxq
    assert np.isfinite(qw.info["loss"])


def test_fp16_input_is_computed_in_float64():
    W = make_weight("fp16", 4, 16, seed=5)
    assert W.dtype == np.float16
    H = make_hessian("fp16", 16, seed=5)
    a = rq.gptq(W, H, rq.QuantSpec(bits=4, group_size=8), act_order=True)
    b = rq.gptq(W.astype(np.float64), H, rq.QuantSpec(bits=4, group_size=8), act_order=True)
    same(a, b)
    assert a.scale.dtype == np.float64


# ---------------------------------------------------------------------------------------------
# Damping
# ---------------------------------------------------------------------------------------------

NOT_PD = np.array([[1.0, 1.025, 0.0], [1.025, 1.0, 0.0], [0.0, 0.0, 1.0]])  # eigenvalue -0.025


def test_non_pd_hessian_raises_with_shape_and_percdamp():
    W = make_weight("normal", 5, 3, seed=6)
    with pytest.raises(rq.HessianNotPositiveDefinite) as exc:
        rq.gptq(W, NOT_PD, rq.QuantSpec(bits=4))
    msg = str(exc.value)
    assert "5x3" in msg and "percdamp=0.01" in msg
    assert isinstance(exc.value, ValueError)


def test_damping_escalation_succeeds_and_logs_every_step(caplog):
    """mean diag = 1, the smallest eigenvalue is -0.025: percdamp 0.01 and 0.02 fail, 0.03 works."""
    W = make_weight("normal", 5, 3, seed=6)
    with caplog.at_level(logging.WARNING, logger="refquant"):
        qw = rq.gptq(W, NOT_PD, rq.QuantSpec(bits=4), max_percdamp=0.1)
    assert qw.info["percdamp"] == pytest.approx(0.03)
    steps = [r for r in caplog.records if r.name == "refquant"]
    assert len(steps) == 2
    assert "percdamp=0.01" in steps[0].getMessage() and "percdamp=0.02" in steps[0].getMessage()
    assert "percdamp=0.02" in steps[1].getMessage() and "percdamp=0.03" in steps[1].getMessage()
    assert all("5x3" in r.getMessage() for r in steps)
    assert np.isfinite(qw.dequantize()).all()
    # same result as asking for the final damping directly
    same(qw, rq.gptq(W, NOT_PD, rq.QuantSpec(bits=4), percdamp=qw.info["percdamp"]))


def test_damping_escalation_gives_up_at_max_percdamp(caplog):
    W = make_weight("normal", 5, 3, seed=6)
    with caplog.at_level(logging.WARNING, logger="refquant"):
        with pytest.raises(rq.HessianNotPositiveDefinite, match=r"percdamp=0\.02"):
            rq.gptq(W, NOT_PD, rq.QuantSpec(bits=4), max_percdamp=0.02)
    assert len([r for r in caplog.records if r.name == "refquant"]) == 1


def test_no_escalation_and_no_log_for_a_pd_hessian(caplog):
    W = make_weight("normal", 3, 8, seed=7)
    with caplog.at_level(logging.WARNING, logger="refquant"):
        qw = rq.gptq(W, make_hessian("well", 8, seed=7), rq.QuantSpec(bits=4), max_percdamp=1.0)
    assert qw.info["percdamp"] == 0.01 and not caplog.records


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

GOOD_W = np.ones((3, 4))
GOOD_H = np.eye(4)


@pytest.mark.parametrize(
    "W, H",
    [
        (np.array([[1.0, np.nan, 0, 0]] * 3), GOOD_H),
        (np.array([[np.inf, 0, 0, 0]] * 3), GOOD_H),
        (GOOD_W, np.where(np.eye(4) == 1, np.nan, 0.0)),
        (GOOD_W, np.where(np.eye(4) == 1, 1.0, np.inf)),
        (GOOD_W, np.eye(3)),  # H for another in_features
        (GOOD_W, np.ones((4, 3))),  # not square
        (GOOD_W, np.ones(4)),  # 1-D
        (np.zeros((0, 4)), GOOD_H),
        (np.zeros((3, 0)), np.zeros((0, 0))),
        (np.ones(4), GOOD_H),
    ],
)
def test_bad_inputs_raise_value_error(W, H):
    with pytest.raises(ValueError):
        rq.gptq(W, H, rq.QuantSpec(bits=4))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(static_groups=True),  # without a group_size
        dict(blocksize=0),
        dict(percdamp=-0.01),
        dict(percdamp=float("nan")),
    ],
)
def test_bad_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        rq.gptq(GOOD_W, GOOD_H, rq.QuantSpec(bits=4), **kwargs)


@pytest.mark.parametrize("bits", [0, 9, 16, -1])
def test_bits_outside_1_to_8_raise_value_error(bits):
    with pytest.raises(ValueError):
        rq.gptq(GOOD_W, GOOD_H, rq.QuantSpec(bits=bits))


def test_spec_must_be_a_quantspec():
    with pytest.raises(ValueError):
        rq.gptq(GOOD_W, GOOD_H, 4)


# ---------------------------------------------------------------------------------------------
# Heavier variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@given(gptq_problems(max_rows=16, max_cols=160))
@fast(400)
def test_slow_nasty_inputs_larger(problem):
    test_nasty_inputs_give_finite_results_or_a_clear_error.hypothesis.inner_test(problem)


@pytest.mark.slow
def test_slow_gptq_beats_rtn_at_layer_like_sizes():
    """Family: seeds 0..19, W 32x256, H from 4 sequences of 512 correlated tokens, 4-bit g128
    asym and 3-bit per channel sym, with/without act-order, blocksize 128. Threshold: GPTQ's proxy
    loss below RTN's in every problem."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((32, 256))
        H = rq.hessian(well_conditioned_x(256, rng, n_seq=4, tokens=512))
        for kw in (dict(bits=4, group_size=128), dict(bits=3, sym=True)):
            spec = rq.QuantSpec(**kw)
            rtn_loss = proxy_loss(W, rq.rtn(W, spec).dequantize(), H)
            for act_order in (False, True):
                assert proxy_loss(W, rq.gptq(W, H, spec, act_order=act_order).dequantize(), H) < rtn_loss


@pytest.mark.slow
@given(gptq_problems(hessian_kinds=("diagonal",), max_rows=16, max_cols=300))
@fast(200)
def test_slow_diagonal_hessian_is_rtn_larger(problem):
    problem["act_order"] = False
    same(rq.gptq(**problem), rq.rtn(problem["W"], problem["spec"]))

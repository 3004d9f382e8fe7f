"""AWQ scale search and clip search (mit-han-lab/llm-awq auto_scale.py / auto_clip.py)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refquant.spec.awq import (
    CLIP_ERR_INIT,
    activation_mean,
    apply_clip,
    candidate_scales,
    linear_block,
    scaled_fake_quant,
    search_clip,
    search_scale,
    weight_mean,
)
from refquant.spec.quantizer import QuantSpec, group_slices
from refquant.spec.rtn import rtn

SETTINGS = settings(max_examples=30, deadline=None)
SPEC = QuantSpec(bits=3, group_size=16, rule="awq")


def problem(seed, tokens=64, n=32, outs=(16, 8)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(tokens, n)) * np.exp(rng.uniform(-2, 3, size=n))
    Ws = [rng.standard_t(4, size=(o, n)) for o in outs]
    return X, Ws


def plain_rtn_loss(X, Ws, spec):
    """Independent ratio-0 loss: quantize the weights as they are (s = 1)."""
    org = np.concatenate([X @ W.T for W in Ws], axis=-1)
    out = np.concatenate([X @ rtn(W, spec).dequantize().T for W in Ws], axis=-1)
    return ((org - out) ** 2).mean()


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from([SPEC, QuantSpec(bits=4, group_size=None, rule="awq"),
                                                                      QuantSpec(bits=2, group_size=12, rule="awq")]))
def test_scale_search_never_worse_than_plain_rtn(seed, duo, spec):
    X, Ws = problem(seed)
    res = search_scale(X, Ws, spec, duo_scaling=duo)
    assert res.losses.shape == (20,)
    if not duo:  # ratio 0 is exactly s = 1 (duo: s = 1 / w_mean, not plain RTN)
        np.testing.assert_allclose(res.losses[0], plain_rtn_loss(X, Ws, spec), rtol=1e-12)
        assert res.best_loss <= plain_rtn_loss(X, Ws, spec) * (1 + 1e-12)
    k = int(np.argmin(res.losses))  # first minimum: strict improvement keeps the earliest
    assert res.best_ratio == k / 20
    assert res.best_loss == res.losses.min()
    w_mean = weight_mean(Ws, spec.group_size) if duo else None
    np.testing.assert_array_equal(res.scales, candidate_scales(activation_mean(X), k / 20, w_mean))
    # the reported loss is reproducible from the reported scales
    out = linear_block(X, [scaled_fake_quant(W, res.scales, spec) for W in Ws])
    np.testing.assert_allclose(((linear_block(X, Ws) - out) ** 2).mean(), res.best_loss, rtol=1e-12)


def test_candidate_scale_formula_head_and_first_release():
    x_mean = np.array([4.0, 1.0, 0.0, 0.25])
    # HEAD: s = max(x_mean^r, 1e-4), normalised by sqrt(max * min)
    s = candidate_scales(x_mean, 0.5, None)
    raw = np.array([2.0, 1.0, 1e-4, 0.5])
    np.testing.assert_allclose(s, raw / np.sqrt(2.0 * 1e-4), rtol=1e-15)
    np.testing.assert_allclose(candidate_scales(x_mean, 0.0, None), np.ones(4))  # 0^0 = 1: plain RTN
    # first release: x_mean^r / w_mean^(1 - r)
    w_mean = np.array([0.5, 0.25, 1.0, 1.0])
    s = candidate_scales(x_mean, 0.5, w_mean)
    raw = np.maximum(np.sqrt(x_mean) / np.sqrt(w_mean), 1e-4)
    np.testing.assert_allclose(s, raw / np.sqrt(raw.max() * raw.min()), rtol=1e-15)
    assert s.max() * s.min() == pytest.approx(1.0)


def test_the_formula_test_detects_a_wrong_exponent():
    x_mean = np.array([4.0, 1.0, 0.5])
    wrong = np.maximum(x_mean ** (1 - 0.25), 1e-4)
    wrong = wrong / np.sqrt(wrong.max() * wrong.min())
    assert not np.allclose(candidate_scales(x_mean, 0.25, None), wrong)


def test_weight_mean_by_hand():
    """get_weight_scale: |W| / group max per row, mean over the rows of the concatenated linears."""
    W1 = np.array([[1.0, -2.0, 4.0, 4.0]])
    W2 = np.array([[3.0, 3.0, -1.0, 0.5]])
    # groups of 2: W1 row -> [0.5, 1, 1, 1]; W2 row -> [1, 1, 1, 0.5]
    np.testing.assert_allclose(weight_mean([W1, W2], 2), [0.75, 1.0, 1.0, 0.75])
    # whole row as one group
    np.testing.assert_allclose(weight_mean([W1, W2], None), [(0.25 + 1) / 2, (0.5 + 1) / 2, (1 + 1 / 3) / 2, (1 + 1 / 6) / 2])


def test_search_does_not_modify_inputs_and_uses_the_block():
    X, Ws = problem(0, tokens=12, n=16, outs=(8,))
    X0, W0 = X.copy(), Ws[0].copy()
    calls = []

    def block(x, weights):
        calls.append(len(weights))
        assert np.array_equal(x, X0)  # the block always sees the unscaled input
        return np.tanh(x @ weights[0].T)

    res = search_scale(X, Ws, QuantSpec(bits=4, group_size=8, rule="awq"), block=block, n_grid=5)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(Ws[0], W0)
    assert calls == [1] * 6  # the original output, then one per grid point
    assert res.losses.shape == (5,)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([None, 16, 12]))
def test_clip_never_worse_than_no_clip(seed, group_size):
    X, Ws = problem(seed, tokens=40, n=32, outs=(8,))
    spec = QuantSpec(bits=3, group_size=group_size, rule="awq")
    W = Ws[0]
    res = search_clip(X, W, spec)
    slices = group_slices(W.shape[1], group_size)
    assert res.max_val.shape == (W.shape[0], len(slices))
    assert res.losses.shape == (10, W.shape[0], len(slices))
    # independent recomputation of the per-group partial dot-product error
    def group_err(Wc):
        Wq = rtn(Wc, spec).dequantize()
        return np.stack([(((X[:, c] @ W[:, c].T) - (X[:, c] @ Wq[:, c].T)) ** 2).mean(axis=0) for c in slices], axis=1)
    err_chosen, err_none = group_err(apply_clip(W, res.max_val, group_size)), group_err(W)
    assert np.all(err_chosen <= err_none * (1 + 1e-12))
    np.testing.assert_allclose(res.losses[0], err_none, rtol=1e-12)
    # chosen value is a candidate: max|w| * (1 - i / 20) for the first minimal i
    org_max = np.stack([np.abs(W[:, c]).max(axis=1) for c in slices], axis=1)
    i = np.argmin(res.losses, axis=0)
    np.testing.assert_array_equal(res.max_val, org_max * (1 - i / 20))


def test_clip_token_subsampling_stride():
    """Every (T // n_sample_tokens)-th token from token 0; rows beyond are ignored."""
    X, Ws = problem(3, tokens=50, n=16, outs=(4,))
    spec = QuantSpec(bits=2, group_size=8, rule="awq")
    a = search_clip(X, Ws[0], spec, n_sample_tokens=12)  # stride 50 // 12 = 4 -> tokens 0, 4, ..., 48
    b = search_clip(X[0::4], Ws[0], spec, n_sample_tokens=10**6)
    np.testing.assert_array_equal(a.losses, b.losses)
    c = search_clip(X[1::4], Ws[0], spec, n_sample_tokens=10**6)
    assert not np.array_equal(a.losses, c.losses)


def test_clip_error_threshold_1e9_quirk():
    """The original starts from min_errs = 1e9: when every candidate errs >= 1e9, no clip is kept."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 8)) * 1e6
    W = rng.normal(size=(2, 8))
    W[:, 0] = 40.0  # an outlier weight makes clipping attractive, but all errors are huge
    res = search_clip(X, W, QuantSpec(bits=2, group_size=None, rule="awq"))
    assert np.all(res.losses >= CLIP_ERR_INIT)
    assert np.argmin(res.losses[:, 0, 0]) > 0  # a clip would have been better ...
    np.testing.assert_array_equal(res.max_val[:, 0], np.abs(W).max(axis=1))  # ... but none is kept


def test_clip_ties_keep_the_first_candidate():
    """A group whose input channels are all zero has error 0 for every candidate: strict `<` keeps no clip."""
    X, Ws = problem(4, tokens=20, n=16, outs=(4,))
    X[:, 8:] = 0.0
    spec = QuantSpec(bits=3, group_size=8, rule="awq")
    res = search_clip(X, Ws[0], spec)
    assert np.all(res.losses[:, :, 1] == 0.0)
    np.testing.assert_array_equal(res.max_val[:, 1], np.abs(Ws[0][:, 8:]).max(axis=1))


def test_scale_search_ties_keep_the_first_ratio():
    """All-zero inputs: every ratio has loss 0, the first (ratio 0, s = 1) is kept."""
    X = np.zeros((6, 8))
    Ws = [np.random.default_rng(0).normal(size=(4, 8))]
    res = search_scale(X, Ws, QuantSpec(bits=3, group_size=4, rule="awq"), n_grid=4)
    assert res.best_ratio == 0.0 and np.all(res.losses == 0.0)
    np.testing.assert_array_equal(res.scales, np.ones(8))


def test_apply_clip():
    W = np.array([[1.0, -3.0, 2.0, -0.5]])
    out = apply_clip(W, np.array([[2.0, 0.25]]), 2)
    np.testing.assert_array_equal(out, [[1.0, -2.0, 0.25, -0.25]])
    np.testing.assert_array_equal(W, [[1.0, -3.0, 2.0, -0.5]])


@pytest.mark.parametrize("case", ["zero_channel", "outlier_channel", "fp16_max", "zero_weight_column"])
def test_nasty_inputs_give_finite_results(case):
    X, Ws = problem(7, tokens=40, n=32, outs=(8, 8))
    if case == "zero_channel":
        X[:, 3] = 0.0
    elif case == "outlier_channel":
        X[:, 5] *= 1e4
    elif case == "fp16_max":
        X = np.clip(X * 1e4, -6.5e4, 6.5e4)
        X[:, 0] = 6.5e4
    elif case == "zero_weight_column":
        Ws[0][:, 2] = 0.0
        Ws[1][:, 2] = 0.0
    res = search_scale(X, Ws, SPEC)
    assert np.all(np.isfinite(res.scales)) and np.all(res.scales > 0)
    assert np.all(np.isfinite(res.losses))
    assert res.best_loss <= res.losses[0]
    Xs, W = X / res.scales, Ws[0] * res.scales
    clip = search_clip(Xs, W, SPEC)
    assert np.all(np.isfinite(clip.max_val)) and np.all(np.isfinite(clip.losses))


def test_errors():
    X, Ws = problem(1, tokens=8, n=16, outs=(4,))
    bad = X.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        search_scale(bad, Ws, SPEC)
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        search_clip(bad, Ws[0], SPEC)
    with pytest.raises(ValueError, match="in_features"):
        search_scale(X[:, :8], Ws, SPEC)
    with pytest.raises(ValueError, match="empty"):
        search_scale(X[:0], Ws, SPEC)
    with pytest.raises(ValueError, match="QuantSpec"):
        search_scale(X, Ws, {"bits": 4})
    with pytest.raises(ValueError, match="list"):
        search_scale(X, Ws[0], SPEC)
    with pytest.raises(ValueError, match="non-finite"):
        search_scale(X, Ws, SPEC, block=lambda x, w: x @ w[0].T * np.inf)
    Wz = Ws[0].copy()
    Wz[:, 0] = 0.0
    Wz[0, :] = 0.0
    with pytest.raises(ValueError, match="duo_scaling"):
        search_scale(X, [Wz], SPEC, duo_scaling=True)
    with pytest.raises(ValueError, match="per-tensor"):
        search_clip(X, Ws[0], QuantSpec(bits=4, per_tensor=True, rule="awq"))
    with pytest.raises(ValueError, match="max_val"):
        apply_clip(Ws[0], np.ones((4, 3)), 16)

"""PB-LLM (refquant.pbllm): the salient selection, the binarizer statistics, the reduction to 8-bit GPTQ,
bit accounting, serialization, nasty inputs and input validation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import HESSIAN_KINDS, WEIGHT_KINDS, fast, make_hessian, make_weight, seeds

import refquant as rq
from refquant.spec import formats as F
from refquant.spec.pbllm import binarized_mask


def run(W, H, **kw):
    try:
        return rq.pbllm(W, H, **kw)
    except rq.HessianNotPositiveDefinite:
        return None


@st.composite
def problems(draw, weight_kinds=WEIGHT_KINDS, hessian_kinds=HESSIAN_KINDS, max_rows=6, max_cols=40):
    cols = draw(st.integers(1, max_cols))
    W = make_weight(draw(st.sampled_from(weight_kinds)), draw(st.integers(1, max_rows)), cols, draw(seeds))
    H = make_hessian(draw(st.sampled_from(hessian_kinds)), cols, draw(seeds))
    kw = dict(low_frac=draw(st.sampled_from([0.0, 0.5, 0.9, 6 / 7, 0.99])),
              high_bits=draw(st.sampled_from([2, 4, 8])),
              salient_metric=draw(st.sampled_from(["hessian", "magnitude"])),
              blocksize=draw(st.sampled_from([1, 5, 128])),
              group_size=draw(st.sampled_from([None, 8, 16])),
              binarizer_stats=draw(st.sampled_from(["code", "binarized"])))
    return W, H, kw


# ------------------------------------------------------------------------------------------ hand-checked


def test_threshold_index_hand_checked():
    """n = 10, low_frac = 0.9: thresh = sorted[int(9.0)] = the largest score, so all ten are binarized
    (the original's off-by-one: the salient fraction is 1 - (int(n low_frac) + 1) / n, not 1 - low_frac)."""
    score = np.arange(10.0).reshape(2, 5)
    assert binarized_mask(score, 0.9).all()
    assert binarized_mask(score, 0.5).sum() == 6  # sorted[5] = 5: scores 0..5
    assert binarized_mask(score, 0.0).sum() == 1  # only the minimum


def test_binarizer_counts_salient_positions_as_zeros():
    """Row [1, 2, 3, 100] with the 100 salient: code mean (1+2+3+0)/4 = 1.5, alpha (0.5+0.5+1.5+1.5)/4 = 1;
    the paper's statistics (binarized only): mean 2, alpha 2/3. Identity H: no feedback."""
    W = np.array([[1.0, 2.0, 3.0, 100.0]])
    H = np.eye(4)
    q = rq.pbllm(W, H, low_frac=0.5, salient_metric="magnitude", percdamp=0.0)
    assert np.array_equal(q.salient_mask, [[False, False, False, True]])
    assert (q.mean[0, 0], q.alpha[0, 0]) == (1.5, 1.0)
    Wh = q.dequantize()
    np.testing.assert_array_equal(Wh[0, :3], [0.5, 2.5, 2.5])
    assert Wh[0, 3] == pytest.approx(100.0, abs=100 / 255 / 2)
    p = rq.pbllm(W, H, low_frac=0.5, salient_metric="magnitude", percdamp=0.0, binarizer_stats="binarized")
    assert p.mean[0, 0] == 2.0 and p.alpha[0, 0] == pytest.approx(2 / 3)


def test_dead_column_becomes_sign_of_minus_mean():
    """A dead input zeroes its weights; binarized, it becomes sign(-mean) alpha + mean."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 16)) + 0.5
    X = rng.standard_normal((2, 40, 16))
    X[..., 3] = 0
    q = rq.pbllm(W, rq.hessian(X), low_frac=0.9)
    col = q.dequantize()[:, 3]
    expect = np.where(q.salient_mask[:, 3], 0.0, np.sign(-q.mean[:, 0]) * q.alpha[:, 0] + q.mean[:, 0])
    np.testing.assert_array_equal(col[~q.salient_mask[:, 3]], expect[~q.salient_mask[:, 3]])


def test_high_bit_range_from_the_original_rows_never_refit():
    W = make_weight("outlier_channel", 6, 24, seed=1)
    H = make_hessian("well", 24, seed=2)
    q = rq.pbllm(W, H, low_frac=0.5)
    scale, zero = rq.quantizer.find_params(W, rq.QuantSpec(bits=8))
    assert np.array_equal(q.scale, scale) and np.array_equal(q.zero, zero)


# ------------------------------------------------------------------------------------------ properties


@given(st.integers(1, 6), st.integers(2, 40), seeds, st.sampled_from(["well", "outlier_channel", "dynamic_range"]),
       st.sampled_from([1, 7, 128]))
@fast(40)
def test_nothing_binarized_is_8bit_gptq(rows, cols, seed, hkind, blocksize):
    """low_frac = 0 binarizes only the threshold element (the minimum score). Put it, alone, in the last
    column (a zero weight, every other weight non-zero): everything else equals 8-bit GPTQ with the same
    per-row quantizer bit for bit."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols))
    W[W == 0] = 1.0
    W[0, -1] = 0.0
    H = make_hessian(hkind, cols, seed)
    try:
        g = rq.gptq(W, H, rq.QuantSpec(bits=8), blocksize=blocksize)
    except rq.HessianNotPositiveDefinite:
        return
    q = rq.pbllm(W, H, low_frac=0.0, blocksize=blocksize)
    expect = np.ones(W.shape, dtype=bool)
    expect[0, -1] = False
    assert np.array_equal(q.salient_mask, expect)
    assert np.array_equal(q.codes[expect], g.codes[expect])
    assert np.array_equal(q.dequantize()[expect], g.dequantize()[expect])


@given(st.integers(1, 8), st.integers(1, 48), seeds, st.sampled_from([0.0, 0.3, 0.5, 0.9, 6 / 7, 0.99]),
       st.sampled_from([None, 8, 16]), st.sampled_from(["normal", "ties", "zero_rows"]))
@fast(50)
def test_salient_fraction_is_one_minus_low_frac_up_to_ties(rows, cols, seed, low_frac, group_size, kind):
    """Per group: binarized = int(n low_frac) + 1 elements plus the ties at the threshold."""
    W = make_weight(kind, rows, cols, seed)
    H = make_hessian("well", cols, seed)
    q = rq.pbllm(W, H, low_frac=low_frac, salient_metric="magnitude", group_size=group_size)
    gs = cols if group_size is None else group_size
    for g0 in range(0, cols, gs):
        mask = ~q.salient_mask[:, g0:g0 + gs]
        n = mask.size
        k = int(n * low_frac) + 1
        score = np.abs(W[:, g0:g0 + gs])
        thresh = np.sort(score.ravel())[k - 1]
        assert mask.sum() == k + int((score.ravel()[np.argsort(score.ravel(), kind="stable")[k:]] == thresh).sum())
        if kind == "normal":
            assert mask.sum() == k  # no ties: exactly the original's count


@given(problems())
@fast(60)
def test_finite_bit_accounting_and_exact_serialization(problem):
    """Zero rows, dead columns, constant blocks, fp16 ranges: finite; storage >= the paper's figure;
    the serialized form dequantizes to exactly the same matrix."""
    W, H, kw = problem
    q = run(W, H, **kw)
    if q is None:
        return
    Wh = q.dequantize()
    assert Wh.shape == W.shape and np.all(np.isfinite(Wh))
    r = q.salient_mask.mean()
    assert q.bits_per_weight == pytest.approx(r * kw["high_bits"] + (1 - r))
    assert q.storage_bits >= q.bits_per_weight * q.numel
    back = F.from_tensors(*q.to_tensors())
    assert isinstance(back, F.PartialBinaryWeight)
    assert np.array_equal(back.dequantize(), Wh)
    assert np.array_equal(back.salient_mask, q.salient_mask)
    assert np.isfinite(q.info["loss"])


def test_storage_layout_counts_everything():
    W = make_weight("normal", 16, 256, seed=0)
    q = rq.pbllm(W, make_hessian("well", 256, seed=0), low_frac=0.9)
    n, n_sal = W.size, int(q.salient_mask.sum())
    zero_signs = int(((q.signs == 0) & ~q.salient_mask).sum())
    expect = n + 8 * n_sal + (n - n_sal) + zero_signs * 12 + 32 * 16 + 32 * 16
    assert q.storage_bits == expect
    assert q.bits_per_weight == pytest.approx(1 + 7 * n_sal / n)


def test_save_load_roundtrip(tmp_path):
    W = make_weight("zero_rows", 8, 64, seed=5)
    q = rq.pbllm(W, make_hessian("dead_columns", 64, seed=5), low_frac=6 / 7, group_size=32)
    F.save(q, tmp_path / "q.safetensors")
    assert np.array_equal(F.load(tmp_path / "q.safetensors").dequantize(), q.dequantize())


# ------------------------------------------------------------------------------------------ errors and extensions


def test_in_features_not_a_multiple_of_blocksize_is_a_documented_extension():
    """The original asserts groupsize % blocksize == 0; here the last block is partial, as in GPTQ."""
    W = make_weight("normal", 4, 200, seed=0)
    q = rq.pbllm(W, make_hessian("well", 200, seed=0), blocksize=128, group_size=48)
    assert q.alpha.shape == (4, 5) and np.all(np.isfinite(q.dequantize()))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_raise(bad):
    W = make_weight("normal", 3, 8, seed=0)
    H = make_hessian("well", 8, seed=0)
    Wb = W.copy()
    Wb[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.pbllm(Wb, H)
    Hb = H.copy()
    Hb[0, 0] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.pbllm(W, Hb)


@pytest.mark.parametrize("kw, match", [
    ({"low_frac": 1.0}, "low_frac"), ({"low_frac": -0.1}, "low_frac"), ({"high_bits": 9}, "high_bits"),
    ({"salient_metric": "l1"}, "salient_metric"), ({"blocksize": 0}, "blocksize"), ({"group_size": 0}, "group_size"),
    ({"percdamp": -1}, "percdamp"), ({"binarizer_stats": "x"}, "binarizer_stats")])
def test_bad_arguments_raise(kw, match):
    W = make_weight("normal", 3, 8, seed=0)
    with pytest.raises(ValueError, match=match):
        rq.pbllm(W, make_hessian("well", 8, seed=0), **kw)


def test_shape_errors():
    with pytest.raises(ValueError, match="in_features"):
        rq.pbllm(np.ones((2, 4)), np.eye(5))
    with pytest.raises(ValueError, match="empty"):
        rq.pbllm(np.ones((0, 4)), np.eye(4))

"""BiLLM (refquant.billm): the structural searches pick the minimum of their objectives, the block's
binarization, bit accounting, serialization, nasty inputs, narrow blocks and input validation."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import HESSIAN_KINDS, WEIGHT_KINDS, fast, make_hessian, make_weight, seeds

import refquant as rq
from refquant.spec import binarize as B
from refquant.spec import formats as F
from refquant.spec.billm import saliency


def run(W, H, **kw):
    try:
        return rq.billm(W, H, **kw)
    except rq.HessianNotPositiveDefinite:
        return None


def naive_residual(x, mask, order):
    """Row by row, on the masked entries only, in exact rational arithmetic (an independent
    transcription of high_order_residual). Exact, because the searches' objectives hinge on exact
    ties: where a residual equals its row mean, sign(0) = 0 reconstructs it exactly, and a mean
    rounded differently (another summation order) flips that sign and costs alpha^2."""
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        v = [Fraction(float(e)) for e in x[r, mask[r]]]
        if not v:
            continue
        acc = [Fraction(0)] * len(v)
        for _ in range(order):
            res = [a - b for a, b in zip(v, acc)]
            m = sum(res) / len(res)
            alpha = sum(abs(e - m) for e in res) / len(res)
            acc = [b + alpha * ((e > m) - (e < m)) + m for b, e in zip(acc, res)]
        out[r, mask[r]] = [float(a) for a in acc]
    return out


def U_diag(H, percdamp=0.01):
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))
    return np.diag(np.linalg.cholesky(np.linalg.inv(H)).T)


@given(st.integers(1, 6), st.integers(2, 70), seeds, st.sampled_from(["hessian", "magnitude"]),
       st.sampled_from(["normal", "outlier_channel", "ties"]))
@fast(25)
def test_chosen_column_count_and_split_minimise_the_objectives(rows, cols, seed, metric, kind):
    """One block (no earlier feedback): the format's salient columns are the top-k of the ranking for
    the k minimising the column objective, and its split is the one of the break point minimising the
    split objective over the 81 candidates.

    The objectives are evaluated with an independent binarizer in exact rational arithmetic, except
    for half-integer weights ranked by magnitude (T = W): there a residual often equals its row mean
    exactly, and whether the float64 reference sees 0 or +-1e-17 there (sign(0) = 0 costs nothing,
    +-1 costs alpha^2) is decided by rounding, so the exact and the float objective can disagree on
    the minimum. For that case the reference's own float objectives are the yardstick: the searches
    must still pick their minimum."""
    W = make_weight(kind, rows, cols, seed)
    H = make_hessian("well", cols, seed)
    q = rq.billm(W, H, blocksize=128, salient_metric=metric)
    T = saliency(W, U_diag(H), metric)
    ranking = B.column_ranking(T)
    ks = B.salient_candidates(cols)
    exact = not (kind == "ties" and metric == "magnitude")

    def masked(k):
        M = np.zeros(T.shape, dtype=bool)
        M[:, ranking[:k]] = True
        return M

    if exact:
        errs = np.array([np.mean((T - naive_residual(T, masked(k), 2) - naive_residual(T, ~masked(k), 2)) ** 2)
                         for k in ks])
    else:
        errs = B.salient_column_errors(T, ranking, ks)
    k = int(q.salient_columns.sum())
    scale = max(errs.min(), 1e-300)
    assert errs[k - 1] <= errs.min() + 1e-9 * scale
    assert np.array_equal(np.flatnonzero(q.salient_columns), np.sort(ranking[:k]))
    M = np.broadcast_to(q.salient_columns[None, :], T.shape)
    ps = B.split_thresholds(T, M)
    if exact:
        g3 = naive_residual(T, M, 2)
        serr = []
        for p in ps:
            m1, m2 = (np.abs(T) < p) & ~M, (np.abs(T) >= p) & ~M
            serr.append(np.mean((T - naive_residual(T, m1, 1) - naive_residual(T, m2, 1) - g3) ** 2))
        serr = np.array(serr)
    else:
        serr = B.split_errors(T, M, ps)
    chosen = [i for i, p in enumerate(ps) if np.array_equal(q.split, (np.abs(T) >= p) & ~M)]
    assert chosen, "the split is none of the candidates'"
    assert min(serr[i] for i in chosen) <= serr.min() + 1e-9 * max(serr.min(), 1e-300)


def test_block_is_binarized_with_orders_1_1_2_and_feedback_to_later_blocks_only():
    W = make_weight("normal", 6, 256, seed=2)
    H = make_hessian("well", 256, seed=2)
    q = rq.billm(W, H)
    Wh = q.dequantize()
    # first block: no feedback, so the format is the binarization of W itself with its masks
    b = slice(0, 128)
    M = np.broadcast_to(q.salient_columns[None, b], (6, 128))
    m2 = q.split[:, b] & ~M
    m1 = ~q.split[:, b] & ~M
    expect = naive_residual(W[:, b], m1, 1) + naive_residual(W[:, b], m2, 1) + naive_residual(W[:, b], M, 2)
    np.testing.assert_allclose(Wh[:, b], expect, rtol=1e-12, atol=1e-15)
    # the second block saw the first block's error: it differs from binarizing W directly
    assert not np.allclose(Wh[:, 128:], rq.billm(W[:, 128:], H[128:, 128:]).dequantize())


@st.composite
def problems(draw):
    cols = draw(st.integers(1, 140))
    W = make_weight(draw(st.sampled_from(WEIGHT_KINDS)), draw(st.integers(1, 5)), cols, draw(seeds))
    H = make_hessian(draw(st.sampled_from(HESSIAN_KINDS)), cols, draw(seeds))
    return W, H, dict(salient_metric=draw(st.sampled_from(["hessian", "magnitude"])),
                      blocksize=draw(st.sampled_from([64, 128])), search_on=draw(st.sampled_from(["saliency", "weight"])))


@given(problems())
@fast(30)
def test_finite_bit_accounting_and_exact_serialization(problem):
    """Zero rows, dead columns, constant blocks, narrow last blocks: finite; storage >= the paper's
    figure; the serialized form dequantizes to exactly the same matrix."""
    W, H, kw = problem
    q = run(W, H, **kw)
    if q is None:
        return
    Wh = q.dequantize()
    assert Wh.shape == W.shape and np.all(np.isfinite(Wh))
    assert q.bits_per_weight == pytest.approx(1 + q.salient_columns.sum() / W.shape[1])
    assert q.storage_bits >= q.bits_per_weight * q.numel
    back = F.from_tensors(*q.to_tensors())
    assert isinstance(back, F.StructuredBinaryWeight)
    assert np.array_equal(back.dequantize(), Wh)
    assert np.isfinite(q.info["loss"])


def test_constant_and_zero_blocks_are_exact():
    W = np.zeros((4, 128))
    W[0] = 0.75
    W[2, :64] = -3.0
    q = rq.billm(W, make_hessian("well", 128, seed=0))
    assert np.array_equal(q.dequantize()[[0, 1, 3]], W[[0, 1, 3]])
    assert np.all(np.isfinite(q.dequantize()))


def test_storage_layout_counts_everything():
    W = make_weight("normal", 8, 256, seed=0)
    q = rq.billm(W, make_hessian("well", 256, seed=0))
    k = int(q.salient_columns.sum())
    zeros = int((q.signs1 == 0).sum() + (q.signs2[:, q.salient_columns] == 0).sum())
    assert q.storage_bits == 2048 + 8 * k + 8 * (256 - k) + 256 + 2 * 16 * 4 * 8 * 2 + zeros * 11
    assert q.info["mean_salient_columns_per_block"] == k / 2


def test_save_load_roundtrip(tmp_path):
    q = rq.billm(make_weight("zero_rows", 4, 160, seed=1), make_hessian("dead_columns", 160, seed=1))
    F.save(q, tmp_path / "b.safetensors")
    assert np.array_equal(F.load(tmp_path / "b.safetensors").dequantize(), q.dequantize())


# ------------------------------------------------------------------------------------------ errors and extensions


def test_narrow_blocks_extend_or_raise():
    W = make_weight("normal", 3, 140, seed=0)
    H = make_hessian("well", 140, seed=0)
    q = rq.billm(W, H)  # last block: 12 columns, k in 1..11
    assert 1 <= q.salient_columns[128:].sum() <= 11
    with pytest.raises(ValueError, match="narrower than 50"):
        rq.billm(W, H, narrow_blocks="error")
    one = rq.billm(W[:, :1], H[:1, :1])
    assert one.salient_columns.tolist() == [True]


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_inputs_raise(bad):
    W = make_weight("normal", 3, 60, seed=0)
    H = make_hessian("well", 60, seed=0)
    Wb = W.copy()
    Wb[0, 5] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.billm(Wb, H)
    Hb = H.copy()
    Hb[3, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.billm(W, Hb)


@pytest.mark.parametrize("kw, match", [({"blocksize": 0}, "blocksize"), ({"percdamp": -0.5}, "percdamp"),
                                       ({"salient_metric": "x"}, "salient_metric"), ({"search_on": "x"}, "search_on"),
                                       ({"narrow_blocks": "x"}, "narrow_blocks")])
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        rq.billm(make_weight("normal", 2, 60, seed=0), make_hessian("well", 60, seed=0), **kw)

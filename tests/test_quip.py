"""QuIP (refquant.quip): the rotations (orthogonal, the original's butterfly layout, seeded), the
undo of projection and rescale, LDLQ against nearest rounding, the greedy passes' quirk, the
incoherent grid, input validation, bit accounting and serialisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import HESSIAN_KINDS, WEIGHT_KINDS, fast, make_hessian, make_weight

import refquant as rq
from refquant.spec import formats
from refquant.spec import quip as Q


def dense(qw, side):
    parts = tuple(getattr(qw, f"{side}_{f}") for f in formats.QUIP_ROTATION_FIELDS)
    return Q.rotation_matrix(parts)


def problem(rows=6, cols=24, seed=0, hkind="well", wkind="normal"):
    W = np.asarray(make_weight(wkind, rows, cols, seed), dtype=np.float64)
    H = make_hessian(hkind, cols, seed + 1)
    return W, H


# ---------------------------------------------------------------------------------------------
# Rotations
# ---------------------------------------------------------------------------------------------


def test_butterfly_factors_as_the_original():
    """Sorted prime factors split alternately (the notes' examples), a prime gives (n, 1)."""
    assert Q.butterfly_factors(4096) == (64, 64)
    assert Q.butterfly_factors(11008) == (688, 16)
    assert Q.butterfly_factors(14336) == (64, 224)
    assert Q.butterfly_factors(1024) == (32, 32)
    assert Q.butterfly_factors(13) == (13, 1)
    assert Q.butterfly_factors(1) == (1, 1)


@given(st.integers(1, 130), st.sampled_from(["blocked", "kron", "blocked_nopermute"]), st.integers(0, 2**32))
@fast(25)
def test_rotation_is_orthogonal(n, kind, seed):
    """U U^T = I to 1e-12 for every dimension (primes, powers of two, mixed) and every kind."""
    U = Q.rotation_matrix(Q.random_rotation(np.random.default_rng(seed), n, kind))
    assert np.max(np.abs(U @ U.T - np.eye(n))) <= 1e-12


def test_butterfly_layout_matches_the_definition():
    """``butterfly_apply`` is P_out S_2 S_1 P_in with index j = a*p2 + b (mul_ortho_butterfly), checked
    entry by entry against an explicit construction; the transpose is the inverse."""
    n = 12
    perm_in, perm_out, R1, R2 = Q.random_rotation(np.random.default_rng(3), n, "blocked")
    p1, p2 = R1.shape[-1], R2.shape[-1]
    S1, S2 = np.zeros((n, n)), np.zeros((n, n))
    for a in range(p1):
        for b in range(p2):
            for c in range(p1):
                S1[a * p2 + b, c * p2 + b] = R1[b][a, c]
            for c in range(p2):
                S2[a * p2 + b, a * p2 + c] = R2[a][b, c]
    Pin, Pout = np.eye(n)[perm_in], np.eye(n)[perm_out]
    B = Pout @ S2 @ S1 @ Pin
    X = np.random.default_rng(0).standard_normal((n, 5))
    assert np.allclose(formats.butterfly_apply(perm_in, perm_out, R1, R2, X), B @ X, atol=1e-14)
    assert np.allclose(formats.butterfly_apply(perm_in, perm_out, R1, R2, X, transpose=True), B.T @ X, atol=1e-14)


def test_kron_is_a_kronecker_product():
    """incoherence='kron' without the permutations is R1 (x) R2 (the paper's form)."""
    perm_in, perm_out, R1, R2 = Q.random_rotation(np.random.default_rng(5), 32, "kron")
    ident = np.arange(32)
    B = Q.rotation_matrix((ident, ident, R1, R2))
    assert np.allclose(B, np.kron(R1[0], R2[0]), atol=1e-14)


def test_rotations_are_seeded_and_leave_the_global_rng_alone():
    W, H = problem()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = rq.quip(W, H, bits=3, seed=7)
    b = rq.quip(W, H, bits=3, seed=7)
    c = rq.quip(W, H, bits=3, seed=8)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.V_R1, b.V_R1)
    assert not np.array_equal(a.V_R1, c.V_R1)


# ---------------------------------------------------------------------------------------------
# Pre-processing and its undo
# ---------------------------------------------------------------------------------------------


@given(st.sampled_from(["normal", "outlier_channel", "dynamic_range"]), st.sampled_from([True, "kron", False]),
       st.booleans(), st.integers(0, 1000))
@fast(20)
def test_undo_is_exact_on_a_fine_grid(wkind, incoherence, rescale, seed):
    """bits = 16: the projected error Q - W_p is within half a grid step wherever W_p is inside
    [-s, s] (clamped entries sit at the end point), and dequantize() undoes projection and rescale
    exactly: U (W_hat - W) diag(t) V^T == Q - W_p."""
    W, H = problem(5, 20, seed, wkind=wkind)
    qw = rq.quip(W, H, bits=16, rounding="nearest", incoherence=incoherence, rescale=rescale, seed=seed)
    t = qw.t if rescale else np.ones(W.shape[1])
    U = dense(qw, "U") if incoherence else np.eye(5)
    V = dense(qw, "V") if incoherence else np.eye(20)
    Wp = U @ (W * t) @ V.T
    Wp[:, np.diag(V @ (H / t[None, :] / t[:, None]) @ V.T) == 0] = 0
    Qp = qw.projected()
    s, maxq = qw.scale, qw.maxq
    inside = np.abs(Wp) < s * (1 - 1e-9)
    step = 2 * s / maxq
    assert np.all(np.abs(Qp - Wp)[inside] <= step / 2 * (1 + 1e-6))
    assert np.allclose(np.abs(Qp)[~inside], s)
    E = U @ ((qw.dequantize() - W) * t) @ V.T
    assert np.allclose(E, Qp - Wp, atol=1e-12 * max(1.0, np.abs(Wp).max()))


def test_rescale_follows_the_code():
    """H / max|H|, t = (diag H / diag W^T W)^(1/4) with the 1e-8 clamps, W diag(t), diag(t)^-1 H diag(t)^-1."""
    W, H = problem(4, 10)
    W[:, 3] = 0  # clamped diag W^T W
    Ws, Hs, t = Q.diagonal_rescale(W, H)
    Hn = H / np.abs(H).max()
    expect = np.maximum((np.maximum(np.diag(Hn), 1e-8) / np.maximum((W ** 2).sum(0), 1e-8)) ** 0.25, 1e-8)
    assert np.allclose(t, expect, rtol=1e-14)
    assert np.allclose(Ws, W * t, rtol=1e-15)
    assert np.allclose(Hs, Hn / np.outer(t, t), rtol=1e-14)


def test_incoherent_grid():
    """s = 2.4 RMS + 1e-16 of the projected matrix; 2^bits levels evenly covering [-s, s]."""
    W, H = problem(8, 32, seed=2)
    for bits in (2, 3, 4):
        qw = rq.quip(W, H, bits=bits, rounding="nearest")
        levels = np.unique(qw.projected())
        assert np.all(np.isin(levels, (np.arange(2 ** bits) / (2 ** bits - 1) * 2 - 1) * qw.scale))
        assert qw.codes.max() <= 2 ** bits - 1


def test_no_incoherence_skips_trace_normalisation():
    """incoherence=False: no rotation, no +0.01 I; a dead input column is zeroed (GPTQ's H modification)."""
    W, H = problem(4, 16, hkind="dead_columns")
    qw = rq.quip(W, H, bits=4, incoherence=False, rescale=False)
    assert qw.U_R1 is None and qw.V_R1 is None and qw.rotation == "none"
    assert qw.info["dead_columns"] > 0
    dead = np.diag(H) == 0
    assert np.all(qw.projected()[:, dead] == qw.projected()[0, 0] * 0 + qw.projected()[:, dead])
    with_proj = rq.quip(W, H, bits=4, incoherence=True, rescale=False)
    assert with_proj.info["dead_columns"] == 0  # + 0.01 I leaves none dead


# ---------------------------------------------------------------------------------------------
# LDLQ
# ---------------------------------------------------------------------------------------------


@given(st.sampled_from(["normal", "outlier_channel", "zero_rows"]), st.booleans(), st.integers(1, 8),
       st.integers(0, 1000))
@fast(30)
def test_ldlq_on_diagonal_H_is_nearest(wkind, rescale, bits, seed):
    """With a diagonal H the LDL factor is I: no feedback, LDLQ rounds like the nearest path (no ties
    in random data: floor(x + 1/2) and round-half-even agree off ties). At an exact tie (a zero row
    on an even number of levels sits at x = maxq / 2) LDLQ rounds up and nearest to even, as the code."""
    W, H = problem(5, 18, seed, hkind="diagonal", wkind=wkind)
    a = rq.quip(W, H, bits=bits, incoherence=False, rescale=rescale, rounding="ldlq")
    b = rq.quip(W, H, bits=bits, incoherence=False, rescale=rescale, rounding="nearest")
    x = Q.grid_coordinates(W * (a.t if rescale else 1), a.scale, a.maxq)
    tie = np.abs(x - np.floor(x) - 0.5) < 1e-9
    assert np.array_equal(a.codes[~tie], b.codes[~tie])
    xc = np.clip(x[tie], 0, a.maxq)
    assert np.array_equal(a.codes[tie], np.floor(xc + 0.5)) and np.array_equal(b.codes[tie], np.rint(x[tie]))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("hkind", ["well", "near_singular"])
def test_ldlq_beats_nearest_in_expectation(bits, hkind):
    """The proxy loss eq. (1) of LDLQ is not worse than nearest rounding's, averaged over rotation seeds
    (QuIP Theorem 1: LDLQ is optimal among linear-feedback rounders, nearest is the zero feedback)."""
    W, H = problem(8, 48, seed=bits, hkind=hkind)
    ld = [rq.quip(W, H, bits=bits, seed=s).info["loss"] for s in range(6)]
    nn = [rq.quip(W, H, bits=bits, seed=s, rounding="nearest").info["loss"] for s in range(6)]
    assert np.mean(ld) <= np.mean(nn)
    ldp = [rq.quip(W, H, bits=bits, seed=s).info["loss_projected"] for s in range(6)]
    nnp = [rq.quip(W, H, bits=bits, seed=s, rounding="nearest").info["loss_projected"] for s in range(6)]
    assert np.mean(ldp) <= np.mean(nnp)


def test_ldlq_order_and_clamp_by_hand():
    """Two columns, hand-checked: the last column is rounded first (floor(x + 1/2)), the first gets
    its error through L[1, 0]; inputs are clamped before rounding."""
    H = np.array([[4.0, 2.0], [2.0, 4.0]])   # chol: [[2, 0], [1, sqrt 3]] -> L[1, 0] = 1 / 2
    w = np.array([[1.3, 2.6]])
    codes = Q.ldlq(w, H, maxq=3)
    assert codes[0, 1] == 3.0                 # floor(2.6 + .5)
    assert codes[0, 0] == math.floor(1.3 + (2.6 - 3.0) * 0.5 + 0.5)  # 1
    assert np.array_equal(Q.ldlq(np.array([[0.0, 3.0]]), H, 3), [[0.0, 3.0]])


def test_greedy_passes_do_not_refresh_the_residual():
    """After a pass's clamp the code keeps the unclamped residual: a second pass then differs from
    restarting the pass on the clamped codes (reproduced)."""
    found = False
    for seed in range(20):
        rng = np.random.default_rng(seed)
        H = make_hessian("near_singular", 16, seed)  # strong correlations: greedy steps leave [0, maxq]
        w = np.clip(rng.uniform(-0.5, 1.5, size=(6, 16)), 0, 1)
        Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(16)
        c0 = Q.ldlq(w, Hd, 1)
        c1, _ = Q.greedy_passes(w, c0, Hd, 1, 1)
        c2, _ = Q.greedy_passes(w, c0, Hd, 1, 2)
        c2_fresh, _ = Q.greedy_passes(w, c1, Hd, 1, 1)
        if not np.array_equal(c2, c2_fresh):
            found = True
            break
    assert found


def test_npasses_stop_at_a_fixed_point():
    W, H = problem(6, 20)
    qw = rq.quip(W, H, bits=2, npasses=50)
    assert 1 <= qw.info["greedy_passes_run"] < 50


# ---------------------------------------------------------------------------------------------
# Given rotations, bits, serialisation
# ---------------------------------------------------------------------------------------------


def test_given_U_V_replace_the_draws():
    W, H = problem(6, 12)
    rng = np.random.default_rng(1)
    U = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    V = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    qw = rq.quip(W, H, bits=3, U=U, V=V)
    assert np.allclose(dense(qw, "U"), U) and np.allclose(dense(qw, "V"), V)
    assert qw.seed is None and qw.rotation == "given"
    qv = rq.quip(W, H, bits=3, V=V)  # U still drawn from the seed
    assert qv.seed == 0 and np.allclose(dense(qv, "V"), V)


@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([True, "kron", False]), st.booleans())
@fast(12)
def test_bits_and_serialisation(bits, incoherence, rescale):
    W, H = problem(6, 20, seed=bits)
    qw = rq.quip(W, H, bits=bits, incoherence=incoherence, rescale=rescale)
    assert qw.bits_per_weight == bits
    expect = 6 * 20 * bits + 16 + (16 * 20 if rescale else 0) + (64 if incoherence else 0)
    assert qw.storage_bits == expect
    tensors, meta = qw.to_tensors()
    back = formats.from_tensors(tensors, meta)
    assert np.array_equal(back.dequantize(), qw.dequantize())
    assert back.scale == qw.scale and back.seed == qw.seed and back.storage_bits == qw.storage_bits
    assert back.info["loss"] == qw.info["loss"]


def test_explicit_rotation_storage():
    W, H = problem(8, 32)
    qw = rq.quip(W, H, bits=2, rescale=False)
    U = dense(qw, "U")
    explicit = qw.storage_bits_with("explicit")
    # 8 = 4 x 2 -> R1 (2, 4, 4), R2 (4, 2, 2); 32 = 8 x 4 -> R1 (4, 8, 8), R2 (8, 4, 4); two permutations each
    rot = 16 * (32 + 16 + 256 + 128) + 2 * 8 * 3 + 2 * 32 * 5
    assert explicit == 8 * 32 * 2 + 16 + rot
    given_ = rq.quip(W, H, bits=2, rescale=False, U=U, V=np.eye(32))
    assert given_.storage_bits == 8 * 32 * 2 + 16 + 16 * (64 + 8) + 16 * (32 * 32 + 32)


def test_dequantize_on_torch_fields():
    torch = pytest.importorskip("torch")
    W, H = problem(6, 12)
    qw = rq.quip(W, H, bits=3)
    import dataclasses
    moved = dataclasses.replace(qw, **{f.name: torch.from_numpy(getattr(qw, f.name)) for f in dataclasses.fields(qw)
                                       if isinstance(getattr(qw, f.name), np.ndarray)})
    assert np.allclose(moved.dequantize().numpy(), qw.dequantize(), atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"bits": 2.0}, "bits"), ({"bits": 3, "seed": -1}, "seed"),
    ({"bits": 3, "rounding": "gptq"}, "rounding"), ({"bits": 3, "incoherence": "hadamard"}, "incoherence"),
    ({"bits": 3, "npasses": -1}, "npasses"), ({"bits": 3, "npasses": 1, "rounding": "nearest"}, "greedy"),
    ({"bits": 3, "percdamp": -0.1}, "percdamp"), ({"bits": 3, "rescale": 1}, "rescale"),
])
def test_bad_arguments(kwargs, match):
    W, H = problem(4, 8)
    with pytest.raises(ValueError, match=match):
        rq.quip(W, H, **kwargs)


def test_bad_arrays():
    W, H = problem(4, 8)
    Wn = W.copy()
    Wn[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        rq.quip(Wn, H, bits=3)
    with pytest.raises(ValueError, match="in_features"):
        rq.quip(W, H[:4, :4], bits=3)
    with pytest.raises(ValueError, match="empty"):
        rq.quip(np.zeros((0, 8)), H, bits=3)
    with pytest.raises(ValueError, match="orthogonal"):
        rq.quip(W, H, bits=3, U=np.ones((4, 4)))
    with pytest.raises(ValueError, match="incoherence=False"):
        rq.quip(W, H, bits=3, U=np.eye(4), incoherence=False)
    with pytest.raises(rq.QuipHessianNotPositiveDefinite):
        rq.quip(W, -np.eye(8), bits=3, incoherence=False, rescale=False, percdamp=0.0)


@given(st.sampled_from(WEIGHT_KINDS), st.sampled_from(HESSIAN_KINDS), st.integers(0, 100))
@fast(25)
def test_nasty_inputs_give_finite_weights(wkind, hkind, seed):
    """Every weight and Hessian kind of the shared strategies: finite output, codes on the grid."""
    W, H = problem(4, 16, seed, hkind=hkind, wkind=wkind)
    try:
        qw = rq.quip(W, H, bits=2, seed=seed)
    except rq.QuipHessianNotPositiveDefinite:
        assert hkind == "all_dead" or hkind.startswith("near")
        return
    assert np.all(np.isfinite(qw.dequantize())) and qw.codes.max() <= 3


# ---------------------------------------------------------------------------------------------
# The wiring unit
# ---------------------------------------------------------------------------------------------


def test_wiring_unit_options_and_validation():
    from refquant import pipeline
    from refquant.methods.quip import QuipOptions, linear_seed

    cfg = pipeline.QuantConfig.of("quip", wbits=2, group_size=None)
    assert cfg.options == QuipOptions() and cfg.weight_spec().group_size is None
    assert pipeline.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="group-size -1"):
        pipeline.QuantConfig.of("quip", wbits=2, group_size=128)
    with pytest.raises(ValueError, match="sym"):
        pipeline.QuantConfig.of("quip", wbits=2, group_size=None, sym=True)
    with pytest.raises(ValueError, match="quip_incoherence"):
        QuipOptions(quip_incoherence="hadamard")
    with pytest.raises(ValueError, match="LDLQ only"):
        QuipOptions(quip_rounding="nearest", npasses=1)
    seeds = {linear_seed(0, i, n) for i in range(3) for n in rq.llama.LINEARS}
    assert len(seeds) == 3 * len(rq.llama.LINEARS)
    rows = pipeline.METHODS["quip"].study_rows("quip")
    assert [k for k, _, _ in rows][:3] == ["quip_w4", "quip_w3", "quip_w2"]


@pytest.mark.slow
def test_pipeline_resume_after_a_crash_gives_identical_results(tmp_path):
    """The tiny model through the torch pipeline, crashed after layer 1 and resumed: the saved QuipWeights
    are replayed (dequantized on torch fields) exactly as in the uninterrupted run."""
    torch = pytest.importorskip("torch")
    from pipeline_helpers import crash_then_resume, quantize_run

    from refquant import pipeline

    ids = np.random.default_rng(0).integers(0, 4096, size=(4, 128))
    cfg = pipeline.QuantConfig.of("quip", wbits=3, group_size=None)
    clean = quantize_run(cfg, ids, tmp_path / "clean").model.state_dict()
    resumed = crash_then_resume(cfg, ids, tmp_path / "crashed", crash_after=1).model.state_dict()
    for k in clean:
        assert torch.equal(clean[k], resumed[k]), k

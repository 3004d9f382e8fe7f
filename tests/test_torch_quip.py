"""The torch twin of QuIP (refquant/backends/torch_quip.py) against the NumPy reference, on CPU torch:
float64 gives the reference's codes (summation order aside), float32 the parity rule of the golden
suite; quip_many (batched LDLQ over matrices of one width) equals separate quip calls; the golden
suite's cases when the manifest has them."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refquant as rq  # noqa: E402
from refquant import backends, golden  # noqa: E402
from refquant.backends.torch_quip import ldlq_batched  # noqa: E402
from refquant.spec import quip as Q  # noqa: E402


@pytest.fixture(scope="module")
def tb():
    return backends.get_backend("torch")


def problem(rows, cols, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)) * 0.02
    X = rng.standard_normal((2 * cols + 8, cols))
    X[:, 3] *= 30  # an outlier channel
    return W, X.T @ X / len(X)


slow = pytest.mark.slow
CASES = [dict(bits=2), dict(bits=3, rounding="nearest"), dict(bits=2, npasses=2), dict(bits=4, incoherence=False),
         pytest.param(dict(bits=4, incoherence="kron"), marks=slow), pytest.param(dict(bits=3, rescale=False), marks=slow),
         pytest.param(dict(bits=3, incoherence="blocked_nopermute"), marks=slow)]


@pytest.mark.parametrize("kw", CASES, ids=["w2", "w3-nearest", "w2-pass2", "w4-noproj", "w4-kron", "w3-norescale",
                                           "w3-nopermute"])
def test_twin_matches_the_reference(tb, kw):
    W, H = problem(12, 64, 1)
    ref = rq.quip(W, H, **kw)
    for dtype, min_same, rtol in ((torch.float64, 1.0, 1e-12), (torch.float32, 0.99, 1e-2)):
        got = tb.quip(torch.from_numpy(W), torch.from_numpy(H), dtype=dtype, blocksize=32, **kw)
        assert isinstance(got, rq.QuipWeight)
        assert (got.codes.numpy() == ref.codes).mean() >= min_same
        assert abs(got.info["loss"] - ref.info["loss"]) <= rtol * ref.info["loss"]
        assert abs(got.scale - ref.scale) <= 1e-6 * ref.scale
        assert np.allclose(got.dequantize().double().numpy(), ref.dequantize(), atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_quip_many_batches_like_separate_calls(tb):
    """Different widths, different row counts (zero-padded in the batch), each with its own H and seed."""
    shapes = [(12, 64), (5, 64), (30, 64), (7, 40)]
    probs = [problem(r, c, k) for k, (r, c) in enumerate(shapes)]
    ref = [rq.quip(W, H, bits=2, seed=10 + k) for k, (W, H) in enumerate(probs)]
    got = tb.quip_many([torch.from_numpy(W) for W, _ in probs], [torch.from_numpy(H) for _, H in probs],
                       [10 + k for k in range(len(probs))], bits=2, dtype=torch.float64, blocksize=16)
    for r, g in zip(ref, got):
        assert np.array_equal(r.codes, g.codes.numpy())
    with pytest.raises(ValueError, match="one Hessian and one seed"):
        tb.quip_many([torch.from_numpy(probs[0][0])], [torch.from_numpy(probs[0][1])] * 2, [0], bits=2)
    with pytest.raises(ValueError, match="non-empty"):
        tb.quip_many([], [], [], bits=2)


def test_blocked_ldlq_equals_the_column_loop():
    """The lazy-batch LDLQ (any block size) gives the reference loop's codes in float64."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 50))
    H = X.T @ X + 0.1 * np.eye(50)
    w = np.clip(rng.uniform(-0.5, 3.5, (7, 50)), 0, 3)
    ref = Q.ldlq(w, H, 3)
    L = torch.from_numpy(Q.ldl_factor(H))[None]
    for bs in (1, 7, 16, 50, 128):
        got = ldlq_batched(torch.from_numpy(w)[None], L, 3, bs)[0].numpy()
        assert np.array_equal(got, ref)


def test_twin_rejects_bad_input(tb):
    W, H = problem(4, 16, 0)
    with pytest.raises(ValueError, match="bits"):
        tb.quip(torch.from_numpy(W), torch.from_numpy(H), bits=0)
    Wn = torch.from_numpy(W).clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        tb.quip(Wn, torch.from_numpy(H), bits=2)


def test_golden_parity_on_cpu_torch(tb):
    """The golden suite ``quip`` (default cases) on CPU torch, float32, under the suite's parity rule."""
    try:
        manifest = golden.load_manifest()
    except golden.GoldenError:
        pytest.skip("no golden manifest")
    if not any(c.method == "quip" for c in golden.cases(manifest=manifest)):
        pytest.skip("the golden set has no quip cases yet (python tools/make_golden.py)")
    reports = golden.parity_check(tb, methods=["quip"], to_device=torch.as_tensor, to_numpy=tb.to_numpy)
    bad = [r for r in reports if not r["ok"]]
    assert reports and not bad, bad[:3]


def test_torch_formats_dequantizes_quip():
    from refquant.backends import torch_formats

    W, H = problem(6, 24, 2)
    qw = rq.quip(W, H, bits=3)
    exact = torch_formats.dequantize(qw, dtype=torch.float64)
    assert np.allclose(exact.numpy(), qw.dequantize(), atol=1e-14)
    assert np.allclose(torch_formats.dequantize(qw).numpy(), qw.dequantize(), atol=1e-6)

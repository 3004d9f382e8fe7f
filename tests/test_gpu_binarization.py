"""The torch twins of PB-LLM and BiLLM (refquant/backends/torch_binarization.py).

* CPU (default suite): the twin in float64 on small problems makes the reference's decisions and
  reproduces its weights to float64 rounding; ``*_shared`` equals separate calls; argument errors.
* GPU (``pytest -m gpu``, skipped without CUDA): the golden suites ``pbllm`` and ``billm`` under
  their parity rules, and the twins against the reference on LLaMA-like random layers.
"""
from __future__ import annotations

import numpy as np
import pytest
from strategies import make_hessian, make_weight

torch = pytest.importorskip("torch")

import refquant as rq  # noqa: E402
from refquant import backends, golden  # noqa: E402

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _t(a, device="cpu"):
    return torch.as_tensor(a, device=device)


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("kw", [{}, {"group_size": 16, "salient_metric": "magnitude"},
                                {"binarizer_stats": "binarized", "low_frac": 0.5, "high_bits": 4, "blocksize": 7}])
def test_torch_pbllm_matches_the_reference_on_cpu(kw):
    be = backends.get_backend("torch")
    W = make_weight("outlier_channel", 12, 40, seed=1)
    H = make_hessian("dead_columns", 40, seed=1)
    ref = rq.pbllm(W, H, **kw)
    got = be.pbllm(_t(W), _t(H), **kw)
    assert np.array_equal(_np(got.salient_mask), ref.salient_mask)
    assert np.array_equal(_np(got.codes), ref.codes) and np.array_equal(_np(got.signs), ref.signs)
    np.testing.assert_allclose(_np(got.dequantize()), ref.dequantize(), rtol=1e-12, atol=1e-14)
    assert got.info["loss"] == pytest.approx(ref.info["loss"], rel=1e-10)


@pytest.mark.parametrize("kw", [{}, {"salient_metric": "magnitude", "search_on": "weight", "blocksize": 64}])
def test_torch_billm_matches_the_reference_on_cpu(kw):
    be = backends.get_backend("torch")
    W = make_weight("normal", 4, 90, seed=2)
    H = make_hessian("dead_columns", 90, seed=2)
    ref = rq.billm(W, H, **kw)
    got = be.billm(_t(W), _t(H), **kw)
    assert np.array_equal(_np(got.salient_columns), ref.salient_columns)
    assert np.array_equal(_np(got.split), ref.split)
    np.testing.assert_allclose(_np(got.dequantize()), ref.dequantize(), rtol=1e-12, atol=1e-14)
    if not kw:  # the CUDA default, float32 searches, on a Hessian without dead inputs (with many all-zero
        # columns the column objective has candidates within float32 rounding of each other)
        H = make_hessian("outlier_channel", 90, seed=2)
        f32 = be.billm(_t(W), _t(H), search_dtype=torch.float32)
        assert np.array_equal(_np(f32.salient_columns), rq.billm(W, H).salient_columns)


def test_shared_equals_separate_calls_and_formats_serialize():
    be = backends.get_backend("torch")
    H = make_hessian("well", 56, seed=3)
    Ws = [make_weight("normal", r, 56, seed=r) for r in (5, 3)]
    shared = be.pbllm_shared([_t(W) for W in Ws], _t(H), group_size=32)
    for W, s in zip(Ws, shared):
        one = be.pbllm(_t(W), _t(H), group_size=32)
        assert torch.equal(s.dequantize(), one.dequantize())
        back = rq.formats.from_tensors(*s.to_tensors())
        assert np.array_equal(back.dequantize(), _np(s.dequantize()))
    bshared = be.billm_shared([_t(W) for W in Ws], _t(H))
    for W, s in zip(Ws, bshared):
        assert torch.equal(s.dequantize(), be.billm(_t(W), _t(H)).dequantize())
        back = rq.formats.from_tensors(*s.to_tensors())
        assert np.array_equal(back.dequantize(), _np(s.dequantize()))


def test_torch_twins_refuse_bad_input():
    be = backends.get_backend("torch")
    W = torch.ones(3, 8, dtype=torch.float64)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        be.pbllm(W, torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="narrower than 50"):
        be.billm(torch.ones(2, 20, dtype=torch.float64), torch.eye(20, dtype=torch.float64), narrow_blocks="error")
    with pytest.raises(ValueError, match="same in_features"):
        be.pbllm_shared([torch.ones(2, 8), torch.ones(2, 9)], torch.eye(8))
    with pytest.raises(ValueError, match="low_frac"):
        be.pbllm(torch.ones(2, 8), torch.eye(8), low_frac=1.0)


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("method", ["pbllm", "billm"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_cuda_passes_the_golden_suite(method):
    be = backends.get_backend("torch")
    reports = golden.parity_check(be, methods=[method], to_device=lambda a: torch.as_tensor(a).cuda(),
                                  to_numpy=be.to_numpy, include_slow=True)
    bad = [r for r in reports if not r["ok"]]
    assert reports and not bad, bad[:5]
    print(f"\n{method} torch/cuda: {len(reports)} golden cases ok; worst: "
          f"{max(reports, key=lambda r: r.get('proxy_loss_rel_diff', 0))}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_cuda_twins_on_llama_like_layers():
    """q/k/v-like matrices sharing one Hessian (512 columns, outlier inputs): the CUDA twins against the
    reference -- PB-LLM's masks identical, BiLLM's column choices on >= 95% of columns; proxy losses close."""
    be = backends.get_backend("torch")
    rng = np.random.default_rng(0)
    cols = 512
    X = rng.standard_normal((8, 256, cols))
    X[..., rng.choice(cols, 4, replace=False)] *= 20
    H = rq.hessian(X)
    Ws = [0.02 * rng.standard_normal((r, cols)) for r in (256, 64)]
    for W, got in zip(Ws, be.pbllm_shared([_t(W, "cuda") for W in Ws], _t(H, "cuda"), group_size=128)):
        ref = rq.pbllm(W, H, group_size=128)
        assert (_np(got.salient_mask) == ref.salient_mask).mean() >= 0.999
        le, lg = golden.proxy_loss(W, ref.dequantize(), H), golden.proxy_loss(W, _np(got.dequantize()), H)
        assert abs(lg - le) <= 0.005 * le
    for W, got in zip(Ws, be.billm_shared([_t(W, "cuda") for W in Ws], _t(H, "cuda"))):
        ref = rq.billm(W, H)
        assert (_np(got.salient_columns) == ref.salient_columns).mean() >= 0.95
        le, lg = golden.proxy_loss(W, ref.dequantize(), H), golden.proxy_loss(W, _np(got.dequantize()), H)
        assert abs(lg - le) <= 0.01 * le

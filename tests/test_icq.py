"""IR-QLoRA's ICQ (refquant/spec/icq.py): the search as htqin/IR-QLoRA's utils.py does it."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refquant as rq
from refquant.spec import formats
from refquant.spec import icq as icq_spec
from refquant.spec import normalfloat as nf
from strategies import fast, make_weight

F32 = np.float32


def _brute_force(W, blocksize, tau_range, tau_n):
    """Every candidate's entropy per block, computed independently of icq()'s loop."""
    blocks = W.astype(np.float32).reshape(-1, blocksize)
    tau0 = np.sort(blocks, axis=1)[:, (blocksize - 1) // 2]
    A = np.abs(blocks - tau0[:, None]).max(axis=1)
    table = icq_spec.entropy_table(blocksize)
    ents = []
    for f in icq_spec.icq_factors(tau_range, tau_n):
        tau = F32(f) * A + tau0
        codes, _ = nf.nf4_blockwise((blocks - tau[:, None]).reshape(-1), blocksize)
        counts = np.stack([(codes.reshape(-1, blocksize) == c).sum(axis=1) for c in range(16)], axis=1)
        e = np.zeros(blocks.shape[0], np.float32)
        for c in range(16):
            e = e + table[counts[:, c]]
        ents.append(e)
    return np.stack(ents, axis=1), A, tau0


def test_sigma_is_the_originals_float32_ppf():
    torch = pytest.importorskip("torch")
    from scipy.stats import norm

    ppf = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1]).tolist()[0]
    assert ppf == icq_spec.PPF_OFFSET
    assert icq_spec.ICQ_SIGMA == 1 / ppf


def test_factor_grid_is_numpy_linspace_rounded_to_float32():
    f = icq_spec.icq_factors(0.1, 100)
    assert f.dtype == np.float32 and f.shape == (201,)
    assert f[0] == F32(-0.1 * icq_spec.ICQ_SIGMA) and f[-1] == -f[0]
    # np.linspace's middle value is not exactly 0 (as in the original): 6.9e-18
    assert f[100] == F32(np.linspace(-0.1 * icq_spec.ICQ_SIGMA, 0.1 * icq_spec.ICQ_SIGMA, 201)[100])
    assert 0 < abs(f[100]) < 1e-16


def test_lower_median_of_an_even_block():
    b = np.array([[4.0, 1.0, 3.0, 2.0]], dtype=np.float32)
    assert icq_spec.lower_median(b).tolist() == [2.0]  # torch.median: not 2.5


def test_entropy_table_and_block_entropy():
    t = icq_spec.entropy_table(64)
    assert t[0] == 0 and t[64] == 0 and t[32] == F32(0.5)
    codes = np.repeat(np.arange(16), 4).reshape(1, 64)  # uniform over 16 codes: 4 bits
    assert icq_spec.block_entropy(codes, t)[0] == F32(4.0)
    assert icq_spec.block_entropy(np.zeros((1, 64), np.uint8), t)[0] == 0


def test_tie_rule_keeps_the_first_most_negative_factor():
    """A constant block: tau = its value for every factor, all codes 0, entropy 0 everywhere: the first wins."""
    W = np.full((1, 64), 0.3)
    q = rq.icq(W, tau_n=5)
    assert q.info["factor"][0] == icq_spec.icq_factors(0.1, 5)[0]
    assert q.tau[0] == F32(0.3)
    assert np.all(q.codes == 0)  # W - tau is an all-zero block: code 0 everywhere
    assert np.isfinite(q.dequantize()).all()


def test_a_later_factor_wins_only_on_strictly_higher_entropy():
    rng = np.random.default_rng(11)
    W = rng.normal(size=(4, 256)) * 0.02
    q = rq.icq(W, tau_n=20)
    ents, A, tau0 = _brute_force(W, 64, 0.1, 20)
    first_max = np.argmax(ents, axis=1)  # np.argmax: the first maximum
    assert np.array_equal(q.info["factor"], icq_spec.icq_factors(0.1, 20)[first_max])
    assert np.array_equal(q.tau, F32(1) * (q.info["factor"] * A + tau0))
    assert q.info["entropy"] == pytest.approx(float(ents.max(axis=1).mean()), rel=1e-6)


def test_tau_compression_zero_group_gets_code_0_and_partial_group():
    tau = np.array([0.0, 0.0, 0.5, -0.25, 0.125], dtype=np.float32)
    codes, tau2 = icq_spec.compress_tau(tau, 2)
    assert tau2.tolist() == [0.0, 0.5, 0.125]
    assert codes[0] == 0 and codes[1] == 0
    back = icq_spec.decompress_tau(codes, tau2, 2)
    assert back[0] == 0 and np.signbit(back[0])  # DYNAMIC_MAP[0] * 0 = -0
    assert back[2] == F32(0.5) and back[4] == F32(0.125)
    assert abs(back[3] - (-0.25)) <= 0.5 * 0.0141
    # argmin: the first index of the minimum distance in float32
    y = tau[3] / tau2[1]
    d = np.abs(y - nf.DYNAMIC_MAP)
    assert codes[3] == np.flatnonzero(d == d.min())[0]


def test_dequantize_is_nf4_plus_decompressed_tau_and_accounting():
    rng = np.random.default_rng(5)
    W = rng.normal(size=(8, 512)) * 0.05
    for dq in (False, True):
        q = rq.icq(W, double_quant=dq, tau_n=10)
        block = np.arange(W.size) // 64
        nf4_part = (nf.NF4_CODE[q.codes.reshape(-1).astype(int)] * q.absmax[block]).astype(np.float32)
        expect = nf4_part + q.tau_hat()[block]
        assert np.array_equal(q.dequantize_fp32().reshape(-1), expect)
        base = 4 + (8 / 64 + 32 / (64 * 256) if dq else 32 / 64)
        assert q.bits_per_weight == pytest.approx(base + 8 / 64 + 32 / (64 * 256))
        n_blocks = W.size // 64
        assert q.storage_bits == rq.nf4(W, double_quant=dq).storage_bits + 8 * n_blocks + 32 * 1
        back = formats.from_tensors(*q.to_tensors())
        assert type(back) is icq_spec.ICQWeight and back.dequantize().tobytes() == q.dequantize().tobytes()
        assert np.array_equal(back.tau, q.tau)


def test_icq_is_never_worse_in_entropy_than_plain_nf4_at_factor_zero():
    W = make_weight("normal", 6, 256, 3)
    q = rq.icq(W, tau_n=10)
    ents, _, _ = _brute_force(W, 64, 0.1, 10)
    chosen = ents[np.arange(ents.shape[0]), np.argmax(ents, axis=1)]
    assert np.all(chosen >= ents[:, 10])  # factor 0 (tau = lower median) is a candidate


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_refused(bad):
    W = np.ones((2, 64))
    W[0, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.icq(W)


def test_size_not_a_multiple_of_blocksize_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="not a multiple of blocksize 64"):
        rq.icq(np.ones((3, 50)))
    with pytest.raises(ValueError, match="tau_n"):
        rq.icq(np.ones((1, 64)), tau_n=-1)
    with pytest.raises(ValueError, match="tau_range"):
        rq.icq(np.ones((1, 64)), tau_range=float("nan"))
    with pytest.raises(ValueError, match="blocksize2"):
        rq.icq(np.ones((1, 64)), blocksize2=0)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        rq.icq(np.ones((1, 64)), blocksize=16)


@fast(10)
@given(kind=st.sampled_from(("normal", "zero_rows", "dynamic_range", "outlier_channel", "nonneg")),
       rows=st.integers(1, 4), seed=st.integers(0, 2**16), dq=st.booleans(), blocksize2=st.sampled_from([1, 3, 256]))
def test_icq_properties(kind, rows, seed, dq, blocksize2):
    W = make_weight(kind, rows, 128, seed)
    q = rq.icq(W, double_quant=dq, tau_n=4, blocksize2=blocksize2)
    ents, A, tau0 = _brute_force(W, 64, 0.1, 4)
    assert np.array_equal(q.info["factor"], icq_spec.icq_factors(0.1, 4)[np.argmax(ents, axis=1)])
    # the NF4 part is nf4 of W - tau (blocks aligned)
    shifted = (W.astype(np.float32).reshape(-1, 64) - q.tau[:, None]).reshape(W.shape)
    assert np.array_equal(q.codes, rq.nf4(shifted.astype(np.float64), double_quant=dq).codes)
    d = q.dequantize()
    assert d.shape == W.shape and np.isfinite(d).all()
    # the compressed tau is within half a dynamic-map step (relative to its group max) of tau
    step = np.diff(nf.DYNAMIC_MAP.astype(np.float64)).max()
    g = np.arange(q.tau.size) // blocksize2
    err = np.abs(q.tau_hat().astype(np.float64) - q.tau)
    assert np.all(err <= q.tau2[g] * step / 2 + 4 * np.finfo(np.float32).eps * np.abs(q.tau2[g]))


def test_torch_twin_is_bit_identical_on_cpu():
    torch = pytest.importorskip("torch")
    from refquant.backends import normalfloat_ops as ops

    W = make_weight("outlier_channel", 4, 256, 9)
    W[1] = 0
    for dq in (False, True):
        ref = rq.icq(W, double_quant=dq, tau_n=8, blocksize2=3)
        q, tau = ops.torch_icq(torch.tensor(W), double_quant=dq, tau_n=8, blocksize2=3)
        assert np.array_equal(q.codes.numpy(), ref.codes.reshape(-1))
        assert tau.numpy().tobytes() == ref.tau.tobytes()
        assert np.array_equal(q.tau_codes.numpy(), ref.tau_codes)
        assert ops.torch_nf4_dequantize(q).numpy().tobytes() == ref.dequantize_fp32().tobytes()

"""NF4 (refquant/spec/normalfloat.py): bitsandbytes' CUDA kernel step for step, properties, hand-checked cases."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refquant as rq
from refquant.spec import formats
from refquant.spec import normalfloat as nf
from strategies import WEIGHT_KINDS, fast, make_weight

F32 = np.float32


def _up(x):
    return np.nextafter(F32(x), F32(np.inf))


# ------------------------------------------------------------------------------------- the constants


def test_code_table_is_the_kernel_lut_sorted_with_exact_zero_and_ends():
    c = nf.NF4_CODE
    assert c.dtype == np.float32 and c.shape == (16,)
    assert np.all(np.diff(c) > 0) and c[0] == -1 and c[15] == 1 and c[7] == 0
    assert (c < 0).sum() == 7 and (c > 0).sum() == 8


def test_thresholds_are_the_float32_midpoints_and_six_sit_above_the_exact_midpoint():
    c = nf.NF4_CODE.astype(np.float64)
    T = nf.NF4_THRESHOLDS
    mid32 = (nf.NF4_CODE[:-1] + nf.NF4_CODE[1:]) * F32(0.5)
    assert np.array_equal(T, mid32)  # the decimal literals round to the float32-computed midpoints
    exact = (c[:-1] + c[1:]) / 2
    above = np.flatnonzero(T.astype(np.float64) > exact) + 1  # boundary k-1|k
    assert above.tolist() == [1, 2, 4, 5, 13, 15]


def test_dynamic_map_matches_a_torch_rebuild_of_create_dynamic_map():
    torch = pytest.importorskip("torch")
    data = []
    for i in range(7):  # signed=True, max_exponent_bits=7, total_bits=8: 2**i + 1 boundaries per exponent
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    rebuilt = torch.tensor(sorted(data), dtype=torch.float32).numpy()
    assert rebuilt.view(np.uint32).tolist() == nf.DYNAMIC_MAP.view(np.uint32).tolist()
    assert nf.DYNAMIC_MAP[0] != -1.0 and nf.DYNAMIC_MAP[255] == 1.0 and nf.DYNAMIC_MAP[127] == 0.0
    # a float64 linspace rebuild differs in the last bits somewhere
    d64 = []
    for i in range(7):
        b = np.linspace(0.1, 1, 2 ** i + 1)
        m = (b[:-1] + b[1:]) / 2
        d64 += list(10.0 ** (-6 + i) * m) + list(-(10.0 ** (-6 + i)) * m)
    assert not np.array_equal(np.sort(np.array(d64 + [0, 1.0])).astype(np.float32), nf.DYNAMIC_MAP)


# ------------------------------------------------------------------------------------- hand-checked cases


@pytest.mark.parametrize("k", range(1, 16))
def test_each_threshold_goes_to_the_lower_code_and_the_next_float_up(k):
    t = nf.NF4_THRESHOLDS[k - 1]
    assert nf.nf4_codes(np.array([t]))[0] == k - 1
    assert nf.nf4_codes(np.array([_up(t)]))[0] == k


@pytest.mark.parametrize("k", [1, 2, 4, 5, 13, 15])
def test_the_six_thresholds_above_the_exact_midpoint_are_not_nearest(k):
    """x equal to the kernel's threshold is nearer the upper code, but the kernel gives the lower one."""
    t = np.float64(nf.NF4_THRESHOLDS[k - 1])
    lo, hi = np.float64(nf.NF4_CODE[k - 1]), np.float64(nf.NF4_CODE[k])
    assert hi - t < t - lo
    assert nf.nf4_codes(np.array([t], dtype=np.float32))[0] == k - 1


def test_threshold_case_through_the_block_path():
    # absmax 1 (r = 1 exactly) so x * r is the threshold itself
    W = np.zeros((1, 64))
    W[0, 0] = 1.0
    W[0, 1:16] = nf.NF4_THRESHOLDS
    q = rq.nf4(W)
    assert q.codes[0, 1:16].tolist() == list(range(15))
    assert q.codes[0, 0] == 15 and q.codes[0, 16] == 7  # zeros in a non-zero block: the exact-zero code


def test_zero_block_gets_code_0_and_dequantizes_to_negative_zero():
    W = np.zeros((2, 64))
    W[1] = np.linspace(-1, 1, 64)
    q = rq.nf4(W)
    assert q.absmax[0] == 0 and np.all(q.codes[0] == 0)
    d = q.dequantize()
    assert np.all(d[0] == 0) and np.all(np.signbit(d[0]))
    assert np.isfinite(d).all()


def test_partial_last_block_takes_its_absmax_over_the_remaining_elements():
    W = np.zeros((1, 70))
    W[0, :64] = 10.0
    W[0, 64:] = [0.5, -0.25, 0.125, 0, 0, 0.1]
    q = rq.nf4(W)
    assert q.absmax.tolist() == [10.0, 0.5]
    assert q.codes[0, 64:].tolist() == [15, 2, 10, 7, 7, 9]  # -0.5 is nearer -0.525 than -0.395
    # the packed layout: first element in the high nibble; 70 codes -> 35 bytes
    p = q.packed()
    assert p.shape == (35,) and p[0] == (q.codes[0, 0] << 4 | q.codes[0, 1])
    assert np.array_equal(nf.unpack_nf4(p, 70), q.codes.reshape(-1))


def test_pack_odd_count_pads_like_the_kernel():
    W = np.ones((1, 3))
    assert nf.unpack_nf4(rq.nf4(W, blocksize=32).packed()).tolist() == [15, 15, 15, 7]
    assert nf.unpack_nf4(rq.nf4(np.zeros((1, 3)), blocksize=32).packed()).tolist() == [0, 0, 0, 0]
    assert nf.pack_nf4(np.array([1, 2, 3], dtype=np.uint8), pad=0).tolist() == [0x12, 0x30]


def test_reciprocal_is_taken_once_per_block_in_float32():
    """x * float32(1/absmax) differs from x / absmax for some x: the code follows the product."""
    absmax = F32(3.0)
    r = F32(1) / absmax
    xs = np.arange(1, 200000, dtype=np.float32) * F32(1e-5)
    # find an x where the product lands on a threshold's other side than the quotient would
    prod, quot = xs * r, xs / absmax
    diff = nf.nf4_codes(prod) != nf.nf4_codes(quot)
    if diff.any():
        x = xs[np.argmax(diff)]
        W = np.zeros((1, 64), dtype=np.float32)
        W[0, 0], W[0, 1] = absmax, x
        assert rq.nf4(W).codes[0, 1] == nf.nf4_codes(np.array([x * r]))[0]
    else:  # still check that the block path equals the product rule on all of them
        W = np.concatenate([[absmax], xs[:63]]).reshape(1, 64)
        assert np.array_equal(rq.nf4(W).codes[0, 1:], nf.nf4_codes(xs[:63] * r))


def test_double_quant_hand_case_and_dequantization_arithmetic():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(64, 300))  # 300 blocks: one full and one partial second-level block
    q = rq.nf4(W, double_quant=True)
    plain = rq.nf4(W)
    assert np.array_equal(q.codes, plain.codes)  # double quantization changes only the stored constants
    off = F32(np.mean(plain.absmax.astype(np.float64)))
    assert q.offset == float(off)
    a = plain.absmax - off
    assert q.absmax2.tolist() == [np.abs(a[:256]).max(), np.abs(a[256:]).max()]
    expect = nf.DYNAMIC_MAP[q.absmax_codes.astype(int)] * q.absmax2[np.arange(300) // 256] + off
    assert np.array_equal(q.absmax, expect.astype(np.float32))
    assert q.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert plain.bits_per_weight == 4.5


def test_dynamic_quantize_is_nearest_up_to_the_float32_midpoint():
    y = np.linspace(-1, 1, 20001, dtype=np.float32)
    q = nf.dynamic_quantize(y).astype(int)
    d = np.abs(y[:, None].astype(np.float64) - nf.DYNAMIC_MAP[None, :].astype(np.float64))
    best = d.min(axis=1)
    got = d[np.arange(y.size), q]
    assert np.all(got <= best + 1e-7)
    assert nf.dynamic_quantize(np.array([np.nan], dtype=np.float32))[0] == 0


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(bad):
    W = np.ones((2, 64))
    W[1, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rq.nf4(W)


def test_bad_shapes_block_sizes_and_overflow_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        rq.nf4(np.ones(64))
    with pytest.raises(ValueError, match="empty"):
        rq.nf4(np.ones((0, 64)))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        rq.nf4(np.ones((2, 64)), blocksize=48)
    with pytest.raises(ValueError, match="float32 range"):
        rq.nf4(np.full((1, 64), 1e39))


# ------------------------------------------------------------------------------------- properties


@fast(25)
@given(kind=st.sampled_from(WEIGHT_KINDS), rows=st.integers(1, 6), cols=st.integers(1, 150),
       seed=st.integers(0, 2**16), blocksize=st.sampled_from([32, 64, 128]), dq=st.booleans())
def test_every_code_is_the_nearest_entry_except_on_a_kernel_threshold(kind, rows, cols, seed, blocksize, dq):
    W = make_weight(kind, rows, cols, seed)
    q = rq.nf4(W, blocksize=blocksize, double_quant=dq)
    flat = W.astype(np.float32).reshape(-1)
    n = flat.size
    blocks = np.zeros(-(-n // blocksize) * blocksize, np.float32)
    blocks[:n] = flat
    absmax = np.abs(blocks.reshape(-1, blocksize)).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (blocks.reshape(-1, blocksize) * (F32(1) / absmax)[:, None]).reshape(-1)[:n]
    codes = q.codes.reshape(-1).astype(int)
    live = np.isfinite(x)
    d = np.abs(x[live, None].astype(np.float64) - nf.NF4_CODE[None, :].astype(np.float64))
    on_threshold = np.isin(x[live], nf.NF4_THRESHOLDS)
    nearest = d[np.arange(live.sum()), codes[live]] <= d.min(axis=1)
    assert np.all(nearest | on_threshold)
    assert np.all(codes[~live] == 0)  # zeros of an all-zero block
    d_hat = q.dequantize()
    assert d_hat.dtype == np.float64 and d_hat.shape == W.shape and np.isfinite(d_hat).all()
    # serialization is exact
    back = formats.from_tensors(*q.to_tensors())
    assert type(back) is nf.NF4Weight and np.array_equal(back.dequantize(), d_hat)
    assert back.storage_bits == q.storage_bits


@fast(20)
@given(seed=st.integers(0, 2**16), n_blocks=st.integers(1, 5), scale_exp=st.integers(-20, 20))
def test_dequantize_of_table_times_absmax_is_exact(seed, n_blocks, scale_exp):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n_blocks, 64))
    codes[:, 0] = 15  # every block reaches absmax = a (r = 1/a exact for a power of two)
    a = F32(2.0 ** scale_exp) * (F32(1) + F32(rng.integers(0, 2)) )  # powers of two (times 1 or 2)
    W = (nf.NF4_CODE[codes] * a).astype(np.float32)
    q = rq.nf4(W.reshape(n_blocks, 64).astype(np.float64))
    assert np.array_equal(q.codes, codes)
    assert np.array_equal(q.dequantize_fp32(), W)


@fast(20)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 700), spread=st.floats(0.0, 5.0))
def test_double_quantization_error_is_within_half_a_dynamic_map_step(seed, n, spread):
    rng = np.random.default_rng(seed)
    absmax = (np.abs(rng.normal(size=n)) * spread + 0.01).astype(np.float32)
    q, absmax2, offset = nf.double_quantize(absmax)
    back = nf.double_dequantize(q, absmax2, offset)
    a = absmax - F32(offset)
    step = np.diff(nf.DYNAMIC_MAP.astype(np.float64)).max()  # widest gap of the 8-bit dynamic map
    bound = absmax2[np.arange(n) // 256].astype(np.float64) * step / 2
    err = np.abs(back.astype(np.float64) - absmax.astype(np.float64))
    slack = 4 * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) + abs(offset) + absmax2.max())
    assert np.all(err <= bound + slack)


def test_constant_blocks_are_finite_and_exact():
    W = np.full((3, 128), -0.75)
    q = rq.nf4(W, double_quant=True)
    assert np.all(q.codes == 0) and np.isfinite(q.dequantize()).all()
    assert np.array_equal(q.dequantize(), W)  # absmax equal everywhere: offset exact, a = 0 -> -0 * 0 + offset


def test_torch_twin_is_bit_identical_on_cpu():
    torch = pytest.importorskip("torch")
    from refquant.backends import normalfloat_ops as ops

    rng = np.random.default_rng(7)
    W = make_weight("zero_group", 8, 200, 5) + 0.0
    W[0, :64] = 0
    for dq in (False, True):
        ref = rq.nf4(W, double_quant=dq)
        q = ops.torch_nf4_quantize(torch.tensor(W), double_quant=dq)
        assert np.array_equal(q.codes.numpy(), ref.codes.reshape(-1))
        assert q.absmax.numpy().tobytes() == ref.absmax.tobytes()
        assert ops.torch_nf4_dequantize(q).numpy().tobytes() == ref.dequantize_fp32().tobytes()
        assert np.array_equal(q.packed().numpy(), ref.packed())
        assert np.array_equal(ops.unpack_nf4(ops.pack_nf4(q.codes), W.size).numpy(), ref.codes.reshape(-1))
    x = torch.tensor(rng.normal(size=5000).astype(np.float32))
    assert np.array_equal(ops.dynamic_quantize(x).numpy(), nf.dynamic_quantize(x.numpy()))

"""Weight formats (refquant.spec.formats): the common interface, the bit accounting of each format,
the one serializer, the minimal per-row binary format, the codebook format and the torch twin."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import fast, gptq_problems, make_hessian, make_weight, rtn_problems, seeds, weights

import refquant as rq
from refquant.spec import formats as F
from refquant.spec import safetensors_io

ALL_RULES = ("gptq", "awq", "absmax")
EPS32 = 2.0 ** -24  # unit roundoff of float32


def same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def round_trip(fmt):
    """Serialize, check the meta is path-free JSON, rebuild, and check everything came back exactly."""
    tensors, meta = fmt.to_tensors()
    text = json.dumps(meta, sort_keys=True)  # non-finite floats (a NaN GPTQ loss) as Python's json writes them
    for s in _strings(meta):
        assert "/" not in s and "\\" not in s, s  # no paths at all, absolute or relative
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    back = F.from_tensors(tensors, json.loads(text))
    assert type(back) is type(fmt)
    t2, m2 = back.to_tensors()
    same_tensors(tensors, t2)
    assert m2["info_dropped"] == []  # the rebuilt info holds the kept entries only
    assert json.dumps({**m2, "info_dropped": meta["info_dropped"]}, sort_keys=True) == text
    a, b = fmt.dequantize(), back.dequantize()
    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    assert back.storage_bits == fmt.storage_bits and back.bits_per_weight == fmt.bits_per_weight
    return back


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


def test_every_format_is_registered_and_implements_the_interface():
    assert {"affine": F.AffineWeight, "binary": F.BinaryWeight, "codebook": F.CodebookWeight}.items() <= F.FORMATS.items()
    assert rq.QuantizedWeight is rq.AffineWeight
    for cls in F.FORMATS.values():
        assert issubclass(cls, F.WeightFormat) and not getattr(cls, "__abstractmethods__", None)
    with pytest.raises(TypeError):
        F.WeightFormat()


def test_from_tensors_refuses_unknown_formats_versions_and_missing_tensors():
    tensors, meta = F.binarize_rows(make_weight("normal", 3, 5, seed=0)).to_tensors()
    with pytest.raises(ValueError, match="known weight formats"):
        F.from_tensors(tensors, {**meta, "format": "nf5"})
    with pytest.raises(ValueError, match="version"):
        F.from_tensors(tensors, {**meta, "version": 99})
    with pytest.raises(ValueError, match="lacks the tensor"):
        F.from_tensors({k: v for k, v in tensors.items() if k != "alpha"}, meta)
    with pytest.raises(ValueError, match="already registered"):
        F.register_format("binary")(type("Other", (F.BinaryWeight,), {}))


def test_the_spec_module_imports_no_array_library_but_numpy():
    """formats.py is spec layer: no torch / cupy / transformers / backends import, anywhere in it."""
    tree = ast.parse(Path(F.__file__).read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    bad = [n for n in names if n.split(".")[0] in ("torch", "cupy", "cupyx", "transformers", "triton")
           or "backends" in n or (n.startswith("..") and not n.startswith("..."))]
    assert not bad, bad
    assert "__module__" not in Path(F.__file__).read_text()


def test_save_and_load_one_file(tmp_path):
    qw = rq.gptq(make_weight("normal", 4, 32, seed=3), make_hessian("well", 32, seed=3),
                 rq.QuantSpec(bits=3, group_size=8), act_order=True)
    path = tmp_path / "w.safetensors"
    F.save(qw, path)
    back = F.load(path)
    same_tensors(qw.to_tensors()[0], back.to_tensors()[0])
    assert back.spec == qw.spec and back.info == {"loss": qw.info["loss"], "percdamp": qw.info["percdamp"]}
    assert str(tmp_path).encode() not in path.read_bytes()
    bare = tmp_path / "bare.safetensors"
    safetensors_io.write(bare, {"x": np.zeros(2)})
    with pytest.raises(ValueError, match="no refquant weight format"):
        F.load(bare)


# ---------------------------------------------------------------------------------------------
# AffineWeight
# ---------------------------------------------------------------------------------------------


def affine_storage(qw) -> int:
    """The documented layout, written out independently of formats.py."""
    rows, cols = qw.codes.shape
    spec = qw.spec
    n_groups = 1 if spec.group_size is None else -(-cols // spec.group_size)
    pairs = 1 if spec.per_tensor else rows * n_groups
    per_pair = 16 if (spec.sym or spec.rule == "absmax") else 32
    g_bits = 0
    if spec.group_size is not None and not np.array_equal(qw.g_idx, np.arange(cols) // spec.group_size):
        g_bits = cols * max(1, math.ceil(math.log2(n_groups)))
    return rows * cols * spec.bits + pairs * per_pair + g_bits


@given(rtn_problems(rules=ALL_RULES))
@fast(150)
def test_affine_bits_and_storage_of_rtn(problem):
    W, spec = problem
    qw = rq.rtn(W, spec)
    assert qw.bits_per_weight == spec.bits and isinstance(qw.bits_per_weight, float)
    assert isinstance(qw.storage_bits, int) and qw.storage_bits == affine_storage(qw)
    assert qw.storage_bits_per_weight == qw.storage_bits / W.size
    assert qw.storage_bits_with(16, 16) == pytest.approx(qw.storage_bits_per_weight, rel=1e-14)
    assert qw.trivial_g_idx


@given(rtn_problems(rules=ALL_RULES))
@fast(100)
def test_affine_round_trip_of_rtn_is_bit_exact(problem):
    W, spec = problem
    qw = rq.rtn(W, spec)
    back = round_trip(qw)
    assert back.spec == spec and back.info == {}


@given(gptq_problems(max_rows=4, max_cols=24))
@fast(40)
def test_affine_round_trip_and_storage_of_gptq(problem):
    qw = rq.gptq(**problem)
    back = round_trip(qw)
    tensors, meta = qw.to_tensors()
    assert meta["info_dropped"] == ["perm"]  # the array of the act-order permutation is not in meta
    assert sorted(back.info) == ["loss", "percdamp"] and back.info["percdamp"] == qw.info["percdamp"]
    assert back.info["loss"] == qw.info["loss"] or (math.isnan(back.info["loss"]) and math.isnan(qw.info["loss"]))
    assert qw.bits_per_weight == problem["spec"].bits
    assert qw.storage_bits == affine_storage(qw)


@pytest.mark.parametrize(
    "spec_kw, gptq_kw, expected",
    [
        (dict(bits=4), {}, 8 * 64 * 4 + 8 * 32),  # per channel: one scale + zero per row
        (dict(bits=4, group_size=16), {}, 8 * 64 * 4 + 8 * 4 * 32),
        (dict(bits=3, group_size=48), {}, 8 * 64 * 3 + 8 * 2 * 32),  # partial last group
        (dict(bits=4, per_tensor=True), {}, 8 * 64 * 4 + 32),  # one pair in all
        (dict(bits=4, sym=True), {}, 8 * 64 * 4 + 8 * 16),  # constant zero is not stored
        (dict(bits=8, rule="absmax"), {}, 8 * 64 * 8 + 8 * 16),
        (dict(bits=4, group_size=16), dict(act_order=True), 8 * 64 * 4 + 8 * 4 * 32 + 64 * 2),  # g_idx
        (dict(bits=4, group_size=16), dict(act_order=True, static_groups=True), 8 * 64 * 4 + 8 * 4 * 32),
        (dict(bits=2, group_size=32, sym=True), dict(act_order=True), 8 * 64 * 2 + 8 * 2 * 16 + 64 * 1),
    ],
)
def test_affine_storage_bits_of_gptq_cases(spec_kw, gptq_kw, expected):
    W = make_weight("normal", 8, 64, seed=2)
    H = make_hessian("dynamic_range", 64, seed=2)
    qw = rq.gptq(W, H, rq.QuantSpec(**spec_kw), **gptq_kw)
    assert qw.storage_bits == expected
    assert qw.storage_bits_per_weight == expected / (8 * 64)
    assert qw.bits_per_weight == spec_kw["bits"]
    assert qw.trivial_g_idx == ("act_order" not in gptq_kw or "static_groups" in gptq_kw or "group_size" not in spec_kw)
    round_trip(qw)


def test_affine_with_torch_fields_serializes_to_the_same_tensors():
    torch = pytest.importorskip("torch")
    qw = rq.rtn(make_weight("normal", 4, 40, seed=5), rq.QuantSpec(bits=4, group_size=16))
    tq = rq.AffineWeight(*(torch.as_tensor(a) for a in (qw.codes, qw.scale, qw.zero, qw.g_idx)), qw.spec)
    same_tensors(tq.to_tensors()[0], qw.to_tensors()[0])
    assert tq.storage_bits == qw.storage_bits
    assert np.array_equal(tq.dequantize().numpy(), qw.dequantize())


# ---------------------------------------------------------------------------------------------
# BinaryWeight
# ---------------------------------------------------------------------------------------------


@given(weights())
@fast(200)
def test_binarize_rows_is_the_definition(W):
    bw = F.binarize_rows(W)
    W = W.astype(np.float64)
    rows, cols = W.shape
    assert bw.shape == (rows, cols) and bw.signs.dtype == bool
    for r in range(rows):
        mean = W[r].mean()
        assert bw.mean[r] == mean
        assert np.array_equal(bw.signs[r], W[r] - mean >= 0)  # sign(0) = +1
        assert bw.alpha[r] == np.abs(W[r] - mean).mean()
    W_hat = bw.dequantize()
    assert W_hat.dtype == np.float64
    assert np.array_equal(W_hat, np.where(bw.signs, 1.0, -1.0) * bw.alpha[:, None] + bw.mean[:, None])


@given(weights())
@fast(200)
def test_binary_rows_take_two_values_around_the_mean(W):
    bw = F.binarize_rows(W)
    W_hat = bw.dequantize()
    assert (bw.alpha >= 0).all() and np.isfinite(W_hat).all()
    for r in range(W.shape[0]):
        values = set(W_hat[r].tolist())
        assert len(values) <= 2
        assert values <= {bw.mean[r] + bw.alpha[r], bw.mean[r] - bw.alpha[r]}
    # alpha = 0 exactly when the row is constant up to the mean's rounding
    W = W.astype(np.float64)
    assert np.array_equal(bw.alpha == 0, (W == bw.mean[:, None]).all(axis=1))


@given(weights())
@fast(200)
def test_alpha_is_the_least_squares_scale_for_the_signs(W):
    """||W - W_hat||^2 = ||W - mean||^2 - n alpha^2 per row (so never worse than the mean alone), and
    any other scale for the same signs is no better."""
    bw = F.binarize_rows(W)
    W = W.astype(np.float64)
    n = W.shape[1]
    d = W - bw.mean[:, None]
    centred = (d ** 2).sum(axis=1)
    err = ((W - bw.dequantize()) ** 2).sum(axis=1)
    tol = 1e-12 * (centred + n * (np.abs(W).max(axis=1) ** 2)) + 1e-300
    assert np.all(np.abs(err - (centred - n * bw.alpha ** 2)) <= 64 * n * tol)
    assert np.all(err <= centred + 64 * n * tol)
    s = np.where(bw.signs, 1.0, -1.0)
    for t in (-0.5, -0.01, 0.01, 0.5):
        other = ((d - (1 + t) * bw.alpha[:, None] * s) ** 2).sum(axis=1)
        assert np.all(other >= err - 64 * n * tol)


def test_the_l1_error_can_exceed_the_mean_only_error():
    """alpha (the mean of |W - mean|) is L2-optimal, not L1-optimal (that is the median): with a row
    of two opposite spikes and zeros, binarizing costs more in L1 than keeping the mean alone."""
    W = np.array([[-1.0, 1.0] + [0.0] * 8])
    bw = F.binarize_rows(W)
    assert bw.mean[0] == 0 and bw.alpha[0] == pytest.approx(0.2)
    l1 = np.abs(W - bw.dequantize()).sum()
    assert l1 == pytest.approx(2 * 0.8 + 8 * 0.2)  # 3.2 > 2 = ||W - mean||_1
    assert l1 > np.abs(W - bw.mean[0]).sum()


@given(weights(), st.sampled_from([1e-3, 0.5, 2.0, 3.0, 1e3]), st.floats(-10, 10))
@fast(150)
def test_binarize_rows_is_equivariant_under_positive_affine_maps(W, c, t):
    """binarize_rows(c W + b), c > 0: same signs (where W - mean is above rounding), alpha * c,
    c * mean + b."""
    W = W.astype(np.float64)
    scale = float(np.abs(W).max()) or 1.0
    b = t * scale
    bw, bw2 = F.binarize_rows(W), F.binarize_rows(c * W + b)
    size = c * np.abs(W).max(axis=1) + abs(b)
    tol = 1e-13 * W.shape[1] * size
    assert np.all(np.abs(bw2.alpha - c * bw.alpha) <= tol + 1e-300)
    assert np.all(np.abs(bw2.mean - (c * bw.mean + b)) <= tol + 1e-300)
    clear = c * np.abs(W - bw.mean[:, None]) > 4 * tol[:, None]
    assert np.array_equal(bw2.signs[clear], bw.signs[clear])


@given(weights())
@fast(150)
def test_negation_flips_the_signs_except_at_the_mean(W):
    """Rounding commutes with negation, so this one holds exactly."""
    W = W.astype(np.float64)
    bw, neg = F.binarize_rows(W), F.binarize_rows(-W)
    assert np.array_equal(neg.mean, -bw.mean) and np.array_equal(neg.alpha, bw.alpha)
    at_mean = W == bw.mean[:, None]
    assert np.array_equal(neg.signs, np.where(at_mean, True, ~bw.signs))


@given(weights())
@fast(100)
def test_binary_bits_and_round_trip(W):
    bw = F.binarize_rows(W)
    rows, cols = W.shape
    assert bw.bits_per_weight == 1.0
    assert bw.storage_bits == rows * cols + 32 * rows
    assert bw.storage_bits_per_weight == pytest.approx(1 + 32 / cols, rel=1e-15)
    tensors, meta = bw.to_tensors()
    assert tensors["signs"].dtype == np.uint8 and tensors["signs"].shape == (rows, -(-cols // 8))
    back = round_trip(bw)
    assert back.signs.dtype == bool and np.array_equal(back.signs, bw.signs)


def test_binary_round_trip_keeps_scalar_info_and_drops_arrays():
    bw = F.BinaryWeight(np.array([[True, False, True]]), np.array([0.5]), np.array([1.0]),
                        info={"loss": np.float64(0.25), "order": 1, "tag": "x", "ok": np.bool_(True),
                              "mask": np.ones(3), "nested": {"a": 1}})
    tensors, meta = bw.to_tensors()
    assert meta["info"] == {"loss": 0.25, "order": 1, "tag": "x", "ok": True}
    assert meta["info_dropped"] == ["mask", "nested"]
    assert F.from_tensors(tensors, meta).info == meta["info"]


@pytest.mark.parametrize(
    "W, match",
    [
        (np.array([[1.0, np.nan]]), "non-finite"),
        (np.array([[1.0], [np.inf]]), "non-finite"),
        (np.zeros((0, 4)), "empty"),
        (np.zeros((3, 0)), "empty"),
        (np.ones(4), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        ([[1.0, 2.0]], "2-D"),
    ],
)
def test_binarize_rows_rejects_bad_input(W, match):
    with pytest.raises(ValueError, match=match):
        F.binarize_rows(W)


def test_binary_weight_checks_its_fields():
    with pytest.raises(ValueError, match="boolean"):
        F.BinaryWeight(np.ones((2, 3), dtype=np.uint8), np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match="alpha must have shape"):
        F.BinaryWeight(np.ones((2, 3), dtype=bool), np.ones(3), np.zeros(2))
    with pytest.raises(ValueError, match="mean must have shape"):
        F.BinaryWeight(np.ones((2, 3), dtype=bool), np.ones(2), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="2-D"):
        F.BinaryWeight(np.ones(3, dtype=bool), np.ones(1), np.zeros(1))


# ---------------------------------------------------------------------------------------------
# CodebookWeight
# ---------------------------------------------------------------------------------------------


@st.composite
def codebook_weights(draw, double_quant=None):
    rng = np.random.default_rng(draw(seeds))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    bits = draw(st.integers(1, 4))
    block = draw(st.sampled_from([1, 4, 7, 16, 64]))
    codebook = np.sort(rng.uniform(-1, 1, 2 ** bits))
    codes = rng.integers(0, 2 ** bits, (rows, cols)).astype(np.uint8)
    n_blocks = -(-rows * cols // block)
    dq = draw(st.booleans()) if double_quant is None else double_quant
    if dq:
        block2 = draw(st.sampled_from([1, 3, 256]))
        absmax = F.QuantizedAbsmax(rng.integers(0, 256, n_blocks).astype(np.uint8), np.linspace(-1, 1, 256),
                                   rng.uniform(0.1, 2.0, -(-n_blocks // block2)), block_size=block2,
                                   offset=float(rng.uniform(1.0, 3.0)))
    else:
        absmax = rng.uniform(0.0, 5.0, n_blocks)
    return F.CodebookWeight(codes, codebook, absmax, block_size=block)


@given(codebook_weights())
@fast(100)
def test_codebook_dequantize_is_the_definition(cw):
    rows, cols = cw.shape
    absmax = cw.absmax_values()
    if cw.double_quant:
        a = cw.absmax
        assert np.array_equal(absmax, [a.codebook[c] * a.scale[i // a.block_size] + a.offset for i, c in enumerate(a.codes)])
    flat = cw.codes.reshape(-1)
    expected = np.array([cw.codebook[flat[i]] * absmax[i // cw.block_size] for i in range(rows * cols)]).reshape(rows, cols)
    assert np.array_equal(cw.dequantize(), expected)


@given(codebook_weights())
@fast(100)
def test_codebook_bits_and_round_trip(cw):
    bits = int(np.log2(len(cw.codebook)))
    assert cw.bits == bits and cw.bits_per_weight == float(bits)
    n_blocks = -(-cw.numel // cw.block_size)
    if cw.double_quant:
        a = cw.absmax
        absmax_bits = n_blocks * 8 + 32 * 256 + 32 * len(a.scale) + 32
    else:
        absmax_bits = 32 * n_blocks
    assert cw.storage_bits == cw.numel * bits + 32 * len(cw.codebook) + absmax_bits
    round_trip(cw)


def test_codebook_storage_matches_qlora_accounting():
    """QLoRA: NF4 with fp32 absmax per 64 weights costs 4.5 bits, with double quantization
    (8-bit codes, fp32 scale per 256 constants) 4 + 8/64 + 32/(64*256) ~= 4.127; our layout adds
    the two codebooks and the offset."""
    rows, cols = 64, 256  # 16384 weights = 256 blocks of 64
    codes = np.zeros((rows, cols), dtype=np.uint8)
    nf = np.linspace(-1, 1, 16)
    n_blocks = rows * cols // 64
    plain = F.CodebookWeight(codes, nf, np.ones(n_blocks), block_size=64)
    assert (plain.storage_bits - 16 * 32) / plain.numel == 4.5
    dq = F.CodebookWeight(codes, nf, F.QuantizedAbsmax(np.zeros(n_blocks, dtype=np.uint8), np.linspace(-1, 1, 256),
                                                       np.ones(n_blocks // 256), block_size=256, offset=0.5), block_size=64)
    assert (dq.storage_bits - 16 * 32 - 256 * 32 - 32) / dq.numel == 4 + 8 / 64 + 32 / (64 * 256)


def test_codebook_weight_checks_its_fields():
    cb = np.linspace(-1, 1, 4)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\]"):
        F.CodebookWeight(np.full((2, 2), 4, dtype=np.uint8), cb, np.ones(1), block_size=4)
    with pytest.raises(ValueError, match="2\\*\\*bits entries"):
        F.CodebookWeight(np.zeros((2, 2), dtype=np.uint8), np.linspace(-1, 1, 3), np.ones(1), block_size=4)
    with pytest.raises(ValueError, match="integer array"):
        F.CodebookWeight(np.zeros((2, 2)), cb, np.ones(1), block_size=4)
    with pytest.raises(ValueError, match="one per block"):
        F.CodebookWeight(np.zeros((2, 3), dtype=np.uint8), cb, np.ones(1), block_size=4)  # 6 weights: 2 blocks
    with pytest.raises(ValueError, match="block_size"):
        F.CodebookWeight(np.zeros((2, 2), dtype=np.uint8), cb, np.ones(1), block_size=0)
    with pytest.raises(ValueError, match="need 2"):
        F.CodebookWeight(np.zeros((2, 3), dtype=np.uint8), cb,
                         F.QuantizedAbsmax(np.zeros(3, dtype=np.uint8), cb, np.ones(1)), block_size=4)
    with pytest.raises(ValueError, match="offset"):
        F.QuantizedAbsmax(np.zeros(3, dtype=np.uint8), cb, np.ones(1), offset=float("nan"))


# ---------------------------------------------------------------------------------------------
# The torch twin
# ---------------------------------------------------------------------------------------------


@st.composite
def any_formats(draw):
    which = draw(st.sampled_from(["rtn", "gptq", "binary", "codebook"]))
    if which == "rtn":
        W, spec = draw(rtn_problems(rules=ALL_RULES))
        return rq.rtn(W, spec)
    if which == "gptq":
        return rq.gptq(**draw(gptq_problems(max_rows=4, max_cols=24)))
    if which == "binary":
        return F.binarize_rows(draw(weights()))
    return draw(codebook_weights())


def twin_tolerance(fmt):
    """Elementwise bound of |float32 twin - float64 reference|: each stored float rounded once to
    float32, then the twin's one or two float32 operations (relative EPS32 each)."""
    if isinstance(fmt, rq.AffineWeight):  # scale * (codes - zero): codes - zero is exact
        return 3 * EPS32 * np.abs(fmt.dequantize())
    if isinstance(fmt, rq.BinaryWeight):  # +-alpha + mean: cancellation -> relative to |alpha| + |mean|
        return 3 * EPS32 * (np.abs(fmt.alpha) + np.abs(fmt.mean))[:, None] * np.ones(fmt.shape)
    # codebook[codes] * absmax (absmax itself from cb2 * scale + offset with double quantization)
    absmax = np.abs(fmt.absmax_values())
    if fmt.double_quant:
        a = fmt.absmax
        absmax = np.abs(a.codebook[a.codes] * a.scale[np.arange(len(a.codes)) // a.block_size]) + abs(a.offset)
    block = (np.arange(fmt.numel) // fmt.block_size).reshape(fmt.shape)
    return 6 * EPS32 * np.abs(fmt.codebook[fmt.codes]) * absmax[block]


@given(any_formats())
@fast(120)
def test_torch_twin_matches_the_reference(fmt):
    torch = pytest.importorskip("torch")
    from refquant.backends import torch_formats

    ref = fmt.dequantize()
    exact = torch_formats.dequantize(fmt, dtype=torch.float64)
    assert exact.dtype == torch.float64 and exact.device.type == "cpu"
    assert np.array_equal(exact.numpy(), ref)  # same arithmetic in float64: bit-identical
    t32 = torch_formats.dequantize(fmt)
    assert t32.dtype == torch.float32 and tuple(t32.shape) == fmt.shape
    assert np.all(np.abs(t32.numpy().astype(np.float64) - ref) <= twin_tolerance(fmt))


def test_torch_twin_takes_torch_fields_and_refuses_unknown_formats():
    torch = pytest.importorskip("torch")
    from refquant.backends import torch_formats

    bw = F.binarize_rows(make_weight("normal", 3, 9, seed=1))
    tb = F.BinaryWeight(torch.as_tensor(bw.signs), torch.as_tensor(bw.alpha), torch.as_tensor(bw.mean))
    assert np.array_equal(torch_formats.dequantize(tb, dtype=torch.float64).numpy(), bw.dequantize())
    assert np.array_equal(tb.dequantize().numpy(), bw.dequantize())
    with pytest.raises(TypeError, match="no torch twin"):
        torch_formats.dequantize(object())
    # the reference dequantize() also runs on torch fields (uint8 codes are indices, not a mask)
    cw = F.CodebookWeight(np.array([[0, 3, 1], [2, 2, 0]], dtype=np.uint8), np.linspace(-1, 1, 4), np.array([2.0, 0.5]),
                          block_size=4)
    tc = F.CodebookWeight(*(torch.as_tensor(a) for a in (cw.codes, cw.codebook, cw.absmax)), block_size=4)
    assert np.array_equal(tc.dequantize().numpy(), cw.dequantize())
    assert np.array_equal(torch_formats.dequantize(tc, dtype=torch.float64).numpy(), cw.dequantize())

"""NormalFloat (NF4) blockwise 4-bit quantization and double quantization, as bitsandbytes' CUDA kernel stores it.

Paper: Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs"
(NeurIPS 2023), Sec. 3: "4-bit NormalFloat Quantization" (eq. (4): the k-bit quantile code built from
N(0, 1) with an exact zero), "Double Quantization" (Sec. 3, the absmax constants quantized to 8-bit
floats in blocks of 256 after subtracting their mean), eq. (5)/(6) (``doubleDequant``).

Original code (the reference that produced the literature's NF4 numbers): bitsandbytes-foundation/
bitsandbytes, commit 95f9af309d4d5793847169c39288dcd3fcbdf564:

* ``csrc/kernels.cu``: ``nf4_dequantization_lut`` (the 16 code values, :data:`NF4_CODE`),
  ``dQuantizeNF4`` (the decision tree and its 15 decimal threshold literals, :data:`NF4_THRESHOLDS`),
  ``kQuantizeBlockwise`` / ``kQuantizeBlockwiseSmall`` (absmax per block, ``1.0f / absmax`` once per
  block, ``x * r`` compared with the tree), ``dQuantize<0>`` (the 8-bit binary search with float32
  midpoints used for the double-quantized absmax), ``kDequantizeBlockwise`` (``code[q] * absmax``);
* ``bitsandbytes/functional.py``: ``get_4bit_type('nf4')``, ``create_normal_map``,
  ``create_dynamic_map`` (the signed 8-bit dynamic map, :data:`DYNAMIC_MAP`), ``quantize_4bit``
  (``compress_statistics``: ``offset = absmax.mean()``, ``quantize_blockwise(absmax - offset,
  blocksize=256)``), ``dequantize_4bit`` (``dequantize_blockwise(...) + offset``).

**A storage format, so float32.** Unlike the rest of :mod:`refquant.spec` (float64), every step here
is the float32 arithmetic of the CUDA kernel, because the stored codes *are* the format: ``W`` is
rounded to float32; per block ``absmax = max |x|``, ``r = float32(1 / absmax)`` once, and each
``x * r`` (one float32 product) goes through the kernel's thresholds -- its decimal literals rounded
to float32, compared with a strict ``>`` (ties to the lower code). Those literals are the float64
midpoints of adjacent float32 code values, so they equal the float32-computed midpoints
``(c[k-1] + c[k]) * 0.5f``; six of them (between codes 0|1, 1|2, 3|4, 4|5, 12|13, 14|15) lie half an
ulp *above* the exact midpoint, so an ``x * r`` equal to such a threshold gets the lower code although
it is nearer the upper one (``tests/test_normalfloat.py`` pins all 15). Dequantization is
``float32(code[q] * absmax)``; :meth:`NF4Weight.dequantize` returns that as float64.

Kernel behaviour kept on purpose (bitsandbytes' CPU backend differs on each point; it is not the
reference): an all-zero block has ``absmax = 0``, ``r = inf``, ``0 * inf = NaN``, every comparison is
false, so every code is 0 (``-1.0``), dequantizing to ``-1.0 * 0 = -0.0``; the partial last block
takes its absmax over its remaining elements; double quantization goes through the binary search of
``dQuantize<0>`` (not a lookup table).

Double quantization (``double_quant=True``, bitsandbytes ``compress_statistics``): ``offset`` = the
mean of the block absmaxes rounded to float32 (the kernel reduces in float32 in an order of its own;
here the sum is exact -- :func:`math.fsum` -- and rounded once: the two agree except when the float32
rounding of the mean is within a few float32-sum rounding errors of a tie); ``a = absmax - offset``
in float32; blocks of 256 constants, ``absmax2 = max |a|``, ``r2 = float32(1 / absmax2)``, ``a * r2``
to the 8-bit signed dynamic map through the kernel's binary search (the nearest entry, ties at the
float32 midpoint ``(lo + hi) * 0.5f`` to the entry the search lands on); the dequantized absmax is
``float32(float32(DYNAMIC_MAP[q] * absmax2) + offset)``, and the NF4 codes are those of the exact
absmax (double quantization changes only the stored constants).

Packing (:func:`pack_nf4`): two codes per byte, the first element in the high nibble; an odd element
count leaves a low nibble that the kernel fills with the code of its zero-padded load (7, or 0 when
the last block is all zero).

Accounting (QLoRA's, ``bits_per_weight``): ``4 + 32/blocksize`` (4.5 at 64), with double quantization
``4 + 8/blocksize + 32/(blocksize * 256)`` (~4.127 at 64). ``storage_bits`` counts the packed code
bytes, the float32 absmax (or the 8-bit codes, float32 ``absmax2`` per 256 blocks and the float32
offset); the two tables are constants of the format and not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from array_api_compat import array_namespace
from array_api_compat import device as array_device

from ._checks import check_finite, check_matrix
from ._xp import to_numpy
from .formats import FLOAT_BITS, WeightFormat, _check_shape, register_format

__all__ = [
    "NF4_CODE", "NF4_THRESHOLDS", "DYNAMIC_MAP", "BLOCKSIZES", "DQ_BLOCKSIZE", "NF4Weight",
    "nf4", "nf4_codes", "nf4_blockwise", "dynamic_quantize", "double_quantize", "double_dequantize",
    "pack_nf4", "unpack_nf4", "check_blocksize", "weight_fp32",
]

#: The 16 NF4 values, ``nf4_dequantization_lut`` of ``csrc/kernels.cu`` (float32 literals; index order
#: is value order: 7 negative values, an exact 0 at index 7, 8 positive values).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
NF4_CODE.setflags(write=False)

#: The decision-tree thresholds of ``dQuantizeNF4`` (``csrc/kernels.cu``), its decimal literals rounded
#: to float32, in ascending order: ``x > NF4_THRESHOLDS[k-1]`` iff the code is ``>= k``.
NF4_THRESHOLDS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=np.float32)
NF4_THRESHOLDS.setflags(write=False)

#: Index of the exact zero in :data:`NF4_CODE` (the code the kernel gives a zero in a non-zero block).
ZERO_CODE = 7

# create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) of bitsandbytes/functional.py, as
# torch builds it (float32 linspace of the fraction boundaries, their means times powers of ten,
# sorted): the float32 bit patterns. tests/test_normalfloat.py rebuilds it with torch when available.
_DYNAMIC_MAP_HEX = (
    "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999a"
    "bf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666"
    "bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333"
    "bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000"
    "bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333"
    "be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999a"
    "bd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3"
    "bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148"
    "bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8a"
    "bb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70b"
    "b8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
    "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d"
    "3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c039581"
    "3c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae148"
    "3d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
    "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb3334"
    "3df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d3334"
    "3e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a"
    "3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d0000"
    "3f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f483333"
    "3f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f736666"
    "3f7700003f7a999a3f7e33333f800000"
)

#: bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values in [-0.99296875, 1]; its smallest
#: value is not -1; one exact 0 at index 127, 1.0 at index 255).
DYNAMIC_MAP = np.frombuffer(bytes.fromhex(_DYNAMIC_MAP_HEX), dtype=">u4").astype(np.uint32).view(np.float32)
DYNAMIC_MAP.setflags(write=False)

#: Block sizes ``quantize_4bit`` accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Second-level block size of double quantization (``quantize_blockwise(..., blocksize=256)``).
DQ_BLOCKSIZE = 256

_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


def check_blocksize(blocksize, name: str = "blocksize") -> int:
    """One of :data:`BLOCKSIZES` (the block sizes bitsandbytes' ``quantize_4bit`` accepts)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES} (the block sizes of bitsandbytes' quantize_4bit); "
                         f"got {blocksize!r}.")
    return int(blocksize)


def weight_fp32(W, name: str = "W") -> np.ndarray:
    """``W`` (finite, non-empty 2-D) rounded to float32 and flattened row-major."""
    W = np.asarray(W)
    check_matrix(W, name)
    if not np.issubdtype(W.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array; got {W.dtype}.")
    with np.errstate(over="raise"):
        try:
            W32 = W.astype(np.float32)
        except FloatingPointError:
            W32 = None
    if W32 is None or not np.isfinite(W32).all():
        raise ValueError(f"{name} has values beyond the float32 range (|W| > 3.4e38); NF4 stores float32 absmax. "
                         "Check the weights.")
    return W32.reshape(-1)


def nf4_codes(x) -> np.ndarray:
    """The code ``dQuantizeNF4`` gives each float32 ``x`` (already scaled by ``r``): the number of
    :data:`NF4_THRESHOLDS` strictly below ``x`` (the tree's strict ``>``; ties to the lower code);
    NaN (a zero in an all-zero block: ``0 * inf``) fails every comparison: code 0."""
    x = np.asarray(x, dtype=np.float32)
    codes = np.searchsorted(NF4_THRESHOLDS, x, side="left").astype(np.uint8)
    codes[np.isnan(x)] = 0
    return codes


def _blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """``flat`` zero-padded to whole blocks, shape (n_blocks, blocksize) (the kernel's zero-filled load)."""
    n_blocks = -(-flat.shape[0] // blocksize)
    out = np.zeros(n_blocks * blocksize, dtype=flat.dtype)
    out[: flat.shape[0]] = flat
    return out.reshape(n_blocks, blocksize)


def nf4_blockwise(flat, blocksize: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``kQuantizeBlockwise`` (NF4) of a float32 vector: ``(codes uint8 (n,), absmax float32 (n_blocks,))``.

    Per block of ``blocksize`` consecutive values (the last one partial): ``absmax = max |x|``,
    ``r = float32(1 / absmax)``, code of ``x * r`` (float32 product) by :func:`nf4_codes`.
    """
    flat = np.asarray(flat, dtype=np.float32).reshape(-1)
    n = flat.shape[0]
    B = _blocks(flat, blocksize)
    absmax = np.abs(B).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = _ONE / absmax
        x = B * r[:, None]
    return nf4_codes(x).reshape(-1)[:n], absmax


def dynamic_quantize(y) -> np.ndarray:
    """``dQuantize<0>`` of ``csrc/kernels.cu`` on :data:`DYNAMIC_MAP`: float32 ``y`` -> uint8 index.

    A binary search from index 127 with steps 64, 32, ..., 1 (strict ``>``), then the float32 midpoint
    ``(neighbour + val) * 0.5f`` towards the side ``y`` lies on decides between the landing entry and
    its neighbour (strict comparisons: a tie stays on the landing entry). NaN lands on index 0.
    """
    code = DYNAMIC_MAP
    y = np.asarray(y, dtype=np.float32)
    pivot = np.full(y.shape, 127, dtype=np.int64)
    upper_pivot = np.full(y.shape, 255, dtype=np.int64)
    lower_pivot = np.zeros(y.shape, dtype=np.int64)
    lower = np.full(y.shape, -1.0, dtype=np.float32)
    upper = np.full(y.shape, 1.0, dtype=np.float32)
    val = code[pivot]
    step = 64
    while step > 0:
        gt = y > val
        lower_pivot = np.where(gt, pivot, lower_pivot)
        lower = np.where(gt, val, lower)
        upper_pivot = np.where(gt, upper_pivot, pivot)
        upper = np.where(gt, upper, val)
        pivot = np.where(gt, pivot + step, pivot - step)
        val = code[pivot]
        step >>= 1
    upper = np.where(upper_pivot == 255, code[255], upper).astype(np.float32)
    lower = np.where(lower_pivot == 0, code[0], lower).astype(np.float32)
    gt = y > val
    mid_up = (upper + val) * _HALF
    mid_lo = (lower + val) * _HALF
    q = np.where(gt, np.where(y > mid_up, upper_pivot, pivot), np.where(y < mid_lo, lower_pivot, pivot))
    return q.astype(np.uint8)


def double_quantize(absmax) -> tuple[np.ndarray, np.ndarray, float]:
    """bitsandbytes' ``compress_statistics``: ``(absmax_codes uint8, absmax2 float32, offset)``.

    ``offset = float32(mean(absmax))`` (exact sum, one rounding); ``a = absmax - offset`` (float32);
    ``quantize_blockwise(a, blocksize=256)`` with :data:`DYNAMIC_MAP`: ``absmax2 = max |a|`` per block
    of 256, ``r2 = float32(1 / absmax2)``, :func:`dynamic_quantize` of ``a * r2``.
    """
    absmax = np.asarray(absmax, dtype=np.float32).reshape(-1)
    offset = np.float32(math.fsum(absmax.astype(np.float64).tolist()) / absmax.shape[0])
    a = absmax - offset
    n = a.shape[0]
    B = _blocks(a, DQ_BLOCKSIZE)
    absmax2 = np.abs(B).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = B * (_ONE / absmax2)[:, None]
    return dynamic_quantize(y).reshape(-1)[:n], absmax2, float(offset)


def double_dequantize(absmax_codes, absmax2, offset) -> np.ndarray:
    """``dequantize_blockwise(...) + offset``: ``float32(float32(DYNAMIC_MAP[q] * absmax2[b]) + offset)``."""
    q = np.asarray(absmax_codes).astype(np.int64)
    block = np.arange(q.shape[0]) // DQ_BLOCKSIZE
    return (DYNAMIC_MAP[q] * np.asarray(absmax2, dtype=np.float32)[block]) + np.float32(offset)


def pack_nf4(codes, pad: int = ZERO_CODE) -> np.ndarray:
    """Two 4-bit codes per byte, the first element in the high nibble (bitsandbytes' layout).

    An odd count leaves the last low nibble to ``pad``: the kernel writes the code of its zero-filled
    load there (7; 0 when the last block is all zero -- :meth:`NF4Weight.packed` passes the right one).
    """
    c = np.asarray(codes).reshape(-1)
    if c.size and (not np.issubdtype(c.dtype, np.integer) or int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("pack_nf4: codes must be integers in 0..15.")
    if not 0 <= int(pad) <= 15:
        raise ValueError(f"pack_nf4: pad must be a code in 0..15; got {pad!r}.")
    c = c.astype(np.uint8)
    if c.shape[0] % 2:
        c = np.concatenate([c, np.array([pad], dtype=np.uint8)])
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack_nf4(packed, numel: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_nf4`: uint8 codes, ``2 * len(packed)`` of them, or the first ``numel``."""
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise ValueError(f"unpack_nf4: packed must be uint8 bytes; got {p.dtype}.")
    p = p.reshape(-1)
    out = np.empty(2 * p.shape[0], dtype=np.uint8)
    out[0::2] = p >> 4
    out[1::2] = p & 0x0F
    if numel is not None:
        if not 0 <= numel <= out.shape[0]:
            raise ValueError(f"unpack_nf4: numel {numel} does not fit {p.shape[0]} bytes.")
        out = out[:numel]
    return out


@register_format("nf4")
@dataclass(frozen=True, eq=False)
class NF4Weight(WeightFormat):
    """A NormalFloat-4 weight as bitsandbytes stores it (:func:`nf4`).

    Attributes:
        codes: uint8 in 0..15, one per weight, shape (out_features, in_features) (row-major order is
            the block order).
        absmax: float32 per block of ``blocksize`` consecutive row-major weights, shape (n_blocks,):
            the absmax the dequantization uses (the double-dequantized one under double quantization).
        blocksize: weights per block (64).
        absmax_codes, absmax2, offset: the double-quantized absmax (uint8 per block, float32 per 256
            blocks, the float32 offset as a Python float), or ``None`` without double quantization.
        info: diagnostics.

    ``dequantize()``: ``float32(NF4_CODE[codes] * absmax[block])`` returned as float64.
    ``bits_per_weight`` (QLoRA's accounting): ``4 + 32/blocksize``, or ``4 + 8/blocksize +
    32/(blocksize * 256)`` with double quantization. ``storage_bits``: the packed code bytes
    (``8 * ceil(numel / 2)``), plus 32 per absmax, or 8 per absmax code + 32 per ``absmax2`` + 32
    for the offset.

    Serialization: tensors ``codes`` (uint8), ``absmax`` (float32) and, with double quantization,
    ``absmax_codes`` (uint8), ``absmax2`` (float32); meta ``blocksize``, ``offset`` (or None).
    """

    codes: object
    absmax: object
    blocksize: int = 64
    absmax_codes: object = None
    absmax2: object = None
    offset: float | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_nf4_parts(self, type(self).__name__)

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.codes.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def dequantize_fp32(self):
        """``float32(NF4_CODE[codes] * absmax[block])`` (``kDequantizeBlockwise``), shape of W (the
        arrays' library: NumPy, or torch/CuPy for a backend's weight)."""
        xp = array_namespace(self.absmax)
        block = xp.arange(self.numel, device=_device(self.absmax)) // self.blocksize
        codes = xp.astype(xp.reshape(self.codes, (-1,)), xp.int64)
        flat = _lut(NF4_CODE, self.absmax)[codes] * self.absmax[block]
        return xp.reshape(flat, self.shape)

    def dequantize(self):
        """The float32 dequantization (:meth:`dequantize_fp32`) as float64."""
        xp = array_namespace(self.absmax)
        return xp.astype(self.dequantize_fp32(), xp.float64)

    def packed(self) -> np.ndarray:
        """The stored bytes: :func:`pack_nf4` of the codes, pad nibble as the kernel writes it."""
        pad = 0 if float(self.absmax_exact_last()) == 0.0 else ZERO_CODE
        return pack_nf4(to_numpy(self.codes), pad=pad)

    def absmax_exact_last(self):
        """The last block's first-level absmax as quantization saw it (recorded in ``info``; else ``absmax``)."""
        return self.info.get("last_block_absmax", float(self.absmax[-1]))

    @property
    def bits_per_weight(self) -> float:
        if self.double_quant:
            return 4 + 8 / self.blocksize + FLOAT_BITS / (self.blocksize * DQ_BLOCKSIZE)
        return 4 + FLOAT_BITS / self.blocksize

    @property
    def storage_bits(self) -> int:
        codes = 8 * (-(-self.numel // 2))
        if self.double_quant:
            return codes + 8 * self.n_blocks + FLOAT_BITS * int(self.absmax2.shape[0]) + FLOAT_BITS
        return codes + FLOAT_BITS * self.n_blocks

    def _tensors_and_meta(self):
        tensors = {"codes": self.codes, "absmax": self.absmax}
        if self.double_quant:
            tensors.update({"absmax_codes": self.absmax_codes, "absmax2": self.absmax2})
        return tensors, {"blocksize": int(self.blocksize), "offset": self.offset}

    @classmethod
    def _required_tensors(cls, meta):
        if meta.get("offset") is None:
            return ("codes", "absmax")
        return ("codes", "absmax", "absmax_codes", "absmax2")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        dq = meta.get("offset") is not None
        return cls(tensors["codes"], tensors["absmax"], blocksize=int(meta["blocksize"]),
                   absmax_codes=tensors["absmax_codes"] if dq else None,
                   absmax2=tensors["absmax2"] if dq else None,
                   offset=float(meta["offset"]) if dq else None, info=info)


def _dtype_is(a, name: str) -> bool:
    return hasattr(a, "dtype") and hasattr(a, "shape") and str(a.dtype).rsplit(".", 1)[-1] == name


def _device(a):
    return array_device(a)


def _lut(table: np.ndarray, like):
    """A constant table as an array of ``like``'s library on its device."""
    if isinstance(like, np.ndarray):
        return table
    return array_namespace(like).asarray(np.array(table), device=_device(like))


def _check_nf4_parts(w, fmt: str) -> None:
    """The field checks of :class:`NF4Weight` (and its subclasses): arrays of one library (NumPy for the
    reference; a backend keeps its own)."""
    check_blocksize(w.blocksize)
    codes = w.codes
    if not _dtype_is(codes, "uint8") or len(codes.shape) != 2:
        raise ValueError(f"{fmt}: codes must be a 2-D uint8 array; got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}.")
    numel = int(codes.shape[0]) * int(codes.shape[1])
    if numel and int(codes.max()) > 15:
        raise ValueError(f"{fmt}: codes must lie in 0..15; got max {int(codes.max())}.")
    n_blocks = -(-numel // w.blocksize)
    if not _dtype_is(w.absmax, "float32"):
        raise ValueError(f"{fmt}: absmax must be a float32 array; got {getattr(w.absmax, 'dtype', type(w.absmax).__name__)}.")
    _check_shape(w.absmax, (n_blocks,), "absmax (one per block)", fmt)
    check_finite(w.absmax, f"{fmt}.absmax")
    parts = (w.absmax_codes is None, w.absmax2 is None, w.offset is None)
    if len(set(parts)) != 1:
        raise ValueError(f"{fmt}: absmax_codes, absmax2 and offset come together (double quantization) or not at all.")
    if w.absmax_codes is not None:
        if not _dtype_is(w.absmax_codes, "uint8"):
            raise ValueError(f"{fmt}: absmax_codes must be a uint8 array.")
        _check_shape(w.absmax_codes, (n_blocks,), "absmax_codes", fmt)
        if not _dtype_is(w.absmax2, "float32"):
            raise ValueError(f"{fmt}: absmax2 must be a float32 array.")
        _check_shape(w.absmax2, (-(-n_blocks // DQ_BLOCKSIZE),), "absmax2 (one per 256 blocks)", fmt)
        if isinstance(w.offset, bool) or not isinstance(w.offset, float) or not math.isfinite(w.offset):
            raise ValueError(f"{fmt}: offset must be a finite Python float; got {w.offset!r}.")


def nf4(W, *, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """NormalFloat-4 quantization of ``W`` as bitsandbytes' CUDA kernel does it (QLoRA Sec. 3).

    Args:
        W: finite 2-D weight (out_features, in_features); rounded to float32 first.
        blocksize: consecutive row-major weights per absmax (bitsandbytes: 64; one of :data:`BLOCKSIZES`).
        double_quant: quantize the absmax constants (``compress_statistics``; QLoRA's default).

    Returns:
        :class:`NF4Weight`: ``codes`` uint8 (shape of W), ``absmax`` float32 per block (the dequantized
        one under double quantization), the double-quantization fields, ``dequantize()`` float64.

    Raises ValueError for non-2-D, empty, non-finite or float32-overflowing ``W`` and for a block size
    bitsandbytes does not accept. See the module docstring for every float32 step.
    """
    blocksize = check_blocksize(blocksize)
    flat = weight_fp32(W)
    codes, absmax = nf4_blockwise(flat, blocksize)
    info = {"last_block_absmax": float(absmax[-1])}
    shape = tuple(np.shape(W))
    if not double_quant:
        return NF4Weight(codes.reshape(shape), absmax, blocksize=blocksize, info=info)
    q, absmax2, offset = double_quantize(absmax)
    return NF4Weight(codes.reshape(shape), double_dequantize(q, absmax2, offset), blocksize=blocksize,
                     absmax_codes=q, absmax2=absmax2, offset=offset, info=info)

"""Quantized weight formats: what a method's output *is*, with ``dequantize()`` and its bit accounting.

Every format is a frozen dataclass deriving from :class:`WeightFormat`, with

* ``dequantize()``: the float weight (out_features, in_features) it stands for; ``shape``, ``numel``;
* ``bits_per_weight`` (float): the cost per weight *in the convention of the format's paper* -- what
  its tables call "4-bit" (GPTQ, AWQ, the LLaMA3 study's "#W"), "1-bit" (binarization papers) or
  "4-bit NF4" (QLoRA): the width of the per-weight code, overheads not included;
* ``storage_bits`` (int): every bit needed to rebuild the weight -- codes, masks, scales, means,
  zeros, indices, codebooks -- in the layout documented on the class, for the whole matrix;
  ``storage_bits_per_weight = storage_bits / numel`` is the honest per-weight cost;
* ``to_tensors() -> (tensors, meta)``: NumPy arrays (host copies, dtypes kept) and a JSON-able dict
  holding no path; the module-level :func:`from_tensors` rebuilds any registered format from them
  (``meta["format"]`` names the class in :data:`FORMATS`, filled by :func:`register_format`), bit
  for bit. :func:`save` / :func:`load` put the pair into one safetensors file.

Float widths in the layouts are those of the deployed formats, not of the float64 fields here:
16-bit scales / zeros / alphas / means (FP16, as GPTQ/AWQ checkpoints and the binarization papers
store them), 32-bit block absmax and codebook entries (bitsandbytes keeps both as float32). The
spec of a format (bit width, group size, block size, rule) is metadata and is not counted.

Formats:

* :class:`AffineWeight` -- the uniform integer grid of GPTQ, RTN, AWQ, SmoothQuant and AWEQ
  (``QuantizedWeight`` is its historical name): sym/asym, per-tensor/per-channel/group, ``g_idx``.
* :class:`BinaryWeight` -- the minimal per-row binary format ``alpha_r sign(W - mean_r) + mean_r``
  (:func:`binarize_rows`); the full binary format (groups, residual orders, salient masks) extends
  it with optional fields (see the class).
* :class:`CodebookWeight` -- integer codes indexing a small codebook, times an absmax per block of
  consecutive weights (QLoRA's NormalFloat layout), optionally with double-quantized absmax
  (:class:`QuantizedAbsmax`). The NF4 values and the quantizer that picks the codes arrive with the
  QLoRA method; any codebook works here.

Planned, arriving with its method (deliberately not outlined as code here): a mixed-precision format
(per-group bit widths, high-bit salient subsets) whose ``storage_bits`` adds the per-group width
fields and the salient index/mask to the codes and scales of its parts.

Nothing here imports torch, CuPy or the backends; ``refquant/backends/torch_formats.py`` is the
torch twin of every ``dequantize()``.
"""
from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields

import numpy as np
from array_api_compat import array_namespace, is_torch_array

from . import safetensors_io
from ._checks import check_matrix
from ._xp import namespace, to_numpy
from .binarize import row_mean_alpha
from .quantizer import QuantSpec, dequantize, group_index

#: Version of the ``to_tensors`` layout (``meta["version"]``); :func:`from_tensors` refuses others.
SERIAL_VERSION = 1

#: Bits of a stored FP16 value (affine scale/zero, binary alpha/mean).
HALF_BITS = 16

#: Bits of a stored FP32 value (codebook block absmax, codebook entries, double-quantization scales).
FLOAT_BITS = 32

#: Registered formats, ``meta["format"]`` name -> class (filled by :func:`register_format`).
FORMATS: dict[str, type] = {}


def register_format(name: str):
    """Class decorator: register a :class:`WeightFormat` subclass under ``name`` for :func:`from_tensors`."""

    def deco(cls):
        if name in FORMATS and FORMATS[name] is not cls:
            raise ValueError(f"weight format name {name!r} is already registered by {FORMATS[name].__name__}.")
        if not (isinstance(cls, type) and issubclass(cls, WeightFormat)):
            raise TypeError(f"{cls!r} is not a WeightFormat subclass.")
        cls.format_name = name
        FORMATS[name] = cls
        return cls

    return deco


class WeightFormat(ABC):
    """Common interface of the quantized weight formats (see the module docstring).

    Subclasses are frozen dataclasses decorated with :func:`register_format`; they implement
    ``dequantize``, ``shape``, ``bits_per_weight``, ``storage_bits``, ``_tensors_and_meta`` and the
    classmethod ``_from_serialized``.
    """

    format_name: str = "?"

    @abstractmethod
    def dequantize(self):
        """The float weight (out_features, in_features) this format stands for."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""

    @property
    @abstractmethod
    def bits_per_weight(self) -> float:
        """Cost per weight in the convention of the format's paper (the code width)."""

    @property
    @abstractmethod
    def storage_bits(self) -> int:
        """Every bit needed to rebuild the weight, in the layout documented on the class."""

    @property
    def numel(self) -> int:
        out_f, in_f = self.shape
        return int(out_f) * int(in_f)

    @property
    def storage_bits_per_weight(self) -> float:
        """``storage_bits / numel``: the per-weight cost with every overhead included."""
        return self.storage_bits / self.numel

    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: NumPy host copies of the array fields (dtypes kept) and a JSON-able
        dict with ``"format"``, ``"version"``, the format's scalar fields, ``"info"`` (the JSON-able
        scalars of ``self.info``) and ``"info_dropped"`` (the names of the ``info`` entries left
        out: arrays such as GPTQ's ``perm``, containers, other objects). :func:`from_tensors`
        inverts it exactly (``info`` comes back with the kept entries only).

        The arrays are the fields (e.g. one byte per affine code), not the packed layout that
        ``storage_bits`` counts; only binary signs are packed (8 per byte)."""
        tensors, meta = self._tensors_and_meta()
        info, dropped = _json_info(getattr(self, "info", None) or {})
        head = {"format": self.format_name, "version": SERIAL_VERSION}
        return ({k: np.array(to_numpy(v)) for k, v in tensors.items()},
                {**head, **meta, "info": info, "info_dropped": dropped})

    @abstractmethod
    def _tensors_and_meta(self) -> tuple[dict, dict]:
        """The format's own arrays (any array library) and JSON-able scalar fields."""

    @classmethod
    @abstractmethod
    def _required_tensors(cls, meta: dict) -> tuple[str, ...]:
        """Names of the tensors :meth:`_from_serialized` needs for this ``meta``."""

    @classmethod
    @abstractmethod
    def _from_serialized(cls, tensors: dict[str, np.ndarray], meta: dict, info: dict):
        """Rebuild from :meth:`to_tensors` output (tensors already checked to be present)."""


def from_tensors(tensors: dict, meta: dict) -> WeightFormat:
    """Rebuild a format from :meth:`WeightFormat.to_tensors` output (the format is ``meta["format"]``).

    Arrays come back as NumPy arrays with the dtypes they were written with.
    """
    name = meta.get("format") if isinstance(meta, dict) else None
    if name not in FORMATS:
        raise ValueError(f"meta['format'] is {name!r}; known weight formats: {sorted(FORMATS)}.")
    if meta.get("version") != SERIAL_VERSION:
        raise ValueError(
            f"serialized {name} weight has layout version {meta.get('version')!r}; this refquant reads "
            f"version {SERIAL_VERSION}."
        )
    cls = FORMATS[name]
    missing = [k for k in cls._required_tensors(meta) if k not in tensors]
    if missing:
        raise ValueError(f"serialized {name} weight lacks the tensor(s) {missing}; got {sorted(tensors)}.")
    arrays = {k: np.array(to_numpy(v)) for k, v in tensors.items()}
    return cls._from_serialized(arrays, meta, dict(meta.get("info", {})))


def save(fmt: WeightFormat, path: str | os.PathLike) -> None:
    """Write ``fmt.to_tensors()`` to one safetensors file (meta as JSON in its ``__metadata__``)."""
    tensors, meta = fmt.to_tensors()
    safetensors_io.write(path, tensors, metadata={"refquant.weight_format": json.dumps(meta, sort_keys=True)})


def load(path: str | os.PathLike) -> WeightFormat:
    """Read a file written by :func:`save`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    raw = header.get("__metadata__", {}).get("refquant.weight_format")
    if raw is None:
        raise ValueError(f"{path} holds no refquant weight format (no 'refquant.weight_format' metadata); "
                         "write it with refquant.formats.save.")
    return from_tensors(safetensors_io.read(path), json.loads(raw))


def _json_info(info: dict) -> tuple[dict, list[str]]:
    """The JSON-able scalar entries of ``info`` (bool, int, float, str, None; NumPy scalars become
    Python scalars) and the sorted names of the others (arrays, containers, objects)."""
    kept, dropped = {}, []
    for key, value in info.items():
        if isinstance(value, np.generic) and np.ndim(value) == 0 and value.dtype.kind in "biuf":
            value = value.item()
        if isinstance(key, str) and (value is None or isinstance(value, (bool, int, float, str))):
            kept[key] = value
        else:
            dropped.append(str(key))
    return kept, sorted(dropped)


def _check_shape(a, shape: tuple, what: str, fmt: str) -> None:
    if not hasattr(a, "shape") or tuple(a.shape) != tuple(shape):
        got = tuple(a.shape) if hasattr(a, "shape") else type(a).__name__
        raise ValueError(f"{fmt}: {what} must have shape {tuple(shape)}; got {got}.")


def _is_dtype(a, kind: str) -> bool:
    """array-api ``isdtype`` for NumPy, CuPy and torch arrays (``kind``: 'bool', 'integral', ...)."""
    return bool(array_namespace(a).isdtype(a.dtype, kind))


@register_format("affine")
@dataclass(frozen=True, eq=False)
class AffineWeight(WeightFormat):
    """A quantized weight matrix: integer codes plus a scale and zero per (row, group).

    ``W_hat[r, j] = scale[r, g_idx[j]] * (codes[r, j] - zero[r, g_idx[j]])``.

    Attributes:
        codes: integer codes in ``[0, maxq]``, shape (out_features, in_features), original
            column order.
        scale, zero: shape (out_features, n_groups).
        g_idx: group of every input column, shape (in_features,). Consecutive groups give
            ``j // group_size``; GPTQ with act-order and dynamic groups gives the permuted layout.
        spec: the :class:`QuantSpec` used.
        info: method diagnostics (e.g. GPTQ's proxy loss, the damping it used and its ``perm``).

    The fields may be NumPy, CuPy or torch arrays (each backend returns its own).

    Bits: ``bits_per_weight = spec.bits`` (GPTQ/AWQ papers, the LLaMA3 study's "#W": a 4-bit g128
    model is "4 bits"). ``storage_bits`` is the layout

    =========  =====================================================================================
    codes      ``spec.bits`` per weight, packed (out_features * in_features codes)
    scale      16 bits per stored (row, group) pair; pairs = out_features * n_groups, or 1 in all
               for ``per_tensor``
    zero       16 bits per stored pair, only where the zero is not a constant of the spec (the
               symmetric ``(maxq + 1) / 2`` and the absmax rule's ``qmax`` are not stored)
    g_idx      ``max(1, ceil(log2 n_groups))`` bits per input column, only when ``g_idx`` is not
               the trivial ``j // group_size`` (GPTQ act-order with dynamic groups)
    =========  =====================================================================================

    e.g. 4-bit g128 asymmetric: 4.25 bits per weight, symmetric 4.125 (``storage_bits_per_weight``;
    :meth:`storage_bits_with` gives other scale/zero widths).

    Serialization (:meth:`to_tensors`): tensors ``codes``, ``scale``, ``zero``, ``g_idx`` as they
    are (host copies); meta ``spec`` (the QuantSpec fields). ``info`` keeps its JSON-able scalars
    (GPTQ's ``loss`` and ``percdamp``); arrays such as GPTQ's ``perm`` are dropped and listed in
    ``meta["info_dropped"]``.
    """

    codes: object
    scale: object
    zero: object
    g_idx: object
    spec: QuantSpec
    info: dict = field(default_factory=dict)

    def dequantize(self):
        """The quantized weight as floats, ``scale * (codes - zero)`` per group."""
        codes = _as_float(self.codes, self.scale)
        return dequantize(codes, self.scale[:, self.g_idx], self.zero[:, self.g_idx])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    @property
    def bits(self) -> int:
        return int(self.spec.bits)

    @property
    def bits_per_weight(self) -> float:
        """``spec.bits``: the papers' convention (a 4-bit g128 model is "4 bits")."""
        return float(self.spec.bits)

    @property
    def storage_bits(self) -> int:
        """Total bits of the documented layout, with 16-bit scales and zeros (see the class)."""
        return self._storage_total(HALF_BITS, HALF_BITS)

    def storage_bits_with(self, scale_bits: int = 16, zero_bits: int = 16) -> float:
        """Storage cost *per weight* of the layout with other scale / zero widths.

        ``storage_bits_with(16, 16) == storage_bits_per_weight`` (to float rounding).
        """
        return int(self.spec.bits) + self._overhead(scale_bits, zero_bits) / self.numel

    def _storage_total(self, scale_bits: int, zero_bits: int) -> int:
        return self.numel * int(self.spec.bits) + self._overhead(scale_bits, zero_bits)

    def _overhead(self, scale_bits: int, zero_bits: int) -> int:
        """Bits of the scales, stored zeros and (non-trivial) ``g_idx``."""
        out_f, in_f = self.shape
        pairs = 1 if self.spec.per_tensor else out_f * self.n_groups
        const_zero = self.spec.sym or self.spec.rule == "absmax"
        overhead = pairs * (scale_bits + (0 if const_zero else zero_bits))
        if not self.trivial_g_idx:
            overhead += in_f * max(1, math.ceil(math.log2(self.n_groups)))
        return int(overhead)

    @property
    def trivial_g_idx(self) -> bool:
        """Whether ``g_idx`` is the consecutive-groups map ``j // group_size`` (then it is not stored)."""
        return bool(np.array_equal(to_numpy(self.g_idx), group_index(self.shape[1], self.spec.group_size)))

    def _tensors_and_meta(self):
        spec = {f.name: _plain(getattr(self.spec, f.name)) for f in fields(QuantSpec)}
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero, "g_idx": self.g_idx}, {"spec": spec}

    @classmethod
    def _required_tensors(cls, meta):
        return ("codes", "scale", "zero", "g_idx")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        return cls(tensors["codes"], tensors["scale"], tensors["zero"], tensors["g_idx"],
                   QuantSpec(**meta["spec"]), info)


def _plain(value):
    """A NumPy scalar as the Python scalar it holds (JSON-able spec fields)."""
    return value.item() if isinstance(value, np.generic) else value


def _as_float(codes, like):
    """Integer codes converted to ``like``'s float dtype (NumPy/CuPy ``astype``, torch ``to``)."""
    if is_torch_array(codes):
        return codes.to(like.dtype)
    return codes.astype(like.dtype)


@register_format("binary")
@dataclass(frozen=True, eq=False)
class BinaryWeight(WeightFormat):
    """Per-row binary weight: ``W_hat[r, j] = alpha[r] * (+1 if signs[r, j] else -1) + mean[r]``.

    The minimal binary format (built by :func:`binarize_rows`): one sign bit per weight and, per
    output row, a scale ``alpha`` and a mean that the binarization is centred on.

    Attributes:
        signs: boolean, shape (out_features, in_features); ``True`` is +1, ``False`` is -1.
        alpha: scale per row, shape (out_features,), ``>= 0``.
        mean: centre per row, shape (out_features,).
        info: method diagnostics.

    Bits: ``bits_per_weight = 1.0`` -- the binarization papers count the sign bit only (their
    "1-bit" / "W1"; per-row floats are overhead). ``storage_bits`` is the layout

    =========  =====================================================================================
    signs      1 bit per weight, packed (out_features * in_features)
    alpha      16 bits per row
    mean       16 bits per row
    =========  =====================================================================================

    i.e. ``out * in + 32 * out``.

    Serialization (:meth:`to_tensors`): ``signs`` packed 8 to a byte along each row
    (``numpy.packbits(signs, axis=1, bitorder="little")``, uint8 (out, ceil(in / 8)); meta
    ``in_features`` gives the unpacked width), ``alpha`` and ``mean`` as they are.

    The full binary format extends this one with optional fields whose defaults give exactly this
    format, so that a ``BinaryWeight`` built or serialized today keeps its meaning (planned, not
    present yet):

    * ``group_size`` (default ``None`` = per row): ``alpha`` / ``mean`` of shape (out, n_groups) over
      consecutive column groups, 32 bits per (row, group);
    * ``residual`` (default ``()``): further ``(signs_k, alpha_k)`` terms of a residual
      binarization of order ``1 + len(residual)``, ``W_hat += alpha_k * sign_k`` (1 sign bit per
      weight and 16 alpha bits per row or group each);
    * ``salient`` (default ``None``): a mask (or column indices) of salient weights binarized with
      their own terms, charged 1 bit per weight for a mask or ``ceil(log2 in)`` per index.
    """

    signs: object
    alpha: object
    mean: object
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not hasattr(self.signs, "ndim") or self.signs.ndim != 2:
            raise ValueError(f"BinaryWeight: signs must be a 2-D boolean array (out_features, in_features); "
                             f"got {getattr(self.signs, 'shape', type(self.signs).__name__)}.")
        if not _is_dtype(self.signs, "bool"):
            raise ValueError(f"BinaryWeight: signs must be boolean (True = +1, False = -1); got dtype "
                             f"{self.signs.dtype}. Convert 0/1 bits with signs.astype(bool).")
        rows = self.signs.shape[0]
        _check_shape(self.alpha, (rows,), "alpha", "BinaryWeight")
        _check_shape(self.mean, (rows,), "mean", "BinaryWeight")

    def dequantize(self):
        """``alpha * sign + mean`` per row (same dtype as ``alpha``)."""
        xp = namespace(self.alpha)
        alpha = self.alpha[:, None]
        return xp.where(self.signs, alpha, -alpha) + self.mean[:, None]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)

    @property
    def bits_per_weight(self) -> float:
        """1.0: the sign bit (the binarization papers' convention)."""
        return 1.0

    @property
    def storage_bits(self) -> int:
        """``out * in`` sign bits plus 16-bit alpha and 16-bit mean per row."""
        out_f, _ = self.shape
        return self.numel + 2 * HALF_BITS * int(out_f)

    def _tensors_and_meta(self):
        packed = np.packbits(to_numpy(self.signs), axis=1, bitorder="little")
        return {"signs": packed, "alpha": self.alpha, "mean": self.mean}, {"in_features": int(self.shape[1])}

    @classmethod
    def _required_tensors(cls, meta):
        return ("signs", "alpha", "mean")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        signs = np.unpackbits(tensors["signs"], axis=1, count=int(meta["in_features"]), bitorder="little")
        return cls(signs.astype(bool), tensors["alpha"], tensors["mean"], info)


def binarize_rows(W) -> BinaryWeight:
    """The minimal per-row binarization of ``W`` (out_features, in_features), in float64.

    ``mean_r = mean_j W[r, j]``, ``signs[r, j] = W[r, j] - mean_r >= 0`` (so sign(0) = +1) and
    ``alpha_r = mean_j |W[r, j] - mean_r|``, giving ``W_hat = alpha_r sign(W - mean_r) + mean_r``.
    For the fixed signs, ``alpha_r`` is the least-squares (L2-optimal) scale, so
    ``||W_r - W_hat_r||^2 = ||W_r - mean_r||^2 - in_features * alpha_r^2``; it is *not* the
    L1-optimal one (that is the median of ``|W - mean_r|``), and the L1 error can exceed
    ``||W_r - mean_r||_1`` (``tests/test_formats.py`` pins an example).

    Raises ValueError for non-2-D, empty or non-finite input. NumPy or CuPy input.
    """
    check_matrix(W, "W")
    xp = namespace(W)
    W = W.astype(xp.float64)
    mean, alpha = row_mean_alpha(W)  # the shared binarizer (refquant/spec/binarize.py), without a mask
    return BinaryWeight(signs=W - mean[:, None] >= 0, alpha=alpha, mean=mean)


@dataclass(frozen=True, eq=False)
class QuantizedAbsmax:
    """Double-quantized block absmax (QLoRA Sec. 3 "Double Quantization", as bitsandbytes does it).

    ``absmax[b] = codebook[codes[b]] * scale[b // block_size] + offset``: the first-level absmax
    constants, minus their mean ``offset``, quantized blockwise with a code table of their own
    (bitsandbytes: its 8-bit dynamic map, blocks of 256).

    Attributes:
        codes: integer indices into ``codebook``, shape (n_blocks,).
        codebook: the second-level code table, shape (2**k,).
        scale: absmax of each second-level block, shape (ceil(n_blocks / block_size),).
        block_size: first-level constants per second-level block (default 256).
        offset: the mean subtracted before quantizing (a Python float).

    Storage: ``k`` bits per code, 32 per codebook entry, 32 per ``scale`` and 32 for ``offset``.
    """

    codes: object
    codebook: object
    scale: object
    block_size: int = 256
    offset: float = 0.0

    def __post_init__(self):
        _check_codebook_parts(self.codes, self.codebook, "QuantizedAbsmax")
        if self.codes.ndim != 1:
            raise ValueError(f"QuantizedAbsmax: codes must be 1-D (one per first-level block); got shape {tuple(self.codes.shape)}.")
        _check_block_size(self.block_size, "QuantizedAbsmax")
        _check_shape(self.scale, (-(-int(self.codes.shape[0]) // self.block_size),), "scale", "QuantizedAbsmax")
        if not isinstance(self.offset, (int, float)) or isinstance(self.offset, bool) or not math.isfinite(self.offset):
            raise ValueError(f"QuantizedAbsmax: offset must be a finite Python float; got {self.offset!r}.")

    @property
    def code_bits(self) -> int:
        return int(self.codebook.shape[0]).bit_length() - 1

    def values(self):
        """The first-level absmax constants, shape (n_blocks,)."""
        xp = namespace(self.scale)
        block = xp.arange(self.codes.shape[0]) // self.block_size
        return self.codebook[_index(self.codes)] * self.scale[block] + self.offset

    @property
    def storage_bits(self) -> int:
        n = int(self.codes.shape[0])
        return n * self.code_bits + FLOAT_BITS * (int(self.codebook.shape[0]) + int(self.scale.shape[0]) + 1)


@register_format("codebook")
@dataclass(frozen=True, eq=False)
class CodebookWeight(WeightFormat):
    """Codebook weight with blockwise absmax (QLoRA's NormalFloat layout, any codebook).

    ``W_hat.flat[i] = codebook[codes.flat[i]] * absmax[i // block_size]``: the weights, flattened in
    row-major order, form blocks of ``block_size`` consecutive values (the last one partial), each
    with one absmax; ``codes`` index a table of ``2**bits`` values (NF4: 16 values in [-1, 1]).

    Attributes:
        codes: integer indices into ``codebook``, shape (out_features, in_features).
        codebook: float table, shape (2**bits,), bits in 1..8.
        absmax: per block, shape (ceil(numel / block_size),) -- or a :class:`QuantizedAbsmax`
            (double quantization).
        block_size: weights per block (QLoRA: 64).
        info: method diagnostics.

    Bits: ``bits_per_weight = bits`` (QLoRA: "4-bit NormalFloat"). ``storage_bits`` is the layout

    =========  =====================================================================================
    codes      ``bits`` per weight, packed
    codebook   32 bits per entry (it is counted: this format takes any codebook)
    absmax     32 bits per block, or the :class:`QuantizedAbsmax` layout (8-bit codes, its own
               codebook, a 32-bit scale per 256 blocks, a 32-bit offset)
    =========  =====================================================================================

    QLoRA's accounting, ``4 + 32/64 = 4.5`` and with double quantization
    ``4 + 8/64 + 32/(64*256) ~= 4.127`` bits per weight, is this layout without the codebooks and
    the offset (constants of the NF4 format).

    Serialization (:meth:`to_tensors`): tensors ``codes``, ``codebook`` and ``absmax``, or
    ``absmax.codes``, ``absmax.codebook``, ``absmax.scale`` for double quantization; meta
    ``block_size`` and ``double_quant`` (``None`` or ``{"block_size", "offset"}``).
    """

    codes: object
    codebook: object
    absmax: object
    block_size: int = 64
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_codebook_parts(self.codes, self.codebook, "CodebookWeight")
        if self.codes.ndim != 2:
            raise ValueError(f"CodebookWeight: codes must be 2-D (out_features, in_features); got shape {tuple(self.codes.shape)}.")
        _check_block_size(self.block_size, "CodebookWeight")
        n_blocks = -(-self.numel // self.block_size)
        if isinstance(self.absmax, QuantizedAbsmax):
            if int(self.absmax.codes.shape[0]) != n_blocks:
                raise ValueError(f"CodebookWeight: the double-quantized absmax holds {self.absmax.codes.shape[0]} "
                                 f"constants; {self.numel} weights in blocks of {self.block_size} need {n_blocks}.")
        else:
            _check_shape(self.absmax, (n_blocks,), "absmax (one per block of block_size weights)", "CodebookWeight")

    @property
    def bits(self) -> int:
        return int(self.codebook.shape[0]).bit_length() - 1

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, QuantizedAbsmax)

    def absmax_values(self):
        """The absmax of every block, shape (n_blocks,) (double quantization undone)."""
        return self.absmax.values() if self.double_quant else self.absmax

    def dequantize(self):
        """``codebook[codes] * absmax[block]`` (blocks of consecutive row-major weights)."""
        absmax = self.absmax_values()
        xp = namespace(absmax)
        block = (xp.arange(self.numel) // self.block_size).reshape(self.shape)
        return self.codebook[_index(self.codes)] * absmax[block]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bits_per_weight(self) -> float:
        """The code width (QLoRA: "4-bit NormalFloat")."""
        return float(self.bits)

    @property
    def storage_bits(self) -> int:
        absmax = self.absmax.storage_bits if self.double_quant else FLOAT_BITS * self.n_blocks
        return self.numel * self.bits + FLOAT_BITS * int(self.codebook.shape[0]) + absmax

    def _tensors_and_meta(self):
        tensors = {"codes": self.codes, "codebook": self.codebook}
        if self.double_quant:
            a = self.absmax
            tensors.update({"absmax.codes": a.codes, "absmax.codebook": a.codebook, "absmax.scale": a.scale})
            dq = {"block_size": int(a.block_size), "offset": float(a.offset)}
        else:
            tensors["absmax"] = self.absmax
            dq = None
        return tensors, {"block_size": int(self.block_size), "double_quant": dq}

    @classmethod
    def _required_tensors(cls, meta):
        if meta.get("double_quant") is None:
            return ("codes", "codebook", "absmax")
        return ("codes", "codebook", "absmax.codes", "absmax.codebook", "absmax.scale")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        dq = meta.get("double_quant")
        if dq is None:
            absmax = tensors["absmax"]
        else:
            absmax = QuantizedAbsmax(tensors["absmax.codes"], tensors["absmax.codebook"], tensors["absmax.scale"],
                                     block_size=int(dq["block_size"]), offset=float(dq["offset"]))
        return cls(tensors["codes"], tensors["codebook"], absmax, block_size=int(meta["block_size"]), info=info)


def _check_codebook_parts(codes, codebook, fmt: str) -> None:
    """Integer codes and a 1-D codebook of 2**k entries (k in 1..8) that every code indexes."""
    if not hasattr(codebook, "ndim") or codebook.ndim != 1:
        raise ValueError(f"{fmt}: codebook must be a 1-D array; got {getattr(codebook, 'shape', type(codebook).__name__)}.")
    n = int(codebook.shape[0])
    if n < 2 or n > 256 or n & (n - 1):
        raise ValueError(f"{fmt}: the codebook must hold 2**bits entries with bits in 1..8; got {n}.")
    if not hasattr(codes, "ndim") or not _is_dtype(codes, "integral"):
        raise ValueError(f"{fmt}: codes must be an integer array (indices into the codebook); "
                         f"got {getattr(codes, 'dtype', type(codes).__name__)}.")
    if math.prod(codes.shape) and (int(codes.min()) < 0 or int(codes.max()) >= n):
        raise ValueError(f"{fmt}: codes must lie in [0, {n - 1}] (the codebook has {n} entries); "
                         f"got [{int(codes.min())}, {int(codes.max())}].")


def _index(codes):
    """Integer codes as int64 indices (torch would read uint8 indices as a mask)."""
    xp = array_namespace(codes)
    return xp.astype(codes, xp.int64)


def _check_block_size(block_size, fmt: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"{fmt}: block_size must be a positive integer; got {block_size!r}.")


QuantizedWeight = AffineWeight
"""The name of :class:`AffineWeight` before the other formats existed (kept: other tools use it)."""


@register_format("mixed")
@dataclass(frozen=True, eq=False)
class MixedWeight(WeightFormat):
    """Mixed-precision group weight (SliM-LLM): consecutive column groups, each with its own bit width.

    Group ``g`` holds columns ``[g * group_size, (g + 1) * group_size)`` (the last one the rest) at
    ``group_bits[g]`` bits, with a scale and a zero per (row, group):

    * ``group_bits[g] >= 2``: the uniform grid, ``W_hat = scale * (codes - zero)``, codes in
      ``[0, 2**b - 1]`` (SliM-LLM's ``normal_quantize``);
    * ``group_bits[g] == 1``: SliM-LLM's binarizer, ``W_hat = sign * scale + zero`` with
      ``scale = mean |w|`` and ``zero = mean w`` of the row's group; ``codes = sign + 1`` in
      ``{0, 1, 2}``. Code 1 (``sign = 0``, the weight equal to the row's mean exactly: ``torch.sign(0)
      = 0`` in the original) is a tie that a single sign bit cannot hold; see ``storage_bits``.

    Attributes:
        codes: integer array (out_features, in_features).
        scale, zero: (out_features, n_groups).
        group_bits: integer array (n_groups,), widths 1..8.
        group_size: columns per group.
        info: method diagnostics (GPTQ proxy ``loss``, ``percdamp``).

    Bits: ``bits_per_weight`` = mean of ``group_bits`` (the SliM-LLM paper's "average bit-width";
    with a partial last group it is not the per-weight average). ``storage_bits`` is the layout

    ===========  ===================================================================================
    codes        ``group_bits[g]`` bits per weight of group g, packed
    tie masks    1 bit per weight of every 1-bit group that holds a tie (code 1); none otherwise
    scale, zero  16 bits each per (row, group)
    group_bits   8 bits per group (one byte each)
    ===========  ===================================================================================

    Serialization (:meth:`to_tensors`): tensors ``codes``, ``scale``, ``zero``, ``group_bits`` as
    they are; meta ``group_size``.
    """

    codes: object
    scale: object
    zero: object
    group_bits: object
    group_size: int
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        fmt = "MixedWeight"
        if not hasattr(self.codes, "ndim") or self.codes.ndim != 2 or not _is_dtype(self.codes, "integral"):
            raise ValueError(f"{fmt}: codes must be a 2-D integer array (out_features, in_features); got "
                             f"{getattr(self.codes, 'shape', type(self.codes).__name__)}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
            raise ValueError(f"{fmt}: group_size must be a positive integer; got {self.group_size!r}.")
        rows, cols = (int(s) for s in self.codes.shape)
        n_groups = -(-cols // int(self.group_size))
        _check_shape(self.scale, (rows, n_groups), "scale", fmt)
        _check_shape(self.zero, (rows, n_groups), "zero", fmt)
        _check_shape(self.group_bits, (n_groups,), "group_bits", fmt)
        bits = np.asarray(to_numpy(self.group_bits))
        if bits.dtype.kind not in "iu" or bits.min() < 1 or bits.max() > 8:
            raise ValueError(f"{fmt}: group_bits must be integers in 1..8; got {bits.tolist()}.")

    def _column_bits(self, xp):
        gidx = group_index(self.shape[1], int(self.group_size), xp=np)
        return np.asarray(to_numpy(self.group_bits)).astype(np.int64)[gidx]

    def dequantize(self):
        """``scale * (codes - zero)`` in the groups of 2 bits or more, ``(codes - 1) * scale + zero`` in the 1-bit ones."""
        xp = array_namespace(self.scale)
        cols = self.shape[1]
        gidx_np = group_index(cols, int(self.group_size), xp=np)
        gidx = xp.asarray(gidx_np, device=getattr(self.scale, "device", None)) if is_torch_array(self.scale) \
            else gidx_np
        one = self._column_bits(xp) == 1
        if is_torch_array(self.scale):
            one = xp.asarray(one, device=self.scale.device)
        S, Z = self.scale[:, gidx], self.zero[:, gidx]
        codes = _as_float(self.codes, self.scale)
        return xp.where(one[None, :], (codes - 1) * S + Z, dequantize(codes, S, Z))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.codes.shape)

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    @property
    def bits_per_weight(self) -> float:
        """Mean of ``group_bits`` (SliM-LLM's average bit-width)."""
        return float(np.mean(np.asarray(to_numpy(self.group_bits)).astype(np.float64)))

    @property
    def storage_bits(self) -> int:
        """Codes at their group's width, tie masks of 1-bit groups, 16-bit scale and zero per (row, group),
        one byte per group width (see the class)."""
        rows, cols = self.shape
        bits = np.asarray(to_numpy(self.group_bits)).astype(np.int64)  # one small vector; the codes stay put
        total = 0
        for g, b in enumerate(bits.tolist()):
            c0, c1 = g * int(self.group_size), min((g + 1) * int(self.group_size), cols)
            total += rows * (c1 - c0) * b
            if b == 1 and bool((self.codes[:, c0:c1] == 1).any()):
                total += rows * (c1 - c0)
        return int(total + rows * self.n_groups * 2 * HALF_BITS + 8 * self.n_groups)

    def _tensors_and_meta(self):
        return ({"codes": self.codes, "scale": self.scale, "zero": self.zero, "group_bits": self.group_bits},
                {"group_size": int(self.group_size)})

    @classmethod
    def _required_tensors(cls, meta):
        return ("codes", "scale", "zero", "group_bits")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        return cls(tensors["codes"], tensors["scale"], tensors["zero"], tensors["group_bits"],
                   int(meta["group_size"]), info)


# --------------------------------------------------------------------------- binarization family (PB-LLM, BiLLM)


def _index_bits(numel: int) -> int:
    """Bits of one flat position in a matrix of ``numel`` weights (at least 1)."""
    return max(1, math.ceil(math.log2(max(int(numel), 2))))


def _pack(bits) -> np.ndarray:
    """A boolean array packed 8 to a byte along the last axis (``numpy.packbits``, little bit order)."""
    return np.packbits(np.asarray(to_numpy(bits), dtype=bool), axis=-1, bitorder="little")


def _unpack(packed, count: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=int(count), bitorder="little").astype(bool)


def _check_signs(signs, shape, what: str, fmt: str) -> None:
    _check_shape(signs, shape, what, fmt)
    if not _is_dtype(signs, "integral") or _is_dtype(signs, "bool"):
        raise ValueError(f"{fmt}: {what} must be an integer array of -1/0/+1 (int8); got dtype {signs.dtype}.")


@register_format("partial_binary")
@dataclass(frozen=True, eq=False)
class PartialBinaryWeight(WeightFormat):
    """PB-LLM's partially binarized weight: a salient subset on a high-bit uniform grid, the rest binary.

    ``W_hat[r, j] = scale[r] * (codes[r, j] - zero[r])`` where ``salient_mask[r, j]`` (the
    ``high_bits`` asymmetric per-row grid of GPTQ's quantizer), otherwise
    ``alpha[r, g] * signs[r, j] + mean[r, g]`` with ``g = j // group_size`` (one group per row when
    ``group_size`` is None) and ``signs`` in {-1, 0, +1} (``sign(0) = 0``, as ``torch.sign`` in the
    original: a weight exactly at the mean is reconstructed as the mean).

    Attributes:
        salient_mask: bool (out, in); True where the weight is kept at ``high_bits``.
        codes: uint8 (out, in) high-bit codes (0 where binarized).
        scale, zero: the high-bit grid per row, shape (out,).
        signs: int8 (out, in) in {-1, 0, +1} (0 where salient).
        alpha, mean: the binarizer per (row, group), shape (out, n_groups).
        high_bits: width of the salient codes (PB-LLM: 8).
        group_size: columns per binarizer group, None = whole rows.

    Bits: ``bits_per_weight = r * high_bits + (1 - r)`` with ``r`` the salient fraction (PB-LLM's
    convention: 10 % salient at 8 bits is "1.7 bits"; masks and scales not counted).
    ``storage_bits`` is the layout

    ===============  ================================================================================
    salient mask     1 bit per weight (a bitmap)
    salient codes    ``high_bits`` per salient weight
    binary signs     1 bit per binarized weight, plus ``ceil(log2 numel)`` bits per zero sign (the
                     position of each exact ``sign(0)`` exception)
    scale, zero      16 bits each per row (the high-bit grid)
    alpha, mean      16 bits each per (row, group)
    ===============  ================================================================================

    Serialization: ``salient_mask`` and the binary signs (``signs > 0`` over the whole matrix)
    packed 8 to a byte per row, ``codes`` of the salient weights only (row-major), the flat
    positions of zero signs (``zero_signs``, int64), ``scale``, ``zero``, ``alpha``, ``mean``;
    meta ``in_features``, ``high_bits``, ``group_size``.
    """

    salient_mask: object
    codes: object
    scale: object
    zero: object
    signs: object
    alpha: object
    mean: object
    high_bits: int = 8
    group_size: int | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        fmt = "PartialBinaryWeight"
        if not hasattr(self.salient_mask, "ndim") or self.salient_mask.ndim != 2 or not _is_dtype(self.salient_mask, "bool"):
            raise ValueError(f"{fmt}: salient_mask must be a 2-D boolean array (out_features, in_features).")
        shape = tuple(self.salient_mask.shape)
        rows, cols = shape
        _check_shape(self.codes, shape, "codes", fmt)
        _check_signs(self.signs, shape, "signs", fmt)
        _check_shape(self.scale, (rows,), "scale", fmt)
        _check_shape(self.zero, (rows,), "zero", fmt)
        if isinstance(self.high_bits, bool) or not isinstance(self.high_bits, (int, np.integer)) or not 1 <= self.high_bits <= 8:
            raise ValueError(f"{fmt}: high_bits must be an integer in 1..8; got {self.high_bits!r}.")
        if self.group_size is not None:
            _check_block_size(self.group_size, fmt)
        _check_shape(self.alpha, (rows, self.n_groups), "alpha (out_features, n_groups)", fmt)
        _check_shape(self.mean, (rows, self.n_groups), "mean (out_features, n_groups)", fmt)

    @property
    def n_groups(self) -> int:
        cols = int(self.salient_mask.shape[1])
        return 1 if self.group_size is None else -(-cols // int(self.group_size))

    def dequantize(self):
        """``scale (codes - zero)`` where salient, ``alpha signs + mean`` elsewhere."""
        xp = namespace(self.alpha)
        cols = self.shape[1]
        g = xp.arange(cols) // (cols if self.group_size is None else int(self.group_size))
        high = self.scale[:, None] * (_as_float(self.codes, self.scale) - self.zero[:, None])
        low = _as_float(self.signs, self.alpha) * self.alpha[:, g] + self.mean[:, g]
        return xp.where(self.salient_mask, high, low)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.salient_mask.shape)

    @property
    def salient_fraction(self) -> float:
        return float(to_numpy(self.salient_mask).mean())

    @property
    def bits_per_weight(self) -> float:
        """``r * high_bits + (1 - r)`` (PB-LLM's convention)."""
        r = self.salient_fraction
        return r * int(self.high_bits) + (1 - r)

    @property
    def storage_bits(self) -> int:
        rows, _ = self.shape
        mask = self.salient_mask  # counted where the arrays live: only two integers leave a device
        n_sal = int(mask.sum())
        zero_signs = int(((self.signs == 0) & ~mask).sum())
        return (self.numel + n_sal * int(self.high_bits) + (self.numel - n_sal) + zero_signs * _index_bits(self.numel)
                + 2 * HALF_BITS * rows + 2 * HALF_BITS * rows * self.n_groups)

    def _tensors_and_meta(self):
        mask = to_numpy(self.salient_mask).astype(bool)
        signs = to_numpy(self.signs)
        tensors = {"salient_mask": _pack(mask), "codes": to_numpy(self.codes)[mask], "signs": _pack(signs > 0),
                   "zero_signs": np.flatnonzero((signs == 0) & ~mask).astype(np.int64),
                   "scale": self.scale, "zero": self.zero, "alpha": self.alpha, "mean": self.mean}
        meta = {"in_features": int(self.shape[1]), "high_bits": int(self.high_bits),
                "group_size": None if self.group_size is None else int(self.group_size),
                "codes_dtype": str(to_numpy(self.codes).dtype), "signs_dtype": str(signs.dtype)}
        return tensors, meta

    @classmethod
    def _required_tensors(cls, meta):
        return ("salient_mask", "codes", "signs", "zero_signs", "scale", "zero", "alpha", "mean")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        cols = int(meta["in_features"])
        mask = _unpack(tensors["salient_mask"], cols)
        codes = np.zeros(mask.shape, dtype=np.dtype(meta.get("codes_dtype", "uint8")))
        codes[mask] = tensors["codes"]
        signs = np.where(_unpack(tensors["signs"], cols), 1, -1).astype(np.dtype(meta.get("signs_dtype", "int8")))
        signs[np.unravel_index(tensors["zero_signs"], signs.shape)] = 0  # ravel() may copy
        signs[mask] = 0
        return cls(mask, codes, tensors["scale"], tensors["zero"], signs, tensors["alpha"], tensors["mean"],
                   high_bits=int(meta["high_bits"]), group_size=meta.get("group_size"), info=info)


#: Terms of a :class:`StructuredBinaryWeight` block: group 1, group 2, salient order 1, salient order 2.
BILLM_TERMS = 4


@register_format("structured_binary")
@dataclass(frozen=True, eq=False)
class StructuredBinaryWeight(WeightFormat):
    """BiLLM's structured binary weight: per block of ``block_size`` columns, salient columns with an
    order-2 residual binarization and the rest split into two order-1 binarized groups.

    For column ``j`` in block ``b = j // block_size``:

    * salient column (``salient_columns[j]``): ``W_hat = (alpha[r,b,2] s1 + mean[r,b,2]) +
      (alpha[r,b,3] s2 + mean[r,b,3])`` with ``s1 = signs1[r, j]``, ``s2 = signs2[r, j]``;
    * otherwise: ``W_hat = alpha[r,b,t] s1 + mean[r,b,t]`` with ``t = 1`` where ``split[r, j]``
      (the group ``|T| >= p``) and ``t = 0`` otherwise.

    Signs are in {-1, 0, +1} (``sign(0) = 0`` as in the original).

    Attributes:
        salient_columns: bool (in,).
        split: bool (out, in), True = group 2 (False on salient columns).
        signs1, signs2: int8 (out, in) (``signs2`` is 0 outside salient columns).
        alpha, mean: (out, n_blocks, 4): group 1, group 2, salient order 1, salient order 2.
        block_size: columns per block (BiLLM: 128).

    Bits: ``bits_per_weight = 1 + (salient columns) / in_features`` -- BiLLM's convention (one bit
    per weight plus one for the second residual order of the salient columns; for 128-wide blocks
    ``1 + mean salient columns per block / 128``). ``storage_bits`` is the layout

    ===============  ================================================================================
    signs1           1 bit per weight
    signs2           1 bit per weight of a salient column
    split flags      1 bit per weight of a non-salient column (a bitmap)
    column mask      1 bit per input column
    alpha, mean      16 bits each, 4 terms per (row, block): 128 bits per row and block
    zero signs       ``ceil(log2 numel)`` bits per exact ``sign(0)`` (its position)
    ===============  ================================================================================

    Serialization: ``salient_columns`` and ``split`` (non-salient columns only is not needed: the
    whole bitmap is packed), ``signs1 > 0`` packed, ``signs2 > 0`` of the salient columns packed,
    the flat positions of zero signs (``zero_signs1``, ``zero_signs2``), ``alpha``, ``mean``; meta
    ``in_features``, ``block_size``.
    """

    salient_columns: object
    split: object
    signs1: object
    signs2: object
    alpha: object
    mean: object
    block_size: int = 128
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        fmt = "StructuredBinaryWeight"
        if not hasattr(self.split, "ndim") or self.split.ndim != 2 or not _is_dtype(self.split, "bool"):
            raise ValueError(f"{fmt}: split must be a 2-D boolean array (out_features, in_features).")
        shape = tuple(int(s) for s in self.split.shape)
        rows, cols = shape
        _check_shape(self.salient_columns, (cols,), "salient_columns", fmt)
        if not _is_dtype(self.salient_columns, "bool"):
            raise ValueError(f"{fmt}: salient_columns must be boolean.")
        _check_signs(self.signs1, shape, "signs1", fmt)
        _check_signs(self.signs2, shape, "signs2", fmt)
        _check_block_size(self.block_size, fmt)
        _check_shape(self.alpha, (rows, self.n_blocks, BILLM_TERMS), "alpha (out, n_blocks, 4)", fmt)
        _check_shape(self.mean, (rows, self.n_blocks, BILLM_TERMS), "mean (out, n_blocks, 4)", fmt)

    @property
    def n_blocks(self) -> int:
        return -(-int(self.split.shape[1]) // int(self.block_size))

    def dequantize(self):
        xp = namespace(self.alpha)
        rows, cols = self.shape
        b = xp.arange(cols) // int(self.block_size)
        sal = self.salient_columns[None, :]
        t = xp.where(sal, 2, xp.where(self.split, 1, 0))
        r = xp.arange(rows)[:, None]
        first = _as_float(self.signs1, self.alpha) * self.alpha[r, b[None, :], t] + self.mean[r, b[None, :], t]
        second = _as_float(self.signs2, self.alpha) * self.alpha[:, b, 3] + self.mean[:, b, 3]
        return xp.where(sal, first + second, first)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.split.shape)

    @property
    def n_salient_columns(self) -> int:
        return int(to_numpy(self.salient_columns).sum())

    @property
    def bits_per_weight(self) -> float:
        """``1 + salient columns / in_features`` (BiLLM's convention)."""
        return 1.0 + self.n_salient_columns / self.shape[1]

    @property
    def storage_bits(self) -> int:
        rows, cols = self.shape
        sal = self.salient_columns  # counted where the arrays live: only integers leave a device
        k = int(sal.sum())
        zeros = int((self.signs1 == 0).sum()) + int(((self.signs2 == 0) & sal[None, :]).sum())
        return (self.numel + rows * k + rows * (cols - k) + cols + 2 * HALF_BITS * BILLM_TERMS * rows * self.n_blocks
                + zeros * _index_bits(self.numel))

    def _tensors_and_meta(self):
        sal = to_numpy(self.salient_columns).astype(bool)
        s1, s2 = to_numpy(self.signs1), to_numpy(self.signs2)
        tensors = {"salient_columns": _pack(sal), "split": _pack(self.split), "signs1": _pack(s1 > 0),
                   "signs2": _pack(s2[:, sal] > 0),
                   "zero_signs1": np.flatnonzero(s1 == 0).astype(np.int64),
                   "zero_signs2": np.flatnonzero(s2[:, sal] == 0).astype(np.int64),
                   "alpha": self.alpha, "mean": self.mean}
        return tensors, {"in_features": int(self.shape[1]), "block_size": int(self.block_size),
                         "signs_dtype": str(s1.dtype)}

    @classmethod
    def _required_tensors(cls, meta):
        return ("salient_columns", "split", "signs1", "signs2", "zero_signs1", "zero_signs2", "alpha", "mean")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        cols = int(meta["in_features"])
        dtype = np.dtype(meta.get("signs_dtype", "int8"))
        sal = _unpack(tensors["salient_columns"], cols)
        split = _unpack(tensors["split"], cols)
        s1 = np.where(_unpack(tensors["signs1"], cols), 1, -1).astype(dtype)
        s1[np.unravel_index(tensors["zero_signs1"], s1.shape)] = 0  # ravel() may copy
        k = int(sal.sum())
        sub = np.where(_unpack(tensors["signs2"], k), 1, -1).astype(dtype) if k else np.zeros((split.shape[0], 0), dtype)
        sub[np.unravel_index(tensors["zero_signs2"], sub.shape)] = 0  # ravel() may copy
        s2 = np.zeros(split.shape, dtype)
        s2[:, sal] = sub
        return cls(sal, split, s1, s2, tensors["alpha"], tensors["mean"], block_size=int(meta["block_size"]), info=info)


# ---------------------------------------------------------------------------------------------
# QuIP: a uniform grid in a randomly rotated, rescaled basis


def butterfly_apply(perm_in, perm_out, R1, R2, X, transpose: bool = False):
    """``B X`` (or ``B^T X``) for the factorised orthogonal matrix ``B = P_out S_2 S_1 P_in`` of QuIP.

    ``n = p1 * p2`` with ``p1 = R1.shape[-1]``, ``p2 = R2.shape[-1]``; ``X`` is (n, q). Index
    ``j = a * p2 + b`` (``a < p1``, ``b < p2``): ``P_in`` takes row ``perm_in[k]`` to row ``k``;
    ``S_1`` rotates over ``a`` for every ``b`` with ``R1[b]`` (``R1`` of shape (p2, p1, p1), or
    (1, p1, p1): one rotation shared by all ``b``, the Kronecker form); ``S_2`` rotates over
    ``b`` for every ``a`` with ``R2[a]`` (shape (p1, p2, p2) or (1, p2, p2)); ``P_out`` takes row
    ``perm_out[k]`` to row ``k``. This is ``mul_ortho_butterfly`` of Cornell-RelaxML/QuIP
    ``method.py``. A dense orthogonal ``U`` is the case ``p1 = n``, ``p2 = 1``, ``R1 = U[None]``,
    ``R2 = ones((n, 1, 1))`` with identity permutations. NumPy, CuPy or torch arrays.
    """
    xp = namespace(X)
    n, q = int(X.shape[0]), int(X.shape[1])
    p1, p2 = int(R1.shape[-1]), int(R2.shape[-1])
    if p1 * p2 != n:
        raise ValueError(f"butterfly factors {p1} x {p2} do not match the dimension {n}.")
    # batched matmuls (R1 / R2 of batch 1 broadcast): y[a, b] <- sum_c R1[b][a, c] y[c, b], then
    # y[a, b] <- sum_c R2[a][b, c] y[a, c]; the transpose runs the steps backwards with R^T
    if not transpose:
        y = xp.reshape(X[perm_in], (p1, p2, q))
        y = xp.moveaxis(R1 @ xp.moveaxis(y, 1, 0), 0, 1)
        y = R2 @ y
        return xp.reshape(y, (n, q))[perm_out]
    y = xp.reshape(X[xp.argsort(perm_out)], (p1, p2, q))
    y = xp.swapaxes(R2, -1, -2) @ y
    y = xp.moveaxis(xp.swapaxes(R1, -1, -2) @ xp.moveaxis(y, 1, 0), 0, 1)
    return xp.reshape(y, (n, q))[xp.argsort(perm_in)]


#: Bits of a stored rotation seed (QuIP: the rotations are regenerated from it).
SEED_BITS = 64

#: The rotation fields of :class:`QuipWeight`, per side.
QUIP_ROTATION_FIELDS = ("perm_in", "perm_out", "R1", "R2")


@register_format("quip")
@dataclass(frozen=True, eq=False)
class QuipWeight(WeightFormat):
    """QuIP weight: integer codes on an evenly spaced grid, in the rotated and rescaled basis.

    ``W_hat = (U^T Q V) diag(t)^-1`` with ``Q = scale * (codes / maxq * 2 - 1)``, ``maxq = 2**bits - 1``
    (``2**bits`` levels covering ``[-scale, scale]``, both ends included; ``scale = 2.4 * RMS`` of
    the projected weight): Chee et al., "QuIP", Algorithms 1-2 and the incoherent quantizer of
    Cornell-RelaxML/QuIP (``quantize_weight_vecbal`` with ``qfn='b'``, ``postproc``).

    Attributes:
        codes: integer codes in ``[0, maxq]``, shape (out_features, in_features), in the
            projected basis.
        scale: the grid half-width ``s`` (a Python float).
        bits: code width (1..16).
        t: the rescale vector (in_features,) or None (no rescale).
        U_perm_in, U_perm_out, U_R1, U_R2: the output-side rotation ``U`` (out_features) as the
            factors of :func:`butterfly_apply`; all None: ``U = I`` (no incoherence processing).
        V_perm_in, V_perm_out, V_R1, V_R2: the input-side rotation ``V`` (in_features), likewise.
        seed: the seed the rotations were generated from (:func:`refquant.spec.quip.random_rotation`),
            or None when they were given.
        rotation: how they were made: ``"blocked"`` (the code's default), ``"kron"`` (the paper's
            Kronecker form), ``"blocked_nopermute"``, ``"given"`` (dense U/V passed in) or ``"none"``.
        info: method diagnostics (proxy loss, greedy passes run, ...).

    Bits: ``bits_per_weight = bits`` (the QuIP paper's "2 bits": the code width). ``storage_bits``
    is the layout

    =========  =====================================================================================
    codes      ``bits`` per weight, packed
    scale      16 bits (FP16: the original returns the quantized weight in half precision)
    t          16 bits per input column, when rescaled
    rotations  ``SEED_BITS`` (64) for the seed when generated (U and V are regenerated from it by
               :func:`refquant.spec.quip.random_rotation`); when given, explicitly: 16 bits per
               entry of ``R1``/``R2`` and ``ceil(log2 n)`` per entry of a non-identity permutation
    =========  =====================================================================================

    :meth:`storage_bits_with` ``(rotation="explicit")`` counts the explicit layout of the
    generated rotations too (a deployment that does not regenerate them).

    Serialization (:meth:`to_tensors`): tensors ``codes``, ``t`` (when present) and the rotation
    factors ``U.perm_in`` ... ``V.R2`` (when present); meta ``scale`` (a JSON float, exact),
    ``bits``, ``seed``, ``rotation``.
    """

    codes: object
    scale: float
    bits: int
    t: object = None
    U_perm_in: object = None
    U_perm_out: object = None
    U_R1: object = None
    U_R2: object = None
    V_perm_in: object = None
    V_perm_out: object = None
    V_R1: object = None
    V_R2: object = None
    seed: int | None = None
    rotation: str = "blocked"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not hasattr(self.codes, "ndim") or self.codes.ndim != 2 or not _is_dtype(self.codes, "integral"):
            raise ValueError(f"QuipWeight: codes must be a 2-D integer array; got "
                             f"{getattr(self.codes, 'shape', type(self.codes).__name__)}.")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= 16:
            raise ValueError(f"QuipWeight: bits must be an integer in 1..16; got {self.bits!r}.")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ValueError(f"QuipWeight: scale must be a finite Python float; got {self.scale!r}.")
        rows, cols = self.shape
        if self.t is not None:
            _check_shape(self.t, (cols,), "t (the rescale vector)", "QuipWeight")
        for side, n in (("U", rows), ("V", cols)):
            parts = [getattr(self, f"{side}_{f}") for f in QUIP_ROTATION_FIELDS]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise ValueError(f"QuipWeight: the {side} rotation needs all of {QUIP_ROTATION_FIELDS} or none.")
            perm_in, perm_out, R1, R2 = parts
            _check_shape(perm_in, (n,), f"{side}_perm_in", "QuipWeight")
            _check_shape(perm_out, (n,), f"{side}_perm_out", "QuipWeight")
            p1, p2 = int(R1.shape[-1]), int(R2.shape[-1])
            if R1.ndim != 3 or R2.ndim != 3 or p1 * p2 != n or R1.shape[0] not in (1, p2) or R2.shape[0] not in (1, p1):
                raise ValueError(f"QuipWeight: {side}_R1 {tuple(R1.shape)} and {side}_R2 {tuple(R2.shape)} are not the "
                                 f"factors of a dimension-{n} butterfly ((p2 or 1, p1, p1), (p1 or 1, p2, p2), p1*p2 = {n}).")

    @property
    def maxq(self) -> int:
        return 2 ** int(self.bits) - 1

    def _rotation(self, side: str):
        parts = tuple(getattr(self, f"{side}_{f}") for f in QUIP_ROTATION_FIELDS)
        return None if parts[0] is None else parts

    def projected(self):
        """The quantized weight in the projected basis, ``scale * (codes / maxq * 2 - 1)``."""
        like = self.t if self.t is not None else self.U_R1 if self.U_R1 is not None else self.V_R1
        if like is not None:
            codes = _as_float(self.codes, like)
        else:
            xp = array_namespace(self.codes)
            codes = xp.astype(self.codes, xp.float64)
        return (codes / self.maxq * 2 - 1) * self.scale

    def dequantize(self):
        """``(U^T Q V) / t`` (the original basis: the projection and the rescale undone)."""
        Wq = self.projected()
        U, V = self._rotation("U"), self._rotation("V")
        if U is not None:
            Wq = butterfly_apply(*U, Wq, transpose=True)          # U^T Q
        if V is not None:
            Wq = butterfly_apply(*V, Wq.T, transpose=True).T      # (V^T (U^T Q)^T)^T = U^T Q V
        if self.t is not None:
            Wq = Wq / self.t[None, :]
        return Wq

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bits_per_weight(self) -> float:
        """The code width (QuIP's "2 bits")."""
        return float(self.bits)

    @property
    def storage_bits(self) -> int:
        """Codes, the FP16 scale, the FP16 rescale vector and the rotations (seed or explicit; see the class)."""
        return self.storage_bits_with("seed" if self.seed is not None else "explicit")

    def storage_bits_with(self, rotation: str = "seed") -> int:
        """Total bits with the rotations stored as their ``"seed"`` or ``"explicit"``ly as factors."""
        if rotation not in ("seed", "explicit"):
            raise ValueError(f"rotation must be 'seed' or 'explicit'; got {rotation!r}.")
        total = self.numel * int(self.bits) + HALF_BITS
        if self.t is not None:
            total += HALF_BITS * self.shape[1]
        sides = [s for s in ("U", "V") if self._rotation(s) is not None]
        if not sides:
            return int(total)
        if rotation == "seed":
            if self.seed is None:
                raise ValueError("these rotations were given, not generated from a seed: count them 'explicit'.")
            return int(total + SEED_BITS)
        for side in sides:
            perm_in, perm_out, R1, R2 = self._rotation(side)
            n = int(perm_in.shape[0])
            for perm in (perm_in, perm_out):
                if not np.array_equal(to_numpy(perm), np.arange(n)):
                    total += n * max(1, math.ceil(math.log2(n)))
            total += HALF_BITS * (math.prod(R1.shape) + math.prod(R2.shape))
        return int(total)

    def _tensors_and_meta(self):
        tensors = {"codes": self.codes}
        if self.t is not None:
            tensors["t"] = self.t
        for side in ("U", "V"):
            if self._rotation(side) is not None:
                for f in QUIP_ROTATION_FIELDS:
                    tensors[f"{side}.{f}"] = getattr(self, f"{side}_{f}")
        meta = {"scale": float(self.scale), "bits": int(self.bits),
                "seed": None if self.seed is None else int(self.seed), "rotation": str(self.rotation),
                "has_t": self.t is not None, "sides": [s for s in ("U", "V") if self._rotation(s) is not None]}
        return tensors, meta

    @classmethod
    def _required_tensors(cls, meta):
        names = ["codes"] + (["t"] if meta.get("has_t") else [])
        return tuple(names + [f"{s}.{f}" for s in meta.get("sides", []) for f in QUIP_ROTATION_FIELDS])

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        kwargs = {f"{s}_{f}": tensors[f"{s}.{f}"] for s in meta.get("sides", []) for f in QUIP_ROTATION_FIELDS}
        return cls(tensors["codes"], float(meta["scale"]), int(meta["bits"]), t=tensors.get("t") if meta.get("has_t") else None,
                   seed=meta["seed"], rotation=meta["rotation"], info=info, **kwargs)


@register_format("dual_binary")
@dataclass(frozen=True, eq=False)
class DualBinaryWeight(WeightFormat):
    """DB-LLM's dual binarization: ``W_hat = a1 * b1 + a2 * b2 + offset`` per (row, group), b in {0, 1}.

    Two binary planes (Flexible Dual Binarization, Chen et al. 2024, Sec. 3.2; built by
    :func:`refquant.spec.dbllm.dbllm`) with a scale each per output row and column group (consecutive
    groups of ``group_size`` columns, the last one partial; ``None`` = one group per row), and an
    optional offset per (row, group)::

        W_hat[r, j] = where(b1[r, j], a1[r, g], 0) + where(b2[r, j], a2[r, g], 0) + offset[r, g]

    (the sum taken in that order; no offset term when ``offset`` is None).

    Attributes:
        b1, b2: boolean, shape (out_features, in_features).
        a1, a2: scales, shape (out_features, n_groups).
        offset: None or shape (out_features, n_groups).
        group_size: columns per group, or None.
        info: method diagnostics.

    Bits: ``bits_per_weight = 2.0`` (the paper's "2-bit"; DB-LLM compares itself with 2-bit methods).
    ``storage_bits`` is the layout

    =========  =====================================================================================
    b1, b2     1 bit per weight each, packed (2 * out_features * in_features)
    a1, a2     16 bits each per (row, group)
    offset     16 bits per (row, group), only when present
    =========  =====================================================================================

    e.g. g128 with offset: ``2 + 48 / 128 = 2.375`` bits per weight; without: 2.25.

    Serialization (:meth:`to_tensors`): ``b1`` and ``b2`` packed 8 to a byte along each row
    (``numpy.packbits(..., axis=1, bitorder="little")``), ``a1``, ``a2`` (and ``offset``) as they are;
    meta ``in_features``, ``group_size``, ``has_offset``.
    """

    b1: object
    b2: object
    a1: object
    a2: object
    offset: object = None
    group_size: int | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        fmt = "DualBinaryWeight"
        for name in ("b1", "b2"):
            plane = getattr(self, name)
            if not hasattr(plane, "ndim") or plane.ndim != 2:
                raise ValueError(f"{fmt}: {name} must be a 2-D boolean array (out_features, in_features); got "
                                 f"{getattr(plane, 'shape', type(plane).__name__)}.")
            if not _is_dtype(plane, "bool"):
                raise ValueError(f"{fmt}: {name} must be boolean (the {{0, 1}} plane); got dtype {plane.dtype}. "
                                 "Convert 0/1 bits with .astype(bool).")
        if tuple(self.b1.shape) != tuple(self.b2.shape):
            raise ValueError(f"{fmt}: b1 and b2 must have the same shape; got {tuple(self.b1.shape)} and "
                             f"{tuple(self.b2.shape)}.")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, (int, np.integer)) or gs < 1):
            raise ValueError(f"{fmt}: group_size must be a positive integer or None; got {gs!r}.")
        rows, cols = (int(s) for s in self.b1.shape)
        n_groups = 1 if gs is None else -(-cols // int(gs))
        _check_shape(self.a1, (rows, n_groups), "a1", fmt)
        _check_shape(self.a2, (rows, n_groups), "a2", fmt)
        if self.offset is not None:
            _check_shape(self.offset, (rows, n_groups), "offset", fmt)

    def _g_idx(self, xp, like):
        cols = int(self.b1.shape[1])
        if is_torch_array(like):
            idx = xp.arange(cols, device=like.device)
        else:
            idx = xp.arange(cols)
        return idx * 0 if self.group_size is None else idx // int(self.group_size)

    def dequantize(self):
        """``where(b1, a1, 0) + where(b2, a2, 0) (+ offset)``, groups expanded (dtype of ``a1``)."""
        xp = namespace(self.a1)
        g = self._g_idx(xp, self.a1)
        zero = xp.zeros((), dtype=self.a1.dtype) if not is_torch_array(self.a1) else 0.0
        W_hat = xp.where(self.b1, self.a1[:, g], zero) + xp.where(self.b2, self.a2[:, g], zero)
        if self.offset is not None:
            W_hat = W_hat + self.offset[:, g]
        return W_hat

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.b1.shape)

    @property
    def n_groups(self) -> int:
        return int(self.a1.shape[1])

    @property
    def bits_per_weight(self) -> float:
        """2.0: two binary planes (the paper's 2-bit)."""
        return 2.0

    @property
    def storage_bits(self) -> int:
        """Two planes of 1 bit per weight, 16-bit a1, a2 (and offset) per (row, group)."""
        rows, _ = self.shape
        per_pair = (3 if self.offset is not None else 2) * HALF_BITS
        return int(2 * self.numel + rows * self.n_groups * per_pair)

    def _tensors_and_meta(self):
        tensors = {"b1": np.packbits(to_numpy(self.b1), axis=1, bitorder="little"),
                   "b2": np.packbits(to_numpy(self.b2), axis=1, bitorder="little"),
                   "a1": self.a1, "a2": self.a2}
        if self.offset is not None:
            tensors["offset"] = self.offset
        return tensors, {"in_features": int(self.shape[1]),
                         "group_size": None if self.group_size is None else int(self.group_size),
                         "has_offset": self.offset is not None}

    @classmethod
    def _required_tensors(cls, meta):
        return ("b1", "b2", "a1", "a2") + (("offset",) if meta.get("has_offset") else ())

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        n = int(meta["in_features"])
        b1 = np.unpackbits(tensors["b1"], axis=1, count=n, bitorder="little").astype(bool)
        b2 = np.unpackbits(tensors["b2"], axis=1, count=n, bitorder="little").astype(bool)
        gs = meta.get("group_size")
        return cls(b1, b2, tensors["a1"], tensors["a2"], tensors["offset"] if meta.get("has_offset") else None,
                   None if gs is None else int(gs), info)

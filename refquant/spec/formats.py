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
    mean = W.mean(axis=1)
    centred = W - mean[:, None]
    return BinaryWeight(signs=centred >= 0, alpha=xp.abs(centred).mean(axis=1), mean=mean)


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

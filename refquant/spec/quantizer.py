"""The uniform affine weight quantizer of the GPTQ code lineage, and the quantized-weight object.

This is the one place where a weight value becomes an integer code. RTN, GPTQ, AWQ's final RTN and
every later method call :func:`find_params`, :func:`quantize` and :func:`dequantize` from here.

Faithful to ``Quantizer`` in IST-DASLab/gptq ``quant.py`` (the code behind the GPTQ paper,
Frantar et al. 2023, eq. (1) with per-row scale/zero):

* the range is forced to contain 0: ``xmin = min(min x, 0)``, ``xmax = max(max x, 0)``;
* asymmetric: ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)`` kept as a float;
* "symmetric": ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax`` where ``xmin < 0``, and the fixed
  ``zero = (maxq + 1) / 2`` -- at 4 bits the grid is ``[-8, +7] * scale`` with
  ``scale = 2 * absmax / 15``, so ``+absmax`` is clipped to ``7/7.5 * absmax`` (not ``[-7, 7]``);
* an all-zero row uses the range ``[-1, 1]``;
* optional MSE shrink search (``mse=True``): ranges ``p * [xmin, xmax]`` for
  ``p = 1, 0.99, ..., 1 - (int(maxshrink * grid) - 1) / grid``, error ``sum |Q(x) - x|^norm``,
  strict improvement only (no expansion beyond min/max);
* ``Q(x) = scale * (clamp(round(x / scale) + zero, 0, maxq) - zero)``, round half to even.

Two further range rules of the same uniform grid live here too, so that every method shares one
quantizer (``QuantSpec.rule``):

* ``"awq"`` -- ``pseudo_quantize_tensor`` of mit-han-lab/llm-awq: raw group min/max (the range is
  *not* forced to contain 0), ``scale = max(xmax - xmin, 1e-5) / maxq``,
  ``zero = clamp(-round(xmin / scale), 0, maxq)``; asymmetric only (the original's symmetric
  branch does not run);
* ``"absmax"`` -- SmoothQuant's ``fake_quant.py``: symmetric, no zero point,
  ``scale = max(absmax, 1e-5) / qmax`` with ``qmax = 2**(bits-1) - 1``, ``W_hat = round(W / scale)
  * scale``. Expressed on the shared grid as codes in ``[0, 2 qmax]`` with ``zero = qmax``
  (the clamp is never active because ``|W / scale| <= qmax``).

Groups run along the input dimension in consecutive runs of ``group_size`` columns starting at
column 0; when ``group_size`` does not divide ``in_features``, the last group holds the remaining
``in_features % group_size`` columns (exactly what the original's slice ``W[:, j:j+gs]`` gives).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_matrix
from ._xp import namespace


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight matrix.

    Args:
        bits: bits per weight, 1..8 (``maxq = 2**bits - 1``).
        group_size: columns per group along in_features; ``None`` means one group per output
            channel (per-row scale/zero, the GPTQ ``--groupsize -1``).
        sym: the original's "symmetric" mode (zero fixed at ``(maxq + 1) / 2``).
        per_tensor: one scale/zero for the whole matrix (GPTQ's ``perchannel=False``).
        mse: MSE shrink search of the range (GPTQ ``Quantizer(mse=True)``).
        norm, grid, maxshrink: parameters of that search (original defaults 2.4, 100, 0.8).
        rule: range rule -- ``"gptq"`` (default), ``"awq"`` or ``"absmax"`` (see module doc).
    """

    bits: int
    group_size: int | None = None
    sym: bool = False
    per_tensor: bool = False
    mse: bool = False
    norm: float = 2.4
    grid: int = 100
    maxshrink: float = 0.8
    rule: str = "gptq"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise ValueError(f"bits must be an integer in 1..8; got {self.bits!r}.")
        if not 1 <= int(self.bits) <= 8:
            raise ValueError(
                f"bits={self.bits} is outside 1..8, the range of the uniform quantizer. "
                "Use 16 (no quantization) at the CLI level, not here."
            )
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
                raise ValueError(
                    f"group_size must be a positive integer or None (per output channel); got {self.group_size!r}. "
                    "The original's -1 is spelled None here."
                )
            if self.per_tensor:
                raise ValueError("per_tensor=True and group_size are exclusive: choose one granularity.")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}; got {self.rule!r}.")
        if self.rule == "awq" and self.sym:
            raise ValueError("rule='awq' is asymmetric only (llm-awq's symmetric branch does not run); use sym=False.")
        if self.rule == "absmax" and int(self.bits) < 2:
            raise ValueError("rule='absmax' needs bits >= 2 (qmax = 2**(bits-1) - 1 must be positive).")
        if self.mse and self.rule != "gptq":
            raise ValueError("the MSE range search belongs to the GPTQ quantizer; use rule='gptq' with mse=True.")
        if self.mse and (self.grid < 1 or not 0 < self.maxshrink <= 1 or self.norm <= 0):
            raise ValueError(
                f"MSE search needs grid >= 1, 0 < maxshrink <= 1 and norm > 0; got grid={self.grid}, "
                f"maxshrink={self.maxshrink}, norm={self.norm}."
            )

    @property
    def maxq(self) -> int:
        """Largest integer code: ``2**bits - 1`` (``2**bits - 2`` for the absmax rule's [-qmax, qmax])."""
        return 2 ** int(self.bits) - (2 if self.rule == "absmax" else 1)


RULES = ("gptq", "awq", "absmax")


def find_params(x, spec: QuantSpec):
    """Per-row ``(scale, zero)`` of the GPTQ quantizer for ``x`` of shape (rows, cols).

    Reproduces ``Quantizer.find_params(x, weight=True)``: per row unless ``spec.per_tensor``, in
    which case one pair is computed over all of ``x`` and repeated for every row. Returns two
    float arrays of shape (rows,).
    """
    xp = namespace(x)
    maxq = spec.maxq
    rows = x.shape[0]
    flat = x.reshape(1, -1) if spec.per_tensor else x
    if spec.rule == "awq":
        scale, zero = _params_awq(flat, maxq, xp)
    elif spec.rule == "absmax":
        scale, zero = _params_absmax(flat, int(spec.bits), xp)
    else:
        scale, zero = _params_gptq(flat, spec, xp)
    if spec.per_tensor:
        scale = xp.repeat(scale, rows)
        zero = xp.repeat(zero, rows)
    return scale, zero


def _params_gptq(flat, spec: QuantSpec, xp):
    """IST-DASLab/gptq ``Quantizer.find_params``: range containing 0, optional MSE shrink."""
    maxq = spec.maxq
    zeros = xp.zeros(flat.shape[0], dtype=flat.dtype)
    xmin = xp.minimum(flat.min(axis=1), zeros)
    xmax = xp.maximum(flat.max(axis=1), zeros)
    if spec.sym:
        xmax = xp.maximum(xp.abs(xmin), xmax)
        xmin = xp.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = xp.where(dead, -1.0, xmin)
    xmax = xp.where(dead, 1.0, xmax)

    scale = (xmax - xmin) / maxq
    if spec.sym:
        zero = xp.full_like(scale, (maxq + 1) / 2)
    else:
        zero = xp.round(-xmin / scale)

    if spec.mse:
        best = xp.full(flat.shape[0], xp.inf, dtype=flat.dtype)
        for i in range(int(spec.maxshrink * spec.grid)):
            p = 1 - i / spec.grid
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = (xmax1 - xmin1) / maxq
            zero1 = zero if spec.sym else xp.round(-xmin1 / scale1)
            q = fake_quantize(flat, scale1[:, None], zero1[:, None], maxq)
            err = (xp.abs(q - flat) ** spec.norm).sum(axis=1)
            better = err < best
            best = xp.where(better, err, best)
            scale = xp.where(better, scale1, scale)
            zero = xp.where(better, zero1, zero)
    return scale, zero


def _params_awq(flat, maxq: int, xp):
    """llm-awq ``pseudo_quantize_tensor`` (zero_point=True): raw min/max, clamped zero."""
    xmax, xmin = flat.max(axis=1), flat.min(axis=1)
    scale = xp.maximum(xmax - xmin, 1e-5) / maxq
    zero = xp.clip(-xp.round(xmin / scale), 0, maxq)
    return scale, zero


def _params_absmax(flat, bits: int, xp):
    """SmoothQuant ``quantize_weight_per_channel_absmax``: ``scale = max(absmax, 1e-5) / qmax``."""
    qmax = 2 ** (bits - 1) - 1
    scale = xp.maximum(xp.abs(flat).max(axis=1), 1e-5) / qmax
    return scale, xp.full_like(scale, float(qmax))


def quantize(x, scale, zero, maxq: int):
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` (as floats, exact integers)."""
    xp = namespace(x)
    return xp.clip(xp.round(x / scale) + zero, 0, maxq)


def dequantize(q, scale, zero):
    """Grid values ``scale * (q - zero)`` of integer codes ``q``."""
    return scale * (q - zero)


def fake_quantize(x, scale, zero, maxq: int):
    """``dequantize(quantize(x))``: the value GPTQ's ``quantize()`` returns."""
    return dequantize(quantize(x, scale, zero, maxq), scale, zero)


def group_index(in_features: int, group_size: int | None, xp=np):
    """Group of every input column for consecutive groups of ``group_size`` (last one partial)."""
    cols = xp.arange(in_features)
    if group_size is None:
        return xp.zeros(in_features, dtype=xp.int64)
    return (cols // group_size).astype(xp.int64)


def group_slices(in_features: int, group_size: int | None) -> list[slice]:
    """Column slices of the groups, in order; the last one holds the remainder."""
    if group_size is None:
        return [slice(0, in_features)]
    return [slice(g, min(g + group_size, in_features)) for g in range(0, in_features, group_size)]


def code_dtype(xp=np):
    """Integer dtype of stored codes (all supported widths fit in 8 bits)."""
    return xp.uint8


def check_spec(spec) -> None:
    """``spec`` must be a :class:`QuantSpec` (its fields are validated when it is made)."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a refquant.QuantSpec; got {type(spec).__name__}.")


def check_weight(W, spec: QuantSpec, name: str = "W"):
    """Validate a weight matrix against a spec (2-D, finite, non-empty)."""
    check_spec(spec)
    check_matrix(W, name)

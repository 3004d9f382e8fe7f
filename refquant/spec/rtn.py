"""Round-to-nearest (RTN) weight quantization: the baseline of every study table.

Each (row, group) slice of W gets its own scale/zero from the shared GPTQ-lineage quantizer
(:mod:`refquant.quantizer`) and every weight is rounded to the nearest grid point independently:

    W_hat[r, j] = scale[r, g] * (clamp(round(W[r, j] / scale[r, g]) + zero[r, g], 0, maxq) - zero[r, g])

This is ``Quantizer.find_params`` + ``quantize`` of IST-DASLab/gptq applied to each group slice,
which is also what GPTQ's group code does (GPTQ paper, Frantar et al. 2023, Sec. 2, eq. (1) with
``quant`` = this rounding). The study's RTN rows (Huang et al. 2024, Table 1) are this function
with ``group_size=128`` or ``None``. See ``docs/methods/rtn.md``.
"""
from __future__ import annotations

from ._xp import namespace
from .formats import QuantizedWeight
from .quantizer import QuantSpec, check_weight, code_dtype, find_params, group_index, group_slices, quantize


def rtn(W, spec: QuantSpec) -> QuantizedWeight:
    """Quantize ``W`` (out_features, in_features) to the nearest grid point, group by group.

    Computed in float64 whatever the input dtype. Returns a :class:`QuantizedWeight` with
    ``scale``/``zero`` of shape (out_features, n_groups).
    """
    check_weight(W, spec)
    xp = namespace(W)
    W = W.astype(xp.float64)
    rows, columns = W.shape
    slices = group_slices(columns, spec.group_size)

    codes = xp.empty((rows, columns), dtype=code_dtype(xp))
    scale = xp.empty((rows, len(slices)), dtype=xp.float64)
    zero = xp.empty((rows, len(slices)), dtype=xp.float64)
    for g, cols in enumerate(slices):
        scale[:, g], zero[:, g] = find_params(W[:, cols], spec)
        codes[:, cols] = quantize(W[:, cols], scale[:, g, None], zero[:, g, None], spec.maxq)
    return QuantizedWeight(codes, scale, zero, group_index(columns, spec.group_size, xp), spec)

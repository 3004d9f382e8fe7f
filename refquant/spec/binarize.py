"""Binarization primitives shared by the binarization family (PB-LLM, BiLLM, the minimal binary format).

Everything here is float64 NumPy math on arrays of shape (rows, cols); nothing imports a weight
format (``refquant/spec/formats.py`` imports this module, not the other way round).

* :func:`row_mean_alpha` -- per-row centre ``mean_r`` and scale ``alpha_r = mean |x - mean_r|`` of
  the entries selected by an optional mask (XNOR-Net / BNN's L2-optimal scale for fixed signs). A
  row without selected entries gets ``mean = alpha = 0`` (what BiLLM's ``nanmean`` + ``isnan -> 0``
  gives). :func:`refquant.spec.formats.binarize_rows` is this function without a mask.
* :func:`sign0` -- ``sign`` with ``sign(0) = 0`` (``torch.sign``, used by both originals: a value
  exactly at the centre is reconstructed as the centre itself).
* :func:`xnor` -- ``alpha * sign0(x - mean) + mean`` (PB-LLM ``LowQuantizer.quantize``, method
  ``"xnor"``).
* :func:`residual_binarize` -- residual binarization of order ``k`` over a mask (BiLLM eq. (5)-(7),
  ``binary.high_order_residual`` of Aaronhuang-778/BiLLM): each order binarizes what the previous
  orders left, over the masked entries of each row only, and the result is zero outside the mask.
* BiLLM's structural searches, written once as batched building blocks so that a backend can run
  every candidate at once: :func:`column_ranking`, :func:`salient_column_errors`,
  :func:`split_levels`, :func:`split_thresholds`, :func:`split_errors`, :func:`first_argmin`.

The original relies on ``torch.sign(NaN) == 0`` inside masked means (unselected entries are NaN
there); here every masked statistic is computed with an explicit mask.
"""
from __future__ import annotations

import numpy as np

from ._xp import namespace

#: Number of split candidates of BiLLM's non-salient search (``torch.linspace(0.10, 0.90, 81)``).
N_SPLIT_LEVELS = 81

#: BiLLM ``structural_searching(..., up_lim=50)``: salient-column counts 1..49 are tried.
SALIENT_UP_LIM = 50


def sign0(x):
    """``sign`` with ``sign(0) = 0`` as int8 (``torch.sign`` / ``numpy.sign`` of a finite value)."""
    xp = namespace(x)
    return xp.sign(x).astype(xp.int8)


def row_mean_alpha(x, mask=None):
    """Per-row ``(mean, alpha)`` of the entries of ``x`` where ``mask`` is True (all entries if None).

    ``mean_r = sum_j m_rj x_rj / n_r`` and ``alpha_r = sum_j m_rj |x_rj - mean_r| / n_r`` with
    ``n_r = sum_j m_rj``; rows with ``n_r = 0`` get ``0, 0``. Without a mask this is
    ``x.mean(1)``, ``|x - mean|.mean(1)`` exactly (the minimal per-row binarizer).
    """
    xp = namespace(x)
    if mask is None:
        mean = x.mean(axis=1)
        return mean, xp.abs(x - mean[:, None]).mean(axis=1)
    count = mask.sum(axis=1)
    safe = xp.maximum(count, 1)
    mean = xp.where(mask, x, 0.0).sum(axis=1) / safe
    alpha = xp.where(mask, xp.abs(x - mean[:, None]), 0.0).sum(axis=1) / safe
    empty = count == 0
    return xp.where(empty, 0.0, mean), xp.where(empty, 0.0, alpha)


def xnor(x, mean, alpha):
    """``alpha * sign0(x - mean) + mean`` with per-row ``mean``, ``alpha`` (shape (rows,))."""
    s = sign0(x - mean[:, None])
    return s * alpha[:, None] + mean[:, None]


def residual_binarize(x, mask, order: int):
    """Residual binarization of ``x`` over ``mask``, ``order`` terms (BiLLM ``high_order_residual``).

    With ``S_0 = 0``: for ``o = 1..order``, ``r = x - S_{o-1}`` on the mask, ``(mean_o, alpha_o) =``
    :func:`row_mean_alpha` ``(r, mask)``, ``b_o = alpha_o sign0(r - mean_o) + mean_o`` on the mask
    (0 elsewhere), ``S_o = S_{o-1} + b_o``. Returns ``(S_order, signs, alphas, means)``: the
    approximation (zero outside the mask), and per order the int8 signs (zero outside the mask),
    the per-row alphas and means (shape (rows,)).
    """
    xp = namespace(x)
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}.")
    total = xp.zeros_like(x)
    signs, alphas, means = [], [], []
    for _ in range(int(order)):
        r = xp.where(mask, x, 0.0) - total
        mean, alpha = row_mean_alpha(r, mask)
        s = xp.where(mask, sign0(r - mean[:, None]), 0).astype(xp.int8)
        b = s * alpha[:, None] + mean[:, None]
        total = total + xp.where(mask, b, 0.0)
        signs.append(s)
        alphas.append(alpha)
        means.append(mean)
    return total, signs, alphas, means


def residual_error(x, mask, order: int):
    """Per-row ``sum over the mask of (x - residual_binarize(x, mask, order))^2``."""
    xp = namespace(x)
    approx = residual_binarize(x, mask, order)[0]
    return xp.where(mask, (x - approx) ** 2, 0.0).sum(axis=1)


# ------------------------------------------------------------------------------------- BiLLM searches


def column_ranking(T):
    """Columns of the saliency matrix ``T`` by decreasing ``sum_r |T[r, j]|`` (BiLLM's ``true_counts``).

    Ties: lower column index first (a stable sort; ``torch.topk`` leaves the order of ties
    unspecified).
    """
    xp = namespace(T)
    return xp.argsort(-xp.abs(T).sum(axis=0), kind="stable")


def salient_candidates(n_cols: int, up_lim: int = SALIENT_UP_LIM) -> list[int]:
    """Salient-column counts tried: ``1 .. up_lim - 1`` (the original), capped at ``n_cols - 1``
    for narrower blocks (refquant's extension; ``[1]`` for a one-column block)."""
    return list(range(1, max(2, min(up_lim, n_cols))))


def salient_column_errors(T, ranking, ks):
    """The column search's objective for every ``k`` in ``ks``: ``mean((T - R2(T, M_k) - R2(T, ~M_k))^2)``
    over the whole block, ``M_k`` = the columns ``ranking[:k]`` (all rows); ``R2`` =
    :func:`residual_binarize` of order 2 (the complement too, in this search only: the code)."""
    xp = namespace(T)
    errors = []
    for k in ks:
        cols = xp.zeros(T.shape[1], dtype=bool)
        cols[ranking[:k]] = True
        M = xp.broadcast_to(cols[None, :], T.shape)
        approx = residual_binarize(T, M, 2)[0] + residual_binarize(T, ~M, 2)[0]
        errors.append(((T - approx) ** 2).mean())
    return xp.asarray(errors, dtype=xp.float64)


def split_levels():
    """The 81 quantile levels ``torch.linspace(0.10, 0.90, 81)`` makes (float32 values, as float64).

    torch computes ``step = (end - start) / (steps - 1)`` and fills the first half as
    ``start + step * i`` and the second as ``end - step * (steps - 1 - i)``, rounding each to
    float32 (``tests/test_binarize.py`` checks the values against torch where it is installed).
    """
    n = N_SPLIT_LEVELS
    start, end = float(np.float32(0.10)), float(np.float32(0.90))
    step = float(np.float32((0.90 - 0.10) / (n - 1)))
    i = np.arange(n, dtype=np.float64)
    vals = np.where(i < n // 2, start + step * i, end - step * (n - 1 - i))
    return vals.astype(np.float32).astype(np.float64)


def split_thresholds(T, salient):
    """Candidate break points: the quantiles at :func:`split_levels` of ``|T * ~salient|`` over the
    whole flattened block, the zeroed salient entries included (the code), linear interpolation
    (``numpy.quantile``'s default, which the original calls)."""
    xp = namespace(T)
    flat = xp.abs(xp.where(salient, 0.0, T)).ravel()
    return xp.quantile(flat, xp.asarray(split_levels()))


def split_masks(T, salient, p):
    """BiLLM ``generate_structural_mask``: non-salient entries with ``|T| < p`` (group 1) and ``>= p`` (group 2)."""
    xp = namespace(T)
    a = xp.abs(xp.where(salient, 0.0, T))
    return (a < p) & ~salient, (a >= p) & ~salient


def split_errors(T, salient, thresholds, salient_approx=None):
    """The split search's objective for every break point:
    ``mean((T - R1(T, M1) - R1(T, M2) - R2(T, salient))^2)`` over the whole block."""
    if salient_approx is None:
        salient_approx = residual_binarize(T, salient, 2)[0]
    xp = namespace(T)
    errors = []
    for p in thresholds:
        m1, m2 = split_masks(T, salient, p)
        approx = residual_binarize(T, m1, 1)[0] + residual_binarize(T, m2, 1)[0] + salient_approx
        errors.append(((T - approx) ** 2).mean())
    return xp.asarray(errors, dtype=xp.float64)


def first_argmin(errors) -> int:
    """Index of the first minimum (the originals keep a candidate only on strict improvement)."""
    xp = namespace(errors)
    return int(xp.argmin(errors))

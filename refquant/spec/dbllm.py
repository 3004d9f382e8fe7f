"""DB-LLM's Flexible Dual Binarization (FDB): a 2-bit weight as two {0, 1} planes with their own scales.

Re-implementation from the paper -- Chen et al., "DB-LLM: Accurate Dual-Binarization for Efficient
LLMs", arXiv 2402.11960 / Findings of ACL 2024, Sec. 3.2 (FDB) -- because the authors' repository
(Hon-Chen/DB-LLM, commit d3aeb16) holds a README only: there is no original code to follow. Where the
paper's text could not be read here, the formula comes from a public summary of it and is marked
UNVERIFIED in ``docs/methods/dbllm.md``.

FDB (the paper's notation, scales alpha_1, alpha_2 named ``a1``, ``a2`` here)::

    w_hat = a1 * b1 + a2 * b2 (+ c)                    b1, b2 in {0, 1}
    b1 = H(w - c - (a1 + a2) / 2)                       H(x) = 1 if x >= 0 else 0 (Heaviside)
    b2 = H(-(w - c - a1 * b1 - a2 / 2))
    initialisation from the 2-bit uniform grid of step s:  a1 = 2 s,  a2 = -s

With ``a1 = 2 s`` and ``a2 = -s`` the four values ``{0, a1, a2, a1 + a2} + c`` are ``c + {-s, 0, s,
2 s}``, a uniform 2-bit grid, and the two Heaviside steps put every weight on its nearest grid point
(thresholds ``c - s/2``, ``c + s/2``, ``c + 3 s/2``): at initialisation FDB *is* 2-bit round to
nearest, re-coded as two binary planes. ``a1`` and ``a2`` are then learned (the paper trains them
with the straight-through estimator, end to end, under its Deviation-Aware Distillation; that part
is torch: ``refquant/backends/dbllm_ops.py``, ``refquant/distill.py``).

The offset ``c`` (``offset``), not in the summarised formula, is refquant's choice (a switch):

* ``offset="zero_point"`` (default): ``s`` and the zero point ``z`` of the shared 2-bit quantizer
  (:func:`refquant.spec.quantizer.find_params`, GPTQ-lineage min/max, ``sym`` as the config says)
  and ``c = s (1 - z)``: the FDB grid is then exactly the grid ``s (q - z), q = 0..3`` of 2-bit RTN
  with the same group size, so FDB at init equals :func:`refquant.rtn` up to the float rounding of
  ``a1 b1 + a2 b2 + c`` versus ``s (q - z)`` (and the side taken at exact ties);
* ``offset="none"``: the formula as summarised, ``c = 0``; ``s`` is the smallest step whose grid
  ``[-s, 2 s]`` holds the group's range (with 0): ``s = max(max(w, 0) / 2, -min(w, 0))``; an
  all-zero group takes ``s = 1``.

Beyond initialisation, :func:`fdb_step` is one float64 gradient step on the scales (``a1``, ``a2``,
``c``) of the layer-wise objective ``tr((W - W_hat) H (W - W_hat)^T)`` (``H = None``: the plain
``||W - W_hat||_F^2``), the planes held fixed (the straight-through view), with the exact line
search of this quadratic along the negative gradient, row by row; then (``resplit``) the planes are
recomputed from ``W`` with the new scales by the paper's two Heaviside formulas. This layer-wise
step is refquant's reference of "learnable scales" (the paper learns them end to end; see the doc).
"""
from __future__ import annotations

import numpy as np

from ._checks import check_finite, check_matrix, check_square
from .formats import DualBinaryWeight
from .quantizer import QuantSpec, find_params, group_index, group_slices

OFFSETS = ("zero_point", "none")
"""The offset rules of :func:`fdb_params` (see the module docstring)."""

BITS = 2
"""FDB is a 2-bit method: two binary planes."""


def _check_group_size(group_size) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                                   or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one group per row); got {group_size!r}.")


def _check_offset(offset) -> None:
    if offset not in OFFSETS:
        raise ValueError(f"offset must be one of {OFFSETS}; got {offset!r}.")


def fdb_params(W, group_size: int | None = 128, *, sym: bool = False, offset: str = "zero_point"):
    """FDB's initial scales per (row, group): ``(a1, a2, c)``, each (out_features, n_groups), float64.

    ``a1 = 2 s``, ``a2 = -s`` (paper, Sec. 3.2) with the 2-bit step ``s`` of the group; ``c`` per
    ``offset`` (module docstring): ``s (1 - z)`` with the 2-bit quantizer's zero point ``z``, or 0.
    """
    check_matrix(W, "W")
    _check_group_size(group_size)
    _check_offset(offset)
    W = np.asarray(W, dtype=np.float64)
    rows, cols = W.shape
    slices = group_slices(cols, group_size)
    s = np.empty((rows, len(slices)))
    c = np.zeros((rows, len(slices)))
    spec = QuantSpec(bits=BITS, sym=sym)
    for g, sl in enumerate(slices):
        if offset == "zero_point":
            s[:, g], z = find_params(W[:, sl], spec)
            c[:, g] = s[:, g] * (1.0 - z)
        else:
            xmin = np.minimum(W[:, sl].min(axis=1), 0.0)
            xmax = np.maximum(W[:, sl].max(axis=1), 0.0)
            step = np.maximum(xmax / 2.0, -xmin)
            s[:, g] = np.where(step == 0, 1.0, step)
    return 2.0 * s, -s, c


def fdb_split(W, a1, a2, c, group_size: int | None):
    """The two planes of the paper's FDB for given scales: ``(b1, b2)``, boolean, shape of ``W``.

    ``b1 = H(w - c - (a1 + a2) / 2)``, ``b2 = H(-(w - c - a1 b1 - a2 / 2))`` with ``H(0) = 1``;
    ``a1``, ``a2``, ``c`` of shape (out_features, n_groups), expanded over each group's columns.
    """
    W = np.asarray(W, dtype=np.float64)
    g = group_index(W.shape[1], group_size)
    A1, A2, C = a1[:, g], a2[:, g], c[:, g]
    r = W - C
    b1 = (r - (A1 + A2) / 2.0) >= 0
    b2 = -(r - np.where(b1, A1, 0.0) - A2 / 2.0) >= 0
    return b1, b2


def dbllm(W, H=None, *, group_size: int | None = 128, sym: bool = False, offset: str = "zero_point",
          steps: int = 0, resplit: bool = True) -> DualBinaryWeight:
    """DB-LLM's Flexible Dual Binarization of ``W`` (out_features, in_features), float64.

    Args:
        W: the weight.
        H: ``None`` or the (in, in) Hessian ``rq.hessian(X)`` of the layer's inputs; used only by the
            ``steps`` scale refinement (objective ``tr((W - W_hat) H (W - W_hat)^T)``; None: the
            identity, ``||W - W_hat||_F^2``).
        group_size: columns per scale group (the study's DB-LLM row: 128); None = one per row.
        sym: the 2-bit initial grid's symmetric mode (``QuantSpec.sym``; only with ``zero_point``).
        offset: ``"zero_point"`` (default) or ``"none"`` (module docstring).
        steps: layer-wise gradient steps on the scales after the initialisation (:func:`fdb_step`;
            0 = the paper's initialisation only, the default).
        resplit: recompute the planes from ``W`` after each step (the paper's Heaviside formulas
            with the new scales); False keeps the planes of the initialisation.

    Returns a :class:`~refquant.spec.formats.DualBinaryWeight` (``bits_per_weight`` 2, the paper's
    count; ``storage_bits`` with the 16-bit scales and offsets). ``info`` holds ``objective``
    (after the last step; with ``steps``: also ``objective_init``).
    """
    check_matrix(W, "W")
    W = np.asarray(W, dtype=np.float64)
    if H is not None:
        check_square(H, W.shape[1], "H")
        H = np.asarray(H, dtype=np.float64)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}.")
    if sym and offset != "zero_point":
        raise ValueError("sym selects the symmetric 2-bit grid of the zero-point initialisation; "
                         "use offset='zero_point' with sym=True, or sym=False.")
    a1, a2, c = fdb_params(W, group_size, sym=sym, offset=offset)
    b1, b2 = fdb_split(W, a1, a2, c, group_size)
    fmt = DualBinaryWeight(b1, b2, a1, a2, c if offset == "zero_point" else None, group_size)
    info = {"offset": offset, "sym": bool(sym), "steps": int(steps)}
    if steps:
        info["objective_init"] = fdb_objective(W, fmt, H)
        for _ in range(int(steps)):
            fmt = fdb_step(W, fmt, H, resplit=resplit)
    info["objective"] = fdb_objective(W, fmt, H)
    return DualBinaryWeight(fmt.b1, fmt.b2, fmt.a1, fmt.a2, fmt.offset, group_size, info)


def fdb_objective(W, fmt: DualBinaryWeight, H=None) -> float:
    """The layer-wise objective ``tr((W - W_hat) H (W - W_hat)^T)`` (``H = None``: ``||W - W_hat||_F^2``)."""
    E = np.asarray(W, dtype=np.float64) - fmt.dequantize()
    if H is None:
        return float(np.sum(E * E))
    return float(np.einsum("ij,jk,ik->", E, np.asarray(H, dtype=np.float64), E))


def _sum_groups(X, g, n_groups):
    """Per (row, group) sums of ``X`` (rows, cols) over the columns of each group."""
    out = np.zeros((X.shape[0], n_groups))
    np.add.at(out.T, g, X.T)
    return out


def fdb_scale_gradient(W, fmt: DualBinaryWeight, H=None) -> dict:
    """Gradient of :func:`fdb_objective` w.r.t. the scales, planes held fixed (straight-through view).

    ``dL/dW_hat = -2 (W - W_hat) H``; ``dL/da1[r, g] = sum_{j in g} dL/dW_hat[r, j] b1[r, j]``, likewise
    ``a2`` with ``b2`` and the offset with 1. Returns ``{"a1", "a2", "offset"}`` ((out, n_groups)
    arrays; ``offset`` is None when the format has none).
    """
    W = np.asarray(W, dtype=np.float64)
    E = W - fmt.dequantize()
    G = -2.0 * (E if H is None else E @ np.asarray(H, dtype=np.float64))
    g = group_index(W.shape[1], fmt.group_size)
    n = fmt.a1.shape[1]
    return {"a1": _sum_groups(np.where(fmt.b1, G, 0.0), g, n), "a2": _sum_groups(np.where(fmt.b2, G, 0.0), g, n),
            "offset": None if fmt.offset is None else _sum_groups(G, g, n)}


def fdb_step(W, fmt: DualBinaryWeight, H=None, *, resplit: bool = True) -> DualBinaryWeight:
    """One gradient step on the scales with the exact line search of the quadratic objective, per row.

    For fixed planes ``W_hat`` is linear in the scales, so along the direction ``D = -grad`` the
    objective of row ``r`` is a parabola in the step ``t`` whose minimum is at
    ``t_r = (e_r H d_r^T) / (d_r H d_r^T)`` (``e_r`` the row's error, ``d_r`` the change of its
    ``W_hat`` per unit step); rows with ``d_r H d_r^T = 0`` (nothing to improve) stay. Before
    ``resplit`` the objective never increases. With ``resplit`` the planes are then recomputed by
    :func:`fdb_split` from ``W`` and the new scales (the paper's forward rule).
    """
    W = np.asarray(W, dtype=np.float64)
    Hm = None if H is None else np.asarray(H, dtype=np.float64)
    grad = fdb_scale_gradient(W, fmt, Hm)
    g = group_index(W.shape[1], fmt.group_size)
    D1, D2 = -grad["a1"], -grad["a2"]
    Dc = None if grad["offset"] is None else -grad["offset"]
    dW = np.where(fmt.b1, D1[:, g], 0.0) + np.where(fmt.b2, D2[:, g], 0.0)
    if Dc is not None:
        dW = dW + Dc[:, g]
    E = W - fmt.dequantize()
    dH = dW if Hm is None else dW @ Hm
    num = np.sum(E * dH, axis=1)
    den = np.sum(dW * dH, axis=1)
    t = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    a1 = fmt.a1 + t[:, None] * D1
    a2 = fmt.a2 + t[:, None] * D2
    c = None if Dc is None else fmt.offset + t[:, None] * Dc
    b1, b2 = fmt.b1, fmt.b2
    if resplit:
        b1, b2 = fdb_split(W, a1, a2, np.zeros_like(a1) if c is None else c, fmt.group_size)
    return DualBinaryWeight(b1, b2, a1, a2, c, fmt.group_size, dict(fmt.info))


def check_fdb_inputs(W, H=None) -> None:
    """The input checks of :func:`dbllm` (finite, non-empty 2-D ``W``; a matching finite ``H``)."""
    check_matrix(W, "W")
    if H is not None:
        check_square(H, W.shape[1], "H")
        check_finite(H, "H")


__all__ = ["BITS", "OFFSETS", "dbllm", "fdb_params", "fdb_split", "fdb_objective", "fdb_scale_gradient", "fdb_step",
           "check_fdb_inputs"]

"""GPTQ: quantize W column by column, updating the not-yet-quantized columns with H^-1.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023. Faithful to ``GPTQ.fasterquant`` of IST-DASLab/gptq:

* eq. (2)-(3) (the OBQ step): quantize column ``j``, ``err = (w_j - q_j) / [H_F^-1]_jj`` and
  ``W_F <- W_F - err [H_F^-1]_{j,F}``, then remove ``j`` from ``H^-1`` by Gaussian elimination;
* Sec. 3 "Step 3: Cholesky reformulation" (no equation number): the rows of ``H_F^-1`` needed in
  that order are the rows of the *upper Cholesky factor* ``U`` of ``H^-1`` (``H^-1 = U^T U``), so
  ``d = U[j, j]`` (not ``[H^-1]_jj``) and the update row is ``U[j, j:]``;
* Sec. 3 "Step 2: lazy batch-updates", eq. (4)-(5): updates inside a block of ``blocksize``
  columns are applied at once; the rest of W receives ``Err_block @ U[block, later]`` after each block;
* damping: ``H + percdamp * mean(diag H) * I`` (relative);
* "dead" inputs (``H[j, j] == 0``): ``H[j, j] = 1`` and ``W[:, j] = 0``;
* act-order (README of the original; the ``desc_act`` of AutoGPTQ): columns in order of
  decreasing ``diag(H)``, undone at the end;
* group parameters: per output channel from the *full original rows* (before dead-column
  zeroing) when ``group_size is None``; otherwise refreshed when the column index ``j`` (in the
  processing order) hits ``j % group_size == 0``, from ``W[:, j:j+group_size]`` -- the weights
  as they are *outside* the current block's buffer, so a group that starts inside a block sees
  weights without that block's earlier updates (the original's quirk for ``group_size <
  blocksize``, reproduced); ``static_groups`` computes all groups up front in original column
  order, after dead-column zeroing.

See ``docs/methods/gptq.md`` for every place this follows the code rather than the paper.
"""
from __future__ import annotations

import logging

import numpy as np

from ._checks import check_square
from ._xp import namespace
from .formats import QuantizedWeight
from .quantizer import QuantSpec, check_spec, check_weight, code_dtype, dequantize, find_params, quantize

log = logging.getLogger("refquant")


class HessianNotPositiveDefinite(ValueError):
    """H + damping is not positive definite, so its Cholesky factor does not exist."""


def upper_cholesky_of_inverse(H):
    """``U`` upper triangular with ``H^-1 = U^T U``, computed as the original does.

    ``L = cholesky(H)`` (lower), ``H^-1 = cholesky_inverse(L) = L^-T L^-1``, ``U = cholesky(H^-1)^T``.
    Raises ``numpy.linalg.LinAlgError`` (or CuPy's equivalent) when H is not positive definite.
    """
    xp = namespace(H)
    L = xp.linalg.cholesky(H)  # CuPy raises only inside cupyx.errstate(linalg="raise") (the cupy backend sets it)
    if not bool(xp.isfinite(L).all()):
        raise xp.linalg.LinAlgError("Cholesky factor has non-finite entries")
    Linv = xp.linalg.inv(L)
    Hinv = Linv.T @ Linv
    U = xp.linalg.cholesky(Hinv).T
    if not bool(xp.isfinite(U).all()):
        raise xp.linalg.LinAlgError("Cholesky factor of H^-1 has non-finite entries")
    return U


def not_positive_definite_message(shape_text: str, percdamp: float, mean_diag: float) -> str:
    """The message of :class:`HessianNotPositiveDefinite` (``shape_text``: e.g. ``"4096x4096"``)."""
    return (
        f"Hessian of the layer with weight shape {shape_text} is not positive definite "
        f"after damping with percdamp={percdamp:g} (damp = {percdamp * mean_diag:.3e}, mean diag H = "
        f"{mean_diag:.3e}). Use more or more varied calibration data, raise percdamp, or pass "
        f"max_percdamp=... to escalate the damping step by step."
    )


def damped_inverse_factor(H, percdamp: float, shape: tuple[int, int], max_percdamp: float | None = None,
                          percdamp_step: float = 0.01):
    """Add relative damping to H (in place) and return ``(U, percdamp_used)``.

    ``H[j, j] += percdamp * mean(diag H)``, then :func:`upper_cholesky_of_inverse`. If that fails
    and ``max_percdamp`` is set, ``percdamp`` is raised by ``percdamp_step`` (GPTQModel's
    ``damp_auto_increment``) until it succeeds or would exceed ``max_percdamp``; every step is
    logged. Otherwise (the original's behaviour) the failure is a
    :class:`HessianNotPositiveDefinite` naming the layer shape and the damping used.
    """
    xp = namespace(H)
    diag = xp.arange(H.shape[0])
    mean_diag = float(xp.mean(xp.diag(H)))
    H0 = H.copy()
    current = percdamp
    while True:
        H[diag, diag] = H0[diag, diag] + current * mean_diag
        try:
            return upper_cholesky_of_inverse(H), current
        except xp.linalg.LinAlgError:
            nxt = current + percdamp_step
            if max_percdamp is None or nxt > max_percdamp + 1e-12:
                raise HessianNotPositiveDefinite(
                    not_positive_definite_message(f"{shape[0]}x{shape[1]}", current, mean_diag)
                ) from None
            log.warning("GPTQ %dx%d: Cholesky failed with percdamp=%g; retrying with percdamp=%g",
                        shape[0], shape[1], current, nxt)
            current = nxt


def check_gptq_args(spec, blocksize, percdamp, act_order, static_groups) -> None:
    """The arguments of :func:`gptq` besides ``W`` and ``H`` (the backends check them here too)."""
    check_spec(spec)
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"blocksize must be an integer >= 1; got {blocksize!r}.")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float, np.floating)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0 (a fraction of mean(diag H)); got {percdamp!r}.")
    for flag, value in (("act_order", act_order), ("static_groups", static_groups)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{flag} must be True or False; got {value!r}.")
    if static_groups and spec.group_size is None:
        raise ValueError("static_groups=True needs a group_size.")


def gptq(W, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
         static_groups: bool = False, *, max_percdamp: float | None = None,
         percdamp_step: float = 0.01) -> QuantizedWeight:
    """GPTQ-quantize ``W`` (out_features, in_features) with the Hessian ``H`` of its inputs.

    Args:
        W: weight matrix; computed in float64.
        H: (in_features, in_features) Hessian, e.g. :func:`refquant.hessian` of the layer inputs.
        spec: quantizer grid and granularity.
        blocksize: columns per lazy-update block (original default 128).
        percdamp: relative damping, fraction of ``mean(diag H)`` added to the diagonal.
        act_order: process columns in decreasing ``diag(H)`` order.
        static_groups: compute every group's parameters before any update, in original order.
        max_percdamp, percdamp_step: opt-in damping escalation when H is not positive definite.

    Returns:
        :class:`QuantizedWeight` in original column order; ``info`` holds the original's proxy
        ``loss`` (sum of ``(w - q)^2 / U_jj^2 / 2``), the ``percdamp`` used and the ``perm``.
    """
    check_weight(W, spec)
    xp = namespace(W, H)
    rows, columns = W.shape
    check_square(H, columns, "H")
    check_gptq_args(spec, blocksize, percdamp, act_order, static_groups)
    gs, maxq = spec.group_size, spec.maxq
    W = W.astype(xp.float64, copy=True)
    H = H.astype(xp.float64, copy=True)

    scale, zero = find_params(W, spec)  # used when group_size is None: full rows, before dead zeroing

    dead = xp.diag(H) == 0
    dead_idx = xp.nonzero(dead)[0]
    H[dead_idx, dead_idx] = 1
    W[:, dead] = 0

    if static_groups:
        groups = [find_params(W[:, g:g + gs], spec) for g in range(0, columns, gs)]

    perm = xp.arange(columns)
    if act_order:
        perm = xp.argsort(-xp.diag(H), kind="stable")  # ties: lower column index first
        W = W[:, perm]
        H = H[perm][:, perm]

    U, percdamp_used = damped_inverse_factor(H, percdamp, (rows, columns), max_percdamp, percdamp_step)

    codes = xp.zeros((rows, columns), dtype=xp.float64)
    Losses = xp.zeros((rows, columns), dtype=xp.float64)
    scales, zeros, group_of = [], [], xp.zeros(columns, dtype=xp.int64)  # group_of: processing order
    if gs is None:
        scales, zeros = [scale], [zero]
    elif static_groups:
        scales, zeros = [s for s, _ in groups], [z for _, z in groups]

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].copy()
        Err1 = xp.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if gs is not None:
                if static_groups:
                    group_of[j] = int(perm[j]) // gs
                    scale, zero = groups[int(group_of[j])]
                else:
                    if j % gs == 0:
                        scale, zero = find_params(W[:, j:j + gs], spec)  # W, not W1: the original's quirk
                        scales.append(scale)
                        zeros.append(zero)
                    group_of[j] = len(scales) - 1
            w = W1[:, i]
            d = Hinv1[i, i]
            code = quantize(w, scale, zero, maxq)
            q = dequantize(code, scale, zero)
            codes[:, j] = code
            Losses[:, j] = (w - q) ** 2 / d ** 2 / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    invperm = xp.argsort(perm)
    return QuantizedWeight(
        codes=codes[:, invperm].astype(code_dtype(xp)),
        scale=xp.stack(scales, axis=1),
        zero=xp.stack(zeros, axis=1),
        g_idx=group_of[invperm],
        spec=spec,
        info={"loss": float(Losses.sum()), "percdamp": percdamp_used, "perm": perm},
    )

"""BiLLM: structural salient-column selection, residual binarization and a split of the rest, per block.

Huang, Liu, Qin, Li, Zhang, Magno, Qi, "BiLLM: Pushing the Limit of Post-Training Quantization for
LLMs", ICML 2024 (arXiv 2402.04291), Sec. 3.1 (structural selection of salient weights by the
Hessian saliency ``s_i = w_i^2 / [H^-1]_ii^2``, eq. (4); residual approximation of the salient
columns, eq. (5)-(7)) and Sec. 3.2 (the bell-shaped split of the non-salient weights at a break
point ``p*`` into two binarized groups, eq. (8)-(9)), inside GPTQ's block loop. Faithful to
``BRAGPTQ.fasterquant(blocksize=128, percdamp=0.01, partition=3, orders=(1, 1, 2))`` of
Aaronhuang-778/BiLLM at commit dc137ebbf62d4b31e8a82ba6bf9e18a51a298dcb (``bigptq.py``,
``binary.py``, ``utils/structure.py``, ``utils/autosearch.py``, ``utils/mask.py``, ``run.py``):

1. dead inputs, damping and ``U`` (upper Cholesky factor of ``H^-1``) as GPTQ;
2. per block of ``blocksize`` columns (the block is also the binarization group), on the *current*
   (already compensated) block ``W_b``: the saliency matrix ``T = W_b^2 / U_jj^2`` ("hessian") or
   ``T = W_b`` (signed, "magnitude");
3. salient-column search on ``T`` (``structural_searching``): columns ranked by ``sum_r |T|``
   (ties: lower index first), for ``k = 1..49`` the top-k columns ``M_k``, objective
   ``mean((T - R2(T, M_k) - R2(T, ~M_k))^2)`` (order 2 on the complement too, in this search only);
   first strict minimum;
4. split search on ``T``: the 81 quantiles at ``torch.linspace(0.10, 0.90, 81)`` of
   ``|T * ~M|`` (zeroed salient entries included), group 1 ``|T| < p``, group 2 ``|T| >= p``
   (non-salient only), objective ``mean((T - R1(T, G1) - R1(T, G2) - R2(T, M))^2)``; first strict
   minimum;
5. the block's *weights* binarized at once with the three masks and orders (1, 1, 2), no
   intra-block compensation; ``err_j = (w_j - q_j) / U_jj`` and ``W[:, later] -= Err @ U[block,
   later]``.

``R_k`` is :func:`refquant.spec.binarize.residual_binarize`. Switches (``docs/methods/billm.md``):
``search_on="weight"`` runs both searches' objectives and quantiles on the block's weights instead of
``T`` (the paper's description; the column ranking still uses the saliency). The original crashes on
a block narrower than 50 columns (``torch.topk(.., 50)``); here such a block tries ``k = 1..cols-1``
(``k = 1`` for a single column), a documented extension (``narrow_blocks="error"`` refuses instead).
"""
from __future__ import annotations

import numpy as np

from ._checks import check_matrix, check_square
from ._xp import namespace
from .binarize import (SALIENT_UP_LIM, column_ranking, first_argmin, residual_binarize, salient_candidates,
                       salient_column_errors, split_errors, split_masks, split_thresholds)
from .formats import BILLM_TERMS, StructuredBinaryWeight
from .gptq import damped_inverse_factor

SALIENT_METRICS = ("hessian", "magnitude")
SEARCH_ON = ("saliency", "weight")
NARROW_BLOCKS = ("extend", "error")
ORDERS = (1, 1, 2)
"""Residual orders of group 1, group 2 and the salient columns (``fasterquant(orders=(1, 1, 2))``)."""


def check_billm_args(blocksize, percdamp, salient_metric, search_on, narrow_blocks) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"blocksize must be an integer >= 1; got {blocksize!r}.")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float, np.floating)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0 (a fraction of mean(diag H)); got {percdamp!r}.")
    if salient_metric not in SALIENT_METRICS:
        raise ValueError(f"salient_metric must be one of {SALIENT_METRICS}; got {salient_metric!r}.")
    if search_on not in SEARCH_ON:
        raise ValueError(f"search_on must be one of {SEARCH_ON}; got {search_on!r}.")
    if narrow_blocks not in NARROW_BLOCKS:
        raise ValueError(f"narrow_blocks must be one of {NARROW_BLOCKS}; got {narrow_blocks!r}.")


def check_block_width(width: int, narrow_blocks: str, where: str) -> None:
    if width < SALIENT_UP_LIM and narrow_blocks == "error":
        raise ValueError(
            f"BiLLM: {where} is {width} columns wide; the original's salient-column search needs >= "
            f"{SALIENT_UP_LIM} (torch.topk(.., {SALIENT_UP_LIM}) fails). Use a blocksize that leaves no block "
            f"narrower than {SALIENT_UP_LIM} columns, or narrow_blocks='extend' (k = 1..width-1)."
        )


def saliency(Wb, Udiag_b, salient_metric: str):
    """BiLLM's ``T``: ``Wb^2 / U_jj^2`` ("hessian") or ``Wb`` itself ("magnitude")."""
    if salient_metric == "magnitude":
        return Wb
    return Wb ** 2 / Udiag_b[None, :] ** 2


def structural_search(T, S=None):
    """The two searches of one block: ``(salient_cols, p, k_errors, split_errs)``.

    ``T`` ranks the columns; ``S`` (default ``T``) is the matrix whose approximation error the
    searches minimise and whose quantiles give the break points (``search_on``).
    """
    xp = namespace(T)
    S = T if S is None else S
    ranking = column_ranking(T)
    ks = salient_candidates(T.shape[1])
    k_err = salient_column_errors(S, ranking, ks)
    k = ks[first_argmin(k_err)]
    cols = xp.zeros(T.shape[1], dtype=bool)
    cols[ranking[:k]] = True
    M = xp.broadcast_to(cols[None, :], T.shape)
    ps = split_thresholds(S, M)
    s_err = split_errors(S, M, ps)
    return cols, ps[first_argmin(s_err)], k_err, s_err


def binarize_block(Wb, S, cols, p):
    """The block's weights with the masks of the searches: ``(Q, split, signs1, signs2, alpha, mean)``.

    ``alpha``, ``mean`` have shape (rows, 4): group 1, group 2, salient order 1, salient order 2.
    """
    xp = namespace(Wb)
    M = xp.broadcast_to(cols[None, :], Wb.shape)
    m1, m2 = split_masks(S, M, p)
    q1, s1a, a1, mu1 = residual_binarize(Wb, m1, ORDERS[0])
    q2, s2a, a2, mu2 = residual_binarize(Wb, m2, ORDERS[1])
    q3, s3, a3, mu3 = residual_binarize(Wb, M, ORDERS[2])
    Q = q1 * m1 + q2 * m2 + q3 * M
    signs1 = (s1a[0] + s2a[0] + s3[0]).astype(xp.int8)  # disjoint masks, zero outside each
    alpha = xp.stack([a1[0], a2[0], a3[0], a3[1]], axis=1)
    mean = xp.stack([mu1[0], mu2[0], mu3[0], mu3[1]], axis=1)
    return Q, m2, signs1, s3[1], alpha, mean


def billm(W, H, *, blocksize: int = 128, percdamp: float = 0.01, salient_metric: str = "hessian",
          search_on: str = "saliency", narrow_blocks: str = "extend") -> StructuredBinaryWeight:
    """BiLLM-binarize ``W`` (out_features, in_features) with the Hessian ``H`` of its inputs.

    Args:
        W: weight matrix; computed in float64.
        H: (in_features, in_features) Hessian, e.g. :func:`refquant.hessian`.
        blocksize: columns per block (also the binarization group; BiLLM: 128).
        percdamp: relative damping of H.
        salient_metric: "hessian" (``W^2 / U_jj^2``, the authors' scripts) or "magnitude" (signed W).
        search_on: "saliency" (the code: both searches on ``T``) or "weight" (the paper's text).
        narrow_blocks: "extend" (blocks narrower than 50 columns try ``k = 1..width-1``) or "error".

    Returns:
        :class:`~refquant.spec.formats.StructuredBinaryWeight`; ``info`` holds the proxy ``loss``,
        the ``percdamp`` used and the mean salient columns per block.
    """
    check_matrix(W, "W")
    xp = namespace(W, H)
    rows, columns = W.shape
    check_square(H, columns, "H")
    check_billm_args(blocksize, percdamp, salient_metric, search_on, narrow_blocks)
    for i1 in range(0, columns, blocksize):
        check_block_width(min(i1 + blocksize, columns) - i1, narrow_blocks, f"block at column {i1}")
    W = W.astype(xp.float64, copy=True)
    H = H.astype(xp.float64, copy=True)

    dead = xp.diag(H) == 0
    dead_idx = xp.nonzero(dead)[0]
    H[dead_idx, dead_idx] = 1
    W[:, dead] = 0
    U, percdamp_used = damped_inverse_factor(H, percdamp, (rows, columns))
    Udiag = xp.diag(U)

    n_blocks = -(-columns // blocksize)
    salient_cols = xp.zeros(columns, dtype=bool)
    split = xp.zeros((rows, columns), dtype=bool)
    signs1 = xp.zeros((rows, columns), dtype=xp.int8)
    signs2 = xp.zeros((rows, columns), dtype=xp.int8)
    alpha = xp.zeros((rows, n_blocks, BILLM_TERMS))
    mean = xp.zeros((rows, n_blocks, BILLM_TERMS))
    losses = 0.0
    for b, i1 in enumerate(range(0, columns, blocksize)):
        i2 = min(i1 + blocksize, columns)
        Wb = W[:, i1:i2].copy()
        T = saliency(Wb, Udiag[i1:i2], salient_metric)
        S = T if search_on == "saliency" else Wb
        cols, p, _, _ = structural_search(T, S)
        Q, m2, s1, s2, a, mu = binarize_block(Wb, S, cols, p)
        salient_cols[i1:i2] = cols
        split[:, i1:i2] = m2
        signs1[:, i1:i2] = s1
        signs2[:, i1:i2] = s2
        alpha[:, b] = a
        mean[:, b] = mu
        d = Udiag[i1:i2]
        Err1 = (Wb - Q) / d[None, :]
        losses += float(((Wb - Q) ** 2 / d[None, :] ** 2).sum()) / 2
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    return StructuredBinaryWeight(
        salient_columns=salient_cols, split=split, signs1=signs1, signs2=signs2, alpha=alpha, mean=mean,
        block_size=int(blocksize),
        info={"loss": losses, "percdamp": percdamp_used,
              "mean_salient_columns_per_block": float(salient_cols.sum()) / n_blocks},
    )

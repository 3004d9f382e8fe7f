"""PB-LLM: partially binarized LLMs -- a salient fraction on an 8-bit grid, the rest binarized, GPTQ feedback.

Shang, Yuan, Wu, Dong, "PB-LLM: Partially Binarized Large Language Models", ICLR 2024
(arXiv 2310.00034), Sec. 3-4: partial binarization (salient weights kept at high bit width, the
rest binarized with the XNOR scale ``alpha = ||w||_1 / n``), salient selection by magnitude or by
the Hessian criterion ``w^2 / [H^-1]_jj^2``, and GPTQ-style error compensation of the remaining
weights (the paper's "PB-GPTQ"). Faithful to ``LowHighGPT.fasterquant`` of hahnyuan/PB-LLM at
commit fe85da943d9df48ab6455d698f75406bb0bfefbc (``gptq_pb/gptq.py``, ``low_quant.py``,
``high_quant.py``, ``run.py``, ``run_all.sh``):

1. the high-bit grid: GPTQ's asymmetric per-row min/max quantizer (``HighQuantizer(high_bit,
   perchannel=True, sym=False)``), calibrated on the *original* rows before dead-column zeroing and
   never refit (updated weights may clip);
2. dead inputs, damping and ``U`` (upper Cholesky factor of ``H^-1``) exactly as GPTQ
   (:func:`refquant.spec.gptq.damped_inverse_factor`);
3. once, before any update, per column group (one group = the whole matrix by default): the score
   ``W^2 / U_jj^2`` ("hessian") or ``|W|`` ("magnitude") of the dead-zeroed W, ``thresh =
   sorted(score)[int(n * low_frac)]``, binarized where ``score <= thresh``;
4. the XNOR binarizer per (row, group): ``mean`` and ``alpha = mean |x - mean|`` of ``W * mask``
   over *all* the group's columns (salient positions count as zeros: the code; the paper's
   statistics over the binarized weights only is ``binarizer_stats="binarized"``), fixed before the
   updates; ``q = alpha sign(w - mean) + mean`` with ``sign(0) = 0``;
5. GPTQ's loop over ``blocksize`` columns: ``q`` from the 8-bit grid where salient, the binarizer
   elsewhere, ``err = (w - q) / U_jj``, intra-block rank-1 updates and the lazy update of later
   blocks.

Where the original crashes, refquant extends (documented in ``docs/methods/pbllm.md``): the
original asserts ``groupsize % blocksize == 0`` (so ``in_features`` must be a multiple of 128 with
``groupsize=-1``); here any ``in_features`` and ``group_size`` work (the group of column ``j`` is
``j // group_size``, its statistics fixed before the loop as in the original). ``low_frac = 1``
(index ``n`` out of range in the original) is refused with a clear error.
"""
from __future__ import annotations

import numpy as np

from ._checks import check_matrix, check_square
from ._xp import namespace
from .binarize import row_mean_alpha, sign0
from .formats import PartialBinaryWeight
from .gptq import damped_inverse_factor
from .quantizer import QuantSpec, code_dtype, dequantize, find_params, quantize

SALIENT_METRICS = ("hessian", "magnitude")
BINARIZER_STATS = ("code", "binarized")


def check_pbllm_args(low_frac, high_bits, salient_metric, blocksize, percdamp, group_size, binarizer_stats) -> None:
    """The arguments of :func:`pbllm` besides W and H (the backends check them here too)."""
    if isinstance(low_frac, bool) or not isinstance(low_frac, (int, float, np.floating)) or not 0 <= low_frac < 1:
        raise ValueError(f"low_frac (the binarized fraction) must be a number in [0, 1); got {low_frac!r}. "
                         "low_frac = 1 would binarize everything (the original indexes past the end there).")
    if isinstance(high_bits, bool) or not isinstance(high_bits, (int, np.integer)) or not 1 <= high_bits <= 8:
        raise ValueError(f"high_bits must be an integer in 1..8 (PB-LLM: 8); got {high_bits!r}.")
    if salient_metric not in SALIENT_METRICS:
        raise ValueError(f"salient_metric must be one of {SALIENT_METRICS}; got {salient_metric!r}.")
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"blocksize must be an integer >= 1; got {blocksize!r}.")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float, np.floating)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0 (a fraction of mean(diag H)); got {percdamp!r}.")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                                   or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one group per layer); got {group_size!r}.")
    if binarizer_stats not in BINARIZER_STATS:
        raise ValueError(f"binarizer_stats must be one of {BINARIZER_STATS} ('code': salient positions count as "
                         f"zeros, as the original; 'binarized': the paper's statistics); got {binarizer_stats!r}.")


def salient_score(W, Udiag, salient_metric: str):
    """PB-LLM's score: ``W^2 / U_jj^2`` ("hessian") or ``|W|`` ("magnitude")."""
    xp = namespace(W)
    if salient_metric == "magnitude":
        return xp.abs(W)
    return W ** 2 / Udiag[None, :] ** 2


def binarized_mask(score, low_frac: float):
    """``score <= sorted(score)[int(n * low_frac)]`` over the whole array (one threshold)."""
    xp = namespace(score)
    flat = xp.sort(score.ravel())
    return score <= flat[int(score.size * low_frac)]


def binarizer_params(Wg, binarized, binarizer_stats: str = "code"):
    """Per-row ``(mean, alpha)`` of a column group: over ``W * mask`` with every column counted
    (``"code"``), or over the binarized entries only (``"binarized"``, the paper)."""
    xp = namespace(Wg)
    if binarizer_stats == "code":
        return row_mean_alpha(xp.where(binarized, Wg, 0.0))
    return row_mean_alpha(Wg, binarized)


def pbllm(W, H, *, low_frac: float = 0.9, high_bits: int = 8, salient_metric: str = "hessian",
          blocksize: int = 128, percdamp: float = 0.01, group_size: int | None = None,
          binarizer_stats: str = "code") -> PartialBinaryWeight:
    """PB-LLM-quantize ``W`` (out_features, in_features) with the Hessian ``H`` of its inputs.

    Args:
        W: weight matrix; computed in float64.
        H: (in_features, in_features) Hessian, e.g. :func:`refquant.hessian`.
        low_frac: fraction of weights binarized (0.9: 10 % salient, "1.7 bits" at 8 bits).
        high_bits: bit width of the salient weights' per-row asymmetric grid.
        salient_metric: "hessian" (``W^2 / U_jj^2``, the authors' scripts) or "magnitude" (``|W|``).
        blocksize: columns per GPTQ lazy-update block.
        percdamp: relative damping of H.
        group_size: columns per threshold / binarizer group (None: one group, the original's
            ``groupsize=-1``).
        binarizer_stats: "code" (salient positions count as zeros in mean/alpha) or "binarized".

    Returns:
        :class:`~refquant.spec.formats.PartialBinaryWeight`; ``info`` holds the proxy ``loss`` (sum
        of ``(w - q)^2 / U_jj^2 / 2``) and the ``percdamp`` used.
    """
    check_matrix(W, "W")
    xp = namespace(W, H)
    rows, columns = W.shape
    check_square(H, columns, "H")
    check_pbllm_args(low_frac, high_bits, salient_metric, blocksize, percdamp, group_size, binarizer_stats)
    W = W.astype(xp.float64, copy=True)
    H = H.astype(xp.float64, copy=True)

    spec = QuantSpec(bits=int(high_bits))
    scale, zero = find_params(W, spec)  # the original rows, before dead zeroing; never refit
    maxq = spec.maxq

    dead = xp.diag(H) == 0
    dead_idx = xp.nonzero(dead)[0]
    H[dead_idx, dead_idx] = 1
    W[:, dead] = 0

    U, percdamp_used = damped_inverse_factor(H, percdamp, (rows, columns))
    Udiag = xp.diag(U)

    gs = columns if group_size is None else int(group_size)
    binarized = xp.zeros((rows, columns), dtype=bool)
    means, alphas = [], []
    for g0 in range(0, columns, gs):
        g = slice(g0, min(g0 + gs, columns))
        binarized[:, g] = binarized_mask(salient_score(W[:, g], Udiag[g], salient_metric), low_frac)
        mean, alpha = binarizer_params(W[:, g], binarized[:, g], binarizer_stats)
        means.append(mean)
        alphas.append(alpha)
    mean = xp.stack(means, axis=1)
    alpha = xp.stack(alphas, axis=1)

    codes = xp.zeros((rows, columns), dtype=xp.float64)
    signs = xp.zeros((rows, columns), dtype=xp.int8)
    losses = 0.0
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].copy()
        Err1 = xp.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            grp = j // gs
            w = W1[:, i]
            d = Hinv1[i, i]
            code = quantize(w, scale, zero, maxq)
            q_high = dequantize(code, scale, zero)
            s = sign0(w - mean[:, grp])
            q_low = s * alpha[:, grp] + mean[:, grp]
            low = binarized[:, j]
            q = xp.where(low, q_low, q_high)
            codes[:, j] = xp.where(low, 0.0, code)
            signs[:, j] = xp.where(low, s, 0)
            losses += float(((w - q) ** 2 / d ** 2).sum()) / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    return PartialBinaryWeight(
        salient_mask=~binarized, codes=codes.astype(code_dtype(xp)), scale=scale, zero=zero, signs=signs,
        alpha=alpha, mean=mean, high_bits=int(high_bits), group_size=None if group_size is None else int(group_size),
        info={"loss": losses, "percdamp": percdamp_used},
    )

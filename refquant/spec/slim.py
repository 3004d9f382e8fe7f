"""SliM-LLM: salience-determined bit allocation (SBA) and salience-weighted quantizer calibration (SQC).

Huang, Qin, Liu, Lv, Wang, Zhang, Magno, Qi, "SliM-LLM: Salience-Driven Mixed-Precision
Quantization for Large Language Models" (arXiv 2405.14917; ICML 2025). Faithful to the authors'
code, Aaronhuang-778/SliM-LLM at commit cfdf5ff: ``slim-llm/slim_gptq.py`` (``SliMGPTQ``:
``get_salience``, ``get_block``, ``fasterquant``), ``slim-llm/utils/bitsearch.py``
(``activation_aware_search``, ``block_quantize``, ``binary``), ``slim-llm/utils/reconstruct.py``
(``kl_div``), ``slim-llm/utils/mixed_quantizer.py`` (``Quantizer.fit``, ``binary_scale``,
``binary``), ``slim-llm/utils/salient_mask.py`` and ``slim-llm/run.py`` (the defaults).

SBA (Sec. 3.2 of the paper; eq. (5)-(8)), :func:`slim_allocate`:

* group salience ``S_g = sum_{rows, j in g} W[r, j]^2 / U[j, j]^2`` (eq. (5)-(6): the OBS
  salience ``w^2 / [H^-1]_jj^2`` with the Cholesky factor's diagonal, as the code has it), ``U`` the
  upper Cholesky factor of ``(H')^-1`` where ``H'`` is ``H`` with dead diagonals set to 1 and an
  *absolute* ``+0.01`` on the diagonal (``get_salience``; the code does this to the stored H in
  place, so the later GPTQ sees it too -- see :func:`slim_llm`'s ``salience_damp``);
* trial ``k = 1 .. n_groups // 2 - 1``: the ``k`` lowest-salience groups at ``bits - 1``, the ``k``
  highest at ``bits + 1``, the rest at ``bits``; every group quantized by plain per-row min/max
  RTN (range containing 0; the 1-bit groups by the binarizer ``sign(w - mean) * mean|w| + mean``);
* error of a trial on calibration sample ``s`` (eq. (7): the paper's KL between the FP and the
  quantized output distributions, in the direction and reduction of the code):
  ``sum_tokens sum_out p_hat log(p_hat / p)`` with ``p_hat = max(softmax(X_s W_hat^T), 1e-6)``,
  ``p = max(softmax(X_s W^T), 1e-6)`` over the output features (clamped, not renormalised;
  ``F.kl_div(log p, p_hat, reduction="batchmean")`` on a (1, tokens, out) input divides by 1);
  averaged over the samples; ``k* = argmin + 1`` (first minimum);
* the applied allocation (``fasterquant``): the groups are *re-ranked* by a salience recomputed
  with ``U`` of ``H' + percdamp * mean(diag H') I`` (the relative damping, ``percdamp = 0.01``),
  and the ``k*`` lowest / highest of that ranking get ``-1`` / ``+1`` bit -- so the applied
  allocation can differ from the trial the search scored. The mean width equals ``bits``
  exactly (equal counts up and down).

SQC (Sec. 3.3, eq. (9)-(10)) + GPTQ, :func:`slim_llm`: GPTQ with block size = group size; at each
group's start, on the GPTQ-updated block ``W1``:

* width >= 2: element sensitivity ``F = W1^2 / diag(U_block)^2``; salient elements
  ``F >= min{F : |z(F)| > 2}`` (z with the mean and the *unbiased* std of the block); base per-row
  range containing 0; 101 range factors ``p`` = 1, ``1 + 0.1 i / 50`` (i = 1..50), ``1 - 0.1 i / 50``
  (i = 1..50) in that order; candidate ``[p xmin, p xmax]`` with asymmetric zero; error
  ``sum_nonsalient |Q(w) - w|^2.4 + lambda * sum_salient |Q(w) - w|^2.4`` per row; strictly better
  replaces. With ``lambda = 1`` (the code's default, never changed by its scripts) the weighting is a
  no-op: the objective is the plain 2.4-norm and only the +-10 % range search acts;
* width 1: ``scale = mean |W1_r|``, ``zero = mean W1_r`` (uncentred mean-abs), ``q = sign(w - zero)
  scale + zero``;
* the *sym quirk*: the code's ``Quantizer`` starts with ``sym=True`` and sets it False at the first
  group labelled ``bits`` or ``bits + 1``, never back; a ``bits - 1`` group (width >= 2) before that
  point gets ``zero = (maxq + 1) / 2`` with the asymmetric scale, also during the range search.

Where the original crashes, refquant defines the behaviour: fewer than 4 groups (no trial; the
original takes ``min`` of an empty list) is a ``ValueError``; a block with no element of
``|z| > 2`` (``torch.min`` of an empty tensor) has no salient element (the documented fallback:
the objective is then the plain 2.4-norm error, which for ``lambda = 1`` is the same objective).
See ``docs/methods/slim.md`` for every difference between the code and the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import NotApplicable, check_finite, check_matrix, check_square
from .formats import MixedWeight
from .gptq import HessianNotPositiveDefinite, damped_inverse_factor, not_positive_definite_message, \
    upper_cholesky_of_inverse
from .quantizer import QuantSpec, fake_quantize, find_params, quantize

#: ``get_salience``'s absolute diagonal damping (added in place to the stored H).
SALIENCE_DAMP = 0.01
#: ``fasterquant``'s relative damping (run.py ``--percdamp``).
PERCDAMP = 0.01
#: KL clamp of ``reconstruct.kl_div``.
KL_CLAMP = 1e-6
#: SQC: range factors 1 +- TAU_RANGE * i / TAU_N; error norm; z-score threshold of the salient mask.
TAU_RANGE, TAU_N, NORM, Z_THRESHOLD = 0.1, 50, 2.4, 2.0


def range_factors() -> np.ndarray:
    """The 101 SQC range factors in the code's order: 1, then 1 + 0.1 i/50, then 1 - 0.1 i/50 (i = 1..50)."""
    i = np.arange(1, TAU_N + 1, dtype=np.float64)
    return np.concatenate([[1.0], 1 + TAU_RANGE * i / TAU_N, 1 - TAU_RANGE * i / TAU_N])


# ------------------------------------------------------------------------------------------- checks

def check_target_bits(bits) -> int:
    """The target width: an integer with ``bits - 1 >= 1`` and ``bits + 1 <= 8``."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 7:
        raise ValueError(f"bits must be an integer in 2..7 (groups go to bits-1 and bits+1, within 1..8); "
                         f"got {bits!r}.")
    return int(bits)


def n_groups_of(columns: int, group_size) -> int:
    """Number of consecutive column groups (the last one partial)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (SliM-LLM has no per-channel mode); "
                         f"got {group_size!r}.")
    return -(-int(columns) // int(group_size))


def check_allocation_size(n_groups: int, columns: int, group_size: int) -> None:
    """SBA needs at least 4 groups (trials k = 1 .. n_groups // 2 - 1)."""
    if n_groups < 4:
        raise NotApplicable(
            f"SliM-LLM's allocation search needs at least 4 groups (trials k = 1 .. n_groups//2 - 1); "
            f"in_features={columns} with group_size={group_size} gives {n_groups}. Use a smaller group_size, "
            "or pass a per-group allocation to slim_llm(group_bits=...) directly."
        )


def check_group_bits(group_bits, n_groups: int) -> np.ndarray:
    """``group_bits`` as an int64 array of ``n_groups`` widths in 1..8."""
    gb = np.asarray(group_bits)
    if gb.ndim != 1 or gb.shape[0] != n_groups:
        raise ValueError(f"group_bits must hold one width per group ({n_groups} groups); got shape {gb.shape}.")
    if gb.dtype.kind not in "iu" or (gb.size and (gb.min() < 1 or gb.max() > 8)):
        raise ValueError(f"group_bits must be integers in 1..8; got {gb.tolist()}.")
    return gb.astype(np.int64)


def check_inputs(X, columns: int) -> np.ndarray:
    """Calibration inputs ``X`` (n_samples, tokens, in_features), finite, non-empty."""
    if not hasattr(X, "ndim") or X.ndim != 3:
        raise ValueError(f"X must be the layer's calibration input, shape (n_samples, tokens, in_features); got "
                         f"{getattr(X, 'shape', type(X).__name__)}. Reshape a (tokens, in_features) input to "
                         "(1, tokens, in_features).")
    if X.shape[2] != columns or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X has shape {tuple(X.shape)}; expected (n_samples >= 1, tokens >= 1, {columns}).")
    check_finite(X, "X")
    return np.asarray(X, dtype=np.float64)


# ------------------------------------------------------------------------------------------ salience

def salience_hessian(H, salience_damp: float = SALIENCE_DAMP) -> np.ndarray:
    """``get_salience``'s in-place step on a copy: dead diagonals set to 1, then ``+ salience_damp`` on the diagonal."""
    H = np.array(H, dtype=np.float64, copy=True)
    d = np.arange(H.shape[0])
    dead = np.diag(H) == 0
    H[d[dead], d[dead]] = 1
    H[d, d] += salience_damp
    return H


def _upper(H, shape) -> np.ndarray:
    try:
        return upper_cholesky_of_inverse(H)
    except np.linalg.LinAlgError:
        raise HessianNotPositiveDefinite(
            not_positive_definite_message(f"{shape[0]}x{shape[1]}", 0.0, float(np.mean(np.diag(H))))) from None


def group_salience(W, U, group_size: int) -> np.ndarray:
    """``S_g = sum W[:, g]^2 / diag(U)[g]^2`` per group (eq. (6); ``get_salience``)."""
    d = np.diag(U)
    return np.array([np.sum(W[:, c:c + group_size] ** 2 / d[None, c:c + group_size] ** 2)
                     for c in range(0, W.shape[1], group_size)])


def allocation(order, k: int, bits: int) -> np.ndarray:
    """Widths of trial ``k``: ``order[:k]`` (lowest salience) at ``bits - 1``, ``order[-k:]`` at ``bits + 1``."""
    gb = np.full(len(order), bits, dtype=np.int64)
    gb[order[:k]] = bits - 1
    gb[order[len(order) - k:]] = bits + 1
    return gb


def salience_order(S) -> np.ndarray:
    """Groups by increasing salience (stable: ties keep the lower index first; the code's argsort is not stable)."""
    return np.argsort(S, kind="stable")


# ------------------------------------------------------------------------------------------ quantizers

def binarize_params(w):
    """SliM-LLM's 1-bit parameters per row: ``scale = mean |w|`` (uncentred), ``zero = mean w``."""
    return np.abs(w).mean(axis=1), w.mean(axis=1)


def binarize(w, scale, zero):
    """``sign(w - zero) * scale + zero`` (``sign(0) = 0``: a weight equal to the mean stays the mean)."""
    return np.sign(w - zero) * scale + zero


def rtn_group(w, b: int) -> np.ndarray:
    """``block_quantize``: per-row min/max RTN (range containing 0, asymmetric) or the binarizer at 1 bit."""
    if b == 1:
        s, z = binarize_params(w)
        return binarize(w, s[:, None], z[:, None])
    spec = QuantSpec(bits=b)
    scale, zero = find_params(w, spec)
    return fake_quantize(w, scale[:, None], zero[:, None], spec.maxq)


def trial_weight(W, group_bits, group_size: int) -> np.ndarray:
    """The whole matrix quantized group by group with :func:`rtn_group` at ``group_bits``."""
    out = np.empty_like(W)
    for g, c in enumerate(range(0, W.shape[1], group_size)):
        out[:, c:c + group_size] = rtn_group(W[:, c:c + group_size], int(group_bits[g]))
    return out


def kl_error(logits_q, logits) -> float:
    """``reconstruct.kl_div``: ``sum p_hat (log p_hat - log p)`` over all tokens and outputs, both clamped at 1e-6."""
    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p_hat = np.maximum(softmax(logits_q), KL_CLAMP)
    p = np.maximum(softmax(logits), KL_CLAMP)
    return float(np.sum(p_hat * (np.log(p_hat) - np.log(p))))


# ------------------------------------------------------------------------------------------ SBA

@dataclass(frozen=True)
class SliMSearch:
    """What :func:`slim_search` found.

    Attributes:
        errors: (n_samples, n_trials) KL of every trial ``k = 1..n_trials`` on every sample.
        k: the chosen ``k* = argmin(mean over samples) + 1``.
        search_bits: the trial ``k*`` as the search scored it (search salience ranking).
        group_bits: the applied allocation (re-ranked by the damped salience; what ``slim_allocate`` returns).
        salience, applied_salience: the two group saliences.
    """

    errors: np.ndarray
    k: int
    search_bits: np.ndarray
    group_bits: np.ndarray
    salience: np.ndarray
    applied_salience: np.ndarray


def trial_errors(W, X, order, bits: int, group_size: int) -> np.ndarray:
    """(n_samples, n_trials) KL errors of the trials ``k = 1 .. n_groups // 2 - 1`` (``activation_aware_search``)."""
    n_trials = len(order) // 2 - 1
    errors = np.empty((X.shape[0], n_trials))
    logits = [X[s] @ W.T for s in range(X.shape[0])]
    for k in range(1, n_trials + 1):
        W_hat = trial_weight(W, allocation(order, k, bits), group_size)
        for s in range(X.shape[0]):
            errors[s, k - 1] = kl_error(X[s] @ W_hat.T, logits[s])
    return errors


def slim_search(W, H, X, *, bits: int, group_size: int = 128) -> SliMSearch:
    """The whole SBA with its diagnostics; :func:`slim_allocate` returns its ``group_bits``."""
    check_matrix(W, "W")
    W = np.asarray(W, dtype=np.float64)
    rows, columns = W.shape
    check_square(H, columns, "H")
    bits = check_target_bits(bits)
    n_groups = n_groups_of(columns, group_size)
    check_allocation_size(n_groups, columns, group_size)
    X = check_inputs(X, columns)

    Hs = salience_hessian(H)                                   # get_salience (in place in the original)
    S = group_salience(W, _upper(Hs.copy(), W.shape), group_size)
    errors = trial_errors(W, X, salience_order(S), bits, group_size)
    mean_err = errors.mean(axis=0)
    k = int(np.argmin(mean_err)) + 1                           # list.index(min(...)): the first minimum
    search_bits = allocation(salience_order(S), k, bits)

    # fasterquant: dead check finds none (Hs has no zero diagonal), relative damping, salience again
    U2, _ = damped_inverse_factor(Hs.copy(), PERCDAMP, W.shape)
    S2 = group_salience(W, U2, group_size)
    return SliMSearch(errors=errors, k=k, search_bits=search_bits,
                      group_bits=allocation(salience_order(S2), k, bits), salience=S, applied_salience=S2)


def slim_allocate(W, H, X, *, bits: int, group_size: int = 128) -> np.ndarray:
    """SliM-LLM's salience-determined bit allocation of one linear layer (SBA, Sec. 3.2).

    Args:
        W: (out_features, in_features) weight.
        H: (in_features, in_features) GPTQ Hessian of the layer's inputs (``refquant.hessian``).
        X: (n_samples, tokens, in_features) the layer's calibration inputs (one sample = one sequence).
        bits: target average width (2..7); groups get ``bits - 1``, ``bits`` or ``bits + 1``.
        group_size: columns per group (the code's ``--groupsize``, also its GPTQ block size).

    Returns:
        int64 array (n_groups,) of per-group widths, the allocation the code *applies* (re-ranked by
        the damped salience after the search); its mean is ``bits`` exactly.

    Raises:
        ValueError: fewer than 4 groups, bad shapes, non-finite input.
    """
    return slim_search(W, H, X, bits=bits, group_size=group_size).group_bits


# ------------------------------------------------------------------------------------------ SQC

def salient_mask(F) -> np.ndarray:
    """``saliency_mask``: ``F >= min{F : |z| > 2}``, z with the unbiased std; no salient element when none has |z| > 2."""
    if F.size < 2:
        return np.zeros(F.shape, dtype=bool)
    std = F.std(ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (F - F.mean()) / std
    outliers = F[np.abs(z) > Z_THRESHOLD]
    if outliers.size == 0:  # the original crashes (torch.min of an empty tensor)
        return np.zeros(F.shape, dtype=bool)
    return F >= outliers.min()


def sqc_params(w, d, b: int, sym: bool, lambda_salience: float):
    """``Quantizer.fit`` for width ``b >= 2``: per-row ``(scale, zero)`` of the block ``w`` (rows, cols).

    ``d``: ``diag(U)`` of the block (the sensitivity ``w^2 / d^2``).
    """
    maxq = 2 ** b - 1
    salient = salient_mask(w ** 2 / d[None, :] ** 2)
    xmin = np.minimum(w.min(axis=1), 0)
    xmax = np.maximum(w.max(axis=1), 0)
    dead = (xmin == 0) & (xmax == 0)
    xmin = np.where(dead, -1.0, xmin)
    xmax = np.where(dead, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    best = np.full(w.shape[0], np.inf)
    for p in range_factors():
        xmin1, xmax1 = p * xmin, p * xmax
        scale1 = (xmax1 - xmin1) / maxq
        zero1 = zero if sym else np.round(-xmin1 / scale1)
        e = np.abs(fake_quantize(w, scale1[:, None], zero1[:, None], maxq) - w) ** NORM
        err = np.where(salient, 0.0, e).sum(axis=1) + lambda_salience * np.where(salient, e, 0.0).sum(axis=1)
        better = err < best
        best = np.where(better, err, best)
        scale = np.where(better, scale1, scale)
        zero = np.where(better, zero1, zero)
    return scale, zero


def check_slim_args(bits, group_bits, columns, group_size, percdamp, lambda_salience, sym_quirk, salience_damp):
    """The arguments of :func:`slim_llm` besides ``W`` and ``H`` (the backends check them here too)."""
    bits = check_target_bits(bits)
    gb = check_group_bits(group_bits, n_groups_of(columns, group_size))
    for name, v in (("percdamp", percdamp), ("salience_damp", salience_damp)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not v >= 0:
            raise ValueError(f"{name} must be a number >= 0; got {v!r}.")
    if isinstance(lambda_salience, bool) or not isinstance(lambda_salience, (int, float, np.floating)) \
            or not np.isfinite(lambda_salience) or lambda_salience < 0:
        raise ValueError(f"lambda_salience must be a finite number >= 0 (1 is the code's default); "
                         f"got {lambda_salience!r}.")
    if not isinstance(sym_quirk, (bool, np.bool_)):
        raise ValueError(f"sym_quirk must be True or False; got {sym_quirk!r}.")
    return bits, gb


def slim_llm(W, H, *, bits: int, group_bits, group_size: int = 128, percdamp: float = 0.01,
             lambda_salience: float = 1.0, sym_quirk: bool = True, salience_damp: float = 0.01) -> MixedWeight:
    """SliM-LLM's quantizer: SQC group parameters + column-wise GPTQ with per-group bit widths.

    Args:
        W: (out_features, in_features) weight.
        H: its GPTQ Hessian.
        bits: the target width (``--low_quant_method``); decides the sym quirk's switch point.
        group_bits: (n_groups,) widths, e.g. :func:`slim_allocate` or a published allocation.
        group_size: columns per group = GPTQ block size.
        percdamp: GPTQ's relative damping.
        lambda_salience: SQC's weight of the salient elements' error (1: no-op, the code's default).
        sym_quirk: reproduce the code's ``sym=True`` start (see the module doc); False: asymmetric
            everywhere (what the code does with a loaded allocation).
        salience_damp: ``get_salience``'s in-place step on H before GPTQ (dead diagonals to 1, then
            ``+ salience_damp``; dead columns are then never zeroed). ``0.0`` skips the step (the path of
            a loaded allocation: GPTQ's own dead handling zeroes dead columns).

    Returns:
        :class:`MixedWeight`; ``info``: GPTQ proxy ``loss``, the ``percdamp`` used.
    """
    check_matrix(W, "W")
    rows, columns = W.shape
    check_square(H, columns, "H")
    bits, gb = check_slim_args(bits, group_bits, columns, group_size, percdamp, lambda_salience, sym_quirk,
                               salience_damp)
    W = np.array(W, dtype=np.float64, copy=True)
    H = np.array(H, dtype=np.float64, copy=True)
    if salience_damp > 0:
        H = salience_hessian(H, salience_damp)
    dead = np.diag(H) == 0
    d = np.arange(columns)
    H[d[dead], d[dead]] = 1
    W[:, dead] = 0
    U, percdamp_used = damped_inverse_factor(H, percdamp, (rows, columns))

    n_groups = len(gb)
    codes = np.zeros((rows, columns), dtype=np.uint8)
    scales = np.zeros((rows, n_groups))
    zeros = np.zeros((rows, n_groups))
    loss = 0.0
    sym = bool(sym_quirk)
    for g, c0 in enumerate(range(0, columns, group_size)):
        c1 = min(c0 + group_size, columns)
        b = int(gb[g])
        if b >= bits:
            sym = False
        W1 = W[:, c0:c1].copy()
        Err1 = np.zeros_like(W1)
        U1 = U[c0:c1, c0:c1]
        if b == 1:
            scale, zero = binarize_params(W1)
        else:
            scale, zero = sqc_params(W1, np.diag(U1), b, sym, float(lambda_salience))
            maxq = 2 ** b - 1
        scales[:, g], zeros[:, g] = scale, zero
        for i in range(c1 - c0):
            w = W1[:, i]
            if b == 1:
                sign = np.sign(w - zero)
                q = sign * scale + zero
                codes[:, c0 + i] = sign + 1
            else:
                code = quantize(w, scale, zero, maxq)
                q = scale * (code - zero)
                codes[:, c0 + i] = code
            err = (w - q) / U1[i, i]
            loss += float(np.sum(err ** 2)) / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, c1:] -= Err1 @ U[c0:c1, c1:]
    return MixedWeight(codes=codes, scale=scales, zero=zeros, group_bits=gb, group_size=int(group_size),
                       info={"loss": loss, "percdamp": percdamp_used})

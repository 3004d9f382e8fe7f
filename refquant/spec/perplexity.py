"""Perplexity as the GPTQ-lineage code computes it.

``llama_eval`` / ``opt_eval`` of IST-DASLab/gptq (and, with the same formula, llm-awq's
``entry.py``, smoothquant's ``ppl_eval.py``, OmniQuant's and the LLaMA-3 study's ``main.py``):

1. ``nsamples = numel // seqlen`` -- the token stream (:func:`refquant.data.get_eval_tokens`) is
   cut into non-overlapping windows of ``seqlen`` tokens; the tail that does not fill a window
   is dropped;
2. per window ``i``: the model sees the ``seqlen`` tokens; the logits at positions
   ``0 .. seqlen-2`` are scored against the labels at positions ``1 .. seqlen-1`` with the mean
   cross-entropy ``L_i`` (``nn.CrossEntropyLoss()``, i.e. over ``seqlen - 1`` tokens);
3. ``nll_i = L_i * seqlen`` (multiplied by ``seqlen`` although ``seqlen - 1`` tokens are scored);
4. ``ppl = exp(sum_i nll_i / (nsamples * seqlen))``, which is ``exp(mean_i L_i)``.

The model side is a callable ``window -> L_i``; :func:`window_loss` turns a window's logits into
``L_i`` with the shift of step 2, and :func:`cross_entropy` is the float64 NumPy loss.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ._checks import check_finite
from .progress import progress

log = logging.getLogger("refquant")


@dataclass
class PerplexityResult:
    """``ppl`` over ``n_windows`` windows of ``seqlen`` tokens, and each window's mean loss ``L_i``."""

    ppl: float
    n_windows: int
    seqlen: int
    window_losses: list[float] = field(default_factory=list)


def _check_seqlen(seqlen) -> int:
    if isinstance(seqlen, bool) or not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
        raise ValueError(
            f"seqlen must be an integer >= 2 (a window scores seqlen - 1 next-token predictions); got {seqlen!r}."
        )
    return int(seqlen)


def windows(tokens, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """The non-overlapping ``seqlen`` windows of ``tokens``: array (n, seqlen), tail dropped.

    ``n = len(tokens) // seqlen``, capped at ``max_windows`` (a quick partial evaluation; the
    result then says how many windows it used). ``tokens`` is 1-D, or (1, N) as a tokenizer's
    ``input_ids``. Returns a view when ``tokens`` is a contiguous NumPy array.
    """
    seqlen = _check_seqlen(seqlen)
    arr = np.asarray(tokens)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D (or (1, N)); got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError("tokens is empty: nothing to evaluate. Check the evaluation data (get_eval_tokens).")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integer token ids; got dtype {arr.dtype}.")
    n = arr.size // seqlen
    if n == 0:
        raise ValueError(
            f"only {arr.size} tokens, fewer than one window of seqlen={seqlen}: numel // seqlen = 0 windows. "
            "Use a smaller seqlen or more evaluation data."
        )
    if max_windows is not None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, (int, np.integer)) or max_windows < 1:
            raise ValueError(f"max_windows must be a positive integer or None; got {max_windows!r}.")
        n = min(n, int(max_windows))
    return arr[: n * seqlen].reshape(n, seqlen)


def cross_entropy(logits, labels) -> float:
    """Mean cross-entropy ``mean_t [logsumexp(logits[t]) - logits[t, labels[t]]]`` in float64.

    ``logits`` (T, V), ``labels`` (T,) integers in ``[0, V)`` -- ``nn.CrossEntropyLoss()`` with
    the default mean reduction (labels are never ignored here: the eval labels are all real
    tokens). The log-sum-exp subtracts each row's maximum first, so large logits do not overflow.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (tokens, vocab); got shape {logits.shape}.")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be 1-D with one label per logits row ({logits.shape[0]}); got shape {labels.shape}.")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits is empty (shape {logits.shape}); nothing to score.")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer token ids; got dtype {labels.dtype}.")
    vocab = logits.shape[1]
    bad = (labels < 0) | (labels >= vocab)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"labels[{k}] = {int(labels[k])} is outside [0, {vocab}) (vocab size from logits). "
            "Ignored labels (-100) are not supported: score real tokens only."
        )
    x = logits.astype(np.float64)
    check_finite(x, "logits")
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    nll = lse - x[np.arange(x.shape[0]), labels]
    return float(nll.mean())


def window_loss(logits, window) -> float:
    """``L_i`` of one window: logits at positions ``0..seqlen-2`` against tokens ``1..seqlen-1``.

    ``logits`` (seqlen, V) are the model outputs for the whole ``window`` (seqlen,).
    """
    logits = np.asarray(logits)
    window = np.asarray(window)
    if logits.ndim != 2 or window.ndim != 1 or logits.shape[0] != window.shape[0]:
        raise ValueError(
            f"logits must be (seqlen, vocab) for a window of seqlen tokens; got logits {logits.shape}, "
            f"window {window.shape}."
        )
    return cross_entropy(logits[:-1], window[1:])


def perplexity_from_losses(window_losses, seqlen: int) -> float:
    """``exp(sum_i (L_i * seqlen) / (n * seqlen))`` -- the original's formula, in float64."""
    seqlen = _check_seqlen(seqlen)
    losses = np.asarray(window_losses, dtype=np.float64).reshape(-1)
    if losses.size == 0:
        raise ValueError("no window losses: perplexity needs at least one window.")
    bad = ~np.isfinite(losses)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"window {k} has a non-finite loss ({losses[k]}); the perplexity is undefined.")
    nlls = losses * seqlen
    return float(math.exp(nlls.sum() / (losses.size * seqlen)))


def perplexity(window_loss_fn: Callable[[np.ndarray], float], tokens, seqlen: int = 2048,
               max_windows: int | None = None, desc: str = "ppl") -> PerplexityResult:
    """Perplexity of a model over ``tokens``, window by window, as the original evaluation.

    ``window_loss_fn(window)`` gets each window (int64 array of shape (seqlen,), a copy) and
    returns its mean cross-entropy ``L_i`` (e.g. ``window_loss(model_logits(window), window)``).
    Progress is shown via :mod:`refquant.progress`.
    """
    wins = windows(tokens, seqlen, max_windows)
    seqlen = wins.shape[1]
    losses: list[float] = []
    for k, win in enumerate(progress(wins, total=len(wins), desc=desc)):
        loss = float(window_loss_fn(np.array(win, dtype=np.int64)))
        if not math.isfinite(loss):
            raise ValueError(
                f"window {k} (tokens [{k * seqlen}, {(k + 1) * seqlen})) gave a non-finite loss ({loss}); "
                "check the model outputs (fp16 overflow is a common cause)."
            )
        losses.append(loss)
    result = PerplexityResult(perplexity_from_losses(losses, seqlen), len(wins), seqlen, losses)
    log.info("%s: ppl %.4f over %d windows of %d tokens", desc, result.ppl, result.n_windows, seqlen)
    return result

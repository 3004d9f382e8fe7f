"""Hessian of the layer-wise reconstruction loss, accumulated from layer inputs.

GPTQ (Frantar et al. 2023), Sec. 3, eq. (1)-(2): for ``argmin_W_hat ||W X - W_hat X||^2`` the
Hessian is ``H = 2 X X^T``. The original ``GPTQ.add_batch`` keeps a running mean over calibration
*sequences* (not tokens):

    H <- H * n / (n + b);   n <- n + b;   x <- sqrt(2 / n) * X^T;   H <- H + x x^T

for a batch of ``b`` sequences ``X`` (all their tokens), so after all batches
``H = (2 / n_sequences) * sum over all tokens of x x^T``. The scale of H does not change GPTQ
(its damping is relative), but it matters when H values are compared, so it is kept exactly.
"""
from __future__ import annotations

import math

import numpy as np

from ._checks import check_finite
from ._xp import namespace


def check_batch(X, in_features: int) -> None:
    """Shape of a calibration batch: (batch, tokens, in_features) or (tokens, in_features), not empty.

    Finiteness is checked separately (the torch backend checks it on the accumulator's device).
    Takes NumPy, CuPy and torch arrays.
    """
    if not hasattr(X, "ndim") or X.ndim < 2:
        raise ValueError(
            f"calibration input must be (batch, tokens, in_features) or (tokens, in_features); "
            f"got shape {tuple(X.shape) if hasattr(X, 'shape') else None}."
        )
    if X.shape[-1] != in_features:
        raise ValueError(
            f"calibration input has {X.shape[-1]} features but this Hessian is for in_features="
            f"{in_features}; hook the input of the same linear layer."
        )
    if math.prod(X.shape) == 0:
        raise ValueError(f"calibration input is empty (shape {tuple(X.shape)}).")


class HessianAccumulator:
    """Streaming GPTQ Hessian, float64 in the reference.

    ``add_batch(X)`` takes ``X`` of shape (batch, tokens, in_features) -- ``batch`` sequences --
    or (tokens, in_features), which counts as one sequence (the original unsqueezes 2-D inputs).
    """

    def __init__(self, in_features: int, dtype=np.float64, xp=np):
        if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
            raise ValueError(f"in_features must be an integer >= 1; got {in_features!r}.")
        self.in_features = int(in_features)
        self.H = xp.zeros((self.in_features, self.in_features), dtype=dtype)
        self.nsamples = 0

    def add_batch(self, X) -> None:
        check_batch(X, self.in_features)
        check_finite(X, "calibration input X")
        batch = 1 if X.ndim == 2 else X.shape[0]
        X = X.reshape(-1, self.in_features).astype(self.H.dtype)
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * X.T
        self.H += x @ x.T


def hessian(X):
    """``H = 2/n * sum x x^T`` over all tokens of ``X`` (shape (..., in_features)), in float64.

    GPTQ eq. (2) with the original's normalisation by the number of sequences ``n``
    (``X.shape[0]`` for 3-D input, 1 for 2-D input). For streaming over many batches use
    :class:`HessianAccumulator`.
    """
    if not hasattr(X, "shape") or len(X.shape) < 2:
        raise ValueError(
            f"X must have shape (..., tokens, in_features) with at least 2 dims; got {getattr(X, 'shape', None)}."
        )
    xp = namespace(X)
    acc = HessianAccumulator(X.shape[-1], dtype=xp.float64, xp=xp)
    acc.add_batch(X if X.ndim <= 3 else X.reshape(X.shape[0], -1, X.shape[-1]))
    return acc.H

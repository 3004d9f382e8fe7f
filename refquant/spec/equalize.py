"""Per-channel equalization: the scaling identity shared by SmoothQuant, AWQ and AWEQ.

A linear layer computes ``y = x W^T`` with ``W`` of shape (out_features, in_features). For any
positive vector ``s`` (one entry per input channel) and ``S = diag(s)``

    y = x W^T = (x S^-1) (W S)^T                                                     (eq. E)

i.e. dividing input channel ``j`` by ``s_j`` and multiplying *column* ``j`` of ``W`` by ``s_j``
leaves the output unchanged. This is eq. (3) of AWEQ (Li et al. 2023) and the smoothing equation
of SmoothQuant (Xiao et al. 2023, Sec. 4, ``Y = (X diag(s)^-1) (diag(s) W)``); the papers write
``W`` as (in, out), so their "row ``j`` of ``W`` times ``s_j``" is our "column ``j`` times ``s_j``".
AWQ (Lin et al. 2024, Sec. 3.2) uses the same identity with ``Q(W S) S^-1``.

The division of the input is never executed at inference: it is folded into the operation that
produces ``x``:

* an RMSNorm / LayerNorm: ``gamma / s`` (and ``beta / s`` for LayerNorm) -- :func:`fold_into_norm`,
  :func:`fold_into_layernorm`; llm-awq ``scale_ln_fcs``, SmoothQuant ``smooth_ln_fcs*``;
* a preceding linear whose output *is* ``x`` (channel for channel): its output rows divided by
  ``s`` -- :func:`fold_into_linear`; llm-awq ``scale_fc_fc``, which divides the **last**
  ``len(s)`` rows (so that a fused qkv projection can be followed by o_proj) and the bias.
  Because the product ``silu(gate x) * (up x)`` is linear in ``up x``, folding into ``up_proj``
  is exact for LLaMA's ``down_proj`` input.

All functions are pure (they return new arrays) and compute in float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ._checks import check_finite, check_matrix
from ._xp import namespace


# ----------------------------------------------------------------------------- input checks


def check_scales(s, n: int, name: str = "s"):
    """``s`` must be a finite, strictly positive 1-D array of length ``n``."""
    if not hasattr(s, "ndim") or s.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array with one scale per input channel; got shape {getattr(s, 'shape', type(s).__name__)}."
        )
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} entries but the weights have in_features={n}.")
    check_finite(s, name)
    xp = namespace(s)
    if bool((s <= 0).any()):
        first = int(xp.argwhere(s <= 0)[0][0])
        raise ValueError(
            f"{name} must be strictly positive (a scale of 0 or below is not invertible / flips signs); "
            f"{name}[{first}] = {float(s[first])!r}."
        )


def check_weights(Ws: Sequence, name: str = "Ws") -> int:
    """A non-empty list of finite 2-D weight matrices sharing ``in_features``; returns it."""
    if hasattr(Ws, "ndim") or not isinstance(Ws, (list, tuple)):
        raise ValueError(
            f"{name} must be a list of (out_features, in_features) weight matrices that share one input "
            f"(e.g. [W_q, W_k, W_v]); got {type(Ws).__name__}. Wrap a single matrix as [W]."
        )
    if len(Ws) == 0:
        raise ValueError(f"{name} is empty: pass at least one weight matrix.")
    for i, W in enumerate(Ws):
        check_matrix(W, f"{name}[{i}]")
    n = Ws[0].shape[1]
    for i, W in enumerate(Ws):
        if W.shape[1] != n:
            raise ValueError(
                f"{name}[{i}] has in_features={W.shape[1]} but {name}[0] has {n}: the linears scaled together "
                "must read the same input."
            )
    return int(n)


def check_activations(X, in_features: int | None, name: str = "X"):
    """Activations of shape (..., in_features) with at least one token, finite."""
    if not hasattr(X, "ndim") or X.ndim < 1:
        raise ValueError(
            f"{name} must be an array of shape (..., in_features), e.g. (tokens, in_features); "
            f"got {getattr(X, 'shape', type(X).__name__)}."
        )
    if math.prod(X.shape) == 0:  # (not X.size: a method of torch tensors, which the backends check here too)
        raise ValueError(f"{name} is empty (shape {tuple(X.shape)}); calibration needs at least one token.")
    if in_features is not None and X.shape[-1] != in_features:
        raise ValueError(
            f"{name} has {X.shape[-1]} channels in its last dimension but the weights have in_features={in_features}; "
            "pass the input of these linears."
        )
    check_finite(X, name)


# ----------------------------------------------------------------------------- the identity (eq. E)


def scale_weight(W, s):
    """``W diag(s)``: column ``j`` of ``W`` (out, in) multiplied by ``s_j`` (AWEQ eq. (3), ``diag(s) W``)."""
    check_matrix(W, "W")
    check_scales(s, W.shape[1])
    xp = namespace(W, s)
    return W.astype(xp.float64) * s.astype(xp.float64)[None, :]


def scale_weights(Ws: Sequence, s) -> list:
    """:func:`scale_weight` applied to every linear that reads the scaled input."""
    n = check_weights(Ws)
    check_scales(s, n)
    return [scale_weight(W, s) for W in Ws]


def scale_activation(X, s):
    """``X diag(s)^-1``: input channel ``j`` (last dimension) divided by ``s_j`` (AWEQ eq. (3))."""
    check_activations(X, None)
    check_scales(s, X.shape[-1])
    xp = namespace(X, s)
    return X.astype(xp.float64) / s.astype(xp.float64)


def fold_into_norm(norm_weight, s):
    """RMSNorm gain after folding ``S^-1``: ``gamma / s``.

    ``RMSNorm(x) = x / rms(x) * gamma``, so ``RMSNorm_{gamma / s}(x) = RMSNorm_gamma(x) diag(s)^-1``
    exactly, and ``RMSNorm_{gamma / s}(x) (W diag(s))^T = RMSNorm_gamma(x) W^T``.
    (llm-awq ``scale_ln_fcs``, SmoothQuant ``smooth_ln_fcs_llama_like``.)
    """
    if not hasattr(norm_weight, "ndim") or norm_weight.ndim != 1 or norm_weight.shape[0] == 0:
        raise ValueError(
            f"norm_weight must be the 1-D gain of the norm (hidden_size,); got shape {getattr(norm_weight, 'shape', None)}."
        )
    check_finite(norm_weight, "norm_weight")
    check_scales(s, norm_weight.shape[0])
    xp = namespace(norm_weight, s)
    return norm_weight.astype(xp.float64) / s.astype(xp.float64)


def fold_into_layernorm(norm_weight, norm_bias, s):
    """LayerNorm weight and bias after folding ``S^-1``: ``(gamma / s, beta / s)`` (``smooth_ln_fcs``)."""
    gamma = fold_into_norm(norm_weight, s)
    if not hasattr(norm_bias, "ndim") or norm_bias.shape != norm_weight.shape:
        raise ValueError(f"norm_bias must have the shape of norm_weight {tuple(norm_weight.shape)}.")
    check_finite(norm_bias, "norm_bias")
    xp = namespace(norm_bias, s)
    return gamma, norm_bias.astype(xp.float64) / s.astype(xp.float64)


def fold_into_linear(W_prev, s, b_prev=None):
    """Fold ``S^-1`` into the linear that produces the scaled input: ``(W_prev', b_prev')``.

    llm-awq ``scale_fc_fc``: the **last** ``len(s)`` rows of ``W_prev`` (out_prev, in_prev) are
    divided by ``s`` (row ``out_prev - len(s) + j`` by ``s_j``), so that for a fused qkv projection
    only the v rows are touched; for LLaMA (``v_proj -> o_proj``, ``up_proj -> down_proj``)
    ``len(s) == out_prev`` and every row is divided. The original divides the whole bias by ``s``,
    which only runs when ``len(b) == len(s)``; here the last ``len(s)`` entries of ``b_prev`` are
    divided, which is the same whenever the original runs. ``b_prev`` may be ``None`` (returned
    as ``None``).
    """
    check_matrix(W_prev, "W_prev")
    if not hasattr(s, "ndim") or s.ndim != 1:
        raise ValueError(f"s must be 1-D; got shape {getattr(s, 'shape', None)}.")
    k = s.shape[0]
    if k == 0 or k > W_prev.shape[0]:
        raise ValueError(
            f"s has {k} entries but W_prev has {W_prev.shape[0]} output rows: the scaled channels are the "
            "last len(s) outputs of the previous linear, so 1 <= len(s) <= out_features."
        )
    check_scales(s, k)
    xp = namespace(W_prev, s)
    s = s.astype(xp.float64)
    W = W_prev.astype(xp.float64, copy=True)
    W[W.shape[0] - k:, :] /= s[:, None]
    if b_prev is None:
        return W, None
    if not hasattr(b_prev, "ndim") or b_prev.ndim != 1 or b_prev.shape[0] != W_prev.shape[0]:
        raise ValueError(f"b_prev must be 1-D of length out_features={W_prev.shape[0]}; got {getattr(b_prev, 'shape', None)}.")
    check_finite(b_prev, "b_prev")
    b = b_prev.astype(xp.float64, copy=True)
    b[b.shape[0] - k:] /= s
    return W, b

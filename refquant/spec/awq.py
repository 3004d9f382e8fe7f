"""AWQ: activation-aware weight quantization -- the per-channel scale search and the clip search.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for On-Device LLM Compression and Acceleration", MLSys 2024. Faithful to
mit-han-lab/llm-awq (``awq/quantize/auto_scale.py``, ``auto_clip.py``, ``quantizer.py``,
``pre_quant.py``; HEAD d6e797a, first release 460d6d4, scale-formula change 02c1dd6):

* Sec. 3.2, eq. (4)-(5): ``s* = argmin_s L(s)``, ``L(s) = || Q(W diag(s)) (diag(s)^-1 X) - W X ||``,
  searched over ``s = s_X^alpha`` for ``alpha = k / n_grid``, ``k = 0 .. n_grid - 1`` (20 points,
  1.0 excluded), ``s_X`` the per-channel **mean** ``|x|`` over all calibration tokens
  (``get_act_scale``). The released code:

  - HEAD (since 02c1dd6): ``s = max(x_mean^ratio, 1e-4)``;
  - first release (460d6d4, the paper's eq. with a weight term; ``duo_scaling=True``):
    ``s = max(x_mean^ratio / w_mean^(1 - ratio), 1e-4)`` with ``w_mean[c]`` the mean over the rows of
    the row-concatenated weights of ``|W[r, c]| / max_{c' in group(c)} |W[r, c']|`` (``get_weight_scale``);
  - then ``s <- s / sqrt(max(s) min(s))``; every linear is replaced by ``Q(W diag(s)) diag(s)^-1``
    (the input ``x`` is *not* scaled during the search); the loss is
    ``mean((block(x) - block_hat(x))^2)`` over all output elements; the strictly smallest loss wins
    (``ratio = 0`` gives ``s = 1``, plain RTN, so it is always a candidate).

* Clip search (``auto_clip_layer``, the paper's "we also search the clipping range"): per
  (output row, group) a symmetric clip ``max_val = max|w| * (1 - i / n_grid)`` for
  ``i = 0 .. int(max_shrink * n_grid) - 1``; the error is the mean over a strided subsample of
  tokens of the squared **per-group partial dot product** error ``(x_g . w_g - x_g . Q(clip(w))_g)^2``;
  strictly better values are kept, starting from an error threshold of ``1e9`` (not ``inf``).

* The quantizer is llm-awq's ``pseudo_quantize_tensor``, the shared ``QuantSpec(rule="awq")``.

See ``docs/methods/awq.md`` for the LLaMA scaling groups and every place this follows the code
rather than the paper.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._checks import check_finite, check_matrix
from ._xp import namespace
from .equalize import check_activations, check_scales, check_weights
from .llama import DOWN, GATE, K, O, Q, UP, V
from .quantizer import QuantSpec, group_slices
from .rtn import rtn

N_GRID = 20
"""Scale-search grid: ratios ``k / 20`` for ``k = 0 .. 19``."""

SCALE_FLOOR = 1e-4
"""Candidate scales are clamped ``>= 1e-4`` before normalisation."""

CLIP_N_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_N_SAMPLE_TOKENS = 512
CLIP_ERR_INIT = 1e9
"""The clip search starts from ``min_errs = 1e9``: a candidate must have error < 1e9 to be kept."""


def _check_spec(spec):
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a refquant.QuantSpec (llm-awq: QuantSpec(bits, group_size=128, rule='awq')); got {type(spec).__name__}.")


def check_grid(n_grid) -> int:
    """``n_grid`` of the scale and clip searches: a positive integer; returned as an ``int``."""
    if isinstance(n_grid, bool) or int(n_grid) != n_grid or n_grid < 1:
        raise ValueError(f"n_grid must be a positive integer; got {n_grid!r}.")
    return int(n_grid)


def check_clip_args(spec, n_grid, max_shrink, n_sample_tokens) -> None:
    """The arguments of :func:`search_clip` besides ``X`` and ``W`` (the backends check them here too)."""
    _check_spec(spec)
    if spec.per_tensor:
        raise ValueError("search_clip clips per (row, group); a per-tensor spec couples all groups. Use group_size or per-row.")
    check_grid(n_grid)
    if not 0 < float(max_shrink) <= 1:
        raise ValueError(f"max_shrink must be in (0, 1]; got {max_shrink!r}.")
    if isinstance(n_sample_tokens, bool) or int(n_sample_tokens) != n_sample_tokens or n_sample_tokens < 1:
        raise ValueError(f"n_sample_tokens must be a positive integer; got {n_sample_tokens!r}.")


# ----------------------------------------------------------------------------- statistics


def activation_mean(X):
    """``s_X``: per input channel the mean of ``|x|`` over all tokens of ``X`` (..., in) (``get_act_scale``)."""
    check_activations(X, None)
    xp = namespace(X)
    return xp.abs(X.reshape(-1, X.shape[-1]).astype(xp.float64)).mean(axis=0)


def weight_mean(Ws: Sequence, group_size: int | None):
    """``w_mean`` of the first release (``get_weight_scale``) on the row-concatenation of ``Ws``.

    ``w_mean[c] = mean_r |W[r, c]| / max_{c' in group(c)} |W[r, c']|`` with consecutive groups of
    ``group_size`` input columns (``None``: the whole row). A (row, group) whose weights are all
    zero makes the original divide 0 by 0 (NaN, then an assertion error); here it is a ValueError,
    as is a column whose ``w_mean`` is 0 (the scale formula would divide by 0).
    """
    n = check_weights(Ws)
    xp = namespace(*Ws)
    A = xp.abs(xp.concatenate([W.astype(xp.float64) for W in Ws], axis=0))
    rel = xp.empty_like(A)
    for cols in group_slices(n, group_size):
        gmax = A[:, cols].max(axis=1, keepdims=True)
        if bool((gmax == 0).any()):
            r = int(xp.argwhere(gmax[:, 0] == 0)[0][0])
            raise ValueError(
                f"duo_scaling: row {r} (of the concatenated weights) is all zero in input columns {cols.start}:{cols.stop}; "
                "the original's |W| / max|W| is 0/0 there. Use duo_scaling=False (the current llm-awq formula)."
            )
        rel[:, cols] = A[:, cols] / gmax
    w_mean = rel.mean(axis=0)
    if bool((w_mean == 0).any()):
        c = int(xp.argwhere(w_mean == 0)[0][0])
        raise ValueError(
            f"duo_scaling: input column {c} is zero in every weight row, so w_mean[{c}] = 0 and the first-release "
            "scale x_mean^r / w_mean^(1-r) divides by zero. Use duo_scaling=False (the current llm-awq formula)."
        )
    return w_mean


# ----------------------------------------------------------------------------- scale search


def candidate_scales(x_mean, ratio: float, w_mean=None):
    """The scale tried at grid point ``ratio`` (``_search_module_scale``), normalised.

    ``s = max(x_mean^ratio, 1e-4)`` (HEAD) or ``s = max(x_mean^ratio / w_mean^(1 - ratio), 1e-4)``
    (first release, when ``w_mean`` is given), then ``s / sqrt(max(s) * min(s))``.
    """
    xp = namespace(x_mean)
    s = x_mean.astype(xp.float64) ** ratio
    if w_mean is not None:
        s = s / w_mean.astype(xp.float64) ** (1.0 - ratio)
    s = xp.maximum(s, SCALE_FLOOR)
    return s / xp.sqrt(s.max() * s.min())


def scaled_fake_quant(W, s, spec: QuantSpec):
    """``Q(W diag(s)) diag(s)^-1``: the weight AWQ evaluates for scale ``s`` (paper eq. (4))."""
    check_matrix(W, "W")
    check_scales(s, W.shape[1])
    _check_spec(spec)
    xp = namespace(W, s)
    s = s.astype(xp.float64)
    return rtn(W.astype(xp.float64) * s[None, :], spec).dequantize() / s[None, :]


def linear_block(X, Ws: Sequence):
    """Default compared module: the outputs ``X W^T`` of every linear, concatenated on the last axis."""
    xp = namespace(X, *Ws)
    return xp.concatenate([X @ W.T for W in Ws], axis=-1)


@dataclass(frozen=True)
class ScaleSearchResult:
    """Outcome of :func:`search_scale`.

    Attributes:
        scales: the chosen normalised ``s`` (in_features,), to be folded with :mod:`refquant.equalize`.
        best_ratio: the grid point ``k / n_grid`` it came from.
        losses: loss of every grid point, ``losses[k]`` for ratio ``k / n_grid``.
    """

    scales: object
    best_ratio: float
    losses: object

    @property
    def best_loss(self) -> float:
        return float(self.losses[int(round(self.best_ratio * len(self.losses)))])


def search_scale(X, Ws: Sequence, spec: QuantSpec, block: Callable | None = None, n_grid: int = N_GRID,
                 duo_scaling: bool = False) -> ScaleSearchResult:
    """Grid-search the AWQ per-input-channel scale for the linears ``Ws`` that share the input ``X``.

    Args:
        X: calibration input of the linears, (..., in_features) (the FP layer's cached input; for
            LLaMA q/k/v the output of ``input_layernorm``). It is passed unchanged (as float64) to
            ``block`` and never modified.
        Ws: the (out, in) weights scaled together (LLaMA: ``[W_q, W_k, W_v]``, ``[W_o]``,
            ``[W_gate, W_up]``, ``[W_down]``).
        spec: the weight quantizer (llm-awq: ``QuantSpec(bits=4, group_size=128, rule="awq")``).
        block: ``block(X, weights) -> output``, the module whose output is compared, evaluated with
            the given list of weights in place of ``Ws`` (same order). Default :func:`linear_block`.
            For LLaMA q/k/v it is the whole attention (o_proj kept in FP), for gate/up the whole MLP.
        n_grid: number of grid points (ratios ``0, 1/n_grid, ..., (n_grid-1)/n_grid``).
        duo_scaling: use the first release's ``x_mean^r / w_mean^(1-r)`` instead of HEAD's ``x_mean^r``.

    Returns:
        :class:`ScaleSearchResult`.
    """
    n = check_weights(Ws)
    check_activations(X, n)
    _check_spec(spec)
    check_grid(n_grid)
    block = linear_block if block is None else block
    xp = namespace(X, *Ws)
    X = X.astype(xp.float64)  # a copy: the caller's X is never touched
    Ws = [W.astype(xp.float64) for W in Ws]

    org_out = _run_block(block, X, Ws, "the original weights")
    x_mean = activation_mean(X)
    w_mean = weight_mean(Ws, spec.group_size) if duo_scaling else None

    losses = xp.empty(int(n_grid), dtype=xp.float64)
    best_loss, best_k, best_s = float("inf"), -1, None
    for k in range(int(n_grid)):
        ratio = k / n_grid
        s = candidate_scales(x_mean, ratio, w_mean)
        out = _run_block(block, X, [scaled_fake_quant(W, s, spec) for W in Ws], f"ratio {ratio}")
        if out.shape != org_out.shape:
            raise ValueError(f"block returned shape {tuple(out.shape)} for the quantized weights but {tuple(org_out.shape)} for the originals.")
        loss = float(((org_out - out) ** 2).mean())
        losses[k] = loss
        if loss < best_loss:
            best_loss, best_k, best_s = loss, k, s
    if best_k < 0:
        raise ValueError(f"AWQ scale search found no finite loss (losses: {losses.tolist()}); check block and inputs.")
    return ScaleSearchResult(scales=best_s, best_ratio=best_k / n_grid, losses=losses)


def _run_block(block, X, weights, what: str):
    out = block(X, weights)
    if not hasattr(out, "shape"):
        raise ValueError(f"block must return an array; got {type(out).__name__}.")
    check_finite(out, f"block output with {what}")
    return out


# ----------------------------------------------------------------------------- clip search


@dataclass(frozen=True)
class ClipSearchResult:
    """Outcome of :func:`search_clip`.

    Attributes:
        max_val: chosen clip threshold per (output row, group), shape (out_features, n_groups);
            the weights are clipped to ``[-max_val, +max_val]`` by :func:`apply_clip`.
        losses: error of every candidate, shape (n_candidates, out_features, n_groups); candidate
            ``i`` is ``max|w| * (1 - i / n_grid)``.
    """

    max_val: object
    losses: object


def apply_clip(W, max_val, group_size: int | None):
    """Clamp ``W`` (out, in) to ``[-max_val[r, g], +max_val[r, g]]`` group by group (``apply_clip``)."""
    check_matrix(W, "W")
    slices = group_slices(W.shape[1], group_size)
    if not hasattr(max_val, "shape") or tuple(max_val.shape) != (W.shape[0], len(slices)):
        raise ValueError(
            f"max_val must have shape (out_features, n_groups) = {(W.shape[0], len(slices))}; got {getattr(max_val, 'shape', None)}."
        )
    check_finite(max_val, "max_val")
    xp = namespace(W, max_val)
    if bool((max_val < 0).any()):
        raise ValueError("max_val must be >= 0 (it is a symmetric clipping threshold).")
    out = W.astype(xp.float64, copy=True)
    for g, cols in enumerate(slices):
        m = max_val[:, g:g + 1].astype(xp.float64)
        out[:, cols] = xp.clip(out[:, cols], -m, m)
    return out


def search_clip(X, W, spec: QuantSpec, n_grid: int = CLIP_N_GRID, max_shrink: float = CLIP_MAX_SHRINK,
                n_sample_tokens: int = CLIP_N_SAMPLE_TOKENS) -> ClipSearchResult:
    """Search the symmetric weight clip per (output row, group) (``auto_clip_layer``).

    ``X`` (..., in_features) is the linear's input and ``W`` (out, in) its weight, both *after*
    the AWQ scale has been applied (llm-awq divides the cached inputs by ``s`` before clipping).
    Tokens are subsampled as the original does: every ``T // n_sample_tokens``-th token starting
    at 0 (all tokens when ``T < n_sample_tokens``; the original fails there with a zero slice step).
    The original processes output rows in batches of 256 or 64; rows are independent, so that
    does not change the result and is not reproduced. Skipping q/k (names containing ``q_``,
    ``k_``, ``query``, ``key``, ``Wqkv``) is the caller's job.
    """
    check_matrix(W, "W")
    check_activations(X, W.shape[1])
    check_clip_args(spec, n_grid, max_shrink, n_sample_tokens)
    xp = namespace(X, W)
    W = W.astype(xp.float64)
    tokens = X.reshape(-1, X.shape[-1]).astype(xp.float64)
    stride = max(1, tokens.shape[0] // int(n_sample_tokens))
    tokens = tokens[0::stride]
    slices = group_slices(W.shape[1], spec.group_size)

    org_max = xp.stack([xp.abs(W[:, cols]).max(axis=1) for cols in slices], axis=1)  # (out, n_groups)
    org_out = [tokens[:, cols] @ W[:, cols].T for cols in slices]  # per group: (tokens, out)

    n_candidates = int(max_shrink * n_grid)
    losses = xp.empty((n_candidates, W.shape[0], len(slices)), dtype=xp.float64)
    best_max_val = org_max.copy()
    min_errs = xp.full(org_max.shape, CLIP_ERR_INIT)
    for i in range(n_candidates):
        max_val = org_max * (1 - i / n_grid)
        W_q = rtn(apply_clip(W, max_val, spec.group_size), spec).dequantize()
        for g, cols in enumerate(slices):
            cur_out = tokens[:, cols] @ W_q[:, cols].T
            losses[i, :, g] = ((cur_out - org_out[g]) ** 2).mean(axis=0)
        better = losses[i] < min_errs
        min_errs = xp.where(better, losses[i], min_errs)
        best_max_val = xp.where(better, max_val, best_max_val)
    return ClipSearchResult(max_val=best_max_val, losses=losses)


# ----------------------------------------------------------------------------- LLaMA scaling groups


@dataclass(frozen=True)
class ScalingGroup:
    """One LLaMA scaling group of ``auto_scale_block``: ``prev`` gets ``1/s``, ``linears`` get ``* s``.

    ``block`` is the compared module (``"attn"``, ``"mlp"``; ``None`` = the linear itself);
    ``prev_is_norm`` says whether ``1/s`` is folded into a norm gain or into a linear's last rows.
    """

    input: str
    prev: str
    linears: tuple
    block: str | None
    prev_is_norm: bool


LLAMA_GROUPS = (
    ScalingGroup("attn_in", "input_layernorm", (Q, K, V), "attn", True),
    ScalingGroup("o_in", V, (O,), None, False),  # only when v_proj and o_proj shapes match (no GQA)
    ScalingGroup("mlp_in", "post_attention_layernorm", (GATE, UP), "mlp", True),
    ScalingGroup("down_in", UP, (DOWN,), None, False),
)
"""``auto_scale_block`` for ``LlamaDecoderLayer``, in the original's order."""

CLIPPED = (V, O, GATE, UP, DOWN)
"""``auto_clip_block`` skips names containing ``q_`` / ``k_``: q_proj and k_proj are never clipped."""

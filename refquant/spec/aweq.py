"""AWEQ: activation-weight equalization (AWE) and quantization bias correction (BC).

Li, Wang, Xu, "AWEQ: Post-Training Quantization with Activation-Weight Equalization for Large
Language Models", arXiv 2311.01305 (2023). No code has been published; every choice the paper
leaves open is made here and listed in ``docs/methods/aweq.md``.

* Sec. 3.1, eq. (3): ``Y = (X diag(s)^-1) (diag(s) W)`` (:mod:`refquant.equalize`).
* Sec. 3.2, eq. (4)-(9): maximise the "total precision" ``sum_i p_i^X p_i^W`` with
  ``p`` = channel range / tensor range, i.e. minimise
  ``max_j (r_j^X / s_j) * max_k (s_k r_k^W)`` (eq. (8), :func:`equalization_objective`); with
  ``r^X / s = s r^W`` for every channel the solution is

      s_i = sqrt(r_i^X r_i^W) / r_i^W                                                  (eq. (10))

  where ``r_i^X`` = max - min of input channel ``i`` over the calibration tokens and ``r_i^W`` =
  max - min of the weights of input channel ``i`` over the output rows. After equalization both
  ranges of channel ``i`` are ``sqrt(r_i^X r_i^W)``.
* Sec. 2, eq. (1)-(2): per-tensor uniform quantization ``x_q = clamp(round(x / Step) + Z)``,
  ``Step = (x_max - x_min) / (2^b - 1)`` -- the shared asymmetric quantizer with
  ``QuantSpec(bits, per_tensor=True)`` (see :func:`weight_spec` for why not "symmetric").
* Sec. 3.3, eq. (11)-(15): ``E[y~ - y] ~ eps E[x]`` with ``eps = W~ - W``; the corrected output is
  ``y~ - eps E[x]`` (:func:`bias_correction`), ``E[x]`` from the calibration set.
* Table 4 ablation: plain / +BC / +AWE / AWEQ (:class:`AWEQConfig`).

Several linears that read the same input (q/k/v; gate/up) share one ``s``; their weight range
``r^W`` is taken over the row-concatenation of their weights (as SmoothQuant's max and llm-awq's
``w_mean`` do). A channel whose activation or weight range is zero keeps ``s_i = 1`` (eq. (10) is
0/0 or x/0 there), as in DFQ's reference implementation (quic/aimet ``ScaleFactorCalculator``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._checks import check_finite, check_matrix
from ._xp import namespace
from .equalize import check_activations, check_scales, check_weights, scale_weights
from .formats import QuantizedWeight
from .quantizer import QuantSpec, fake_quantize, find_params
from .rtn import rtn


# ----------------------------------------------------------------------------- calibration statistics


@dataclass(frozen=True)
class ActivationStats:
    """Per-channel calibration statistics of one linear input, accumulated in one pass.

    Attributes:
        count: number of tokens seen.
        x_min, x_max: per-channel minimum and maximum over those tokens (in_features,).
        x_sum: per-channel sum over those tokens (float64), so that ``mean = x_sum / count``.
    """

    count: int
    x_min: object
    x_max: object
    x_sum: object

    @property
    def range(self):
        """``r^X``: per-channel ``max - min`` (eq. (4))."""
        return self.x_max - self.x_min

    @property
    def mean(self):
        """``E[x]``: per-channel mean over all calibration tokens (eq. (15))."""
        return self.x_sum / self.count


def update_stats(stats: ActivationStats | None, x) -> ActivationStats:
    """Add the tokens of ``x`` (..., in_features) to ``stats`` (``None`` starts a new one).

    Every index but the last is a token; min, max and sum are updated in one pass over ``x``.
    Returns a new :class:`ActivationStats` (the old one is not modified).
    """
    check_activations(x, None if stats is None else stats.x_min.shape[0], "x")
    xp = namespace(x)
    rows = x.reshape(-1, x.shape[-1]).astype(xp.float64)
    lo, hi, total = rows.min(axis=0), rows.max(axis=0), rows.sum(axis=0)
    if stats is None:
        return ActivationStats(count=rows.shape[0], x_min=lo, x_max=hi, x_sum=total)
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats must be an ActivationStats or None; got {type(stats).__name__}.")
    return ActivationStats(
        count=stats.count + rows.shape[0],
        x_min=xp.minimum(stats.x_min, lo),
        x_max=xp.maximum(stats.x_max, hi),
        x_sum=stats.x_sum + total,
    )


def weight_range(Ws: Sequence):
    """``r^W``: per input channel, ``max - min`` of the weights over all rows of all ``Ws``."""
    check_weights(Ws)
    xp = namespace(*Ws)
    A = xp.concatenate([W.astype(xp.float64) for W in Ws], axis=0)
    return A.max(axis=0) - A.min(axis=0)


# ----------------------------------------------------------------------------- equalization


def _check_range(r, n: int, name: str):
    if not hasattr(r, "ndim") or r.ndim != 1 or r.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one entry per input channel ({n}); got shape {getattr(r, 'shape', None)}.")
    check_finite(r, name)
    if bool((r < 0).any()):
        raise ValueError(f"{name} must be >= 0 (a range is max - min).")


def equalization_scales(x_range, Ws: Sequence):
    """AWE factors ``s_i = sqrt(r_i^X r_i^W) / r_i^W`` (eq. (10)) for the linears ``Ws`` sharing an input.

    Args:
        x_range: ``r^X`` (in_features,), per-channel max - min of the input over the calibration
            tokens (:attr:`ActivationStats.range`).
        Ws: list of (out, in) weights that read this input; ``r^W`` is their :func:`weight_range`
            (range over the row-concatenation).

    Returns:
        ``s`` (in_features,), float64, computed as ``sqrt(r^X) / sqrt(r^W)`` (the same number as
        eq. (10) without overflow/underflow of the product); ``s_i = 1`` where ``r_i^X = 0`` or
        ``r_i^W = 0``. Scale the weights' columns by ``s`` and divide the input by ``s``.
    """
    n = check_weights(Ws)
    _check_range(x_range, n, "x_range")
    xp = namespace(x_range, *Ws)
    r_x = x_range.astype(xp.float64)
    r_w = weight_range(Ws)
    ok = (r_x > 0) & (r_w > 0)
    safe_x = xp.where(ok, r_x, 1.0)
    safe_w = xp.where(ok, r_w, 1.0)
    return xp.where(ok, xp.sqrt(safe_x) / xp.sqrt(safe_w), 1.0)


def equalization_objective(x_range, w_range, s) -> float:
    """Eq. (8): ``max_j (r_j^X / s_j) * max_k (s_k r_k^W)`` (smaller is better; eq. (7) is its inverse)."""
    if not hasattr(x_range, "ndim") or x_range.ndim != 1:
        raise ValueError("x_range must be 1-D.")
    n = x_range.shape[0]
    _check_range(x_range, n, "x_range")
    _check_range(w_range, n, "w_range")
    check_scales(s, n)
    return float((x_range / s).max() * (s * w_range).max())


def equalized_range(stats: ActivationStats, s) -> tuple[float, float]:
    """Per-tensor ``(min, max)`` of the equalized input ``x / s`` implied by the calibration stats."""
    check_scales(s, stats.x_min.shape[0])
    return float((stats.x_min / s).min()), float((stats.x_max / s).max())


# ----------------------------------------------------------------------------- quantizers (eq. (1)-(2))


def weight_spec(bits: int) -> QuantSpec:
    """The per-tensor quantizer of eq. (1)-(2): ``Step = (x_max - x_min) / (2^b - 1)`` with a zero point.

    The paper's sentence "uniform unsigned symmetric quantization" contradicts its own formulas
    (a zero point ``Z`` and a ``max - min`` range are the asymmetric quantizer, and the AWE
    objective is written in max - min ranges, which only an asymmetric quantizer is sensitive
    to). The formulas win: the shared GPTQ-lineage asymmetric quantizer, one scale/zero for the
    tensor (its range is widened to contain 0, a no-op for the mixed-sign tensors of a LLaMA
    layer; ``Z = round(-x_min / Step)``).
    """
    return QuantSpec(bits=bits, per_tensor=True, sym=False, rule="gptq")


def quantize_weight(W, spec: QuantSpec) -> QuantizedWeight:
    """Quantize a (possibly equalized) weight with ``spec`` (default granularity: :func:`weight_spec`)."""
    return rtn(W, spec)


def quantize_activation(x, bits: int, static_range: tuple[float, float] | None = None):
    """Per-tensor fake quantization of activations with eq. (1)-(2) (asymmetric, zero point).

    Dynamic by default (``x_min``/``x_max`` of this call's tensor); ``static_range=(lo, hi)``
    fixes the range from calibration (e.g. :func:`equalized_range`), values outside it are clamped.
    """
    check_activations(x, None, "x")
    xp = namespace(x)
    spec = weight_spec(bits)
    rows = x.reshape(-1, x.shape[-1]).astype(xp.float64)
    if static_range is None:
        scale, zero = find_params(rows, spec)
    else:
        lo, hi = (float(v) for v in static_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"static_range must be finite (lo, hi) with lo <= hi; got {static_range!r}.")
        scale, zero = find_params(xp.asarray([[lo, hi]], dtype=xp.float64), spec)
        scale = xp.repeat(scale, rows.shape[0])
        zero = xp.repeat(zero, rows.shape[0])
    return fake_quantize(rows, scale[:, None], zero[:, None], spec.maxq).reshape(x.shape)


# ----------------------------------------------------------------------------- bias correction


def bias_correction(W, W_q, x_mean):
    """The bias to **add** to the quantized linear's output: ``b = -eps E[x]``, ``eps = W_q - W``.

    Eq. (11)-(15): ``E[y~ - y] = E[W_q x - W x] = eps E[x]`` (``y = x W^T`` per token, so in our
    row-vector convention ``eps E[x]`` is ``(W_q - W) @ E[x]``); the corrected output
    ``y~ - eps E[x]`` is ``x W_q^T + b`` with the returned ``b`` (length out_features). If the linear
    already has a bias ``b0``, its new bias is ``b0 + b``. ``W``, ``W_q`` and ``x_mean`` must
    describe the same linear: for an equalized linear, ``W diag(s)``, its quantized version and
    ``E[x] / s``.
    """
    check_matrix(W, "W")
    check_matrix(W_q, "W_q")
    if W.shape != W_q.shape:
        raise ValueError(f"W {tuple(W.shape)} and W_q {tuple(W_q.shape)} must have the same shape.")
    if not hasattr(x_mean, "ndim") or x_mean.ndim != 1 or x_mean.shape[0] != W.shape[1]:
        raise ValueError(f"x_mean must be 1-D of length in_features={W.shape[1]}; got shape {getattr(x_mean, 'shape', None)}.")
    check_finite(x_mean, "x_mean")
    xp = namespace(W, W_q, x_mean)
    eps = W_q.astype(xp.float64) - W.astype(xp.float64)
    return -(eps @ x_mean.astype(xp.float64))


# ----------------------------------------------------------------------------- the method (Table 4 switches)


@dataclass(frozen=True)
class AWEQConfig:
    """Ablation switches of Table 4: ``awe`` = activation-weight equalization, ``bc`` = bias correction."""

    awe: bool = True
    bc: bool = True

    @property
    def name(self) -> str:
        return {(False, False): "plain", (False, True): "+BC", (True, False): "+AWE", (True, True): "AWEQ"}[(self.awe, self.bc)]


PLAIN = AWEQConfig(awe=False, bc=False)
BC_ONLY = AWEQConfig(awe=False, bc=True)
AWE_ONLY = AWEQConfig(awe=True, bc=False)
FULL = AWEQConfig(awe=True, bc=True)
ABLATIONS = (PLAIN, BC_ONLY, AWE_ONLY, FULL)
"""Table 4 rows in order: W8A8, W8A8+BC, W8A8+AWE, AWEQ."""


@dataclass(frozen=True)
class AWEQResult:
    """AWEQ applied to the linears sharing one input.

    Attributes:
        scales: ``s`` (ones when ``awe`` is off); fold ``1/s`` into the producer of the input
            (:func:`refquant.equalize.fold_into_norm`) and use ``x / s`` as the linears' input.
        weights: the equalized float weights ``W diag(s)``.
        quantized: their :class:`QuantizedWeight` (``.dequantize()`` is the weight to deploy).
        biases: per linear the bias to add (:func:`bias_correction` with ``E[x] / s``), or ``None``
            when ``bc`` is off.
        input_mean: ``E[x] / s``, the calibration mean of the equalized input.
    """

    scales: object
    weights: list
    quantized: list
    biases: list | None
    input_mean: object


def aweq_linears(Ws: Sequence, stats: ActivationStats, spec: QuantSpec, config: AWEQConfig = FULL) -> AWEQResult:
    """AWE (eq. (10)) then quantization (eq. (1)-(2)) then BC (eq. (15)) for linears sharing an input.

    ``stats`` are the calibration statistics of the *unequalized* input (:func:`update_stats`);
    ``spec`` is the weight quantizer (paper: ``weight_spec(bits)``, per tensor).
    """
    n = check_weights(Ws)
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats must be an ActivationStats (see update_stats); got {type(stats).__name__}.")
    if stats.x_min.shape[0] != n:
        raise ValueError(f"stats describe {stats.x_min.shape[0]} channels but the weights have in_features={n}.")
    if not isinstance(config, AWEQConfig):
        raise ValueError(f"config must be an AWEQConfig; got {type(config).__name__}.")
    xp = namespace(*Ws)
    s = equalization_scales(stats.range, Ws) if config.awe else xp.ones(n, dtype=xp.float64)
    weights = scale_weights(Ws, s)
    quantized = [quantize_weight(W, spec) for W in weights]
    input_mean = stats.mean / s
    biases = None
    if config.bc:
        biases = [bias_correction(W, q.dequantize(), input_mean) for W, q in zip(weights, quantized)]
    return AWEQResult(scales=s, weights=weights, quantized=quantized, biases=biases, input_mean=input_mean)

"""SmoothQuant: migrate activation outliers into the weights with a per-channel scale.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023. Faithful to mit-han-lab/smoothquant
(``smooth.py``, ``calibration.py``, ``fake_quant.py``):

* Sec. 4, the smoothing identity ``Y = (X diag(s)^-1) (diag(s) W)`` (:mod:`refquant.equalize`)
  with the "migration strength" formula

      s_j = max(|X_j|)^alpha / max(|W_j|)^(1 - alpha)

  ``max|X_j|`` the per-channel absmax over all calibration tokens (``get_act_scales``) and
  ``max|W_j|`` over all rows of all linears that read the input (``smooth_ln_fcs*``), clamped
  ``>= 1e-5``; ``s`` clamped ``>= 1e-5``;
* the scale is folded into the preceding norm (``gamma / s``) and the linears (``W[:, j] * s_j``);
  for LLaMA only ``input_layernorm -> q/k/v`` and ``post_attention_layernorm -> gate/up``;
* W8A8 fake quantization: weights per-channel (or per-tensor) absmax, activations per-token (or
  per-tensor) absmax (:mod:`refquant.actquant`), both through the shared quantizer
  ``QuantSpec(rule="absmax")``.

See ``docs/methods/smoothquant.md`` for every place this follows the code rather than the paper.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._checks import check_finite, check_matrix
from ._xp import namespace
from .actquant import quantize_activation
from .equalize import check_activations, check_weights, fold_into_norm, scale_weights
from .formats import QuantizedWeight
from .quantizer import QuantSpec
from .rtn import rtn

DEFAULT_ALPHA = 0.5
"""``smooth_lm(..., alpha=0.5)`` and ``ppl_eval.py --alpha`` default; the OPT value of the paper."""

ALPHA_LLAMA = 0.85
"""Migration strength of the original README / ``examples/ppl_eval.sh`` for Llama-2-7B/13B and
Llama-3-8B/70B (0.9 for Llama-2-70B, 0.8 for Mistral/Mixtral)."""

WEIGHT_SCALE_FLOOR = 1e-5
"""``max|W_j|`` is clamped to at least this (``weight_scales.clamp(min=1e-5)``)."""

SCALE_FLOOR = 1e-5
"""``s_j`` is clamped to at least this (``scales.clamp(min=1e-5)``)."""

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")


def update_act_absmax(running, x):
    """Streaming calibration statistic: per-channel ``max |x|`` over every token seen so far.

    ``calibration.get_act_scales``: ``x`` (..., channels) is viewed as (tokens, channels); the
    running maximum of ``|x|`` over tokens is kept per channel. ``running=None`` starts it.
    Returns a new float64 array of shape (channels,).
    """
    check_activations(x, None if running is None else running.shape[0], "x")
    xp = namespace(x)
    current = xp.abs(x.reshape(-1, x.shape[-1]).astype(xp.float64)).max(axis=0)
    if running is None:
        return current
    if running.ndim != 1:
        raise ValueError(f"running must be the 1-D per-channel absmax; got shape {tuple(running.shape)}.")
    check_finite(running, "running")
    return xp.maximum(running.astype(xp.float64), current)


def weight_absmax(Ws: Sequence):
    """``max|W_j|``: per input channel, the max of ``|W[r, j]|`` over all rows of all ``Ws``, floored at 1e-5."""
    check_weights(Ws)
    xp = namespace(*Ws)
    per_linear = xp.stack([xp.abs(W.astype(xp.float64)).max(axis=0) for W in Ws])
    return xp.maximum(per_linear.max(axis=0), WEIGHT_SCALE_FLOOR)


def smooth_scales(x_absmax, Ws: Sequence, alpha: float):
    """Smoothing factors ``s`` (Sec. 4, migration strength ``alpha``) for the linears ``Ws`` sharing one input.

    Args:
        x_absmax: per-channel calibration absmax ``max|X_j|`` (in_features,), e.g. from
            :func:`update_act_absmax`; must be >= 0.
        Ws: list of (out, in) weight matrices reading that input (LLaMA: ``[W_q, W_k, W_v]`` or
            ``[W_gate, W_up]``).
        alpha: migration strength in [0, 1] (:data:`ALPHA_LLAMA` = 0.85 for LLaMA).

    Returns:
        ``s = max(max|X_j|^alpha / max(max|W_j|, 1e-5)^(1 - alpha), 1e-5)``, float64 (in_features,).
    """
    n = check_weights(Ws)
    if not hasattr(x_absmax, "ndim") or x_absmax.ndim != 1 or x_absmax.shape[0] != n:
        raise ValueError(
            f"x_absmax must be 1-D with one entry per input channel ({n}); got shape {getattr(x_absmax, 'shape', None)}."
        )
    check_finite(x_absmax, "x_absmax")
    xp = namespace(x_absmax, *Ws)
    if bool((x_absmax < 0).any()):
        raise ValueError("x_absmax must be >= 0 (it is a maximum of absolute values).")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}.")
    alpha = float(alpha)
    w = weight_absmax(Ws)
    s = x_absmax.astype(xp.float64) ** alpha / w ** (1.0 - alpha)
    return xp.maximum(s, SCALE_FLOOR)


@dataclass(frozen=True)
class SmoothResult:
    """A smoothed norm -> linears site: ``s``, the new norm gain and the scaled weights."""

    scales: object
    norm_weight: object
    weights: list


def smooth_norm_linears(norm_weight, Ws: Sequence, x_absmax, alpha: float) -> SmoothResult:
    """``smooth_ln_fcs_llama_like``: compute ``s`` and fold it, ``gamma / s`` and ``W[:, j] * s_j``."""
    s = smooth_scales(x_absmax, Ws, alpha)
    return SmoothResult(scales=s, norm_weight=fold_into_norm(norm_weight, s), weights=scale_weights(Ws, s))


def quantize_weight(W, bits: int = 8, granularity: str = "per_channel") -> QuantizedWeight:
    """Absmax weight quantization of ``fake_quant.py``; ``.dequantize()`` is the fake-quant weight.

    ``per_channel``: ``Delta_r = max(max_j |W[r, j]|, 1e-5) / qmax`` per output row
    (``quantize_weight_per_channel_absmax``); ``per_tensor``: one ``Delta`` for the matrix
    (``quantize_weight_per_tensor_absmax``). ``W_hat = round(W / Delta) * Delta``. The shared
    quantizer with ``QuantSpec(bits, rule="absmax")`` does the rounding.
    """
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"granularity must be one of {WEIGHT_GRANULARITIES}; got {granularity!r}.")
    return rtn(W, QuantSpec(bits=bits, rule="absmax", per_tensor=(granularity == "per_tensor")))


def fake_quant_linear(x, W_hat, a_bits: int = 8, act_quant: str = "per_token", bias=None,
                      quantize_output: bool = False):
    """Forward of ``W8A8Linear``: ``Q_a(x) W_hat^T + b``, optionally ``Q_a`` of the output too.

    ``W_hat`` is the already fake-quantized weight (:func:`quantize_weight` ``.dequantize()``);
    ``quantize_output=True`` is the original's ``quantize_bmm_input`` emulation for q/k/v_proj
    (their outputs are the BMM inputs), quantized with the same ``act_quant`` mode and bits.
    """
    check_matrix(W_hat, "W_hat")
    check_activations(x, W_hat.shape[1], "x")
    xp = namespace(x, W_hat)
    y = quantize_activation(x, a_bits, act_quant) @ W_hat.astype(xp.float64).T
    if bias is not None:
        if not hasattr(bias, "ndim") or bias.shape != (W_hat.shape[0],):
            raise ValueError(f"bias must have shape ({W_hat.shape[0]},); got {getattr(bias, 'shape', None)}.")
        check_finite(bias, "bias")
        y = y + bias.astype(xp.float64)
    if quantize_output:
        y = quantize_activation(y, a_bits, act_quant)
    return y

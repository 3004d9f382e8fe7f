"""Activation fake quantization: symmetric absmax, as SmoothQuant's ``fake_quant.py``.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, Sec. 2 eq. (1): ``X_bar = round(X / Delta)``, ``Delta = max(|X|) / (2^(N-1) - 1)``;
Sec. 4/Table 2: per-token dynamic, per-tensor dynamic and per-tensor static activation scales.
Faithful to mit-han-lab/smoothquant ``smoothquant/fake_quant.py``:

* ``quantize_activation_per_token_absmax``: one ``Delta`` per token, i.e. per row of the last
  dimension, recomputed at every call: ``Delta_t = max(max_c |x[t, c]|, 1e-5) / qmax``;
* ``quantize_activation_per_tensor_absmax``: one ``Delta`` over the whole tensor of that call;
* ``X_hat = round(X / Delta) * Delta`` (round half to even), ``qmax = 2^(bits-1) - 1``; no zero
  point, no clamp needed (``|X / Delta| <= qmax``).

The per-tensor *static* mode fixes ``Delta`` from a calibration absmax (SmoothQuant
``calibration.get_static_decoder_layer_scales``: ``input_scale = absmax / 127``; the paper's O3).
Values beyond the calibrated range are clamped to ``[-qmax, qmax]`` codes -- the shared absmax
grid; torch-int's INT8 kernels clamp to ``[-128, 127]``, which differs only for values below
``-127.5 Delta`` (see ``docs/methods/smoothquant.md``).

Every rounding here goes through the shared quantizer (:mod:`refquant.quantizer`,
``QuantSpec(rule="absmax")``); W8A8, W6A6 and W4A4 are just ``bits`` = 8, 6, 4.
"""
from __future__ import annotations

import numpy as np

from ._checks import check_finite
from ._xp import namespace
from .equalize import check_activations
from .quantizer import QuantSpec, fake_quantize, find_params

MODES = ("per_token", "per_tensor")


def _spec(bits: int, per_tensor: bool) -> QuantSpec:
    return QuantSpec(bits=bits, rule="absmax", per_tensor=per_tensor)


def quantize_activation(x, bits: int, mode: str = "per_token", static_scale: float | None = None):
    """Fake-quantize activations ``x`` of shape (..., channels); returns float64 of the same shape.

    Args:
        x: activations; the last dimension is the channel dimension, every other index a token.
        bits: 2..8 (``qmax = 2^(bits-1) - 1``).
        mode: ``"per_token"`` (dynamic, one scale per token row, SmoothQuant's LLaMA default) or
            ``"per_tensor"`` (one scale for all of ``x``).
        static_scale: only with ``mode="per_tensor"``: a fixed step ``Delta`` (e.g.
            :func:`static_scale_from_absmax` of a calibration absmax) instead of the dynamic absmax of ``x``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    check_activations(x, None, "x")
    xp = namespace(x)
    spec = _spec(bits, per_tensor=(mode == "per_tensor"))
    rows = x.reshape(-1, x.shape[-1]).astype(xp.float64)
    if static_scale is None:
        scale, zero = find_params(rows, spec)
    else:
        if mode != "per_tensor":
            raise ValueError("static_scale is a per-tensor scale: use mode='per_tensor' (per-token scales are dynamic).")
        if not float(static_scale) > 0 or not float(static_scale) < float("inf"):
            raise ValueError(f"static_scale must be a finite positive step size; got {static_scale!r}.")
        scale = xp.full(rows.shape[0], float(static_scale))
        zero = xp.full(rows.shape[0], float(spec.maxq // 2))  # the absmax grid's zero code, qmax
    return fake_quantize(rows, scale[:, None], zero[:, None], spec.maxq).reshape(x.shape)


def activation_absmax(x) -> float:
    """``max |x|`` over the whole tensor: the per-tensor calibration statistic."""
    check_activations(x, None, "x")
    xp = namespace(x)
    return float(xp.abs(x.astype(xp.float64)).max())


def update_activation_absmax(running: float | None, x) -> float:
    """Streaming per-tensor calibration: ``max(running, max |x|)`` (``running=None`` starts it)."""
    current = activation_absmax(x)
    if running is None:
        return current
    if not float(running) >= 0 or float(running) == float("inf"):
        raise ValueError(f"running absmax must be a finite non-negative number or None; got {running!r}.")
    return max(float(running), current)


def static_scale_from_absmax(absmax: float, bits: int) -> float:
    """The static per-tensor step ``Delta = max(absmax, 1e-5) / qmax`` of a calibration absmax.

    Computed by the shared absmax rule (``find_params``), so the ``1e-5`` floor of the dynamic
    modes applies too (SmoothQuant's calibration divides by 127 without a floor).
    """
    a = np.asarray([[float(absmax)]], dtype=np.float64)
    check_finite(a, "absmax")
    if a[0, 0] < 0:
        raise ValueError(f"absmax must be >= 0; got {absmax!r}.")
    scale, _ = find_params(a, _spec(bits, per_tensor=True))
    return float(scale[0])

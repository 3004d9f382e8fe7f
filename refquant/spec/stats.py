"""Calibration statistics of one linear input, accumulated batch by batch in one pass.

Every method reads the statistics it needs from here, computed by the functions of its own module:

* ``"H"``: GPTQ's Hessian (:class:`refquant.hessian.HessianAccumulator`, 2/n over sequences);
* ``"absmax"``: per-channel ``max |x|`` (SmoothQuant ``get_act_scales``,
  :func:`refquant.smoothquant.update_act_absmax`);
* ``"mean_abs"``: per-channel mean ``|x|`` over tokens (AWQ ``get_act_scale``);
* ``"minmax"`` / ``"mean"``: per-channel min, max, range and mean (AWEQ, :func:`refquant.aweq.update_stats`);
* ``"inputs"``: the inputs themselves, kept (AWQ's scale and clip searches replay them).
"""
from __future__ import annotations

import numpy as np

from . import aweq, smoothquant
from .hessian import HessianAccumulator

KINDS = ("H", "absmax", "mean_abs", "minmax", "mean", "inputs")


class ChannelStats:
    """Accumulates the requested ``kinds`` for an input with ``in_features`` channels (float64)."""

    def __init__(self, kinds, in_features: int):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown statistic(s) {sorted(unknown)}; known: {KINDS}.")
        self.kinds = tuple(kinds)
        self.in_features = int(in_features)
        self._hessian = self._new_hessian() if "H" in kinds else None
        self.absmax = None
        self._abs_sum = None
        self._range_stats = None
        self._inputs = []
        self.tokens = 0

    def _new_hessian(self):
        return HessianAccumulator(self.in_features)

    def add(self, x) -> None:
        """Add a batch ``x`` of shape (batch, tokens, in_features) (or (tokens, in_features))."""
        x = np.asarray(x, dtype=np.float64)
        flat = x.reshape(-1, x.shape[-1])
        if self._hessian is not None:
            self._hessian.add_batch(x)
        if "absmax" in self.kinds:
            self.absmax = smoothquant.update_act_absmax(self.absmax, flat)
        if "mean_abs" in self.kinds:
            s = np.abs(flat).sum(axis=0)
            self._abs_sum = s if self._abs_sum is None else self._abs_sum + s
        if "minmax" in self.kinds or "mean" in self.kinds:
            self._range_stats = aweq.update_stats(self._range_stats, flat)
        if "inputs" in self.kinds:
            self._inputs.append(x.reshape(-1, x.shape[-2], x.shape[-1]) if x.ndim >= 2 else x)
        self.tokens += flat.shape[0]

    @property
    def H(self):
        return self._hessian.H

    @property
    def mean_abs(self):
        return self._abs_sum / self.tokens

    @property
    def range_stats(self) -> "aweq.ActivationStats":
        return self._range_stats

    @property
    def inputs(self):
        """The kept inputs, (n_sequences, tokens, in_features)."""
        return np.concatenate(self._inputs, axis=0)

    def take_inputs(self):
        """:attr:`inputs`, handing them over: the kept per-batch pieces are released (read once)."""
        out = self.inputs
        self._inputs = []
        return out

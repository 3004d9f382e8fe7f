"""PipelineOps: what the layer-wise loop needs besides RTN/GPTQ, for the numpy and torch backends.

* ``channel_stats(kinds, in_features, device=None)``: calibration statistics of one linear input
  (:mod:`refquant.spec.stats`: Hessian, channel absmax, mean |x|, min/max/mean, kept inputs);
* ``quantize_activation(x, bits, mode, static_scale)``: SmoothQuant's activation fake quantization
  (:func:`refquant.spec.actquant.quantize_activation`);
* ``static_act_scale(absmax, bits)``: the per-tensor static step from a calibration absmax.

(``to_numpy(x)`` / ``like(a, ref)``, which move small vectors between the backend and the reference,
are :class:`~refquant.backends.protocols.QuantOps`.)

:class:`NumpyPipelineOps` *is* the reference functions. :class:`TorchPipelineOps` computes the same
statistics in float32/float64 torch on the activations' device (they run inside the calibration
forward, where a host round trip per batch would dominate); their parity with the reference is
tested in ``tests/test_pipeline_ops.py``. Both are mixins of the backend classes
(``numpy_backend.NumpyBackend``, ``torch_backend.TorchBackend``).
"""
from __future__ import annotations

import numpy as np

from ..spec import actquant
from ..spec.aweq import ActivationStats
from ..spec.stats import ChannelStats

from .numpy_quant import as_numpy


class NumpyPipelineOps:
    """:class:`~refquant.backends.protocols.PipelineOps` of the reference (float64 NumPy)."""

    def channel_stats(self, kinds, in_features: int, device=None):
        return ChannelStats(kinds, in_features)

    def quantize_activation(self, x, bits: int, mode: str = "per_token", static_scale: float | None = None):
        return actquant.quantize_activation(x, bits, mode, static_scale)

    def static_act_scale(self, absmax, bits: int) -> float:
        return actquant.static_scale_from_absmax(float(np.max(as_numpy(absmax))), bits)


# --------------------------------------------------------------------------------------------- torch

try:
    import torch
except ImportError:  # the numpy backend works without torch
    torch = None

if torch is not None:
    from .torch_quant import TorchHessianAccumulator, div_exact

    class TorchChannelStats(ChannelStats):
        """:class:`refquant.stats.ChannelStats` in torch, on the activations' device.

        Hessian: :class:`TorchHessianAccumulator` (fp32, created on the first batch's device).
        absmax / min / max: exact in the input dtype. Sums for mean |x| and E[x]: fp32 per batch,
        accumulated in float64. Kept inputs stay in their dtype, on ``keep_device`` (default: where
        they come from). ``H`` and ``mean_abs`` are the reference's properties.
        """

        def __init__(self, kinds, in_features: int, device=None, keep_device=None):
            super().__init__(kinds, in_features)
            self.device = device
            self.keep_device = keep_device
            self.x_min = self.x_max = self.x_sum = None

        def _new_hessian(self):
            return None  # made on the device of the first batch

        def add(self, x) -> None:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"input has {x.shape[-1]} channels; these statistics are for {self.in_features}.")
            flat = x.detach().reshape(-1, self.in_features)
            if "H" in self.kinds:
                if self._hessian is None:
                    self._hessian = TorchHessianAccumulator(self.in_features, device=x.device)
                self._hessian.add_batch(x.detach() if x.ndim >= 2 else flat)
            if "absmax" in self.kinds:
                m = flat.abs().amax(dim=0).float()
                self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
            if "mean_abs" in self.kinds:
                s = flat.abs().float().sum(dim=0).double()
                self._abs_sum = s if self._abs_sum is None else self._abs_sum + s
            if "minmax" in self.kinds or "mean" in self.kinds:
                lo, hi = flat.amin(dim=0).double(), flat.amax(dim=0).double()
                total = flat.float().sum(dim=0).double()
                if self.x_min is None:
                    self.x_min, self.x_max, self.x_sum = lo, hi, total
                else:
                    self.x_min = torch.minimum(self.x_min, lo)
                    self.x_max = torch.maximum(self.x_max, hi)
                    self.x_sum = self.x_sum + total
            if "inputs" in self.kinds:
                kept = x.detach()
                self._inputs.append(kept if self.keep_device is None else kept.to(self.keep_device))
            self.tokens += flat.shape[0]

        @property
        def range_stats(self):
            return ActivationStats(count=self.tokens, x_min=self.x_min.cpu().numpy(), x_max=self.x_max.cpu().numpy(),
                                   x_sum=self.x_sum.cpu().numpy())

        @property
        def inputs(self):
            return torch.cat(self._inputs, dim=0)

        def take_inputs(self):
            """:attr:`inputs`, handing them over: each per-batch piece is released as soon as it is copied
            (peak: the result plus one piece, not twice the inputs as ``inputs`` then dropping the stats)."""
            pieces, self._inputs = self._inputs, []
            if len(pieces) == 1:
                return pieces.pop()
            n = sum(int(p.shape[0]) for p in pieces)
            out = torch.empty((n, *pieces[0].shape[1:]), dtype=pieces[0].dtype, device=pieces[0].device)
            i = 0
            while pieces:
                p = pieces.pop(0)
                out[i:i + p.shape[0]] = p
                i += int(p.shape[0])
                del p
            return out

    class TorchPipelineOps:
        """:class:`~refquant.backends.protocols.PipelineOps` in torch, on the activations' device."""

        def channel_stats(self, kinds, in_features: int, device=None, keep_device=None):
            return TorchChannelStats(kinds, in_features, device, keep_device)

        def quantize_activation(self, x, bits: int, mode: str = "per_token", static_scale: float | None = None):
            """SmoothQuant ``quantize_activation_per_{token,tensor}_absmax`` in fp32, returned in x's dtype."""
            if mode not in actquant.MODES:
                raise ValueError(f"mode must be one of {actquant.MODES}; got {mode!r}.")
            qmax = 2 ** (int(bits) - 1) - 1
            xf = x.float()
            if static_scale is not None:
                scale = torch.tensor(float(static_scale), device=x.device)
                q = torch.clamp(torch.round(xf / scale), -qmax, qmax)
            else:
                absmax = xf.abs().amax(dim=-1, keepdim=True) if mode == "per_token" else xf.abs().amax()
                scale = div_exact(torch.clamp(absmax.double(), min=1e-5), qmax).float()
                q = torch.round(xf / scale)
            return (q * scale).to(x.dtype)

        def static_act_scale(self, absmax, bits: int) -> float:
            return actquant.static_scale_from_absmax(float(absmax.max()), bits)

"""The "numpy" backend: the reference itself (refquant, float64 on the CPU), behind the backend API.

Nothing here re-implements an algorithm: every call goes to :mod:`refquant`. ``gptq_shared`` is, by
definition, separate :func:`refquant.gptq` calls with the same Hessian (the fast backends must equal
that).
"""
from __future__ import annotations

import numpy as np

import refquant
from refquant.hessian import HessianAccumulator
from refquant.quantizer import QuantizedWeight, QuantSpec

from . import Backend


def check_shared(Ws, name: str = "Ws") -> int:
    """Validate the matrix list of ``gptq_shared``; return the common in_features."""
    if isinstance(Ws, (str, bytes)) or not hasattr(Ws, "__len__") or len(Ws) == 0:
        raise ValueError(f"{name} must be a non-empty list of weight matrices sharing one Hessian; got {type(Ws).__name__}.")
    cols = []
    for k, W in enumerate(Ws):
        shape = getattr(W, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"{name}[{k}] must be a 2-D weight matrix (out_features, in_features); got shape {shape}.")
        cols.append(int(shape[1]))
    if len(set(cols)) != 1:
        raise ValueError(
            f"all matrices of {name} must have the same in_features to share one Hessian; got in_features {cols}."
        )
    return cols[0]


class NumpyBackend(Backend):
    """refquant on NumPy arrays (float64)."""

    name = "numpy"

    @staticmethod
    def asarray(x) -> np.ndarray:
        """A NumPy array of ``x`` (NumPy, CuPy or torch input)."""
        mod = type(x).__module__
        if mod.startswith("torch"):
            x = x.detach().cpu()
            if x.is_floating_point() and x.element_size() < 4:  # bf16 has no NumPy dtype; fp32 holds it exactly
                x = x.float()
            return x.numpy()
        if mod.startswith("cupy"):
            return x.get()
        return np.asarray(x)

    def rtn(self, W, spec: QuantSpec) -> QuantizedWeight:
        return refquant.rtn(self.asarray(W), spec)

    def hessian(self, X) -> np.ndarray:
        return refquant.hessian(self.asarray(X))

    def hessian_accumulator(self, in_features: int, device=None):
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU only; got device={device!r}.")
        return _NumpyHessianAccumulator(in_features)

    def gptq(self, W, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
             static_groups: bool = False, *, max_percdamp: float | None = None,
             percdamp_step: float = 0.01) -> QuantizedWeight:
        return refquant.gptq(self.asarray(W), self.asarray(H), spec, blocksize=blocksize, percdamp=percdamp,
                             act_order=act_order, static_groups=static_groups, max_percdamp=max_percdamp,
                             percdamp_step=percdamp_step)

    def gptq_shared(self, Ws, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                    act_order: bool = False, static_groups: bool = False, *, max_percdamp: float | None = None,
                    percdamp_step: float = 0.01) -> list[QuantizedWeight]:
        """Separate :func:`refquant.gptq` calls with one Hessian (the definition the fast backends meet)."""
        check_shared(Ws)
        H = self.asarray(H)
        return [self.gptq(W, H, spec, blocksize, percdamp, act_order, static_groups, max_percdamp=max_percdamp,
                          percdamp_step=percdamp_step) for W in Ws]


class _NumpyHessianAccumulator(HessianAccumulator):
    """:class:`refquant.HessianAccumulator` that also accepts torch/CuPy batches (copied to the host)."""

    def add_batch(self, X) -> None:
        super().add_batch(NumpyBackend.asarray(X) if hasattr(X, "shape") else X)

"""QuantOps and GPTQOps of the "numpy" backend: the reference itself (refquant.spec, float64 on the CPU).

Nothing here re-implements an algorithm: every call goes to :mod:`refquant.spec`. ``gptq_shared`` is,
by definition, separate :func:`refquant.gptq` calls with the same Hessian (the fast backends must
equal that). :class:`NumpyQuantOps` and :class:`NumpyGPTQOps` are the mixins of
:class:`refquant.backends.numpy_backend.NumpyBackend`.
"""
from __future__ import annotations

import numpy as np

from ..spec.formats import QuantizedWeight
from ..spec.gptq import gptq
from ..spec.hessian import HessianAccumulator, hessian
from ..spec.quantizer import QuantSpec
from ..spec.rtn import rtn

__all__ = ["NumpyQuantOps", "NumpyGPTQOps", "as_numpy", "check_shared"]


def as_numpy(x) -> np.ndarray:
    """A NumPy array of ``x`` (NumPy, CuPy or torch input; bf16/fp16 tensors as float32, which holds them)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # bf16 has no NumPy dtype; fp32 holds it exactly
            x = x.float()
        return x.numpy()
    if mod.startswith("cupy"):
        return x.get()
    return np.asarray(x)


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


class NumpyQuantOps:
    """:class:`~refquant.backends.protocols.QuantOps`: :func:`refquant.rtn` on NumPy copies of the inputs."""

    @staticmethod
    def asarray(x) -> np.ndarray:
        """A NumPy array of ``x`` (NumPy, CuPy or torch input)."""
        return as_numpy(x)

    def rtn(self, W, spec: QuantSpec) -> QuantizedWeight:
        return rtn(as_numpy(W), spec)

    def to_numpy(self, x):
        return as_numpy(x)

    def like(self, a, ref=None):
        return np.asarray(a, dtype=np.float64)


class NumpyGPTQOps:
    """:class:`~refquant.backends.protocols.GPTQOps`: :func:`refquant.hessian`, :func:`refquant.gptq`."""

    def hessian(self, X) -> np.ndarray:
        return hessian(as_numpy(X))

    def hessian_accumulator(self, in_features: int, device=None):
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU only; got device={device!r}.")
        return _NumpyHessianAccumulator(in_features)

    def gptq(self, W, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
             static_groups: bool = False, *, max_percdamp: float | None = None,
             percdamp_step: float = 0.01) -> QuantizedWeight:
        return gptq(as_numpy(W), as_numpy(H), spec, blocksize=blocksize, percdamp=percdamp,
                    act_order=act_order, static_groups=static_groups, max_percdamp=max_percdamp,
                    percdamp_step=percdamp_step)

    def gptq_shared(self, Ws, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                    act_order: bool = False, static_groups: bool = False, *, max_percdamp: float | None = None,
                    percdamp_step: float = 0.01) -> list[QuantizedWeight]:
        """Separate :func:`refquant.gptq` calls with one Hessian (the definition the fast backends meet)."""
        check_shared(Ws)
        H = as_numpy(H)
        return [self.gptq(W, H, spec, blocksize, percdamp, act_order, static_groups, max_percdamp=max_percdamp,
                          percdamp_step=percdamp_step) for W in Ws]


class _NumpyHessianAccumulator(HessianAccumulator):
    """:class:`refquant.HessianAccumulator` that also accepts torch/CuPy batches (copied to the host)."""

    def add_batch(self, X) -> None:
        super().add_batch(as_numpy(X) if hasattr(X, "shape") else X)

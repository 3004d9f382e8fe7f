"""The "cupy" backend: the reference itself (refquant, float64) run on CuPy arrays on the GPU.

refquant is written against the part of the NumPy API that CuPy implements and picks its array
module from its inputs (:mod:`refquant._xp`), so nothing is re-implemented here: inputs are moved to
the GPU and the reference functions are called on them. Two things are added around the calls:

* ``cupyx.errstate(linalg="raise")``: with CuPy's default (``"ignore"``) a failed Cholesky does
  not raise and does not reliably produce NaN either (cuSOLVER ``potrf`` stops at the failing
  column and leaves finite partial values), so the reference's "non-finite => LinAlgError" check
  could pass a garbage factor on. With ``"raise"`` CuPy checks ``devInfo`` and raises
  ``numpy.linalg.LinAlgError`` (== ``cupy.linalg.LinAlgError``), which the reference catches for
  its damping escalation. The setting is thread-local and restored on exit.
* ``with cupy.cuda.Device(...)``: the computation runs on the device of the weight.

``gptq_shared`` is separate :func:`refquant.gptq` calls (the definition; no speed goal here).

Operation families (:mod:`refquant.backends.protocols`): ``QuantOps`` and ``GPTQOps``.
"""
from __future__ import annotations

import contextlib

try:
    import cupy
    import cupyx
except ImportError as e:  # pragma: no cover - depends on the machine
    from . import BackendUnavailable

    raise BackendUnavailable(
        "the 'cupy' backend needs CuPy and a CUDA GPU: pip install cupy-cuda12x (CUDA 12) or "
        "cupy-cuda13x (CUDA 13). The 'numpy' backend runs the same reference on the CPU."
    ) from e

from ..spec.gptq import gptq
from ..spec.hessian import hessian
from ..spec.rtn import rtn
from ..spec.hessian import HessianAccumulator
from ..spec.formats import QuantizedWeight
from ..spec.quantizer import QuantSpec

from . import Backend
from .numpy_quant import as_numpy, check_shared


def _device_of(x):
    return x.device if isinstance(x, cupy.ndarray) else cupy.cuda.Device()


@contextlib.contextmanager
def _on(device):
    with device, cupyx.errstate(linalg="raise"):
        yield


class CupyBackend(Backend):
    """refquant on CuPy arrays (float64 on the GPU): QuantOps and GPTQOps."""

    name = "cupy"

    @staticmethod
    def asarray(x, device=None):
        """A CuPy array of ``x`` (NumPy, CuPy or torch input; torch CUDA tensors via DLPack)."""
        if type(x).__module__.startswith("torch"):
            x = x.detach()
            if x.is_floating_point() and x.element_size() < 4:
                x = x.float()
            if x.device.type != "cuda":
                x = x.numpy()
            else:
                return cupy.from_dlpack(x)
        if device is None:
            return cupy.asarray(x)
        with cupy.cuda.Device(device):
            return cupy.asarray(x)

    def rtn(self, W, spec: QuantSpec) -> QuantizedWeight:
        W = self.asarray(W)
        with _on(_device_of(W)):
            return rtn(W, spec)

    def to_numpy(self, x):
        """A NumPy array of ``x`` (CuPy, torch or NumPy input)."""
        return as_numpy(x)

    def like(self, a, ref=None):
        """``a`` as a float64 CuPy array on ``ref``'s device (the current device without ``ref``)."""
        dev = _device_of(ref) if ref is not None else cupy.cuda.Device()
        return self.asarray(a, device=dev.id).astype(cupy.float64, copy=False)

    def hessian(self, X):
        X = self.asarray(X)
        with _on(_device_of(X)):
            return hessian(X)

    def hessian_accumulator(self, in_features: int, device=None):
        return _CupyHessianAccumulator(in_features, device)

    def gptq(self, W, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
             static_groups: bool = False, *, max_percdamp: float | None = None,
             percdamp_step: float = 0.01) -> QuantizedWeight:
        W = self.asarray(W)
        dev = _device_of(W)
        H = self.asarray(H, device=dev.id)
        with _on(dev):
            return gptq(W, H, spec, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
                                 static_groups=static_groups, max_percdamp=max_percdamp,
                                 percdamp_step=percdamp_step)

    def gptq_shared(self, Ws, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                    act_order: bool = False, static_groups: bool = False, *, max_percdamp: float | None = None,
                    percdamp_step: float = 0.01) -> list[QuantizedWeight]:
        check_shared(Ws)
        return [self.gptq(W, H, spec, blocksize, percdamp, act_order, static_groups, max_percdamp=max_percdamp,
                          percdamp_step=percdamp_step) for W in Ws]


class _CupyHessianAccumulator:
    """:class:`refquant.HessianAccumulator` with a float64 CuPy ``H`` on one device."""

    def __init__(self, in_features: int, device=None):
        self.device = cupy.cuda.Device(device) if device is not None else cupy.cuda.Device()
        with self.device:
            self._acc = HessianAccumulator(in_features, dtype=cupy.float64, xp=cupy)

    @property
    def H(self):
        return self._acc.H

    @property
    def nsamples(self) -> int:
        return self._acc.nsamples

    @property
    def in_features(self) -> int:
        return self._acc.in_features

    def add_batch(self, X) -> None:
        X = CupyBackend.asarray(X, device=self.device.id) if hasattr(X, "shape") else X
        with _on(self.device):
            self._acc.add_batch(X)

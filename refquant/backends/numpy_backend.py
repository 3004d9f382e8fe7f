"""The "numpy" backend: the reference itself (refquant.spec, float64 on the CPU), behind the backend API.

Nothing in it re-implements an algorithm: every operation calls :mod:`refquant.spec` on NumPy copies
of its inputs, so its ops *are* the reference that the other backends are measured against. The
class is composed of one mixin per operation family (:mod:`refquant.backends.protocols`), each
next to that family's code:

* :class:`~.numpy_quant.NumpyQuantOps`, :class:`~.numpy_quant.NumpyGPTQOps` (RTN, Hessian, GPTQ;
  ``gptq_shared`` is, by definition, separate :func:`refquant.gptq` calls with the same Hessian);
* :class:`~.pipeline_ops.NumpyPipelineOps` (calibration statistics, activation quantization);
* :class:`~.equalization_ops.NumpyEqualizationOps`, :class:`~.equalization_ops.NumpyAWQOps`
  (SmoothQuant, AWEQ, AWQ).
"""
from __future__ import annotations

from . import Backend
from .equalization_ops import NumpyAWQOps, NumpyEqualizationOps
from .numpy_quant import NumpyGPTQOps, NumpyQuantOps, as_numpy, check_shared
from .pipeline_ops import NumpyPipelineOps
from .numpy_slim import NumpySliMOps
from .dbllm_ops import NumpyDBLLMOps
from .normalfloat_ops import NumpyNormalFloatOps
from .quip_ops import NumpyQuipOps
from .numpy_binarization import NumpyBinarizationOps

__all__ = ["NumpyBackend", "as_numpy", "check_shared"]


class NumpyBackend(NumpyQuantOps, NumpyGPTQOps, NumpyPipelineOps, NumpyEqualizationOps, NumpyAWQOps, NumpyDBLLMOps, NumpySliMOps, NumpyNormalFloatOps, NumpyQuipOps, NumpyBinarizationOps, Backend):
    """refquant on NumPy arrays (float64): QuantOps, GPTQOps, PipelineOps, EqualizationOps, AWQOps."""

    name = "numpy"

"""The "torch" backend: the reference's algorithms in float32/float64 torch, fast on CUDA (H200), exact on CPU.

:class:`TorchBackend` is composed of one mixin per operation family
(:mod:`refquant.backends.protocols`), each next to that family's code:

* :class:`~.torch_quant.TorchQuantOps`, :class:`~.torch_quant.TorchGPTQOps` (:mod:`.torch_quant`):
  the shared quantizer, RTN in fp32, streaming fp32 Hessians, GPTQ step for step as
  :func:`refquant.gptq` (``U = P inv(chol(P H P)) P``, group params at the block start, the
  intra-block loop as one Triton launch per block (:mod:`.gptq_kernels`; torch ops on CPU), the lazy
  update as a matmul with TF32 off (:func:`ieee_fp32`));
* :class:`~.pipeline_ops.TorchPipelineOps`: calibration statistics and activation quantization on
  the activations' device;
* :class:`~.equalization_ops.TorchEqualizationOps`, :class:`~.equalization_ops.TorchAWQOps`:
  SmoothQuant / AWEQ scales and folding, AWQ's scale and clip searches.

The public helpers of :mod:`.torch_quant` are re-exported here (``torch_backend.ieee_fp32``,
``div_exact``, ``work_dtype``, ...). See ``docs/backends.md``.
"""
from __future__ import annotations

# torch_quant imports torch first and raises BackendUnavailable (with install advice) without it
from .torch_quant import (
    FP64_FACTOR_MAX,
    TorchGPTQOps,
    TorchHessianAccumulator,
    TorchQuantOps,
    dequantize,
    div_exact,
    find_params,
    group_params,
    ieee_fp32,
    quantize,
    upper_cholesky_of_inverse,
    work_dtype,
)

from . import Backend, torch_quant
from .equalization_ops import TorchAWQOps, TorchEqualizationOps
from .pipeline_ops import TorchChannelStats, TorchPipelineOps
from .torch_slim import TorchSliMOps
from .torch_dbllm import TorchDBLLMOps
from .normalfloat_ops import TorchNormalFloatOps
from .torch_quip import TorchQuipOps
from .torch_binarization import TorchBinarizationOps

__all__ = ["TorchBackend", "TorchChannelStats", "FP64_FACTOR_MAX", *torch_quant.__all__]  # the helpers re-exported


class TorchBackend(TorchQuantOps, TorchGPTQOps, TorchPipelineOps, TorchEqualizationOps, TorchAWQOps, TorchDBLLMOps, TorchNormalFloatOps, TorchBinarizationOps, TorchSliMOps, TorchQuipOps, Backend):
    """refquant's algorithms in torch on CPU or CUDA (Triton block kernel on CUDA): QuantOps, GPTQOps,
    PipelineOps, EqualizationOps, AWQOps."""

    name = "torch"

"""DB-LLM's operation family on the numpy backend: the reference itself (:mod:`refquant.spec.dbllm`).

:class:`NumpyDBLLMOps` implements :class:`~refquant.backends.protocols.DBLLMOps` by calling
:func:`refquant.spec.dbllm.dbllm` on NumPy copies of its inputs. The torch twin (FDB in float64 on
the device, and the training pieces of Deviation-Aware Distillation) is
:mod:`refquant.backends.torch_dbllm`.
"""
from __future__ import annotations

from ..spec.dbllm import dbllm as _dbllm
from ..spec.formats import DualBinaryWeight
from .numpy_quant import as_numpy

__all__ = ["NumpyDBLLMOps"]


class NumpyDBLLMOps:
    """:class:`~refquant.backends.protocols.DBLLMOps`: :func:`refquant.dbllm` on NumPy copies."""

    def dbllm(self, W, H=None, *, group_size=128, sym=False, offset="zero_point", steps=0,
              resplit=True) -> DualBinaryWeight:
        return _dbllm(as_numpy(W), None if H is None else as_numpy(H), group_size=group_size, sym=sym,
                      offset=offset, steps=steps, resplit=resplit)

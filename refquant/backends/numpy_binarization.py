"""BinarizationOps of the "numpy" backend: the reference itself (:func:`refquant.pbllm`, :func:`refquant.billm`).

``pbllm_shared`` / ``billm_shared`` are, by definition, separate reference calls with the same
Hessian (the torch twin factors it once and must equal that).
"""
from __future__ import annotations

from ..spec.billm import billm
from ..spec.pbllm import pbllm
from .numpy_quant import as_numpy, check_shared

__all__ = ["NumpyBinarizationOps"]


class NumpyBinarizationOps:
    """:class:`~refquant.backends.protocols.BinarizationOps` on NumPy copies of the inputs (float64)."""

    def pbllm(self, W, H, *, low_frac=0.9, high_bits=8, salient_metric="hessian", blocksize=128, percdamp=0.01,
              group_size=None, binarizer_stats="code"):
        return pbllm(as_numpy(W), as_numpy(H), low_frac=low_frac, high_bits=high_bits, salient_metric=salient_metric,
                     blocksize=blocksize, percdamp=percdamp, group_size=group_size, binarizer_stats=binarizer_stats)

    def pbllm_shared(self, Ws, H, *, low_frac=0.9, high_bits=8, salient_metric="hessian", blocksize=128,
                     percdamp=0.01, group_size=None, binarizer_stats="code"):
        check_shared(Ws)
        H = as_numpy(H)
        return [self.pbllm(W, H, low_frac=low_frac, high_bits=high_bits, salient_metric=salient_metric,
                           blocksize=blocksize, percdamp=percdamp, group_size=group_size,
                           binarizer_stats=binarizer_stats) for W in Ws]

    def billm(self, W, H, *, blocksize=128, percdamp=0.01, salient_metric="hessian", search_on="saliency",
              narrow_blocks="extend", search_dtype=None, search_budget_bytes=None):
        """``search_dtype``, ``search_budget_bytes`` (hints of the torch twin) do not apply: the reference is float64."""
        return billm(as_numpy(W), as_numpy(H), blocksize=blocksize, percdamp=percdamp, salient_metric=salient_metric,
                     search_on=search_on, narrow_blocks=narrow_blocks)

    def billm_shared(self, Ws, H, *, blocksize=128, percdamp=0.01, salient_metric="hessian", search_on="saliency",
                     narrow_blocks="extend", search_dtype=None, search_budget_bytes=None):
        check_shared(Ws)
        H = as_numpy(H)
        return [self.billm(W, H, blocksize=blocksize, percdamp=percdamp, salient_metric=salient_metric,
                           search_on=search_on, narrow_blocks=narrow_blocks) for W in Ws]

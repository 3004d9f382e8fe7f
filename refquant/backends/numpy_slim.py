"""SliMOps of the "numpy" backend: the reference itself (:mod:`refquant.spec.slim`) on NumPy copies."""
from __future__ import annotations

from ..spec import slim
from .numpy_quant import as_numpy

__all__ = ["NumpySliMOps"]


class NumpySliMOps:
    """:class:`~refquant.backends.protocols.SliMOps`: :func:`refquant.slim_allocate`, :func:`refquant.slim_llm`."""

    def slim_search(self, W, H, X, *, bits, group_size=128):
        return slim.slim_search(as_numpy(W), as_numpy(H), as_numpy(X), bits=bits, group_size=group_size)

    def slim_allocate(self, W, H, X, *, bits, group_size=128):
        return slim.slim_allocate(as_numpy(W), as_numpy(H), as_numpy(X), bits=bits, group_size=group_size)

    def slim_llm(self, W, H, *, bits, group_bits, group_size=128, percdamp=0.01, lambda_salience=1.0,
                 sym_quirk=True, salience_damp=0.01):
        return slim.slim_llm(as_numpy(W), as_numpy(H), bits=bits, group_bits=as_numpy(group_bits),
                             group_size=group_size, percdamp=percdamp, lambda_salience=lambda_salience,
                             sym_quirk=sym_quirk, salience_damp=salience_damp)

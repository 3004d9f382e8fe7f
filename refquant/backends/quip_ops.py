"""QuipOps of the "numpy" backend: :func:`refquant.spec.quip.quip` itself on NumPy copies of the inputs.

``quip_many`` is, by definition, separate :func:`refquant.quip` calls (one per matrix, each with its
own Hessian and seed); the torch twin (:mod:`.torch_quip`) batches the matrices of equal width.
:class:`NumpyQuipOps` is a mixin of :class:`refquant.backends.numpy_backend.NumpyBackend`.
"""
from __future__ import annotations

from ..spec.formats import QuipWeight
from ..spec.quip import quip
from .numpy_quant import as_numpy

__all__ = ["NumpyQuipOps", "check_many"]


def check_many(Ws, Hs, seeds) -> None:
    """``quip_many``'s lists: non-empty, equally long, one Hessian and one seed per matrix."""
    for name, xs in (("Ws", Ws), ("Hs", Hs), ("seeds", seeds)):
        if isinstance(xs, (str, bytes)) or not hasattr(xs, "__len__") or len(xs) == 0:
            raise ValueError(f"{name} must be a non-empty list; got {type(xs).__name__}.")
    if not len(Ws) == len(Hs) == len(seeds):
        raise ValueError(f"quip_many needs one Hessian and one seed per matrix; got {len(Ws)} matrices, "
                         f"{len(Hs)} Hessians, {len(seeds)} seeds.")


class NumpyQuipOps:
    """:class:`~refquant.backends.protocols.QuipOps`: :func:`refquant.quip` on NumPy copies."""

    def quip(self, W, H, *, bits, U=None, V=None, seed=0, rescale=True, incoherence=True, rounding="ldlq",
             npasses=0, percdamp=0.01) -> QuipWeight:
        return quip(as_numpy(W), as_numpy(H), bits=bits, U=None if U is None else as_numpy(U),
                    V=None if V is None else as_numpy(V), seed=seed, rescale=rescale, incoherence=incoherence,
                    rounding=rounding, npasses=npasses, percdamp=percdamp)

    def quip_many(self, Ws, Hs, seeds, *, bits, rescale=True, incoherence=True, rounding="ldlq", npasses=0,
                  percdamp=0.01) -> list[QuipWeight]:
        """``[quip(W, H, seed=s, ...) for W, H, s in zip(Ws, Hs, seeds)]`` (the definition the twins meet)."""
        check_many(Ws, Hs, seeds)
        return [self.quip(W, H, bits=bits, seed=s, rescale=rescale, incoherence=incoherence, rounding=rounding,
                          npasses=npasses, percdamp=percdamp) for W, H, s in zip(Ws, Hs, seeds)]

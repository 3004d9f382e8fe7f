"""Input validation shared by every reference function.

Every public entry point checks its inputs here, so that NaN, Inf, empty or mis-shaped input
fails with a ValueError that says what was wrong and what to do, instead of silently producing
garbage several layers later. The checks take NumPy, CuPy and torch arrays (the torch backend uses
them too).
"""
from __future__ import annotations

from array_api_compat import array_namespace


class NotApplicable(ValueError):
    """A method's settings cannot apply to this model's shapes (e.g. SliM-LLM's allocation search on a layer
    narrower than four groups). Raised by input checks; a study reports such a row as not applicable to the
    model rather than as a failure."""


def check_matrix(W, name: str = "W"):
    """A finite, non-empty 2-D weight matrix of shape (out_features, in_features)."""
    if not hasattr(W, "ndim") or W.ndim != 2:
        shape = tuple(W.shape) if hasattr(W, "shape") else type(W).__name__
        raise ValueError(
            f"{name} must be a 2-D array (out_features, in_features); got shape {shape}. "
            "Pass a linear layer's weight matrix, e.g. layer.weight."
        )
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)}); nothing to quantize.")
    check_finite(W, name)


def check_finite(x, name: str):
    """Raise if x has NaN or Inf, with the count and the first offending index.

    Takes NumPy, CuPy and torch arrays (array-api-compat picks the library; the backends use these
    checks too). Integer and boolean arrays are finite by construction.
    """
    xp = array_namespace(x)
    if not xp.isdtype(x.dtype, ("real floating", "complex floating")):
        return
    bad = ~xp.isfinite(x)
    if bool(xp.any(bad)):
        n_bad = int(xp.sum(xp.astype(bad, xp.int64)))
        first = tuple(int(i[0]) for i in xp.nonzero(bad)) if bad.ndim else ()
        raise ValueError(
            f"{name} contains {n_bad} non-finite value(s) (NaN or Inf), first at index {first}. "
            "Check the model weights / calibration activations (fp16 overflow is a common cause)."
        )


def check_square(H, n: int, name: str = "H"):
    """A finite (n, n) matrix, e.g. a Hessian that must match a weight's in_features."""
    if not hasattr(H, "ndim") or H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be a square 2-D array; got shape {tuple(H.shape) if hasattr(H, 'shape') else None}.")
    if H.shape[0] != n:
        raise ValueError(
            f"{name} is {H.shape[0]}x{H.shape[1]} but the weight has in_features={n}; "
            "the Hessian must be accumulated from this layer's inputs."
        )
    check_finite(H, name)

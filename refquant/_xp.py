"""Array namespace selection: the reference runs on NumPy arrays, and unchanged on CuPy arrays.

The reference is written against the subset of the NumPy API that CuPy also implements, so the
"cupy" backend is literally this code on device arrays (see ``backends/cupy_backend.py``).
"""
from __future__ import annotations

import numpy as np


def namespace(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_numpy(a) -> np.ndarray:
    """Host copy of a NumPy or CuPy array (NumPy arrays are returned as they are)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)

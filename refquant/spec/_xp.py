"""Array namespace selection: the reference runs on NumPy arrays, and unchanged on CuPy arrays.

The reference is written against the part of the NumPy API that CuPy also implements. Which library
an array belongs to is decided by array-api-compat (``array_namespace(..., use_compat=False)``
returns the library's own module: ``numpy`` or ``cupy``), so the "cupy" backend is literally this
code on device arrays (``refquant/backends/cupy_backend.py``). Nothing here imports CuPy or torch:
array-api-compat recognizes their arrays only when their library is already loaded.
"""
from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, is_cupy_array, is_torch_array


def namespace(*arrays):
    """The array library (``numpy`` or ``cupy``) of the array arguments; Python scalars and None are ignored."""
    arrays = [a for a in arrays if a is not None and not isinstance(a, (bool, int, float, complex))]
    if not arrays:
        return np
    return array_namespace(*arrays, use_compat=False)


def to_numpy(a) -> np.ndarray:
    """Host copy of a NumPy, CuPy or torch array (NumPy arrays are returned as they are)."""
    if is_cupy_array(a):
        return a.get()
    if is_torch_array(a):
        return a.detach().cpu().numpy()
    return np.asarray(a)

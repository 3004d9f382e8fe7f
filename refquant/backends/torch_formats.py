"""Torch twin of the weight formats of :mod:`refquant.spec.formats`: ``dequantize`` on a device.

    from refquant.backends import torch_formats
    W_hat = torch_formats.dequantize(fmt, device="cuda", dtype=torch.bfloat16)

:func:`dequantize` gives, for every registered format, the weight that ``fmt.dequantize()`` gives
(float64, NumPy), as a torch tensor of ``dtype`` on ``device``, by the same arithmetic in that
dtype: with ``dtype=torch.float64`` the result is bit-identical to the reference; with float32
it is within float32 rounding of it (each stored float is rounded once to float32, then one or
two float32 operations follow; ``tests/test_formats.py`` pins the bounds).

The fields may be NumPy, CuPy (copied through the host) or torch arrays. ``device=None`` keeps
the device of the format's torch fields (CPU when it has none). Only this module imports torch:
``refquant.spec.formats`` never does, and nothing on the NumPy path imports this module.
"""
from __future__ import annotations

import dataclasses

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    from . import BackendUnavailable

    raise BackendUnavailable(
        "the torch twin of the weight formats needs PyTorch: pip install torch (CPU wheel: pip install 'refquant[torch]')."
    ) from e

from ..spec._xp import to_numpy
from ..spec.formats import (
    AffineWeight, BinaryWeight, CodebookWeight, DualBinaryWeight, MixedWeight, PartialBinaryWeight,
    QuipWeight, StructuredBinaryWeight, WeightFormat,
)

__all__ = ["dequantize", "to_torch", "TWINS"]


def to_torch(a, device=None, dtype=None) -> torch.Tensor:
    """``a`` (NumPy, CuPy or torch array) as a torch tensor on ``device`` (None: where it is, CPU for
    host arrays) with ``dtype`` (None: its own)."""
    if not isinstance(a, torch.Tensor):
        a = torch.from_numpy(np.ascontiguousarray(to_numpy(a)))
    return a.to(device=device if device is not None else a.device, dtype=dtype if dtype is not None else a.dtype)


def _affine(fmt: AffineWeight, device, dtype) -> torch.Tensor:
    scale = to_torch(fmt.scale, device, dtype)
    zero = to_torch(fmt.zero, device, dtype)
    codes = to_torch(fmt.codes, device, dtype)
    g = to_torch(fmt.g_idx, device, torch.int64)
    return scale[:, g] * (codes - zero[:, g])


def _binary(fmt: BinaryWeight, device, dtype) -> torch.Tensor:
    alpha = to_torch(fmt.alpha, device, dtype)[:, None]
    mean = to_torch(fmt.mean, device, dtype)[:, None]
    signs = to_torch(fmt.signs, device, torch.bool)
    return torch.where(signs, alpha, -alpha) + mean


def _codebook(fmt: CodebookWeight, device, dtype) -> torch.Tensor:
    if fmt.double_quant:
        a = fmt.absmax
        n = int(a.codes.shape[0])
        block2 = torch.arange(n, device=device) // a.block_size
        absmax = (to_torch(a.codebook, device, dtype)[to_torch(a.codes, device, torch.int64)]
                  * to_torch(a.scale, device, dtype)[block2] + a.offset)
    else:
        absmax = to_torch(fmt.absmax, device, dtype)
    block = (torch.arange(fmt.numel, device=device) // fmt.block_size).reshape(fmt.shape)
    return to_torch(fmt.codebook, device, dtype)[to_torch(fmt.codes, device, torch.int64)] * absmax[block]


def _dual_binary(fmt: DualBinaryWeight, device, dtype) -> torch.Tensor:
    cols = int(fmt.shape[1])
    idx = torch.arange(cols, device=device)
    g = idx * 0 if fmt.group_size is None else idx // int(fmt.group_size)
    zero = torch.zeros((), dtype=dtype, device=device)
    W = (torch.where(to_torch(fmt.b1, device, torch.bool), to_torch(fmt.a1, device, dtype)[:, g], zero)
         + torch.where(to_torch(fmt.b2, device, torch.bool), to_torch(fmt.a2, device, dtype)[:, g], zero))
    return W if fmt.offset is None else W + to_torch(fmt.offset, device, dtype)[:, g]


def _quip(fmt: QuipWeight, device, dtype) -> torch.Tensor:
    """QuIP: the format's own ``dequantize`` (array-agnostic) on torch fields (permutations int64, codes kept)."""
    moved = {}
    for f in dataclasses.fields(fmt):
        v = getattr(fmt, f.name)
        if f.name in ("scale", "bits", "seed", "rotation", "info") or v is None:
            continue
        kind = to_torch(v).dtype
        moved[f.name] = to_torch(v, device, None if not kind.is_floating_point else dtype)
    return dataclasses.replace(fmt, **moved).dequantize().to(dtype)


def _mixed(fmt: MixedWeight, device, dtype) -> torch.Tensor:
    """SliM-LLM's mixed widths: ``scale * (codes - zero)``, 1-bit groups ``(codes - 1) * scale + zero``."""
    cols = int(fmt.shape[1])
    g = torch.arange(cols, device=device) // int(fmt.group_size)
    S, Z = to_torch(fmt.scale, device, dtype)[:, g], to_torch(fmt.zero, device, dtype)[:, g]
    codes = to_torch(fmt.codes, device, dtype)
    one = (to_torch(fmt.group_bits, device, torch.int64) == 1)[g][None, :]
    return torch.where(one, (codes - 1) * S + Z, S * (codes - Z))


#: Format class -> its torch ``dequantize(fmt, device, dtype)``.
TWINS = {AffineWeight: _affine, BinaryWeight: _binary, CodebookWeight: _codebook, DualBinaryWeight: _dual_binary,
         QuipWeight: _quip, MixedWeight: _mixed}


def _fields_on(fmt, device, dtype):
    """The format with its float fields as ``dtype`` and its other arrays as torch tensors on ``device``:
    PB-LLM's and BiLLM's ``dequantize()`` are written for any array library (refquant/spec/formats.py)."""
    moved = {}
    for f in dataclasses.fields(fmt):
        v = getattr(fmt, f.name)
        if hasattr(v, "shape"):
            t = to_torch(v, device)
            moved[f.name] = t.to(dtype) if t.is_floating_point() else t
    return dataclasses.replace(fmt, **moved).dequantize()


TWINS[PartialBinaryWeight] = _fields_on
TWINS[StructuredBinaryWeight] = _fields_on


def _device_of(fmt) -> torch.device:
    for value in vars(fmt).values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def dequantize(fmt: WeightFormat, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``fmt.dequantize()`` as a ``dtype`` torch tensor on ``device`` (see the module docstring)."""
    twin = TWINS.get(type(fmt))
    if twin is None:
        raise TypeError(
            f"no torch twin for {type(fmt).__name__}; formats with one: {[c.__name__ for c in TWINS]}."
        )
    device = torch.device(device) if device is not None else _device_of(fmt)
    return twin(fmt, device, dtype)

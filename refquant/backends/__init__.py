"""Backends of refquant: the reference (NumPy), the reference on the GPU (CuPy), and the fast torch path.

    from refquant import backends
    be = backends.get_backend("torch")          # or "numpy", "cupy"
    qw = be.rtn(W, spec)
    acc = be.hessian_accumulator(W.shape[1], device=W.device)
    for X in batches:
        acc.add_batch(X)
    qw = be.gptq(W, acc.H, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False)
    qws = be.gptq_shared([Wq, Wk, Wv], acc.H, spec)      # one Hessian, several matrices

Every backend object has the reference's signatures (:func:`refquant.rtn`, :func:`refquant.hessian`,
:func:`refquant.gptq`, ...) and takes and returns that backend's arrays; see ``docs/backends.md`` for
dtypes, devices and the parity rules against the float64 reference.

The operations come in typed families, one :class:`typing.Protocol` each
(:mod:`refquant.backends.protocols`: ``QuantOps``, ``GPTQOps``, ``PipelineOps``, ``EqualizationOps``,
``AWQOps``). A backend class is composed explicitly of one mixin per family it implements
(``class TorchBackend(TorchQuantOps, TorchGPTQOps, TorchPipelineOps, TorchEqualizationOps,
TorchAWQOps, Backend)``), and ``isinstance(backend, AWQOps)`` says whether it has a family. Adding
a family: a protocol in ``protocols.py``, a mixin per backend next to its code, and the mixin in
the backend classes' bases.
"""
from __future__ import annotations

import importlib

from .protocols import PROTOCOLS, AWQOps, EqualizationOps, GPTQOps, PipelineOps, QuantOps

__all__ = ["Backend", "BackendUnavailable", "available_backends", "get_backend", "QuantOps", "GPTQOps",
           "PipelineOps", "EqualizationOps", "AWQOps", "PROTOCOLS"]


class BackendUnavailable(ImportError):
    """A backend whose array library (torch, cupy) is not installed or cannot start."""


class Backend:
    """Base class of the backend objects returned by :func:`get_backend`.

    Subclasses list the mixins of the operation families they implement before it (see the module
    docstring); :attr:`families` names them.
    """

    name: str = "?"

    @property
    def families(self) -> tuple[str, ...]:
        """Names of the protocols of :mod:`refquant.backends.protocols` this backend implements."""
        return tuple(p.__name__ for p in PROTOCOLS if isinstance(self, p))

    def __repr__(self) -> str:
        return f"<refquant backend {self.name!r}>"


# name -> (module, class name). Modules are imported on first use, so that e.g. "numpy" works without torch.
_REGISTRY = {
    "numpy": (f"{__name__}.numpy_backend", "NumpyBackend"),
    "torch": (f"{__name__}.torch_backend", "TorchBackend"),
    "cupy": (f"{__name__}.cupy_backend", "CupyBackend"),
}

_INSTANCES: dict[str, Backend] = {}


def available_backends() -> tuple[str, ...]:
    """Names accepted by :func:`get_backend` (whether their libraries are installed or not)."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend object called ``name`` ("numpy", "torch" or "cupy").

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailable` (an ``ImportError``)
    when the backend's array library is missing, saying what to install.
    """
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(_REGISTRY)}.")
    name = name.lower()
    if name not in _INSTANCES:
        module_name, cls_name = _REGISTRY[name]
        module = importlib.import_module(module_name)  # raises BackendUnavailable with install advice
        _INSTANCES[name] = getattr(module, cls_name)()
    return _INSTANCES[name]

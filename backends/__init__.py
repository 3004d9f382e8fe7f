"""Backends of refquant: the reference (NumPy), the reference on the GPU (CuPy), and the fast torch path.

    import backends
    be = backends.get_backend("torch")          # or "numpy", "cupy"
    qw = be.rtn(W, spec)
    acc = be.hessian_accumulator(W.shape[1], device=W.device)
    for X in batches:
        acc.add_batch(X)
    qw = be.gptq(W, acc.H, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False)
    qws = be.gptq_shared([Wq, Wk, Wv], acc.H, spec)      # one Hessian, several matrices

Every backend object has the reference's signatures (:func:`refquant.rtn`, :func:`refquant.hessian`,
:func:`refquant.gptq`) and takes and returns that backend's arrays; see ``docs/backends.md`` for
dtypes, devices and the parity rules against the float64 reference.

Adding a method (AWQ, SmoothQuant, ...) to a backend: either define it on the backend class in its
module, or, from a separate module, decorate a function with ``@TorchBackend.register("awq")``
(any :class:`Backend` subclass) and list that module in ``EXTENSIONS[name]`` below so that
:func:`get_backend` imports it before returning the backend object.
"""
from __future__ import annotations

import importlib

__all__ = ["Backend", "BackendUnavailable", "available_backends", "get_backend", "EXTENSIONS"]


class BackendUnavailable(ImportError):
    """A backend whose array library (torch, cupy) is not installed or cannot start."""


class Backend:
    """Base class of the backend objects returned by :func:`get_backend`.

    Subclasses implement ``rtn``, ``hessian``, ``hessian_accumulator``, ``gptq`` and
    ``gptq_shared``; later methods are added with :meth:`register`.
    """

    name: str = "?"

    @classmethod
    def register(cls, name: str | None = None, *, replace: bool = False):
        """Decorator that adds a function as a method of this backend class.

        ``@TorchBackend.register("awq")`` on ``def awq(self, W, X, spec, ...)`` makes
        ``get_backend("torch").awq(...)`` available. Refuses to overwrite an existing attribute
        unless ``replace=True``.
        """

        def deco(fn):
            attr = name or fn.__name__
            if not replace and hasattr(cls, attr):
                raise ValueError(f"{cls.__name__} already has an attribute {attr!r}; pass replace=True to override it.")
            setattr(cls, attr, fn)
            return fn

        return deco

    def methods(self) -> list[str]:
        """Public method names of this backend (for discovery and error messages)."""
        return sorted(a for a in dir(self) if not a.startswith("_") and callable(getattr(self, a)) and a not in {"register", "methods"})

    def __repr__(self) -> str:
        return f"<refquant backend {self.name!r}>"


# name -> (module, class name). Modules are imported on first use, so that e.g. "numpy" works without torch.
_REGISTRY = {
    "numpy": ("backends.numpy_backend", "NumpyBackend"),
    "torch": ("backends.torch_backend", "TorchBackend"),
    "cupy": ("backends.cupy_backend", "CupyBackend"),
}

#: Extra modules imported by :func:`get_backend` after the backend module (they register methods).
EXTENSIONS: dict[str, list[str]] = {name: [] for name in _REGISTRY}
EXTENSIONS["numpy"].append("backends.pipeline_ops")
EXTENSIONS["torch"].append("backends.pipeline_ops")
EXTENSIONS["numpy"].append("backends.equalization_ops")  # SmoothQuant / AWQ / AWEQ ops
EXTENSIONS["torch"].append("backends.equalization_ops")

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
        for ext in EXTENSIONS.get(name, []):
            importlib.import_module(ext)
        _INSTANCES[name] = getattr(module, cls_name)()
    return _INSTANCES[name]

"""The wiring units: one module per method, each registered once with ``@refquant.pipeline.register``.

A wiring unit joins a method's spec (``refquant/spec/<method>.py``) and its backend twins
(``refquant/backends``) to the application. It holds the method's typed options (from which the
CLI arguments are generated), the layer-level algorithm the loop runs, which statistics it needs,
its golden suites, its benchmark preset and its rows of the main job. Every module of this package
is imported here, in name order, when ``refquant`` is imported, so that the registry
(``refquant.pipeline.METHODS``) is complete whatever the caller imports first. Adding a method is
adding a module here (see ``docs/architecture.md``); nothing else lists the methods.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..pipeline import METHODS

WIRING_UNITS = tuple(m.name for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name))
for _name in WIRING_UNITS:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["METHODS", "WIRING_UNITS"]

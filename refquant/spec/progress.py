"""Progress display for long loops (perplexity windows, C4 document draws, calibration passes).

``progress(iterable, total=None, desc="")`` returns something to iterate over in place of
``iterable``. Whether anything is shown is decided once per call:

* env ``REFQUANT_PROGRESS=0`` (or ``false``/``no``/``off``): never shown;
* env ``REFQUANT_PROGRESS=1`` (or ``true``/``yes``/``on``): always shown on stderr, also when
  stderr is a file or a pipe -- then at most one line every 30 s, so a log of a long run shows
  it is alive without being flooded;
* unset (default): shown only when stderr is a terminal. CI logs and captured test output get
  nothing.

The bar is tqdm's when tqdm is importable, otherwise a one-line ``desc: n/total`` counter.
Messages go through ``logging.getLogger("refquant")`` elsewhere in the package; this module
only draws progress.
"""
from __future__ import annotations

import os
import sys
import time

ENV_PROGRESS = "REFQUANT_PROGRESS"

_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}
#: seconds between updates when stderr is not a terminal (forced on with REFQUANT_PROGRESS=1)
_NON_TTY_INTERVAL = 30.0


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def enabled() -> bool:
    """Whether :func:`progress` would show anything now (see the module docstring)."""
    setting = os.environ.get(ENV_PROGRESS, "").strip().lower()
    if setting in _OFF:
        return False
    if setting in _ON:
        return sys.stderr is not None
    return _stderr_is_tty()


def progress(iterable, total: int | None = None, desc: str = ""):
    """Iterate over ``iterable``, showing progress on stderr when :func:`enabled`."""
    if not enabled():
        return iterable
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    interval = 0.1 if _stderr_is_tty() else _NON_TTY_INTERVAL
    try:
        from tqdm import tqdm
    except ImportError:
        return _counter(iterable, total, desc, interval)
    return tqdm(iterable, total=total, desc=desc or None, file=sys.stderr, mininterval=interval, leave=False)


def _counter(iterable, total, desc, interval):
    """Minimal stand-in for tqdm: ``desc: n/total`` redrawn at most every ``interval`` seconds."""
    tty = _stderr_is_tty()
    label = f"{desc}: " if desc else ""
    last = time.monotonic()
    n = 0

    def show(final=False):
        line = f"{label}{n}/{total}" if total is not None else f"{label}{n}"
        if tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    for item in iterable:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= interval:
            show()
            last = now
    show(final=True)

"""Provenance of every result, and atomic writes (a crashed run never leaves a half-written file)."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from ._version import __version__

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("numpy", "scipy", "torch", "transformers", "tokenizers", "safetensors", "cupy", "triton", "datasets")


def git_commit() -> str:
    """``$REFQUANT_GIT_COMMIT`` when set (a copied tree, e.g. the GPU machine's, may carry a stale ``.git``),
    else HEAD of the refquant checkout (``+dirty`` with uncommitted changes), or ``unknown``."""
    if os.environ.get("REFQUANT_GIT_COMMIT"):
        return os.environ["REFQUANT_GIT_COMMIT"]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True,
                                        stderr=subprocess.DEVNULL).strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def portable_path(path: str | os.PathLike) -> str:
    """A path as results record it: never a machine's absolute path.

    Inside the checkout: relative to it (``golden/models/tiny-llama3``); inside the working directory:
    relative to that; a relative path or a Hugging Face id: as given; any other absolute path: its last
    component (``.../Meta-Llama-3-8B``). Strings that are not existing absolute paths pass unchanged.
    """
    text = str(path)
    p = Path(text)
    if not p.is_absolute():
        return text
    p = p.resolve()
    for base in (ROOT, Path.cwd().resolve()):
        try:
            return p.relative_to(base).as_posix() or "."
        except ValueError:
            pass
    return ".../" + p.name


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
        out[name] = getattr(mod, "__version__", "?")
    return out


def device_info(device: str | None = None) -> dict:
    info = {"requested": device, "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def provenance(device: str | None = None) -> dict:
    """Who/what/where produced a result: version, commit, packages, platform, command, time."""
    return {
        "refquant": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device_info(device),
        "command": " ".join([Path(sys.argv[0]).name] + [portable_path(a) for a in sys.argv[1:]]) if sys.argv else "",
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to ``path.tmp`` then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")

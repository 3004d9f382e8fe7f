"""Golden outputs: versioned, hashed reference results that every backend is checked against.

The llm.c pattern: ``tools/make_golden.py`` runs the reference on fixed inputs and writes
``golden/<method>/<case>.npz`` plus ``golden/manifest.json`` (format and generator versions, git
commit, NumPy version, platform fingerprint, sha256 of each file, each case's parameters and
comparison rule, and the parity rule every backend must meet per method). This module reads that
state, re-runs a method on a case, and applies the rules. It is used by ``tests/test_golden.py``,
the backend parity tests and the CLI's GPU preflight.

Calibration inputs are stored as small integers ``X_int`` with ``X = X_int * 2**-x_exp`` and a
number of sequences ``n`` with ``sqrt(2/n)`` a power of two, so that ``H = refquant.hessian(X)`` is
exact in float64 in any summation order: the Hessian, and therefore every input of GPTQ, is
bit-identical on every platform.

Comparison rules (stated per case in the manifest):

* ``exact``: integer outputs (codes, group map, permutation) must be identical everywhere;
* ``bitwise``: float outputs must be identical bit for bit -- on every platform for purely
  elementwise methods (RTN, Hessian of exact inputs); for methods that go through LAPACK/BLAS
  (GPTQ's Cholesky factors and block updates) on the generating platform (same platform
  fingerprint);
* ``cross_platform_rtol``: where the fingerprint differs (another BLAS, NumPy or CPU), float outputs
  must agree within this relative tolerance (a few ulps accumulated), codes still exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backends
from ._version import __version__
from .spec.quantizer import QuantSpec

FORMAT_VERSION = 1


class GoldenError(RuntimeError):
    """The golden state is missing, corrupted or does not match the reference."""


def golden_dir() -> Path:
    """``$REFQUANT_GOLDEN_DIR`` or the ``golden/`` folder of this checkout."""
    env = os.environ.get("REFQUANT_GOLDEN_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "golden"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def platform_fingerprint() -> dict:
    """What decides the last bits of BLAS/LAPACK results: NumPy, its BLAS, the CPU."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    blas = ""
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg.get("Build Dependencies", {}).get("blas", {})
        blas = f"{b.get('name', '')} {b.get('version', '')}".strip()
    except Exception:  # older NumPy without mode="dicts"
        pass
    return {"numpy": np.__version__, "blas": blas, "machine": platform.machine(), "cpu": cpu,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "")}


def same_platform(recorded: dict, current: dict | None = None) -> bool:
    """Whether BLAS/LAPACK results of this process may be compared bit for bit with ``recorded``'s.

    ``OPENBLAS_CORETYPE`` forces an OpenBLAS kernel, which changes the last bits of matrix products
    on the same CPU (measured: the golden AWQ losses move by ~1e-18 under ``Haswell``). Manifests
    written before the fingerprint had that key were generated without it set (verified: they
    reproduce bit for bit with it unset), so a missing key reads as ``""``.
    """
    current = current or platform_fingerprint()
    keys = set(recorded) | set(current)
    return all(recorded.get(k, "") == current.get(k, "") for k in keys)


@dataclass(frozen=True)
class GoldenCase:
    name: str
    method: str
    file: str
    sha256: str
    params: dict
    rule: dict
    input: str = ""
    input_sha256: str = ""
    slow: bool = False
    generator: dict | None = None  # cases added beside an existing record carry their own generator

    def load(self) -> dict:
        """Inputs and expected outputs in one dict, after checking both files' sha256."""
        arrays = _load_checked(self.input, self.input_sha256) if self.input else {}
        arrays.update(_load_checked(self.file, self.sha256))
        return arrays


def _load_checked(rel: str, sha256: str) -> dict:
    path = golden_dir() / rel
    if not path.exists():
        raise GoldenError(f"golden file {path} listed in the manifest is missing; "
                          "restore it from git or regenerate with `python tools/make_golden.py`.")
    digest = sha256_file(path)
    if digest != sha256:
        raise GoldenError(
            f"golden file {rel} is corrupted or was changed by hand: sha256 {digest[:16]}... but the "
            f"manifest says {sha256[:16]}.... Restore it with `git checkout -- golden/` or, if the "
            "reference changed on purpose, regenerate with `python tools/make_golden.py` and commit why."
        )
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_manifest(directory: Path | None = None) -> dict:
    path = (directory or golden_dir()) / "manifest.json"
    if not path.exists():
        raise GoldenError(f"no golden manifest at {path}; run `python tools/make_golden.py`.")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenError(f"golden format version {manifest.get('format_version')} != {FORMAT_VERSION} "
                          "understood by this refquant; regenerate with `python tools/make_golden.py`.")
    return manifest


def cases(method: str | None = None, manifest: dict | None = None) -> list[GoldenCase]:
    manifest = manifest or load_manifest()
    out = [GoldenCase(name=n, **c) for n, c in manifest["cases"].items()]
    return [c for c in out if method is None or c.method == method]


# ---------------------------------------------------------------------------------------------
# Inputs and running a method on a case


def calibration_input(arrays: dict) -> np.ndarray:
    """``X = X_int * 2**-x_exp`` as float64, shape (n_sequences, tokens, in_features)."""
    return arrays["X_int"].astype(np.float64) * 2.0 ** -int(np.asarray(arrays["x_exp"]).item())


def spec_of(params: dict) -> QuantSpec:
    return QuantSpec(**params["spec"])


def outputs_of(qw, to_numpy=np.asarray) -> dict:
    """The arrays a quantized weight is compared on."""
    out = {
        "codes": to_numpy(qw.codes),
        "scale": to_numpy(qw.scale),
        "zero": to_numpy(qw.zero),
        "g_idx": to_numpy(qw.g_idx),
        "W_hat": to_numpy(qw.dequantize()),
    }
    if "perm" in qw.info:
        out["perm"] = to_numpy(qw.info["perm"])
    if "loss" in qw.info:
        out["loss"] = np.asarray(qw.info["loss"], dtype=np.float64)
    return out


@dataclass(frozen=True)
class GoldenSuite:
    """The golden cases of one method (or primitive) and how a backend is run and judged on them.

    A method's wiring unit (``refquant/methods/<name>.py``) declares its suites in ``Method.golden``;
    registering the method registers them here, and ``tools/make_golden.py``, the golden tests and
    the GPU preflight iterate :data:`SUITES`.

    Attributes:
        name: the suite name (``method`` of its cases in the manifest, ``golden/<name>/`` files).
        cases: ``() -> iterable of (shape, case_name, params, slow)``; ``shape`` names an input set of
            ``tools/make_golden.py`` (``llama4096``, ``odd1000``, ``nasty256``).
        rule: ``params -> dict``: how the reference is compared with its own golden outputs
            (``exact`` / ``bitwise`` keys, ``bitwise_everywhere``, ``cross_platform_rtol``, ``text``).
        parity_rule: what every backend must meet (the manifest's ``parity_rules[name]``).
        run: ``(params, arrays, ops, to_device, to_numpy) -> outputs``: run the backend ``ops`` (the
            reference is the numpy backend) on a case's inputs.
        compare: ``(case, arrays, expected, got, parity_rule) -> report`` with ``ok``.
    """

    name: str
    cases: Callable[[], Iterable[tuple[str, str, dict, bool]]]
    rule: Callable[[dict], dict]
    parity_rule: dict
    run: Callable[..., dict]
    compare: Callable[..., dict]


SUITES: dict[str, GoldenSuite] = {}
"""Every golden suite by name, filled when the methods register (``refquant.pipeline.register``)."""


def register_suite(suite: GoldenSuite) -> GoldenSuite:
    if not isinstance(suite, GoldenSuite):
        raise ValueError(f"a golden suite must be a refquant.golden.GoldenSuite; got {type(suite).__name__}.")
    if suite.name in SUITES:
        raise ValueError(f"golden suite {suite.name!r} is registered twice.")
    SUITES[suite.name] = suite
    return suite


def suite_of(name: str) -> GoldenSuite:
    if name not in SUITES:
        raise GoldenError(f"no golden suite {name!r} is registered (registered: {sorted(SUITES)}); the manifest "
                          "names a method whose wiring unit is missing from refquant/methods/.")
    return SUITES[name]


def reference_ops():
    """The reference as a backend object: the numpy backend calls the spec functions and nothing else."""
    return backends.get_backend("numpy")


def run_case(case: GoldenCase, arrays: dict, backend=None, to_device=lambda a: a, to_numpy=np.asarray) -> dict:
    """Run ``case`` on ``backend`` (default: the NumPy reference) with its suite's runner."""
    return suite_of(case.method).run(case.params, arrays, backend or reference_ops(), to_device, to_numpy)


# ---------------------------------------------------------------------------------------------
# SmoothQuant, AWQ, AWEQ: the primitives of one linear, chained as the layer-level methods chain them


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def codes_near_ties(expected: dict, got: dict, x_ref: np.ndarray, tie_eps: float, w_hat_ulps: float,
                     where: np.ndarray | None = None) -> dict:
    """The RTN parity rule on a derived matrix: codes identical except at rounding ties of ``x_ref / scale``
    (off by one at most); where codes agree, W_hat within ``w_hat_ulps`` float32 ulps. ``where``: check
    only these weights."""
    codes_e, codes_g = expected["codes"].astype(np.int64), got["codes"].astype(np.int64)
    same = codes_e == codes_g
    s = expected["scale"][:, expected["g_idx"]]
    tie = rounding_tie(x_ref / s, tie_eps)
    allowed = same | (tie & (np.abs(codes_e - codes_g) <= 1)) | (False if where is None else ~where)
    Wh_e = s * (codes_e - expected["zero"][:, expected["g_idx"]])
    Wh_g = f64(got["W_hat"])
    tol = w_hat_ulps * np.finfo(np.float32).eps * np.maximum(np.abs(Wh_e), s)
    return {"codes_identical_fraction": float(same.mean()), "codes_differing_off_ties": int((~allowed).sum()),
            "w_hat_beyond_fp32_rounding": int(((np.abs(Wh_e - Wh_g) > tol) & same & (True if where is None else where)).sum()),
            "same": same}


# ---------------------------------------------------------------------------------------------
# Reference reproduction


def compare_to_reference(case: GoldenCase, expected: dict, got: dict, manifest: dict | None = None) -> list[str]:
    """Failures (empty if none) of ``got`` against ``expected`` under the case's rule."""
    manifest = manifest or load_manifest()
    same_platform_ = same_platform((case.generator or manifest["generator"])["platform"])
    bitwise_everywhere = case.rule.get("bitwise_everywhere", False)
    rtol = case.rule["cross_platform_rtol"]
    problems = []
    for key in case.rule["exact"]:
        if not np.array_equal(expected[key], got[key]):
            n = int(np.sum(expected[key] != got[key])) if expected[key].shape == got[key].shape else -1
            problems.append(f"{key}: must be identical; {n} element(s) differ")
    for key in case.rule["bitwise"]:
        e, g = expected[key], got[key]
        if e.shape != g.shape:
            problems.append(f"{key}: shape {g.shape} != golden {e.shape}")
        elif bitwise_everywhere or same_platform_:
            if np.ascontiguousarray(e).tobytes() != np.ascontiguousarray(g, dtype=e.dtype).tobytes():
                problems.append(f"{key}: must be bit-identical; max |diff| = {np.max(np.abs(e - g)):.3e}")
        elif not np.allclose(g, e, rtol=rtol, atol=0):
            problems.append(f"{key}: beyond the cross-platform rtol {rtol:g}: max rel diff "
                            f"{np.max(np.abs(e - g) / np.maximum(np.abs(e), 1e-300)):.3e}")
    return problems


# ---------------------------------------------------------------------------------------------
# Backend parity


def proxy_loss(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """GPTQ's layer-wise objective ``tr((W - W_hat) H (W - W_hat)^T)`` in float64."""
    D = np.asarray(W, dtype=np.float64) - np.asarray(W_hat, dtype=np.float64)
    return float(np.einsum("ij,jk,ik->", D, H, D))


def rounding_tie(x: np.ndarray, eps: float) -> np.ndarray:
    """Where ``x`` (a pre-rounding value) lies within ``eps`` of a half-integer."""
    frac = np.abs(x - np.floor(x) - 0.5)
    return frac <= eps * np.maximum(np.abs(x), 1.0)


def compare_backend(case: GoldenCase, arrays: dict, expected: dict, got: dict, rules: dict) -> dict:
    """Apply the case's parity rule (``rules[case.method]``); returns a report with ``ok`` and the measured values."""
    report = {"case": case.name, "method": case.method}
    report.update(suite_of(case.method).compare(case, arrays, expected, got, rules[case.method]))
    return report


def parity_check(backend, methods=None, to_device=lambda a: a, to_numpy=np.asarray, include_slow=False) -> list[dict]:
    """Run ``backend`` on every golden case of ``methods`` and apply the manifest's parity rules."""
    manifest = load_manifest()
    reports = []
    for case in cases(manifest=manifest):
        if (methods is not None and case.method not in methods) or (case.slow and not include_slow):
            continue
        arrays = case.load()
        got = run_case(case, arrays, backend, to_device, to_numpy)
        reports.append(compare_backend(case, arrays, arrays, got, manifest["parity_rules"]))
    return reports


__all__ = [
    "FORMAT_VERSION", "GoldenCase", "GoldenError", "GoldenSuite", "SUITES", "register_suite", "suite_of",
    "golden_dir", "load_manifest", "cases", "run_case", "calibration_input", "spec_of", "outputs_of",
    "codes_near_ties", "rounding_tie", "f64",
    "compare_to_reference", "compare_backend", "parity_check", "platform_fingerprint", "proxy_loss",
    "sha256_file", "__version__",
]

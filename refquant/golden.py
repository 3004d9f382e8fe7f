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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._version import __version__

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
    return {"numpy": np.__version__, "blas": blas, "machine": platform.machine(), "cpu": cpu}


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


def spec_of(params: dict):
    from .quantizer import QuantSpec

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


def run_case(case: GoldenCase, arrays: dict, backend=None, to_device=lambda a: a, to_numpy=np.asarray) -> dict:
    """Run ``case.method`` of ``backend`` (default: the NumPy reference) on the case's inputs."""
    import refquant as rq

    fns = backend or rq
    if case.method == "hessian":
        return {"H": to_numpy(fns.hessian(to_device(calibration_input(arrays))))}
    spec = spec_of(case.params)
    W = to_device(arrays["W"])
    if case.method == "rtn":
        return outputs_of(fns.rtn(W, spec), to_numpy)
    if case.method == "gptq":
        H = rq.hessian(calibration_input(arrays))  # exact on every platform (see module doc)
        return outputs_of(fns.gptq(W, to_device(H), spec, **case.params["kwargs"]), to_numpy)
    raise GoldenError(f"golden case {case.name}: no runner for method {case.method!r}")


# ---------------------------------------------------------------------------------------------
# Reference reproduction


def compare_to_reference(case: GoldenCase, expected: dict, got: dict, manifest: dict | None = None) -> list[str]:
    """Failures (empty if none) of ``got`` against ``expected`` under the case's rule."""
    manifest = manifest or load_manifest()
    same_platform = manifest["generator"]["platform"] == platform_fingerprint()
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
        elif bitwise_everywhere or same_platform:
            if not np.array_equal(e.view(np.uint8), np.ascontiguousarray(g, dtype=e.dtype).view(np.uint8)):
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


def _rounding_tie(x: np.ndarray, eps: float) -> np.ndarray:
    """Where ``x`` (a pre-rounding value) lies within ``eps`` of a half-integer."""
    frac = np.abs(x - np.floor(x) - 0.5)
    return frac <= eps * np.maximum(np.abs(x), 1.0)


def compare_backend(case: GoldenCase, arrays: dict, expected: dict, got: dict, rules: dict) -> dict:
    """Apply a method's backend parity rule; returns a report with ``ok`` and the measured values."""
    rule = rules[case.method]
    report = {"case": case.name, "method": case.method}
    if case.method == "hessian":
        H, Hb = expected["H"], got["H"].astype(np.float64)
        rel = float(np.max(np.abs(Hb - H)) / max(np.max(np.abs(H)), 1e-300))
        report.update(max_rel_err=rel, ok=rel <= rule["max_rel_err"])
        return report
    codes_e, codes_g = expected["codes"].astype(np.int64), got["codes"].astype(np.int64)
    same = codes_e == codes_g
    report["codes_identical_fraction"] = float(same.mean())
    if case.method == "rtn":
        W = arrays["W"]
        s = expected["scale"][:, expected["g_idx"]]
        tie = _rounding_tie(W / s, rule["tie_eps"])
        allowed = same | (tie & (np.abs(codes_e - codes_g) <= 1))
        report["codes_differing_off_ties"] = int((~allowed).sum())
        Wh_e, Wh_g = expected["W_hat"], got["W_hat"].astype(np.float64)
        tol = rule["w_hat_ulps"] * np.finfo(np.float32).eps * np.maximum(np.abs(Wh_e), s)
        bad = (np.abs(Wh_e - Wh_g) > tol) & same
        report["w_hat_beyond_fp32_rounding"] = int(bad.sum())
        report["ok"] = report["codes_differing_off_ties"] == 0 and report["w_hat_beyond_fp32_rounding"] == 0
        return report
    if case.method == "gptq":
        from .hessian import hessian

        H = hessian(calibration_input(arrays))
        loss_e = proxy_loss(arrays["W"], expected["W_hat"], H)
        loss_g = proxy_loss(arrays["W"], got["W_hat"], H)
        report["proxy_loss_rel_diff"] = abs(loss_g - loss_e) / max(loss_e, 1e-300)
        report["ok"] = (report["codes_identical_fraction"] >= rule["min_codes_identical"]
                        and report["proxy_loss_rel_diff"] <= rule["proxy_loss_rtol"])
        return report
    raise GoldenError(f"no parity rule implementation for method {case.method!r}")


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
    "FORMAT_VERSION", "GoldenCase", "GoldenError", "golden_dir", "load_manifest", "cases", "run_case",
    "compare_to_reference", "compare_backend", "parity_check", "platform_fingerprint", "proxy_loss",
    "sha256_file", "__version__",
]

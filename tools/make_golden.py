#!/usr/bin/env python3
"""Write the golden state: run the NumPy reference on fixed seeded inputs, save outputs + manifest.

    python tools/make_golden.py            # add the cases of newly registered suites beside the recorded ones
    python tools/make_golden.py --check    # regenerate every case in memory and report what would change
    python tools/make_golden.py --out DIR  # a fresh golden set in DIR (e.g. to try new cases out)

The cases come from the methods' wiring units (``Method.golden``: ``refquant.golden.GoldenSuite``);
this tool names no method.

Inputs live once per shape in ``golden/inputs/<shape>.npz`` (W in bf16-representable float64;
calibration inputs as int8 ``X_int`` with ``X = X_int * 2**-x_exp`` and 8 sequences, so that the
Hessian is exact in any summation order -- see refquant/golden.py). Each case writes
``golden/<method>/<case>.npz`` with the outputs only, and ``golden/manifest.json`` records the
format and generator versions, git commit, NumPy version, platform fingerprint, sha256 of every
file, every case's parameters and comparison rule, and the backend parity rules per method.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import refquant as rq  # noqa: E402  (registers every method's golden suites)
from refquant import golden  # noqa: E402

GENERATOR_VERSION = "2"  # 2: SmoothQuant / AWQ / AWEQ cases
N_SEQUENCES = 8  # sqrt(2 / 8) = 0.5: the Hessian's scaling is exact
X_EXP = 6
SHAPES = ("llama4096", "odd1000", "nasty256")


def parity_rules() -> dict:
    """Every golden suite's backend parity rule (written by the methods' wiring units)."""
    return {name: suite.parity_rule for name, suite in golden.SUITES.items()}


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float64 values to the nearest bfloat16-representable value (ties to even)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def make_inputs(shape: str) -> dict:
    """Seeded inputs of one golden shape (stored, so the generator's RNG need not be stable)."""
    seed = {"llama4096": 4096, "odd1000": 1000, "nasty256": 256}[shape]
    rng = np.random.default_rng(seed)
    rows, cols, tokens = {"llama4096": (8, 4096, 64), "odd1000": (12, 1000, 48), "nasty256": (32, 256, 32)}[shape]
    W = 0.02 * rng.standard_normal((rows, cols))
    X = 16 * rng.standard_normal((N_SEQUENCES, tokens, cols))
    outlier_cols = rng.choice(cols, size=max(1, cols // 256), replace=False)
    X[..., outlier_cols] *= 6  # LLaMA-like activation outlier channels (clipped to int8 below)
    if shape == "nasty256":
        X[..., [3, 77]] = 0  # dead inputs: zero Hessian diagonal
        W[5] = 0  # an all-zero row
        W[9, 128:] = 0  # an all-zero group
        W[:, 200] *= 50  # a single outlier weight channel
        W[20] = np.sign(W[20]) * np.logspace(-6, 2, cols)  # huge dynamic range within a row
        W[21] = np.abs(W[21])  # a same-sign row
    X_int = np.clip(np.rint(X), -127, 127).astype(np.int8)
    return {"W": bf16_round(W), "X_int": X_int, "x_exp": np.array(X_EXP)}


def case_grid():
    """(suite, shape, name, params, slow) for every golden case of every registered suite."""
    for suite in golden.SUITES.values():
        for shape, name, params, slow in suite.cases():
            if shape not in SHAPES:
                raise ValueError(f"golden suite {suite.name}: case {name} names input shape {shape!r}; known: {SHAPES}.")
            yield suite, shape, name, params, slow


def npz_bytes(arrays: dict) -> bytes:
    """A compressed .npz with fixed zip timestamps, so identical arrays give identical bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            arr = io.BytesIO()
            a = np.asarray(arrays[key])
            np.lib.format.write_array(arr, a if a.flags.c_contiguous else a.copy(order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


def git_commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "refquant"], cwd=ROOT, text=True).strip()
        return sha + ("+dirty(refquant)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def generate(only=None, skip=frozenset(), inputs=None) -> tuple[dict, dict]:
    """Run the reference on every case of the registered suites (``only``: these suites; ``skip``: case
    names left out). Returns ``(files, manifest_cases)``: file bytes by relative path and manifest entries."""
    inputs = inputs or {shape: make_inputs(shape) for shape in SHAPES}
    files = {f"inputs/{shape}.npz": npz_bytes(arrays) for shape, arrays in inputs.items()}
    manifest_cases = {}
    for suite, shape, name, params, slow in case_grid():
        case_name = f"{suite.name}/{name}"
        if (only is not None and suite.name not in only) or case_name in skip:
            continue
        case = golden.GoldenCase(name=case_name, method=suite.name, file=f"{suite.name}/{name}.npz", sha256="",
                                 params=params, rule=suite.rule(params), slow=slow)
        t = time.time()
        out = golden.run_case(case, inputs[shape])
        out.pop("W_hat", None)  # derived: dequantize(codes, scale, zero)
        files[case.file] = npz_bytes(out)
        manifest_cases[case.name] = {"method": suite.name, "file": case.file, "input": f"inputs/{shape}.npz",
                                     "params": params, "rule": case.rule, "slow": slow,
                                     "sha256": hashlib.sha256(files[case.file]).hexdigest(),
                                     "input_sha256": hashlib.sha256(files[f"inputs/{shape}.npz"]).hexdigest()}
        print(f"{case.name:60s} {time.time() - t:6.2f}s", flush=True)
    return files, manifest_cases


def generator_record(t0: float) -> dict:
    return {"tool": "tools/make_golden.py", "version": GENERATOR_VERSION, "refquant": rq.__version__,
            "git_commit": git_commit(), "platform": golden.platform_fingerprint(), "numpy": np.__version__,
            "seconds": round(time.time() - t0, 1)}


def write_files(out: Path, files: dict, manifest: dict) -> None:
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / "manifest.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "golden", help="golden directory (default: golden/)")
    ap.add_argument("--check", action="store_true", help="do not write; report cases whose outputs would change")
    ap.add_argument("--methods", default=None,
                    help="comma-separated golden suites: a partial golden set (for trying cases out in a temp --out; "
                         "refused for golden/ itself)")
    args = ap.parse_args(argv)
    only = set(args.methods.split(",")) if args.methods else None
    if only is not None and (args.check or args.out.resolve() == (ROOT / "golden").resolve()):
        ap.error("--methods writes a partial golden set: use it with a temporary --out, not golden/ or --check.")
    if only is not None and only - set(golden.SUITES):
        ap.error(f"unknown golden suite(s) {sorted(only - set(golden.SUITES))}; registered: {sorted(golden.SUITES)}.")
    t0 = time.time()
    existing = (args.out / "manifest.json").exists() and only is None

    if args.check:
        old = golden.load_manifest(args.out)
        files, manifest_cases = generate()
        changed = [n for n, c in manifest_cases.items() if n in old["cases"] and old["cases"][n]["sha256"] != c["sha256"]]
        missing = sorted(set(manifest_cases) - set(old["cases"]))
        # bytes differ: within the case's comparison rule (last bits of BLAS on another platform) or beyond it?
        beyond = {}
        for name in changed:
            case = next(c for c in golden.cases(manifest=old) if c.name == name)
            with np.load(io.BytesIO(files[case.file]), allow_pickle=False) as z:
                got = {k: z[k] for k in z.files}
            problems = golden.compare_to_reference(case, case.load(), got, old)
            if problems:
                beyond[name] = problems
        same = golden.same_platform(old["generator"]["platform"])
        print(f"{len(changed)} case(s) differ in their bytes ({'same' if same else 'another'} platform than the "
              f"record's); {len(beyond)} beyond their comparison rule"
              + (": " + "; ".join(f"{n}: {p[0]}" for n, p in beyond.items()) if beyond else "")
              + (f"; {len(missing)} new case(s) not yet written: {', '.join(missing)}" if missing else ""))
        return 1 if beyond or (changed and same) else 0

    if not existing:  # a fresh golden set (a temporary --out, or the very first one)
        files, manifest_cases = generate(only)
        manifest = {"format_version": golden.FORMAT_VERSION, "generator": generator_record(t0),
                    "inputs": {"n_sequences": N_SEQUENCES, "x_exp": X_EXP,
                               "note": "X = X_int * 2**-x_exp; H = refquant.hessian(X) is exact in float64 and float32"},
                    "parity_rules": {k: v for k, v in parity_rules().items() if only is None or k in only},
                    "cases": manifest_cases}
        write_files(args.out, files, manifest)
        print(f"wrote {len(files)} files ({sum(len(d) for d in files.values()) / 1e6:.2f} MB) and manifest.json "
              f"in {time.time() - t0:.0f}s")
        return 0

    # An existing golden set is a record: its files and entries never change. New cases are added beside
    # them, each with the generator that wrote it (its platform decides where it must reproduce bit for bit).
    manifest = golden.load_manifest(args.out)
    rules = parity_rules()
    changed_rules = [k for k in manifest["parity_rules"] if k in rules and rules[k] != manifest["parity_rules"][k]]
    if changed_rules:
        print(f"the parity rule(s) of {changed_rules} differ from the recorded ones; a recorded rule never changes. "
              "Give the changed rule a new suite name, or restore the wiring unit's rule.", file=sys.stderr)
        return 1
    files, new_cases = generate(skip=frozenset(manifest["cases"]))
    for name, entry in new_cases.items():
        entry["generator"] = generator_record(t0)
        input_rel = entry["input"]
        recorded = (manifest.get("input_sha256") or {}).get(input_rel) or next(
            (c["input_sha256"] for c in manifest["cases"].values() if c["input"] == input_rel), None)
        if recorded is not None and recorded != entry["input_sha256"]:
            print(f"{input_rel} would change ({entry['input_sha256'][:12]} vs recorded {recorded[:12]}); inputs are "
                  "part of the record.", file=sys.stderr)
            return 1
    files = {rel: data for rel, data in files.items() if not rel.startswith("inputs/")}
    manifest["cases"].update(new_cases)
    manifest["parity_rules"].update({k: v for k, v in rules.items() if k not in manifest["parity_rules"]})
    if not new_cases:
        print(f"{args.out}: all {len(manifest['cases'])} registered cases are recorded; nothing to add "
              "(--check regenerates them in memory and compares).")
        return 0
    write_files(args.out, files, manifest)
    print(f"added {len(new_cases)} case(s) beside the {len(manifest['cases']) - len(new_cases)} recorded ones "
          f"in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Write the golden state: run the NumPy reference on fixed seeded inputs, save outputs + manifest.

    python tools/make_golden.py            # regenerate golden/ (commit the result with the reason)
    python tools/make_golden.py --check    # regenerate in memory and report what would change

Inputs live once per shape in ``golden/inputs/<shape>.npz`` (W in bf16-representable float64;
calibration inputs as int8 ``X_int`` with ``X = X_int * 2**-x_exp`` and 8 sequences, so that the
Hessian is exact in any summation order -- see refquant/golden.py). Each case writes
``golden/<method>/<case>.npz`` with the outputs only, and ``golden/manifest.json`` records the
format and generator versions, git commit, NumPy version, platform fingerprint, sha256 of every
file, every case's parameters and comparison rule, and the backend parity rules per method.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import refquant as rq  # noqa: E402
from refquant import golden  # noqa: E402

GENERATOR_VERSION = "2"  # 2: SmoothQuant / AWQ / AWEQ cases
N_SEQUENCES = 8  # sqrt(2 / 8) = 0.5: the Hessian's scaling is exact
X_EXP = 6

# Backend parity rules (issue: "RTN codes identical except exact rounding ties, dequantized weights
# within float32 rounding; GPTQ >= 99.9% identical codes and proxy loss within 0.5%").
PARITY_RULES = {
    "rtn": {
        "tie_eps": 1e-6,
        "w_hat_ulps": 4,
        "text": "codes identical except where the reference's W/scale lies within tie_eps (relative) of a "
                "rounding tie (then off by at most 1); where codes agree, W_hat within w_hat_ulps float32 "
                "ulps of max(|W_hat|, scale)",
    },
    "gptq": {
        "min_codes_identical": 0.999,
        "chaotic_min_codes_identical": 0.95,
        "proxy_loss_rtol": 0.005,
        "text": "fp32 backend vs fp64 reference: >= 99.9% identical codes and proxy loss "
                "tr((W-W_hat) H (W-W_hat)^T) within 0.5% of the reference's, on the same exact H; on a chaotic "
                "case (the reference itself changes > 0.1% of its codes when H is perturbed by 1e-15, "
                "golden.reference_gptq_flip_fraction) >= 95% identical codes and the same proxy-loss bound",
    },
    "hessian": {
        "max_rel_err": 1e-6,
        "text": "max |H_backend - H_ref| / max |H_ref| <= 1e-6 (the golden inputs make fp32 accumulation exact)",
    },
    # Issue 5: the equalization methods, one linear each (refquant/golden.py EQUALIZATION_RUNNERS).
    "smoothquant": {
        "tie_eps": 1e-6,
        "w_hat_ulps": 4,
        "text": "s bit-identical (the reference formula on the exact channel absmax); codes of W diag(s) (absmax "
                "per channel) and per-token activation codes of X diag(s)^-1 identical except within tie_eps "
                "(relative) of a rounding tie, then off by at most 1; where codes agree, W_hat within w_hat_ulps "
                "float32 ulps of max(|W_hat|, scale)",
    },
    "awq": {
        "loss_rtol": 1e-10,
        "scales_rtol": 1e-12,
        "min_clip_identical": 0.99,
        "clip_err_rtol": 1e-10,
        "tie_eps": 1e-5,
        "w_hat_ulps": 4,
        "text": "the searches run in float64 on every backend: every grid loss within loss_rtol of the reference's; "
                "the chosen ratio is the reference's, or its reference loss is within loss_rtol of the minimum (a "
                "near tie). With the same ratio: scales within scales_rtol; with bit-identical scales >= min_clip_identical of "
                "the (row, group) clip candidates identical; every other one a near tie (reference clip error within "
                "clip_err_rtol of the reference's choice) or, where the scales differ in last bits (a sum in another "
                "order flips exact zero-point ties of single candidates), the reference's choice (or a near tie) on "
                "the backend's own scaled inputs. Final float32 RTN, where the clip agrees: signed codes q - zero identical "
                "except at rounding ties (tie_eps, then off by 1), the zero point equal or, where the reference's "
                "was an exact tie (a symmetric clip gives zero = round(maxq / 2)), off by 1; W_hat within w_hat_ulps "
                "float32 ulps",
    },
    "aweq": {
        "tie_eps": 1e-6,
        "w_hat_ulps": 4,
        "bias_rtol": 1e-4,
        "text": "s bit-identical (eq. (10) on the exact ranges); codes of W diag(s) identical except at rounding ties "
                "(tie_eps), W_hat within w_hat_ulps float32 ulps; for rows whose codes all agree, the bias within "
                "bias_rtol of sum_j |W_hat - W diag(s)|_rj |E[x]_j / s_j| of the reference",
    },
}


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
    """(method, shape, name, params, slow) for every golden case."""
    for shape in ("llama4096", "odd1000", "nasty256"):
        for bits, sym, gs in itertools.product((2, 3, 4, 8), (False, True), (None, 128)):
            spec = {"bits": bits, "group_size": gs, "sym": sym}
            name = f"{shape}_w{bits}_{'sym' if sym else 'asym'}_{'g' + str(gs) if gs else 'perchannel'}"
            yield "rtn", shape, name, {"spec": spec}, False
    # the 4096-wide cases cost seconds each (4096^3 Cholesky work): a covering few run by default
    covering = {(4, False, 128, False), (4, True, 128, True), (3, False, None, True)}
    for shape in ("llama4096", "odd1000", "nasty256"):
        configs = [(b, s, g, a, False) for b, s, g, a in itertools.product((2, 3, 4, 8), (False, True), (None, 128),
                                                                           (False, True))]
        configs += [(4, False, 128, True, True), (3, True, 128, True, True)]  # static groups
        if shape != "llama4096":
            configs += [(3, True, 32, False, False), (3, False, 32, True, False), (4, False, 32, True, True)]
        for bits, sym, gs, act, static in configs:
            spec = {"bits": bits, "group_size": gs, "sym": sym}
            kwargs = {"blocksize": 128, "percdamp": 0.01, "act_order": act, "static_groups": static}
            name = (f"{shape}_w{bits}_{'sym' if sym else 'asym'}_{'g' + str(gs) if gs else 'perchannel'}"
                    f"{'_actorder' if act else ''}{'_static' if static else ''}")
            slow = shape == "llama4096" and (bits, sym, gs, act) not in covering and (bits, static) != (4, True)
            yield "gptq", shape, name, {"spec": spec, "kwargs": kwargs}, slow
    yield "hessian", "nasty256", "nasty256", {}, False
    yield from equalization_case_grid()


def equalization_case_grid():
    """SmoothQuant, AWQ and AWEQ cases: (method, shape, name, params, slow); each runs in well under a second."""
    for shape in ("llama4096", "odd1000", "nasty256"):
        for bits, alpha in ((8, 0.85), (8, 0.5), (6, 0.85), (4, 0.85)):
            params = {"spec": {"bits": bits, "group_size": None, "rule": "absmax"}, "alpha": alpha}
            if shape == "nasty256":
                params["act_bits"] = bits  # activation codes: (8 x 32 x 256) int8 per case
            yield "smoothquant", shape, f"{shape}_w{bits}_alpha{alpha}", params, False
    for shape in ("llama4096", "odd1000", "nasty256"):
        configs = [(4, 128, False, 512), (3, 128, False, 100), (3, None, False, 512)]
        if shape != "nasty256":  # its all-zero row and group make the first-release formula 0/0 (a ValueError)
            configs.append((4, 128, True, 512))
        for bits, gs, duo, n_tok in configs:
            params = {"spec": {"bits": bits, "group_size": gs, "rule": "awq"}, "n_grid": 20, "duo_scaling": duo,
                      "clip_n_grid": 20, "clip_n_sample_tokens": n_tok}
            name = (f"{shape}_w{bits}_{'g' + str(gs) if gs else 'perchannel'}{'_duo' if duo else ''}"
                    f"{'_sample' + str(n_tok) if n_tok != 512 else ''}")
            yield "awq", shape, name, params, False
    for shape in ("llama4096", "odd1000", "nasty256"):
        for bits, per_tensor in ((8, True), (4, True), (3, True), (4, False)):
            spec = ({"bits": bits, "per_tensor": True, "sym": False, "rule": "gptq"} if per_tensor
                    else {"bits": bits, "group_size": 128, "sym": False})
            yield "aweq", shape, f"{shape}_w{bits}_{'pertensor' if per_tensor else 'g128'}", {"spec": spec}, False


def rule_for(method: str, params: dict | None = None) -> dict:
    if method == "smoothquant":
        act = ["act_codes"] if (params or {}).get("act_bits") else []
        return {"exact": ["codes", "g_idx"] + act, "bitwise": ["s", "scale", "zero"] + (["act_step"] if act else []),
                "bitwise_everywhere": False, "cross_platform_rtol": 1e-12,
                "text": "codes identical everywhere; s (x^alpha / w^(1-alpha): libm pow) and the quantizer floats "
                        "bit for bit on the generating platform, within rtol 1e-12 elsewhere"}
    if method == "awq":
        return {"exact": ["best_k", "codes", "g_idx"],
                "bitwise": ["scales", "losses", "clip_max_val", "clip_losses", "scale", "zero"],
                "bitwise_everywhere": False, "cross_platform_rtol": 1e-9,
                "text": "chosen ratio and codes identical everywhere; floats bit for bit on the generating platform, "
                        "within rtol 1e-9 where NumPy/BLAS/CPU differ (matmul order in the losses)"}
    if method == "aweq":
        return {"exact": ["codes", "g_idx"], "bitwise": ["s", "scale", "zero", "bias"], "bitwise_everywhere": False,
                "cross_platform_rtol": 1e-9,
                "text": "codes identical everywhere; floats bit for bit on the generating platform, within rtol 1e-9 "
                        "elsewhere (the bias is a BLAS matrix-vector product)"}
    if method == "rtn":
        return {"exact": ["codes", "g_idx"], "bitwise": ["scale", "zero"], "bitwise_everywhere": True,
                "cross_platform_rtol": 0.0,
                "text": "elementwise IEEE arithmetic only: identical bit for bit on every platform"}
    if method == "hessian":
        return {"exact": [], "bitwise": ["H"], "bitwise_everywhere": True, "cross_platform_rtol": 0.0,
                "text": "exact inputs make every summation order exact: identical bit for bit everywhere"}
    return {"exact": ["codes", "g_idx", "perm"], "bitwise": ["scale", "zero", "loss"], "bitwise_everywhere": False,
            "cross_platform_rtol": 1e-9,
            "text": "codes/g_idx/perm identical everywhere; floats bit for bit on the generating platform, "
                    "within rtol 1e-9 where NumPy/BLAS/CPU differ (LAPACK Cholesky rounding)"}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "golden", help="golden directory (default: golden/)")
    ap.add_argument("--check", action="store_true", help="do not write; report cases whose outputs would change")
    ap.add_argument("--methods", default=None,
                    help="comma-separated methods: a partial golden set (for trying cases out in a temp --out; "
                         "refused for golden/ itself)")
    args = ap.parse_args(argv)
    only = set(args.methods.split(",")) if args.methods else None
    if only is not None and (args.check or args.out.resolve() == (ROOT / "golden").resolve()):
        ap.error("--methods writes a partial golden set: use it with a temporary --out, not golden/ or --check.")

    files: dict[str, bytes] = {}
    manifest_cases = {}
    inputs = {}
    t0 = time.time()
    for shape in ("llama4096", "odd1000", "nasty256"):
        inputs[shape] = make_inputs(shape)
        files[f"inputs/{shape}.npz"] = npz_bytes(inputs[shape])
    for method, shape, name, params, slow in case_grid():
        if only is not None and method not in only:
            continue
        arrays = inputs[shape]
        case = golden.GoldenCase(name=f"{method}/{name}", method=method, file=f"{method}/{name}.npz", sha256="",
                                 params=params, rule=rule_for(method, params), slow=slow)
        t = time.time()
        out = golden.run_case(case, arrays)
        out.pop("W_hat", None)  # derived: dequantize(codes, scale, zero)
        files[case.file] = npz_bytes(out)
        manifest_cases[case.name] = {"method": method, "file": case.file, "input": f"inputs/{shape}.npz",
                                     "params": params, "rule": case.rule, "slow": slow}
        print(f"{case.name:60s} {time.time() - t:6.2f}s", flush=True)

    import hashlib

    for name, c in manifest_cases.items():
        c["sha256"] = hashlib.sha256(files[c["file"]]).hexdigest()
        c["input_sha256"] = hashlib.sha256(files[c["input"]]).hexdigest()
    manifest = {
        "format_version": golden.FORMAT_VERSION,
        "generator": {"tool": "tools/make_golden.py", "version": GENERATOR_VERSION,
                      "refquant": rq.__version__, "git_commit": git_commit(),
                      "platform": golden.platform_fingerprint(), "numpy": np.__version__,
                      "seconds": round(time.time() - t0, 1)},
        "inputs": {"n_sequences": N_SEQUENCES, "x_exp": X_EXP,
                   "note": "X = X_int * 2**-x_exp; H = refquant.hessian(X) is exact in float64 and float32"},
        "parity_rules": PARITY_RULES,
        "cases": manifest_cases,
    }

    if args.check:
        old = golden.load_manifest(args.out)
        changed = [n for n, c in manifest_cases.items() if old["cases"].get(n, {}).get("sha256") != c["sha256"]]
        print(f"{len(changed)} case(s) would change" + (": " + ", ".join(changed) if changed else ""))
        return 1 if changed else 0

    for rel, data in files.items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    tmp = args.out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(args.out / "manifest.json")
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files ({total / 1e6:.2f} MB) and manifest.json in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The golden state is intact and the current reference reproduces every case.

A reference change that moves a golden output fails here; regenerating golden/ with
``python tools/make_golden.py`` is then a deliberate act, committed with the reason.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from refquant import golden

MANIFEST = golden.load_manifest()
CASES = golden.cases(manifest=MANIFEST)


def test_manifest_records_provenance():
    gen = MANIFEST["generator"]
    assert MANIFEST["format_version"] == golden.FORMAT_VERSION
    for key in ("tool", "version", "git_commit", "numpy", "platform", "refquant"):
        assert gen[key], key
    assert set(MANIFEST["parity_rules"]) >= {"rtn", "gptq", "hessian"}
    methods = {c.method for c in CASES}
    assert methods >= {"rtn", "gptq", "hessian"}
    # the configurations the golden set must cover
    specs = [c.params.get("spec", {}) for c in CASES]
    assert {s.get("bits") for s in specs} >= {2, 3, 4, 8}
    assert {s.get("sym") for s in specs} >= {True, False}
    assert {s.get("group_size") for s in specs} >= {None, 128}
    assert {c.params["kwargs"]["act_order"] for c in CASES if c.method == "gptq"} == {True, False}
    assert any(c.input.endswith("llama4096.npz") for c in CASES)


def test_every_file_matches_its_hash():
    for case in CASES:
        case.load()  # raises GoldenError on a missing or corrupted file


def test_corrupted_file_fails_with_a_clear_message(tmp_path, monkeypatch):
    case = next(c for c in CASES if c.method == "rtn")
    dst = tmp_path / "golden"
    shutil.copytree(golden.golden_dir(), dst, ignore=shutil.ignore_patterns("models"))
    path = dst / case.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setenv("REFQUANT_GOLDEN_DIR", str(dst))
    with pytest.raises(golden.GoldenError, match="corrupted.*make_golden"):
        case.load()


def test_a_moved_output_is_detected():
    """The comparison itself can fail: one code changed by one step is reported."""
    case = next(c for c in CASES if c.method == "gptq" and not c.slow)
    arrays = case.load()
    got = {k: arrays[k].copy() for k in case.rule["exact"] + case.rule["bitwise"]}
    got["codes"].flat[7] ^= 1
    got["scale"] = np.nextafter(got["scale"], np.inf)
    problems = golden.compare_to_reference(case, arrays, got, MANIFEST)
    assert any(p.startswith("codes") for p in problems)
    assert any(p.startswith("scale") for p in problems) or not golden.platform_fingerprint() == MANIFEST["generator"]["platform"]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_reference_reproduces_golden(case):
    arrays = case.load()
    got = golden.run_case(case, arrays)
    problems = golden.compare_to_reference(case, arrays, got, MANIFEST)
    assert not problems, f"{case.name} ({case.rule['text']}):\n  " + "\n  ".join(problems)


def test_chaotic_gptq_case_is_judged_by_its_loss_and_a_broken_result_still_fails():
    """On an ill-conditioned case, float64 noise in H flips codes of the reference itself: another correct
    float64 implementation (simulated: the reference on H * (1 + 1e-15 E)) passes; a wrong one does not."""
    import refquant as rq
    from refquant.methods import gptq as gptq_unit

    rules = golden.load_manifest()["parity_rules"]
    for name, chaotic in (("gptq/odd1000_w3_sym_g128_actorder", True), ("gptq/nasty256_w3_sym_g128_actorder", False)):
        (case,) = [c for c in golden.cases("gptq") if c.name == name]
        arrays = case.load()
        H = rq.hessian(golden.calibration_input(arrays))
        flips = gptq_unit.reference_flip_fraction(case.params, arrays, H)
        assert (flips > 1 - rules["gptq"]["min_codes_identical"]) is chaotic, (name, flips)
    (case,) = [c for c in golden.cases("gptq") if c.name == "gptq/odd1000_w3_sym_g128_actorder"]
    arrays = case.load()
    H = rq.hessian(golden.calibration_input(arrays))
    E = np.random.default_rng(7).normal(size=H.shape)
    spec = golden.spec_of(case.params)
    other = golden.outputs_of(rq.gptq(arrays["W"], H * (1 + 1e-15 * (E + E.T) / 2), spec, **case.params["kwargs"]))
    report = golden.compare_backend(case, arrays, arrays, other, rules)
    assert report["ok"] and report["chaotic"] and report["codes_identical_fraction"] < 0.999, report
    rtn = golden.outputs_of(rq.rtn(arrays["W"], spec))  # a backend that forgot the error feedback
    report = golden.compare_backend(case, arrays, arrays, rtn, rules)
    assert not report["ok"], report


def test_awq_scales_off_in_last_bits_are_judged_on_the_backends_own_inputs():
    """A backend whose AWQ scales differ from the reference's in the last bit (GPU: x_mean summed in another
    order) flips exact zero-point ties inside single clip candidates. Its clip choices are then checked by
    the reference on its own scaled inputs -- and a wrong clip choice still fails."""
    from refquant import awq

    rules = golden.load_manifest()["parity_rules"]
    ops = golden.reference_ops()

    class Nudged:
        def __getattr__(self, name):
            return getattr(ops, name)

        def awq_search_scale(self, *a, **kw):
            r = ops.awq_search_scale(*a, **kw)
            s = np.array(r.scales, copy=True)
            s[::3] = np.nextafter(s[::3], np.inf)
            return awq.ScaleSearchResult(scales=s, best_ratio=r.best_ratio, losses=r.losses)

    (case,) = [c for c in golden.cases("awq") if c.name == "awq/llama4096_w4_g128"]
    arrays = case.load()
    got = golden.run_case(case, arrays, Nudged())
    report = golden.compare_backend(case, arrays, arrays, got, rules)
    assert report["ok"] and report["clip_explained_by_backend_scales"] > 0, report
    assert report["clip_identical_fraction"] < rules["awq"]["min_clip_identical"]  # the old rule would fail it
    same = np.isclose(got["clip_max_val"], arrays["clip_max_val"], rtol=1e-12, atol=0)
    r, g = np.argwhere(same)[0]
    wrong = dict(got, clip_max_val=np.array(got["clip_max_val"], copy=True))
    wrong["clip_max_val"][r, g] *= 0.8 if wrong["clip_max_val"][r, g] > 0.5 * arrays["clip_max_val"][r, g] else 1.2
    report = golden.compare_backend(case, arrays, arrays, wrong, rules)
    assert not report["ok"] and report["clip_off_near_ties"] >= 1, report


def test_manifest_parity_rules_are_the_generators():
    """The rules a backend is judged by are the ones tools/make_golden.py writes (a rule edited in one
    place only would silently judge backends differently from a fresh regeneration)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "make_golden.py"
    spec = importlib.util.spec_from_file_location("refquant_make_golden_rules", path)
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    assert MANIFEST["parity_rules"] == mg.parity_rules()

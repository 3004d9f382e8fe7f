"""``refquant study``: recipes, row globbing, resume, the side-by-side table, plots, dry run, provenance.

The end-to-end runs use RTN rows (no calibration to tokenize) with perplexity on one short
WikiText-2 window, so the file stays well under a minute on two cores.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from refquant import pipeline, runs, study
from refquant.data import resolve_data_dir
from refquant.study import recipe as rc
from refquant.study import report, runner
from refquant.study.command import recipes_from

ROOT = Path(__file__).resolve().parent.parent
needs_data = pytest.mark.skipif(resolve_data_dir() is None or not (resolve_data_dir() / "wikitext2" / "wiki.test.raw").exists(),
                                reason="needs REFQUANT_DATA_DIR with wikitext2/wiki.test.raw")


def small_recipe(**row_overrides) -> dict:
    return {
        "schema": 1, "id": "mini", "title": "mini", "paper_model": "LLaMA3-8B",
        "columns": [{"group": "PPL", "metrics": ["wikitext2"]},
                    {"group": "CSQA", "metrics": ["piqa", "zero_shot_avg"]}],
        "defaults": {"evaluations": ["ppl"]},
        "rows": [
            {"name": "FP", "label": "LLaMA3", "method": "fp", "w": 16, "a": 16, "g": None, "paper": {"wikitext2": 6.1}},
            {"name": "RTN-W4-g128", "label": "RTN", "method": "rtn", "w": 4, "g": 128, "paper": {"wikitext2": 8.5}},
            {"name": "RTN-W2-g128", "label": "RTN", "method": "rtn", "w": 2, "g": 128, "paper": {"wikitext2": "1.9e3"}},
            {"name": "Future-W2", "label": "Future", "method": "nosuchmethod", "w": 2, "paper": {"wikitext2": 13.6}},
        ],
    }


# ---------------------------------------------------------------------------------------------- recipes


def test_builtin_recipes_load_with_the_papers_numbers():
    t1, t2, t3 = study.load(1), study.load("table2"), study.load("3")
    assert (len(t1.rows), len(t2.rows), len(t3.rows)) == (35, 22, 4)
    rows = {r.name: r for r in t1.rows}
    assert rows["FP"].paper["wikitext2"] == 6.1 and rows["FP"].paper["zero_shot_avg"] == 68.6
    assert rows["RTN-W3-g128"].paper["c4"] == 110.0  # printed 1.1e2
    assert rows["GPTQ-W2"].paper["ptb"] == 2.7e5 and rows["BiLLM-W1.1-g128"].w == 1.1
    assert rows["SliM-LLM-W2-g128"].paper["wikitext2"] == 39.7 and "zero_shot_avg" not in rows["SliM-LLM-W2-g128"].paper
    assert rows["SmoothQuant-W4A4"].settings() == {"wbits": 4, "group_size": None, "abits": 4, "quantize_bmm_input": True,
                                                   "alpha": 0.85}
    assert {r.name: r.paper["mmlu_avg"] for r in t3.rows} == {"FP": 64.8, "NormalFloat-W4": 62.5, "QLoRA-W4": 56.7,
                                                              "IR-QLoRA-W4": 57.2}
    assert all(set(r.paper) <= set(t.metrics) for t in (t1, t2, t3) for r in t.rows)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
    (lambda d: d["rows"][1].update(bitz=4), r"rows\[1\] \(RTN-W4-g128\): unknown key\(s\) \['bitz'\]"),
    (lambda d: d["rows"][1]["paper"].update(wikitext3=1.0), r"RTN-W4-g128\)\.paper: 'wikitext3' is not one of"),
    (lambda d: d["rows"][2].update(name="RTN-W4-g128"), r"rows\[2\] \(RTN-W4-g128\)\.name: 'RTN-W4-g128' appears twice"),
    (lambda d: d["rows"][1].update(w=0), r"RTN-W4-g128\)\.w: bits per weight must be in"),
    (lambda d: d["rows"][1].update(g="128"), r"RTN-W4-g128\)\.g: group size"),
    (lambda d: d["rows"][1].update(a=12), r"RTN-W4-g128\)\.a: activation bits"),
    (lambda d: d["rows"][1].update(evaluations=["perplexity"]), r"RTN-W4-g128\)\.evaluations: unknown evaluation"),
    (lambda d: d["rows"][1]["paper"].update(wikitext2="lots"), r"RTN-W4-g128\)\.paper\.wikitext2: expected a number"),
    (lambda d: d["rows"][1].pop("method"), r"RTN-W4-g128\): missing key 'method'"),
    (lambda d: d["columns"][0]["metrics"].append("bleu"), r"columns\[0\]\.metrics: unknown metric 'bleu'"),
    (lambda d: d["rows"][1].update(finetune="lora"), r"RTN-W4-g128\)\.finetune: unknown finetuning"),
    (lambda d: d.update(id="a/b"), r"id 'a/b' must be a plain folder name"),
])
def test_recipe_validation_names_the_bad_key(mutate, message):
    d = small_recipe()
    mutate(d)
    with pytest.raises(rc.RecipeError, match=message):
        rc.parse(d, "mine.yaml")


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [unclosed\n")
    with pytest.raises(rc.RecipeError, match="bad.yaml: not valid YAML"):
        study.load(bad)
    with pytest.raises(rc.RecipeError, match="neither a built-in table"):
        study.load(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(small_recipe()))
    assert study.load(good).rows[2].paper["wikitext2"] == 1900.0


def test_row_globbing_keeps_the_fp_row():
    t1 = study.load(1)
    assert [r.name for r in t1.select("GPTQ*")] == ["FP"] + [f"GPTQ-W{b}{g}" for g in ("-g128", "") for b in
                                                           ((4, 3, 2) if g else (8, 4, 3, 2))]
    assert [r.name for r in t1.select("rtn-w4*, awq-w8")] == ["FP", "RTN-W4-g128", "RTN-W4", "AWQ-W8"]
    assert len(t1.select(None)) == 35
    with pytest.raises(rc.RecipeError, match=r"--rows 'GTPQ\*' matches no row; rows: FP, RTN-W4-g128"):
        t1.select("GTPQ*")


def test_recipes_install_with_the_wheel():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"refquant\.study"\s*=\s*\[\s*"recipes/\*\.yaml"\s*\]', text), "package-data entry missing"
    assert sorted(p.name for p in rc.RECIPE_DIR.glob("*.yaml")) == ["table1.yaml", "table2.yaml", "table3.yaml"]


# ---------------------------------------------------------------------------------------------- plan / dry run


def test_unknown_methods_are_reported_not_run():
    rec = rc.parse(small_recipe(), "mine.yaml")
    planned = runner.plan(rec, list(rec.rows), runner.PROTOCOLS["reduced"], backend="torch")
    status = {p.row.name: p.status for p in planned}
    assert status == {"FP": "run", "RTN-W4-g128": "run", "RTN-W2-g128": "run", "Future-W2": "unavailable"}
    assert "'nosuchmethod' is not registered in this build" in planned[3].reason
    assert planned[1].config == pipeline.QuantConfig.of("rtn", wbits=4, group_size=128)
    bad = small_recipe()
    bad["rows"][1]["config"] = {"no_such_option": 1}
    rec = rc.parse(bad, "mine.yaml")
    pl = runner.plan(rec, list(rec.rows), runner.PROTOCOLS["reduced"])[1]
    assert pl.status == "invalid" and "no_such_option" in pl.reason and "RTN-W4-g128" in pl.reason


def test_reduced_protocol_options_apply_only_to_methods_that_have_them():
    rec = study.load(1)
    planned = {p.row.name: p for p in runner.plan(rec, rec.select("AWQ-W4-g128,RTN-W4"), runner.PROTOCOLS["reduced"])}
    assert planned["AWQ-W4-g128"].config.options.awq_search_samples == 4
    full = runner.plan(rec, rec.select("AWQ-W4-g128"), runner.PROTOCOLS["full"])[1]
    assert full.config.options.awq_search_samples is None


def test_dry_run_lists_rows_estimates_and_missing_data(tmp_path):
    rec = rc.parse(small_recipe(), "mine.yaml")
    cfg = runner.StudyRun(out=str(tmp_path), device="cpu", backend="torch", data_dir=str(tmp_path / "nodata"))
    text = study.dry_run(rec, cfg)
    assert re.search(r"RTN-W4-g128\s+run\s+evaluations ppl; ~\d+ s", text)
    assert re.search(r"Future-W2\s+not available in this build: method 'nosuchmethod'", text)
    assert re.search(r"estimated time: ~\d+ s for 3 row\(s\) on cpu \(model: 5\.\dM parameters", text)
    assert "estimated peak memory: ~0." in text
    assert "perplexity wikitext2: missing wikitext2/wiki.test.raw under the data directory" in text
    assert not list(tmp_path.glob("**/*.json"))  # a dry run writes nothing


def test_registry_recipe_covers_methods_beyond_the_paper():
    covered = {r.method for k in ("1", "2", "3") for r in study.load(k).rows}
    extras = study.registry_recipe(exclude=covered)
    assert extras is not None and "aweq" not in covered
    assert {r.method for r in extras.rows} - {"fp"} == set(pipeline.METHODS) - covered
    assert [r.id for r in recipes_from("1,extras")] == ["table1", "extras"]
    eq = study.registry_recipe("equalization")
    assert eq.rows[0].is_fp and {r.method for r in eq.rows[1:]} >= {"smoothquant", "awq", "rtn", "aweq"}


# ---------------------------------------------------------------------------------------------- table and plots


def fake_results(rec):
    ours = {"FP": {"wikitext2": 70.23, "piqa": 57.5, "zero_shot_avg": 36.5},
            "RTN-W4-g128": {"wikitext2": 71.65, "piqa": 60.0, "zero_shot_avg": 37.0},
            "RTN-W2-g128": {"wikitext2": 2345.0, "piqa": 50.0, "zero_shot_avg": 35.0}}
    bits = {"FP": {}, "RTN-W4-g128": {"bits_per_weight": 4.0, "storage_bits_per_weight": 4.25},
            "RTN-W2-g128": {"bits_per_weight": 2.0, "storage_bits_per_weight": 2.25}}
    return [{"row": k, "status": "done", "method": "fp" if k == "FP" else "rtn", "metrics": v,
             "bits": {"paper_w": 16, **bits[k]}} for k, v in ours.items()]


def test_table_puts_the_paper_beside_ours_with_the_difference():
    rec = rc.parse(small_recipe(), "mine.yaml")
    planned = runner.plan(rec, list(rec.rows), runner.PROTOCOLS["reduced"])
    text = report.render_table(rec, planned, fake_results(rec), "golden/models/tiny-llama3", runner.PROTOCOLS["reduced"].to_dict())
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("| Method"))
    assert lines[head] == "| Method | #W | #A | #G | WikiText2 | PIQA | Avg. |"
    assert lines[head - 2] == "| | | | | PPL | CSQA | |"
    assert lines[head + 1] == "| LLaMA3 | 16 | 16 | - | 70.23 / 6.1 (+64.13) | 57.50 / - | 36.50 / - |"
    assert lines[head + 2] == "| RTN | 4 | 16 | 128 | 71.65 / 8.5 (+63.15) | 60.00 / - | 37.00 / - |"
    assert lines[head + 3] == "|  | 2 | 16 | 128 | 2.3E3 / 1.9E3 (+445.00) | 50.00 / - | 35.00 / - |"
    assert lines[head + 4].startswith("| Future | 2 | 16 | - | 13.6 (paper; not available in this build) |")
    assert "- Future-W2: not available in this build: method 'nosuchmethod'" in text
    assert "a quick look, not the paper's protocol" in text and "near chance" in text
    rel = report.relative_table(rec, planned, fake_results(rec))
    assert "| RTN | 4 | 16 | 128 | 1.02 / 1.39 |" in rel


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rec = rc.parse(small_recipe(), "mine.yaml")
    planned = runner.plan(rec, list(rec.rows), runner.PROTOCOLS["reduced"])
    paths = report.make_plots(rec, planned, fake_results(rec), tmp_path)
    assert sorted(p.name for p in paths) == ["frontier.png", "ppl_vs_bits.png", "zero_shot_vs_bits.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_accuracy_metrics_from_the_evaluator_are_percentages():
    res = {"tasks": {"piqa": {"acc": 0.575}, "arc_easy": {"acc": 0.25}}, "zero_shot_average": 0.4125,
           "mmlu": {"acc": 0.3, "categories": {"STEM": {"acc": 0.2}, "humanities": {"acc": 0.4},
                                               "social sciences": {"acc": 0.5}, "other (business, health, misc.)": {"acc": 0.1}}}}
    got = runner._accuracy_metrics(res)
    assert got == pytest.approx({"piqa": 57.5, "arc_easy": 25.0, "zero_shot_avg": 41.25, "mmlu_avg": 30.0,
                                 "mmlu_stem": 20.0, "mmlu_humanities": 40.0, "mmlu_social_sciences": 50.0,
                                 "mmlu_other": 10.0})


# ---------------------------------------------------------------------------------------------- end to end


def _cfg(tmp_path, resume):
    proto = runner.Protocol("test", nsamples=2, calib_seqlen=64, seqlen=128, max_eval_windows=1)
    return runner.StudyRun(model=str(runs.DEFAULT_MODEL), out=str(tmp_path / "results"), device="cpu", backend="torch",
                           resume=resume, protocol=proto, evaluations=("ppl",))


@needs_data
def test_run_saves_rows_with_provenance_and_resume_skips_finished_rows(tmp_path, monkeypatch, capsys):
    rec = rc.parse(small_recipe(), "mine.yaml")
    real = runs.evaluate_ppl

    def crash_on_w2(loaded, *args, **kw):  # the process "dies" on the RTN-W2 row
        if crash_on_w2.calls == 2:
            raise RuntimeError("simulated crash")
        crash_on_w2.calls += 1
        return real(loaded, *args, **kw)

    crash_on_w2.calls = 0
    monkeypatch.setattr(runner.runs, "evaluate_ppl", crash_on_w2)
    out = study.study(rec, _cfg(tmp_path, resume=False), plots=False)
    assert out["failed"] == ["RTN-W2-g128"]
    dest = tmp_path / "results" / "tiny-llama3" / "mini"
    assert json.loads((dest / "rows" / "RTN-W2-g128.json").read_text())["status"] == "failed"
    assert "- RTN-W2-g128: failed: RuntimeError: simulated crash" in (dest / "table.md").read_text()
    assert not (dest / "rows" / "Future-W2.json").exists()

    monkeypatch.setattr(runner.runs, "evaluate_ppl", real)
    capsys.readouterr()
    out = study.study(rec, _cfg(tmp_path, resume=True), plots=False)
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 2 and "RTN-W2-g128: quantizing and evaluating" in printed
    assert "Future-W2: not available in this build" in printed and not out["failed"]
    rows = {r["row"]: r for r in out["rows"]}
    fp, w4, w2 = (rows[k]["metrics"]["wikitext2"] for k in ("FP", "RTN-W4-g128", "RTN-W2-g128"))
    assert fp < w4 < w2

    row_text = (dest / "rows" / "RTN-W4-g128.json").read_text()
    row = json.loads(row_text)
    assert row["refquant_version"] == study.runner.__version__ and row["method_doc"] == "docs/methods/rtn.md"
    assert row["config"] == pipeline.QuantConfig.of("rtn", wbits=4, group_size=128).to_dict()
    assert row["bits"] == {"paper_w": 4.0, "bits_per_weight": 4.0, "storage_bits_per_weight": 4.25,
                           "quantized_weights": row["bits"]["quantized_weights"]}
    assert re.fullmatch(r"[0-9a-f]{64}", row["data_files"]["wikitext2/wiki.test.raw"])
    prov = row["provenance"]
    assert prov["refquant"] and prov["git_commit"] and "torch" in prov["packages"]
    assert row["seeds"]["calibration"] == 0 and row["protocol"]["name"] == "test" and row["wall_s"] > 0
    assert row["peak_memory"]["process_peak_rss_bytes"] > 0 and row["paper"] == {"wikitext2": 8.5}
    assert row["settings"]["model"] == "golden/models/tiny-llama3"
    for text in [row_text] + [p.read_text() for p in dest.rglob("*.json")] + [(dest / "table.md").read_text()]:
        assert str(tmp_path) not in text and str(ROOT) not in text
        assert not re.search(r'"/(?:work|home|root|tmp|Users)/', text), "an absolute path was written"
    summary = json.loads((dest / "table.json").read_text())
    assert {r["row"]: r["status"] for r in summary["rows"]} == {"FP": "done", "RTN-W4-g128": "done",
                                                                "RTN-W2-g128": "done", "Future-W2": "unavailable"}

    # a changed setting reruns the row even with resume
    d2 = small_recipe()
    d2["rows"] = d2["rows"][:2]
    d2["rows"][1]["config"] = {"sym": True}
    capsys.readouterr()
    study.study(rc.parse(d2, "mine.yaml"), _cfg(tmp_path, resume=True), plots=False)
    printed = capsys.readouterr().out
    assert "FP: done earlier" in printed and "RTN-W4-g128: quantizing and evaluating" in printed


def test_cli_study_dry_run(capsys, tmp_path):
    from refquant.cli import main

    assert main(["study", "--table", "1", "--rows", "GPTQ-W4*,QuIP-W2", "--dry-run", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"GPTQ-W4-g128\s+run", out) and re.search(r"GPTQ-W4\s+run", out)
    assert "estimated time" in out and "missing data" in out
    quip = "quip" in pipeline.METHODS
    assert bool(re.search(r"QuIP-W2\s+not available in this build", out)) is not quip


def test_citation_file_names_this_version():
    from refquant._version import __version__

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == __version__
    assert cff["title"].startswith("refquant") and cff["authors"]
    assert any("2404.14047" in str(r.get("identifiers")) for r in cff["references"])


@needs_data
def test_a_row_that_does_not_fit_the_model_is_not_applicable_not_failed(tmp_path):
    """SliM-LLM g128 on the tiny model's 256-wide layers (2 groups; its search needs 4): reported as not
    applicable with the reason, and not counted as a failure (the main job's exit status stays 0)."""
    recipe = small_recipe()
    recipe["rows"] = [recipe["rows"][0], {"name": "SliM-LLM-W3-g128", "label": "SliM-LLM", "method": "slim", "w": 3,
                                          "g": 128, "paper": {"wikitext2": 7.7}}]
    out = study.study(rc.parse(recipe, "mine.yaml"), _cfg(tmp_path, resume=False), plots=False)
    assert out["failed"] == []
    dest = tmp_path / "results" / "tiny-llama3" / "mini"
    row = json.loads((dest / "rows" / "SliM-LLM-W3-g128.json").read_text())
    assert row["status"] == "not applicable" and "at least 4 groups" in row["error"]
    assert "- SliM-LLM-W3-g128: not applicable to this model: SliM-LLM's allocation search needs at least 4 groups" \
        in (dest / "table.md").read_text()

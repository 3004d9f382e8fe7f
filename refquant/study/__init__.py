"""``refquant study``: the LLaMA3 quantization study's tables as data, run on any LLaMA checkpoint.

Reproduces Tables 1-3 of Huang et al. 2024 ("How Good Are Low-bit Quantized LLaMA3 Models?",
arXiv:2404.14047; the SliM-LLM rows of its journal version) on a model of your choice and puts
the paper's numbers beside ours:

* :mod:`refquant.study.recipe`: the recipes (YAML, one per table, in ``refquant/study/recipes/``;
  a user's own file works the same), validated on load;
* :mod:`refquant.study.runner`: plan (rows whose method is not in this build are reported, not
  run), dry-run estimates, the run (quantize, perplexity, zero-shot, MMLU), one JSON per row with
  provenance, ``resume``;
* :mod:`refquant.study.report`: the Markdown table laid out like the paper's (ours / paper
  (difference)) and the plots.

:func:`study` runs one recipe end to end; :func:`dry_run` says what it would do. ``docs/study.md``
is the user's guide.
"""
from __future__ import annotations

import time

from .. import pipeline
from ..provenance import portable_path, provenance, write_json_atomic, write_text_atomic
from . import recipe, report, runner
from .recipe import BUILTIN, Recipe, RecipeError, Row, load
from .runner import PROTOCOLS, Protocol, StudyRun, choose_protocol


def study(rec: Recipe, cfg: StudyRun, rows: str | None = None, plots: bool = True) -> dict:
    """Run ``rec``'s rows (``rows``: globs) and write the row JSONs, ``table.md``, ``table.json`` and the plots."""
    t0 = time.perf_counter()
    selected = rec.select(rows)
    out = runner.run(rec, selected, cfg)
    dest = out["dir"]
    planned, results = out["planned"], out["rows"]
    protocol = cfg.protocol.to_dict()
    table = report.render_table(rec, planned, results, portable_path(cfg.model), protocol)
    rel = report.relative_table(rec, planned, results)
    write_text_atomic(dest / "table.md", table + ("\n\n" + rel if rel else "") + "\n")
    plots = report.make_plots(rec, planned, results, dest) if plots else []
    summary = {
        "recipe": rec.id, "recipe_file": rec.path, "title": rec.title, "model": portable_path(cfg.model),
        "protocol": protocol, "backend": out["backend"], "device": out["device"],
        "rows": [{"row": pl.row.name, "status": pl.status if pl.status != "run" else
                  next((r.get("status") for r in results if r.get("row") == pl.row.name), "not run"),
                  "reason": pl.reason} for pl in planned],
        "failed": out["failed"], "plots": [p.name for p in plots], "seconds": time.perf_counter() - t0,
        "provenance": provenance(out["device"]),
    }
    write_json_atomic(dest / "table.json", summary)
    out.update(table=table, relative=rel, plots=plots, summary=summary)
    return out


def dry_run(rec: Recipe, cfg: StudyRun, rows: str | None = None) -> str:
    """What :func:`study` would run: each row's status, estimated time and memory, missing data."""
    backend = runner.runs.resolve_backend(cfg.backend)
    device = runner.runs.resolve_device(backend, cfg.device)
    planned = runner.plan(rec, rec.select(rows), cfg.protocol, backend)
    if cfg.evaluations is not None:
        for pl in planned:
            pl.evaluations = tuple(e for e in pl.evaluations if e in cfg.evaluations)
    est = runner.estimate(planned, cfg.model, cfg.protocol, device, cfg.dtype)
    per_row = {r["row"]: r for r in est.get("rows", [])}
    dest = runner.out_dir(cfg, rec)
    lines = [f"study {rec.id}: {rec.title}", f"  model {portable_path(cfg.model)} on {device} ({backend}, {cfg.dtype}); "
             f"protocol {cfg.protocol.name}; results in {portable_path(dest)}"]
    for pl in planned:
        done = cfg.resume and (dest / "rows" / f"{pl.row.name}.json").exists()
        if pl.status == "run":
            e = per_row.get(pl.row.name, {})
            what = f"run    {'(finished earlier; --resume skips it if unchanged) ' if done else ''}" \
                   f"evaluations {','.join(pl.evaluations) or 'none'}"
            if e:
                what += f"; ~{_secs(e['total_s'])}"
            for ev, why in pl.skipped_evaluations.items():
                what += f"; {ev} skipped ({why})"
        elif pl.status == "unavailable":
            what = f"not available in this build: {pl.reason}"
        else:
            what = f"config rejected: {pl.reason}"
        lines.append(f"  {pl.row.name:24s} {what}")
    if "total_s" in est:
        lines.append(f"estimated time: ~{_secs(est['total_s'])} for {len(per_row)} row(s) on {est['device']} "
                     f"(model: {est['params']['total'] / 1e6:.1f}M parameters at {est['throughput_flops']:.0e} FLOP/s; "
                     "docs/study.md says how it is estimated)")
        lines.append(f"estimated peak memory: ~{est['peak_memory_bytes'] / 2**30:.2f} GiB "
                     + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est["memory_parts"].items()))
    else:
        lines.append(est.get("note", ""))
    missing = runner.missing_data(planned, cfg.protocol, cfg.data_dir)
    lines.append("missing data: " + ("none" if not missing else ""))
    lines += [f"  - {m}" for m in missing]
    return "\n".join(lines)


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def registry_recipe(suite: str | None = None, exclude: set | None = None) -> Recipe | None:
    """A recipe of the rows the registered methods declare (``Method.study_rows``), without paper values.

    ``suite``: only that suite's rows; else every method whose name is not in ``exclude`` (the methods the
    paper's recipes already cover) with the rows of all its suites (its own method only).
    """
    rows, seen = [], set()
    for name, method in pipeline.METHODS.items():
        if suite is None and name in (exclude or set()):
            continue
        for s in ((suite,) if suite else method.suites):
            for key, label, config in method.study_rows(s):
                if (suite is None and config.method != name) or key in seen:
                    continue
                seen.add(key)
                d = config.to_dict()
                options = d.pop("options") or {}
                d.pop("method")
                spec = config.weight_spec()
                g = None if spec.per_tensor else config.group_size
                rows.append(Row(name=key, label=label, method=config.method, w=config.wbits, a=config.abits, g=g,
                                config={**d, **options}, evaluations=("ppl", "zero_shot")))
    if not rows:
        return None
    fp = Row(name="FP", label="FP", method="fp", w=16, a=16, g=None, evaluations=("ppl", "zero_shot"))
    rid = suite or "extras"
    return Recipe(id=rid, title=f"Rows the methods declare ({suite or 'methods not in the paper tables'}); no paper values",
                  rows=(fp, *rows), source="refquant wiring units (Method.study_rows)",
                  columns=(("PPL (lower is better)", ("wikitext2", "c4", "ptb")),
                           ("CommonSenseQA (higher is better)", ("piqa", "arc_easy", "arc_challenge", "hellaswag",
                                                                 "winogrande", "zero_shot_avg"))),
                  path=f"<registry:{rid}>")


__all__ = ["BUILTIN", "PROTOCOLS", "Protocol", "Recipe", "RecipeError", "Row", "StudyRun", "choose_protocol",
           "dry_run", "load", "recipe", "registry_recipe", "report", "runner", "study"]

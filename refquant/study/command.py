"""The command line of ``refquant study`` (and the study part of ``refquant main``)."""
from __future__ import annotations

import argparse
import fnmatch

from .. import runs
from ..provenance import portable_path
from . import dry_run, load, registry_recipe, study
from .recipe import EVALUATIONS, RecipeError
from .runner import PROTOCOLS, StudyRun, choose_protocol


def _evaluations(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in EVALUATIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown evaluation(s) {bad}; choose from {', '.join(EVALUATIONS)}")
    return names


def add_arguments(p: argparse.ArgumentParser, model_default: str | None = None, out_default: str = "results/study") -> None:
    p.add_argument("--model", default=model_default or str(runs.DEFAULT_MODEL),
                   help="checkpoint directory or Hugging Face id (default: the embedded tiny LLaMA3)")
    p.add_argument("--rows", default=None, help="comma-separated globs over row names, e.g. 'GPTQ*,RTN-W4*' (FP stays in)")
    p.add_argument("--out", default=out_default, help="results go to OUT/<model>/<table>/")
    p.add_argument("--resume", action="store_true", help="skip rows already finished with the same settings")
    p.add_argument("--dry-run", action="store_true", help="list what would run, estimated time/memory, missing data")
    p.add_argument("--full", action="store_true",
                   help="the paper's full protocol (default on a GPU); without it a CPU run uses the reduced preset")
    p.add_argument("--evaluations", type=_evaluations, default=None,
                   help="only these evaluations for every row (ppl,zero_shot,mmlu; default: what each row asks for)")
    p.add_argument("--ppl", default=None, help="only these perplexity data sets, e.g. wikitext2 (default: the table's)")
    p.add_argument("--nsamples", type=int, default=None, help="override: calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=None, help="override: calibration window length")
    p.add_argument("--seqlen", type=int, default=None, help="override: perplexity window length")
    p.add_argument("--max-eval-windows", type=int, default=None, help="override: perplexity windows per data set")
    p.add_argument("--zero-shot-limit", type=int, default=None, help="override: documents per zero-shot task")
    p.add_argument("--mmlu-limit", type=int, default=None, help="override: MMLU questions per subject")
    p.add_argument("--seed", type=int, default=None, help="override: calibration seed")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "torch"])
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="datasets in the layout of ../shared/data (else $REFQUANT_DATA_DIR)")
    p.add_argument("--reference-eval", action="store_true", help="zero-shot/MMLU through the batch-1 reference path")
    p.add_argument("-v", "--verbose", action="store_true")


def config_from_args(a) -> StudyRun:
    backend = runs.resolve_backend(a.backend)
    device = runs.resolve_device(backend, a.device)
    protocol = choose_protocol(device, a.full).with_overrides(
        nsamples=a.nsamples, calib_seqlen=a.calib_seqlen, seqlen=a.seqlen, max_eval_windows=a.max_eval_windows,
        zero_shot_limit=a.zero_shot_limit, mmlu_limit=a.mmlu_limit, seed=a.seed)
    return StudyRun(model=a.model, out=a.out, device=device, backend=backend, dtype=a.dtype, batch_size=a.batch_size,
                    data_dir=a.data_dir, resume=a.resume, protocol=protocol, evaluations=a.evaluations,
                    fast_eval=not a.reference_eval,
                    ppl=tuple(t.strip() for t in a.ppl.split(",") if t.strip()) if a.ppl else None)


def recipes_from(tables: str) -> list:
    """``1``, ``1,3``, a path to a YAML recipe, ``extras`` (the methods' own rows) or ``suite:NAME``."""
    out = []
    for t in [t.strip() for t in str(tables).split(",") if t.strip()]:
        if t == "extras" or t.startswith("suite:"):
            covered = {r.method for k in ("1", "2", "3") for r in load(k).rows}
            rec = registry_recipe(t[6:] if t.startswith("suite:") else None, exclude=covered)
            if rec is None:
                if t.startswith("suite:"):
                    raise RecipeError(f"no registered method has rows in suite {t[6:]!r}.")
                continue
            out.append(rec)
        else:
            out.append(load(t))
    return out


def run_from_args(a, tables: str) -> int:
    """Dry-run or run every recipe in ``tables``; print where the tables and plots are. Exit status 1 if a row failed."""
    cfg = config_from_args(a)
    recipes = recipes_from(tables)
    if a.dry_run:
        for rec in recipes:
            print(dry_run(rec, cfg, a.rows))
            print()
        return 0
    status, written = 0, []
    for rec in recipes:
        rows = a.rows
        if rows:  # with several recipes, a glob need only match in one of them
            pats = [p for p in rows.split(",") if any(fnmatch.fnmatchcase(r.name.lower(), p.strip().lower()) for r in rec.rows)]
            if not pats and len(recipes) > 1:
                continue
            rows = ",".join(pats) if len(recipes) > 1 else rows
        out = study(rec, cfg, rows)
        print()
        print(out["table"])
        if out["relative"]:
            print()
            print(out["relative"])
        if out["failed"]:
            status = 1
        written.append((rec.id, out["dir"], out["plots"]))
    print()
    for rid, dest, plots in written:
        print(f"{rid}: table {portable_path(dest / 'table.md')}, rows {portable_path(dest / 'rows')}/, "
              + (f"plots {', '.join(p.name for p in plots)}" if plots else "no plots (matplotlib is not installed)"))
    return status


__all__ = ["add_arguments", "config_from_args", "recipes_from", "run_from_args", "PROTOCOLS"]

"""The main job: the LLaMA3 study on the embedded tiny model -- every method this build has, every evaluation.

``refquant main`` runs the study's recipes (``refquant/study/recipes``: Table 1 with the journal's
SliM-LLM rows, Table 3) and the rows the registered methods declare beyond the paper
(``extras``: e.g. AWEQ's ablation) on ``golden/models/tiny-llama3``, with perplexity on
WikiText2/C4/PTB, the five zero-shot tasks and MMLU where the table has them. Rows whose method
is not in this build are listed as *not available*. Each table comes out as Markdown with the
paper's value beside ours (and the difference), with one JSON per row (provenance) and plots.

On a CPU the *reduced* protocol runs (``refquant.study.runner.PROTOCOLS["reduced"]``: calibration
16 x 512 tokens, the first perplexity window of 2048 tokens per data set, the first 10
documents per zero-shot task, one MMLU question per subject, AWQ/SliM-LLM searches on 4
sequences); ``--full`` or a GPU runs the paper's protocol. Finished rows are kept: a rerun
continues where a crash stopped (``--fresh`` redoes everything).

``suites()`` / ``suite_rows()`` list the suites the wiring units declare rows in
(``Method.suites`` / ``Method.study_rows``); ``--suite NAME`` runs one of them as a study.
"""
from __future__ import annotations

from . import pipeline, runs
from .study import command

DEFAULT_TABLES = "1,3,extras"

NEAR_CHANCE = ("Note: the embedded model has about 5M parameters; on PIQA, ARC, HellaSwag, WinoGrande and MMLU it "
               "sits near chance (50/25/25/25/50/25 %), so those columns show the pipeline working, not which method "
               "is better. Its perplexities do separate the methods. Compare each side with its own FP row (the "
               "'x FP' table).")


def run_main(a) -> int:
    """``refquant main``: the study's tables on the embedded model (see the module docstring)."""
    a.resume = not getattr(a, "fresh", False)
    tables = f"suite:{a.suite}" if getattr(a, "suite", None) else a.table
    if not a.dry_run:
        print(NEAR_CHANCE, flush=True)
    status = command.run_from_args(a, tables)
    if not a.dry_run:
        print()
        print(NEAR_CHANCE)
    return status


def add_arguments(p) -> None:
    """The arguments of ``refquant main`` (``refquant study``'s, with the embedded model and every table)."""
    p.add_argument("--table", default=DEFAULT_TABLES,
                   help="recipes to run: 1, 2, 3, a YAML path, 'extras' (the methods' rows beyond the paper); "
                        f"default {DEFAULT_TABLES}")
    p.add_argument("--suite", default=None, choices=suites(),
                   help="instead of the tables: the rows the methods declare for this suite (Method.study_rows)")
    p.add_argument("--fresh", action="store_true", help="rerun rows that finished earlier (default: keep them)")
    command.add_arguments(p, model_default=str(runs.DEFAULT_MODEL))


def suites() -> list[str]:
    """Every suite a registered method has rows in (``Method.suites``)."""
    return sorted({s for m in pipeline.METHODS.values() for s in m.suites})


def suite_rows(a, suite: str) -> list:
    """The rows ``(key, label, QuantConfig)`` of ``suite``: methods in registry order, each with its own rows."""
    rows = [row for m in pipeline.METHODS.values() for row in m.study_rows(suite)]
    if not rows:
        raise ValueError(f"no method has rows in suite {suite!r}; suites: {', '.join(suites())}.")
    return rows

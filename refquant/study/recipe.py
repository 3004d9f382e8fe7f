"""Study recipes: the rows of a table as data (YAML), validated on load.

A recipe is one table of the study (``refquant/study/recipes/table1.yaml`` ...) or a user's own
grid. Its keys (the full description with an example is ``docs/study.md``):

* ``schema`` (1), ``id`` (a name for the output folder), ``title``, ``source``, ``paper_model``;
* ``columns``: a list of ``{group, metrics}``: the table's column groups in the paper's order;
  a metric is one of :data:`METRICS`;
* ``defaults``: ``evaluations`` (a subset of ``ppl``, ``zero_shot``, ``mmlu``) for every row;
* ``rows``: each ``{name, label, method, w, a, g, config, finetune, evaluations, paper}``:

  - ``name``: unique, the row's id (``--rows`` globs match it; the result file is ``<name>.json``);
  - ``label``: the Method column as the paper prints it; ``method``: a registered method
    (``refquant.pipeline.METHODS``) or ``fp`` (the unquantized model);
  - ``w``, ``a``, ``g``: the #W, #A and #G columns (``g: null`` = per channel). They also set
    the shared quantizer settings ``wbits`` (when ``w`` is an integer), ``abits`` and
    ``group_size``; ``config`` adds or overrides settings and method options (the flat keywords
    of ``QuantConfig.of``);
  - ``finetune``: a finetuning recipe run after quantization (QLoRA, IR-QLoRA);
  - ``paper``: the published values, metric -> number (``1.1e2`` and ``"1.1e2"`` both work).

Validation errors (:class:`RecipeError`) name the file, the row and the bad key.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

try:
    import yaml
except ImportError:  # PyYAML comes with transformers; the numpy-only install reads no recipes
    yaml = None

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
BUILTIN = {"1": "table1.yaml", "2": "table2.yaml", "3": "table3.yaml"}

PPL_METRICS = ("wikitext2", "c4", "ptb", "c4-new", "ptb-new")
ZERO_SHOT_METRICS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "zero_shot_avg")
MMLU_METRICS = ("mmlu_humanities", "mmlu_stem", "mmlu_social_sciences", "mmlu_other", "mmlu_avg")
METRICS = PPL_METRICS + ZERO_SHOT_METRICS + MMLU_METRICS
"""Every metric a recipe may name: perplexities, zero-shot accuracies (%), MMLU accuracies (%)."""
HIGHER_IS_BETTER = set(ZERO_SHOT_METRICS) | set(MMLU_METRICS)
EVALUATIONS = ("ppl", "zero_shot", "mmlu")
EVALUATION_OF = {**{m: "ppl" for m in PPL_METRICS}, **{m: "zero_shot" for m in ZERO_SHOT_METRICS},
                 **{m: "mmlu" for m in MMLU_METRICS}}
FINETUNES = ("qlora", "irqlora")

_TOP_KEYS = {"schema", "id", "title", "source", "paper_model", "columns", "defaults", "rows"}
_ROW_KEYS = {"name", "label", "method", "w", "a", "g", "config", "finetune", "evaluations", "paper", "note"}
_SHARED = {"wbits", "group_size", "sym", "abits", "act_mode", "quantize_bmm_input"}


class RecipeError(ValueError):
    """A recipe that does not follow the schema; the message names the file, row and key."""


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    method: str
    w: float
    a: int
    g: int | None
    config: dict = field(default_factory=dict)
    finetune: str | None = None
    evaluations: tuple[str, ...] = ("ppl",)
    paper: dict = field(default_factory=dict)
    note: str | None = None

    @property
    def is_fp(self) -> bool:
        return self.method == "fp"

    def settings(self) -> dict:
        """The flat keywords of ``QuantConfig.of`` for this row: the #W/#A/#G columns, then ``config``."""
        out: dict = {}
        if float(self.w).is_integer():
            out["wbits"] = int(self.w)
        out["group_size"] = self.g
        if self.a != 16:
            out["abits"] = self.a
        out.update(self.config)
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "method": self.method, "w": self.w, "a": self.a, "g": self.g,
                "config": dict(self.config), "finetune": self.finetune, "evaluations": list(self.evaluations),
                "paper": dict(self.paper)}


@dataclass(frozen=True)
class Recipe:
    id: str
    title: str
    rows: tuple[Row, ...]
    columns: tuple[tuple[str, tuple[str, ...]], ...]
    source: str = ""
    paper_model: str = ""
    path: str = ""

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for _, ms in self.columns for m in ms)

    def select(self, patterns: str | list[str] | None) -> list[Row]:
        """The rows whose name matches one of the globs (``'GPTQ*,RTN-W4*'``; case-insensitive).

        The FP row stays in (it is every table's reference). A pattern that matches nothing is an
        error listing the row names.
        """
        if not patterns:
            return list(self.rows)
        if isinstance(patterns, str):
            patterns = [p.strip() for p in patterns.split(",") if p.strip()]
        chosen = set()
        for p in patterns:
            hits = {r.name for r in self.rows if fnmatch.fnmatchcase(r.name.lower(), p.lower())}
            if not hits:
                raise RecipeError(f"{self.id}: --rows {p!r} matches no row; rows: {', '.join(r.name for r in self.rows)}.")
            chosen |= hits
        return [r for r in self.rows if r.name in chosen or r.is_fp]


def _number(value, where: str) -> float:
    if isinstance(value, bool):
        raise RecipeError(f"{where}: expected a number, got {value!r}.")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise RecipeError(f"{where}: expected a number (e.g. 6.1 or 1.1e2), got {value!r}.")


def _unknown(keys, allowed, where: str) -> None:
    bad = sorted(set(keys) - set(allowed))
    if bad:
        raise RecipeError(f"{where}: unknown key(s) {bad}; allowed: {sorted(allowed)}.")


def parse(obj, where: str = "<recipe>") -> Recipe:
    """Validate a recipe (the parsed YAML) and return it; :class:`RecipeError` names the bad key."""
    if not isinstance(obj, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with keys {sorted(_TOP_KEYS)}; got {type(obj).__name__}.")
    _unknown(obj, _TOP_KEYS, where)
    for key in ("id", "rows", "columns"):
        if key not in obj:
            raise RecipeError(f"{where}: missing key {key!r}.")
    if obj.get("schema", 1) != 1:
        raise RecipeError(f"{where}: schema {obj['schema']!r} is not supported (this refquant reads schema 1).")
    rid = str(obj["id"])
    if not rid or any(c in rid for c in "/\\ ") or rid.startswith("."):
        raise RecipeError(f"{where}: id {rid!r} must be a plain folder name (no slashes or spaces).")
    columns = []
    if not isinstance(obj["columns"], list) or not obj["columns"]:
        raise RecipeError(f"{where}: columns must be a non-empty list of {{group, metrics}}.")
    for i, col in enumerate(obj["columns"]):
        cw = f"{where}: columns[{i}]"
        if not isinstance(col, dict):
            raise RecipeError(f"{cw}: expected {{group, metrics}}, got {col!r}.")
        _unknown(col, {"group", "metrics"}, cw)
        metrics = col.get("metrics")
        if not isinstance(metrics, list) or not metrics:
            raise RecipeError(f"{cw}.metrics: a non-empty list of metrics ({', '.join(METRICS)}).")
        for m in metrics:
            if m not in METRICS:
                raise RecipeError(f"{cw}.metrics: unknown metric {m!r}; known: {', '.join(METRICS)}.")
        columns.append((str(col.get("group", "")), tuple(metrics)))
    all_metrics = {m for _, ms in columns for m in ms}
    defaults = obj.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"{where}: defaults must be a mapping.")
    _unknown(defaults, {"evaluations"}, f"{where}: defaults")
    default_evals = _evaluations(defaults.get("evaluations", ["ppl"]), f"{where}: defaults.evaluations")
    if not isinstance(obj["rows"], list) or not obj["rows"]:
        raise RecipeError(f"{where}: rows must be a non-empty list.")
    rows, names = [], set()
    for i, r in enumerate(obj["rows"]):
        rw = f"{where}: rows[{i}]" + (f" ({r.get('name')})" if isinstance(r, dict) and r.get("name") else "")
        if not isinstance(r, dict):
            raise RecipeError(f"{rw}: a row is a mapping, got {r!r}.")
        _unknown(r, _ROW_KEYS, rw)
        for key in ("name", "method", "w"):
            if key not in r:
                raise RecipeError(f"{rw}: missing key {key!r}.")
        name = str(r["name"])
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise RecipeError(f"{rw}.name: {name!r} must be a plain file name (no slashes or spaces).")
        if name in names:
            raise RecipeError(f"{rw}.name: {name!r} appears twice.")
        names.add(name)
        method = str(r["method"])
        w = _number(r["w"], f"{rw}.w")
        if not 0 < w <= 32:
            raise RecipeError(f"{rw}.w: bits per weight must be in (0, 32], got {w}.")
        a = r.get("a", 16)
        if isinstance(a, bool) or not isinstance(a, int) or not (a == 16 or 2 <= a <= 8):
            raise RecipeError(f"{rw}.a: activation bits must be 16 or 2..8, got {a!r}.")
        g = r.get("g")
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise RecipeError(f"{rw}.g: group size must be a positive integer or null (per channel), got {g!r}.")
        config = r.get("config") or {}
        if not isinstance(config, dict):
            raise RecipeError(f"{rw}.config: a mapping of settings, got {config!r}.")
        if method == "fp" and (config or r.get("finetune")):
            raise RecipeError(f"{rw}: the fp row takes no config or finetune.")
        finetune = r.get("finetune")
        if finetune is not None and finetune not in FINETUNES:
            raise RecipeError(f"{rw}.finetune: unknown finetuning {finetune!r}; known: {', '.join(FINETUNES)}.")
        evals = _evaluations(r["evaluations"], f"{rw}.evaluations") if "evaluations" in r else default_evals
        paper = r.get("paper") or {}
        if not isinstance(paper, dict):
            raise RecipeError(f"{rw}.paper: a mapping metric -> value, got {paper!r}.")
        values = {}
        for k, v in paper.items():
            if k not in all_metrics:
                raise RecipeError(f"{rw}.paper: {k!r} is not one of this recipe's columns ({', '.join(sorted(all_metrics))}).")
            values[k] = _number(v, f"{rw}.paper.{k}")
            if not math.isfinite(values[k]):
                raise RecipeError(f"{rw}.paper.{k}: {v!r} is not finite.")
        rows.append(Row(name=name, label=str(r.get("label", method)), method=method, w=w, a=a, g=g, config=dict(config),
                        finetune=finetune, evaluations=evals, paper=values, note=r.get("note")))
    if sum(r.is_fp for r in rows) > 1:
        raise RecipeError(f"{where}: more than one row has method fp.")
    return Recipe(id=rid, title=str(obj.get("title", rid)), rows=tuple(rows), columns=tuple(columns),
                  source=str(obj.get("source", "")), paper_model=str(obj.get("paper_model", "")), path=where)


def _evaluations(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: a non-empty list of {', '.join(EVALUATIONS)}.")
    for e in value:
        if e not in EVALUATIONS:
            raise RecipeError(f"{where}: unknown evaluation {e!r}; known: {', '.join(EVALUATIONS)}.")
    return tuple(value)


def load(table: str | Path) -> Recipe:
    """A built-in table (``1``, ``2``, ``3``, ``table1``) or the path of a YAML recipe, validated."""
    key = str(table)
    if key.startswith("table") and key[5:] in BUILTIN:
        key = key[5:]
    if key in BUILTIN:
        path, shown = RECIPE_DIR / BUILTIN[key], f"refquant/study/recipes/{BUILTIN[key]}"
    else:
        path = Path(table)
        shown = path.name
        if not path.is_file():
            raise RecipeError(f"--table {table!r}: neither a built-in table ({', '.join(BUILTIN)}) nor a recipe file.")
    if yaml is None:
        raise ImportError("reading study recipes needs PyYAML: pip install pyyaml (it comes with transformers).")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{shown}: not valid YAML: {e}") from None
    return parse(obj, shown)

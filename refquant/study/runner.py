"""Running a study recipe: plan the rows, estimate them (``--dry-run``), quantize, evaluate, save.

Per row: load the model, quantize it with :func:`refquant.runs.quantize` (calibration windows
drawn once per study), evaluate perplexity (:func:`refquant.runs.evaluate_ppl`), the zero-shot
tasks and MMLU (:func:`refquant.evaluate.evaluate`) as the row asks, and write
``<out>/<recipe id>/rows/<row>.json`` at once with provenance. ``resume`` skips rows whose file
holds a finished result made with the same settings; a row whose method is not registered in
this build is reported as *not available*, never run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import data, pipeline, runs
from .._version import __version__
from ..provenance import ROOT, portable_path, provenance, write_json_atomic
from ..spec._checks import NotApplicable
from ..spec.progress import progress
from . import recipe as rc

try:  # zero-shot and MMLU need torch and transformers
    from .. import evaluate
except ImportError:
    evaluate = None

try:
    from .. import finetune
except ImportError:
    finetune = None

try:
    from transformers import AutoTokenizer
except ImportError:
    AutoTokenizer = None

try:
    import resource
except ImportError:  # not on Windows
    resource = None

log = logging.getLogger("refquant")

ROW_SCHEMA = "refquant.study.row/1"

# Tokenized calibration windows and evaluation streams, shared by the recipes of one process (the main job runs
# several): keyed by model, data directory and protocol; the evaluation cache by (name, seqlen) inside runs.
_STATE: dict = {}
_TOKENS: dict = {}


# ---------------------------------------------------------------------------------------------
# Protocols


@dataclass(frozen=True)
class Protocol:
    """The evaluation and calibration protocol of a study run (recorded in every row).

    ``full`` is the paper's: calibration on 128 WikiText-2 windows of 2048 tokens (seed 0),
    perplexity on every 2048-token window, every zero-shot document, MMLU 5-shot on every
    question. ``reduced`` (the default on a CPU) keeps the same windows and prompts but fewer of
    them, and gives AWQ a smaller search budget; its numbers are a quick look, not the protocol.
    """

    name: str = "full"
    calib: str = "wikitext2"
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    seqlen: int = 2048
    max_eval_windows: int | None = None
    zero_shot_limit: int | None = None
    mmlu_limit: int | None = None
    method_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, **kw) -> "Protocol":
        kw = {k: v for k, v in kw.items() if v is not None}
        if not kw:
            return self
        return dataclasses.replace(self, name=self.name + "+overrides", **kw)


PROTOCOLS = {
    "full": Protocol("full"),
    "reduced": Protocol("reduced", nsamples=16, calib_seqlen=512, max_eval_windows=1, zero_shot_limit=10,
                        mmlu_limit=1, method_options={"awq": {"awq_search_samples": 4}, "slim": {"slim_search_samples": 4}}),
}


def choose_protocol(device: str, full: bool) -> Protocol:
    """``full`` with ``--full`` or on a GPU, else ``reduced``."""
    return PROTOCOLS["full"] if full or str(device).startswith("cuda") else PROTOCOLS["reduced"]


# ---------------------------------------------------------------------------------------------
# Plan: which rows run, which cannot, with what config


@dataclass
class Planned:
    row: rc.Row
    status: str  # "run" | "unavailable" | "invalid"
    reason: str = ""
    config: pipeline.QuantConfig | None = None
    evaluations: tuple[str, ...] = ()
    skipped_evaluations: dict = field(default_factory=dict)


def _finetune_runner(kind: str):
    """The finetuning entry point of ``refquant.finetune`` for a row's ``finetune``, or None."""
    if finetune is None:
        return None
    return getattr(finetune, "study_finetune", None)


def plan(recipe: rc.Recipe, rows: list[rc.Row], protocol: Protocol, backend: str = "torch") -> list[Planned]:
    """Decide for every row: runnable (with its QuantConfig), unavailable in this build, or invalid."""
    out = []
    for row in rows:
        evals, skipped = [], {}
        for e in row.evaluations:
            if e in ("zero_shot", "mmlu") and (evaluate is None or backend != "torch"):
                skipped[e] = ("the numpy backend has no zero-shot/MMLU path (use --backend torch)" if evaluate is not None
                              else "refquant.evaluate is not available in this build (needs torch and transformers)")
            else:
                evals.append(e)
        if row.is_fp:
            out.append(Planned(row, "run", evaluations=tuple(evals), skipped_evaluations=skipped))
            continue
        if row.method not in pipeline.METHODS:
            out.append(Planned(row, "unavailable", f"method {row.method!r} is not registered in this build "
                               f"(registered: {', '.join(sorted(pipeline.METHODS))})"))
            continue
        if row.finetune and _finetune_runner(row.finetune) is None:
            out.append(Planned(row, "unavailable", f"finetuning {row.finetune!r} is not available in this build "
                               "(refquant.finetune has no study entry point)"))
            continue
        settings = row.settings()
        extra = protocol.method_options.get(row.method, {})
        own = {f.name for f in dataclasses.fields(pipeline.METHODS[row.method].Options)}
        settings.update({k: v for k, v in extra.items() if k in own and k not in row.config})
        try:
            config = pipeline.QuantConfig.of(row.method, **settings)
        except (ValueError, TypeError) as e:
            out.append(Planned(row, "invalid", f"{recipe.path}: row {row.name}: {e}"))
            continue
        out.append(Planned(row, "run", config=config, evaluations=tuple(evals), skipped_evaluations=skipped))
    return out


# ---------------------------------------------------------------------------------------------
# Dry run: estimates


COST = {"fp": 0.0, "rtn": 0.0, "gptq": 3.0, "awq": 40.0, "smoothquant": 1.0, "aweq": 1.0, "slim": 12.0,
        "quip": 4.0, "pbllm": 3.0, "billm": 10.0, "dbllm": 6.0, "nf4": 0.0, "icq": 1.0}
"""Quantization cost of a method in calibration forward passes (measured on the tiny model with the
reduced protocol against the cost of one forward pass over the calibration windows; RTN/NF4 need no
calibration). A method not listed counts as 5."""

THROUGHPUT = {"cpu": 3e10, "cuda": 1.5e14}
"""Effective float32 FLOP/s of one forward pass (2 x parameters per token): measured on the tiny model on
2 CPU cores (about 3e10); an H200 in bfloat16 / tf32 on 8B-class models (about 1.5e14)."""


def count_params(model: str | os.PathLike) -> dict:
    """Parameters of a checkpoint from its config.json (decoder linears, embeddings, total)."""
    cfg_path = Path(model) / "config.json"
    if not cfg_path.exists():
        return {}
    c = json.loads(cfg_path.read_text())
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or h // heads
    linear = L * (h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * i)
    embed = v * h * (1 if c.get("tie_word_embeddings") else 2)
    return {"linear": linear, "embedding": embed, "total": linear + embed, "layers": L, "hidden": h, "intermediate": i}


def estimate(planned: list[Planned], model, protocol: Protocol, device: str, dtype: str = "float32") -> dict:
    """Time and memory per row from a simple model (``docs/study.md``): forward cost = 2 x parameters x
    tokens / :data:`THROUGHPUT`; quantization = :data:`COST` forward passes over the calibration
    tokens; evaluation = one pass over the perplexity tokens, about 4 choices x 100 tokens per zero-shot
    document, one 600-token prompt per MMLU question. Memory: the weights in ``dtype``, plus one
    layer's calibration activations and its Hessians (float64 for the numpy backend)."""
    p = count_params(model)
    if not p:
        return {"note": f"{model}: no local config.json, so no estimate (the hub id is resolved only when run)."}
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    flops_tok = 2 * p["total"]
    calib_tokens = protocol.nsamples * protocol.calib_seqlen
    n_windows = {"wikitext2": 140, "c4": 256, "ptb": 40}  # windows of 2048 tokens of the LLaMA-3 tokenizer
    ppl_windows = sum(min(n, protocol.max_eval_windows or n) for n in n_windows.values())
    ppl_tokens = ppl_windows * protocol.seqlen
    zs_docs = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267}
    zs_tokens = sum(min(n, protocol.zero_shot_limit or n) for n in zs_docs.values()) * 4 * 100
    mmlu_tokens = (57 * protocol.mmlu_limit if protocol.mmlu_limit else 14042) * 600
    bytes_per = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    rows, total = [], 0.0
    for pl in planned:
        if pl.status != "run":
            continue
        cost = COST.get(pl.row.method, 5.0)
        t_quant = cost * flops_tok * calib_tokens / THROUGHPUT[dev]
        t_eval = flops_tok * (ppl_tokens * ("ppl" in pl.evaluations) + zs_tokens * ("zero_shot" in pl.evaluations)
                              + mmlu_tokens * ("mmlu" in pl.evaluations)) / THROUGHPUT[dev]
        rows.append({"row": pl.row.name, "quantize_s": t_quant, "evaluate_s": t_eval, "total_s": t_quant + t_eval})
        total += t_quant + t_eval
    weights = p["total"] * bytes_per
    acts = protocol.nsamples * protocol.calib_seqlen * max(p["hidden"], p["intermediate"]) * 4 * 2
    hessians = 4 * max(p["hidden"], p["intermediate"]) ** 2 * 8
    return {"params": p, "device": dev, "throughput_flops": THROUGHPUT[dev], "rows": rows, "total_s": total,
            "peak_memory_bytes": weights + acts + hessians,
            "memory_parts": {"weights": weights, "calibration_activations": acts, "hessians": hessians}}


def missing_data(planned: list[Planned], protocol: Protocol, data_dir=None) -> list[str]:
    """The evaluation and calibration files the runnable rows need that the data directory lacks."""
    root = data.resolve_data_dir(data_dir)
    need_ppl = sorted({m for pl in planned if pl.status == "run" and "ppl" in pl.evaluations for m in rc.PPL_METRICS
                       if m in _ppl_columns(pl)})
    wanted: list[tuple[str, list[str]]] = []
    if any(pl.status == "run" and pl.config is not None and pl.config.method_obj.needs_calibration for pl in planned):
        wanted.append((f"calibration {protocol.calib} train", _candidates(protocol.calib, "train")))
    split = {"wikitext2": "test", "ptb": "validation", "c4": "validation", "ptb-new": "test", "c4-new": "validation"}
    for name in need_ppl:
        base = name.replace("-new", "")
        wanted.append((f"perplexity {name}", _candidates(base, split[name])))
    if evaluate is not None:
        tasks = set()
        for pl in planned:
            if pl.status == "run":
                if "zero_shot" in pl.evaluations:
                    tasks |= set(evaluate.ZERO_SHOT)
                if "mmlu" in pl.evaluations:
                    tasks.add("mmlu")
        for t in sorted(tasks):
            wanted.append((f"{t}", list(evaluate.TASK_FILES.get(t, ()))))
    out = []
    for what, rels in wanted:
        if root is None:
            out.append(f"{what}: no data directory (--data-dir or ${data.ENV_DATA_DIR}); expected {', '.join(rels)}")
            continue
        ok = any((root / r).exists() for r in rels) if what.startswith(("calibration", "perplexity")) else \
            all((root / r).exists() for r in rels)
        if not ok:
            out.append(f"{what}: missing {' or '.join(rels)} under the data directory")
    return out


def _ppl_columns(pl: Planned) -> set:
    return set(pl.row.paper) | set(rc.PPL_METRICS[:3])


def _candidates(dataset: str, split: str) -> list[str]:
    return [c.relpath for c in data._LOCAL.get((dataset, split), ())]


# ---------------------------------------------------------------------------------------------
# Provenance helpers


_HASHES: dict = {}


def file_hash(path: Path) -> str:
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def data_files(infos: list[dict], data_dir=None) -> dict:
    """``{relative path: sha256}`` of the local files behind the data infos (relative to the data directory)."""
    root = data.resolve_data_dir(data_dir)
    out = {}
    for info in infos:
        src = (info or {}).get("source")
        if not src or src == "huggingface" or root is None:
            continue
        p = root / src
        if p.is_file():
            out[src] = file_hash(p)
    return out


def method_doc(method: str) -> str | None:
    """The method's documentation page (relative to the checkout) that the run followed."""
    if method == "fp":
        return None
    p = ROOT / "docs" / "methods" / f"{method}.md"
    return f"docs/methods/{method}.md" if p.exists() else None


def _peak_rss_bytes() -> int | None:
    if resource is None:
        return None
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def model_slug(model: str) -> str:
    """The folder name of a model's results: the checkpoint folder's name, or the hub id with '--'."""
    p = Path(str(model))
    if p.exists():
        return p.resolve().name
    return str(model).strip("/").replace("/", "--")


def bit_accounting(result: pipeline.QuantizationResult | None) -> dict:
    """Mean ``bits_per_weight`` (the paper's convention) and ``storage_bits`` per weight over every quantized linear."""
    if result is None:
        return {}
    n = bpw = sb = 0.0
    for layer in result.layers:
        for qw in layer.quantized.values():
            k = float(qw.numel)
            n += k
            bpw += qw.bits_per_weight * k
            sb += float(qw.storage_bits)
    if not n:
        return {}
    return {"bits_per_weight": bpw / n, "storage_bits_per_weight": sb / n, "quantized_weights": int(n)}


# ---------------------------------------------------------------------------------------------
# Run


@dataclass
class StudyRun:
    """What :func:`run` needs besides the recipe."""

    model: str = str(runs.DEFAULT_MODEL)
    out: str = "results/study"
    device: str = "auto"
    backend: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8
    data_dir: str | None = None
    resume: bool = False
    protocol: Protocol = PROTOCOLS["reduced"]
    evaluations: tuple[str, ...] | None = None  # restrict every row to these evaluations
    fast_eval: bool = True
    ppl: tuple[str, ...] | None = None  # only these perplexity data sets (default: the recipe's columns)


def out_dir(cfg: StudyRun, recipe: rc.Recipe) -> Path:
    return Path(cfg.out) / model_slug(cfg.model) / recipe.id


def row_settings(cfg: StudyRun, recipe: rc.Recipe, pl: Planned, backend: str) -> dict:
    """Everything that decides a row's numbers: a finished row is reused on --resume only if these match."""
    return {"model": portable_path(cfg.model), "backend": backend, "dtype": cfg.dtype, "recipe": recipe.id,
            "row": pl.row.to_dict(), "config": pl.config.to_dict() if pl.config else None,
            "evaluations": list(pl.evaluations), "protocol": cfg.protocol.to_dict(), "fast_eval": cfg.fast_eval,
            "ppl": list(cfg.ppl) if cfg.ppl else None}


def run(recipe: rc.Recipe, rows: list[rc.Row], cfg: StudyRun) -> dict:
    """Run the rows; returns ``{"rows": [row results], "dir": Path, "failed": [...], ...}``."""
    backend = runs.resolve_backend(cfg.backend)
    device = runs.resolve_device(backend, cfg.device)
    planned = plan(recipe, rows, cfg.protocol, backend)
    if cfg.evaluations is not None:
        for pl in planned:
            pl.evaluations = tuple(e for e in pl.evaluations if e in cfg.evaluations)
    dest = out_dir(cfg, recipe)
    (dest / "rows").mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    key = (str(cfg.model), str(cfg.data_dir), cfg.protocol.calib, cfg.protocol.nsamples, cfg.protocol.calib_seqlen,
           cfg.protocol.seed)
    state = _STATE.setdefault(key, {"calib": None, "tokens": _TOKENS.setdefault((str(cfg.model), str(cfg.data_dir), cfg.protocol.seqlen), {}),
                                    "tokenizer": None})
    todo = [pl for pl in planned if pl.status == "run"]
    for pl in planned:
        if pl.status != "run":
            print(f"[study {recipe.id}] {pl.row.name}: not available in this build -- {pl.reason}", flush=True)
    for pl in progress(todo, total=len(todo), desc=f"study {recipe.id} rows"):
        path = dest / "rows" / f"{pl.row.name}.json"
        settings = json.loads(json.dumps(row_settings(cfg, recipe, pl, backend), default=str))
        if cfg.resume and path.exists():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("status") == "done" and saved.get("settings") == settings:
                print(f"[study {recipe.id}] {pl.row.name}: done earlier ({portable_path(path)})", flush=True)
                results.append(saved)
                continue
        print(f"[study {recipe.id}] {pl.row.name}: quantizing and evaluating ...", flush=True)
        try:
            row = run_row(recipe, pl, cfg, backend, device, settings, state)
        except (KeyboardInterrupt, SystemExit):
            raise
        except NotApplicable as e:  # the row's settings do not fit this model's shapes: reported, not a failure
            row = {"schema": ROW_SCHEMA, "status": "not applicable", "row": pl.row.name, "error": str(e),
                   "settings": settings, "refquant_version": __version__}
            print(f"[study {recipe.id}] {pl.row.name}: not applicable to this model -- {e}", flush=True)
        except Exception as e:  # noqa: BLE001 -- a failed row is reported and the study goes on
            log.exception("row %s failed", pl.row.name)
            row = {"schema": ROW_SCHEMA, "status": "failed", "row": pl.row.name, "error": f"{type(e).__name__}: {e}",
                   "settings": settings, "refquant_version": __version__}
            failed.append(pl.row.name)
            print(f"[study {recipe.id}] {pl.row.name}: FAILED -- {type(e).__name__}: {e}", flush=True)
        write_json_atomic(path, row)
        results.append(row)
        if row.get("status") == "done":
            print(f"[study {recipe.id}] {pl.row.name}: " + "  ".join(
                f"{k} {v:.4g}" for k, v in row["metrics"].items() if v is not None), flush=True)
    return {"recipe": recipe, "planned": planned, "rows": results, "failed": failed, "dir": dest,
            "backend": backend, "device": device}


def run_row(recipe: rc.Recipe, pl: Planned, cfg: StudyRun, backend: str, device: str, settings: dict,
            state: dict) -> dict:
    proto = cfg.protocol
    t0 = time.perf_counter()
    torch = runs.torch_pipeline.torch if (backend == "torch" and runs.torch_pipeline is not None) else None
    cuda = torch is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    loaded = runs.load(cfg.model, backend, device, cfg.dtype)
    timings, result, calib_info = {}, None, None
    if pl.config is not None:
        calib_ids = None
        if pl.config.method_obj.needs_calibration:
            if state["calib"] is None:
                t = time.perf_counter()
                state["calib"] = data.get_calibration(proto.calib, loaded.encode, nsamples=proto.nsamples,
                                                      seqlen=proto.calib_seqlen, seed=proto.seed, data_dir=cfg.data_dir)
                timings["calibration_data"] = time.perf_counter() - t
            calib_ids, calib_info = state["calib"]
        t = time.perf_counter()
        result = runs.quantize(loaded, pl.config, calib_ids, batch_size=cfg.batch_size)
        timings["quantize"] = time.perf_counter() - t
        timings.update({f"quantize.{k}": v for k, v in result.timings.items()})
        if pl.row.finetune:
            t = time.perf_counter()
            info = _finetune_runner(pl.row.finetune)(loaded, pl.row.finetune, data_dir=cfg.data_dir, protocol=proto.name)
            timings["finetune"] = time.perf_counter() - t
            settings = dict(settings, finetune_info=info)
    metrics: dict = {}
    evaluation: dict = {}
    data_infos = [calib_info] if calib_info else []
    if "ppl" in pl.evaluations:
        datasets = [m for m in rc.PPL_METRICS if m in recipe.metrics and (cfg.ppl is None or m in cfg.ppl)]
        t = time.perf_counter()
        ppl = runs.evaluate_ppl(loaded, datasets, proto.seqlen, cfg.data_dir, proto.max_eval_windows, cfg.batch_size,
                                token_cache=state["tokens"])
        timings["perplexity"] = time.perf_counter() - t
        for k, v in ppl.items():
            metrics[k] = v["ppl"]
            data_infos.append(v["data"])
        evaluation["perplexity"] = {k: {"ppl": v["ppl"], "n_windows": v["n_windows"], "seqlen": v["seqlen"],
                                        "data": v["data"]} for k, v in ppl.items()}
    for kind in ("zero_shot", "mmlu"):
        if kind not in pl.evaluations:
            continue
        if state["tokenizer"] is None:
            state["tokenizer"] = AutoTokenizer.from_pretrained(str(cfg.model))
        tasks = list(evaluate.ZERO_SHOT) if kind == "zero_shot" else ["mmlu"]
        limit = proto.zero_shot_limit if kind == "zero_shot" else proto.mmlu_limit
        t = time.perf_counter()
        res = evaluate.evaluate(loaded.model, state["tokenizer"], tasks, limit=limit, device=device,
                                data_dir=cfg.data_dir, fast=cfg.fast_eval, act_quant=loaded.act_quant or None,
                                progress=True)
        timings[kind] = time.perf_counter() - t
        evaluation[kind] = res
        metrics.update(_accuracy_metrics(res))
    peak = {"process_peak_rss_bytes": _peak_rss_bytes()}
    if cuda:
        peak["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return {
        "schema": ROW_SCHEMA, "status": "done", "table": recipe.id, "recipe": recipe.path, "row": pl.row.name,
        "label": pl.row.label, "method": pl.row.method, "w": pl.row.w, "a": pl.row.a, "g": pl.row.g,
        "finetune": pl.row.finetune, "config": pl.config.to_dict() if pl.config else None,
        "settings": settings, "metrics": metrics, "paper": dict(pl.row.paper),
        "bits": {"paper_w": pl.row.w, **bit_accounting(result)},
        "skipped_evaluations": pl.skipped_evaluations, "evaluation": evaluation,
        "timings_s": timings, "wall_s": time.perf_counter() - t0, "peak_memory": peak,
        "seeds": {"calibration": proto.seed, "c4_eval": 0},
        "protocol": proto.to_dict(), "calibration": calib_info,
        "data_files": data_files(data_infos, cfg.data_dir),
        "refquant_version": __version__, "method_doc": method_doc(pl.row.method),
        "provenance": provenance(device),
    }


def _accuracy_metrics(res: dict) -> dict:
    """Percentages like the paper's tables from :func:`refquant.evaluate.evaluate`'s result."""
    out = {}
    for task, r in (res.get("tasks") or {}).items():
        if task in rc.ZERO_SHOT_METRICS:
            out[task] = 100.0 * r["acc"]
    if res.get("tasks") and res.get("zero_shot_average") is not None:
        out["zero_shot_avg"] = 100.0 * res["zero_shot_average"]
    mmlu = res.get("mmlu")
    if mmlu:
        if mmlu.get("acc") is not None:
            out["mmlu_avg"] = 100.0 * mmlu["acc"]
        for cat, v in (mmlu.get("categories") or {}).items():
            key = cat.lower()
            name = ("mmlu_stem" if key.startswith("stem") else "mmlu_humanities" if key.startswith("human") else
                    "mmlu_social_sciences" if key.startswith("social") else "mmlu_other" if key.startswith("other") else None)
            if name and v.get("acc") is not None:
                out[name] = 100.0 * v["acc"]
    return out

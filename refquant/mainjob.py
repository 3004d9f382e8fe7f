"""The main job: the study's Table 1 comparison on the embedded tiny LLaMA3 model.

Suite ``table1`` (default): RTN and GPTQ at 4/3/2 bits with group size 128 (asymmetric, as the
LLaMA runs of the originals). Suite ``equalization``: SmoothQuant W8A8/W6A6/W4A4, AWQ vs RTN at
w4/w3 g128, and AWEQ's ablation (plain, +BC, +AWE, AWE+BC; the paper's Table 4) at W8A8 and at
INT4/INT3 weight-only per tensor. Calibrated on 128 WikiText-2 windows of 2048 tokens (seed 0),
perplexity on WikiText-2, C4 and PTB with the GPTQ protocol, against the unquantized model. Every
finished row is saved at once (``rows/<row>.json``), so a rerun after a crash continues where it
stopped; the table is written as Markdown and JSON with provenance.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import data, pipeline, runs
from .provenance import portable_path, provenance, write_json_atomic, write_text_atomic

COLUMNS = {"wikitext2": "WikiText2", "c4": "C4", "ptb": "PTB", "c4-new": "C4 (new)", "ptb-new": "PTB (new)"}


def fmt(x: float) -> str:
    """Like the study's tables: 2 decimals, scientific from 1000 on."""
    return f"{x:.1E}".replace("E+0", "E").replace("E+", "E") if x >= 1000 else f"{x:.2f}"


def run_main(a) -> int:
    out = Path(a.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    backend = runs.resolve_backend(a.backend)
    rows = [("fp", "FP", None)] + suite_rows(a, getattr(a, "suite", "table1"))
    t0 = time.perf_counter()
    base = runs.load(a.model, backend, a.device, a.dtype)
    calib_ids, calib_info = data.get_calibration("wikitext2", base.encode, nsamples=a.nsamples, seqlen=a.seqlen,
                                                 seed=a.seed, data_dir=a.data_dir)
    token_cache: dict = {}
    results = []
    for key, label, config in rows:
        settings = {"model": portable_path(a.model), "backend": backend, "dtype": base.dtype if backend == "numpy" else a.dtype,
                    "config": config.to_dict() if config else None, "ppl": a.ppl, "seqlen": a.seqlen,
                    "max_eval_windows": a.max_eval_windows, "nsamples": a.nsamples, "seed": a.seed}
        path = out / "rows" / f"{key}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                print(f"[main] {key}: done earlier ({path})", flush=True)
                results.append(dict(saved, label=label))
                continue
        print(f"[main] {key}: quantizing and evaluating ...", flush=True)
        t = time.perf_counter()
        loaded = runs.load(a.model, backend, a.device, a.dtype)
        timings = {}
        if config is not None:
            res = runs.quantize(loaded, config, calib_ids if config.method_obj.needs_calibration else None,
                                batch_size=a.batch_size)
            timings = res.timings
        ppl = runs.evaluate_ppl(loaded, a.ppl, a.seqlen, a.data_dir, a.max_eval_windows, a.batch_size,
                                token_cache=token_cache)
        row = {"key": key, "label": label, "wbits": config.wbits if config else 16,
               "abits": config.abits if config else 16,
               "group_size": config.group_size if config else None,
               "per_tensor": bool(config and config.weight_spec().per_tensor), "settings": settings,
               "perplexity": {k: v["ppl"] for k, v in ppl.items()},
               "windows": {k: v["n_windows"] for k, v in ppl.items()},
               "data": {k: v["data"] for k, v in ppl.items()}, "timings_s": timings,
               "seconds": time.perf_counter() - t, "provenance": provenance(loaded.device)}
        write_json_atomic(path, row)
        results.append(row)
        print(f"[main] {key}: " + "  ".join(f"{COLUMNS.get(k, k)} {fmt(v)}" for k, v in row["perplexity"].items()),
              flush=True)

    table = render_table(results, a.ppl)
    notes = notes_for(calib_info, results, a)
    write_text_atomic(out / "table.md", table + "\n\n" + notes + "\n")
    write_json_atomic(out / "table.json", {"rows": results, "calibration": calib_info, "provenance": provenance(base.device),
                                           "seconds": time.perf_counter() - t0})
    print()
    print(table)
    print()
    print(notes)
    print(f"\nwritten: {out / 'table.md'} and {out / 'table.json'}")
    return 0


def table1_rows(a) -> list:
    """``--methods`` at ``--bits`` with ``--group-size`` (the study's Table 1 rows; RTN and GPTQ by default)."""
    bits = [int(b) for b in a.bits.split(",")]
    methods = [m.strip() for m in a.methods.split(",")]
    return [(f"{m}_w{b}_g{a.group_size or 'row'}", m.upper(), pipeline.QuantConfig.of(m, wbits=b, group_size=a.group_size))
            for m in methods for b in bits]


def suites() -> list[str]:
    """``table1`` and every suite a registered method has rows in (``Method.suites``)."""
    return ["table1"] + sorted({s for m in pipeline.METHODS.values() for s in m.suites})


def suite_rows(a, suite: str) -> list:
    """The rows ``(key, label, QuantConfig)`` of ``suite``: methods in registry order, each with its own rows."""
    if suite == "table1":
        return table1_rows(a)
    rows = [row for m in pipeline.METHODS.values() for row in m.study_rows(suite)]
    if not rows:
        raise ValueError(f"no method has rows in suite {suite!r}; suites: {', '.join(suites())}.")
    return rows


def render_table(results: list[dict], datasets: list[str]) -> str:
    head = "| Method | #W | #A | #G | " + " | ".join(COLUMNS.get(d, d) for d in datasets) + " |"
    sep = "|---|---|---|---|" + "---|" * len(datasets)
    lines = [head, sep]
    for r in results:
        name = "tiny-llama3 (bf16 weights)" if r["key"] == "fp" else r["label"]
        per_tensor = r.get("per_tensor", False)
        g = "tensor" if per_tensor else "-" if r["group_size"] is None else str(r["group_size"])
        vals = " | ".join(fmt(r["perplexity"][d]) for d in datasets)
        lines.append(f"| {name} | {r['wbits']} | {r['abits']} | {g} | {vals} |")
    return "\n".join(lines)


def notes_for(calib_info: dict, results: list[dict], a) -> str:
    d0 = results[0]["data"]
    lines = [
        f"Perplexity (lower is better), GPTQ-lineage protocol: non-overlapping {a.seqlen}-token windows, "
        "exp of the mean window loss, tail dropped."
        + (f" Only the first {a.max_eval_windows} windows per dataset." if a.max_eval_windows else ""),
        f"Calibration: {calib_info.get('nsamples')} x {calib_info.get('seqlen')} tokens, seed {calib_info.get('seed')}, "
        f"{calib_info.get('data_variant') or calib_info.get('variant')}.",
    ]
    for name, info in d0.items():
        caveat = f" Caveat: {info['caveat']}" if info.get("caveat") else ""
        lines.append(f"{COLUMNS.get(name, name)}: {info.get('data_variant') or info.get('variant')} "
                     f"({results[0]['windows'][name]} windows).{caveat}")
    return "\n".join("- " + line for line in lines)

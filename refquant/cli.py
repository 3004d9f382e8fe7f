"""The ``refquant`` command line: quantize, eval, main (the study table on the embedded model), preflight.

    refquant quantize --model PATH_OR_ID --method gptq --wbits 4 --group-size 128 --out DIR
    refquant eval --model DIR --ppl wikitext2,c4,ptb
    refquant eval --model DIR --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,mmlu --limit 100
    refquant main --data-dir ../shared/data
    refquant preflight --backend torch --methods gptq
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
from pathlib import Path

from . import backends, data, distill, golden, mainjob, pipeline, runs
from .provenance import portable_path, write_json_atomic, write_text_atomic

try:  # zero-shot / MMLU evaluation needs torch and transformers (refquant/evaluate.py)
    from . import evaluate
except ImportError:
    evaluate = None
from .study import command as study_command

try:  # `refquant export` (real quantized checkpoints) needs torch and safetensors (refquant/export.py)
    from . import export as export_cmd
except ImportError:
    export_cmd = None

try:  # QLoRA / IR-QLoRA finetuning needs torch, transformers and peft (refquant/finetune.py)
    from . import finetune
except ImportError:
    finetune = None

log = logging.getLogger("refquant")


def _group_size(text: str):
    g = int(text)
    return None if g <= 0 else g


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "torch"],
                   help="numpy: the float64 reference; torch: transformers on CPU/GPU (default: torch if installed)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="torch model/activation dtype (numpy is always float64)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward call (torch)")
    p.add_argument("--data-dir", default=None, help="datasets in the layout of ../shared/data (else $REFQUANT_DATA_DIR)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("-v", "--verbose", action="store_true")


def _add_method(p: argparse.ArgumentParser) -> None:
    """``--method``, the shared quantizer settings, and every registered method's options.

    The method options are generated from each wiring unit's ``Options`` dataclass
    (``refquant/methods/<name>.py``): ``--field-name`` with the field's type and default, or for a
    bool ``--field-name`` (default False) / ``--no-field-name`` (default True); the field's
    ``metadata["help"]`` is the help text. Nothing here names a method.
    """
    p.add_argument("--method", default="gptq", choices=sorted(pipeline.METHODS))
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=_group_size, default=128, help="columns per group; -1 = per output channel")
    p.add_argument("--sym", action="store_true", help="the original's symmetric grid (zero = (maxq+1)/2)")
    p.add_argument("--abits", type=int, default=16, help="activation bits (16 = not quantized)")
    p.add_argument("--act-mode", default="per_token", choices=list(pipeline.ACT_MODES))
    p.add_argument("--quantize-bmm-input", action="store_true", help="also per-token quantize the q/k/v outputs")
    seen: dict[str, tuple] = {}
    for name, method in sorted(pipeline.METHODS.items()):
        group = p.add_argument_group(f"{name} options")
        hints = typing.get_type_hints(method.Options)
        for f in dataclasses.fields(method.Options):
            key = (hints[f.name], f.default)
            if f.name in seen:
                if seen[f.name] != key:
                    raise ValueError(f"option {f.name!r} of {name} clashes with another method's option of the same "
                                     f"name ({seen[f.name]} vs {key}); rename one of them.")
                continue
            seen[f.name] = key
            _add_option(group, f, hints[f.name], name)


def _add_option(group, f: dataclasses.Field, hint, method: str) -> None:
    help_text = f"{f.metadata.get('help', '')} ({method})".strip()
    flag = "--" + f.name.replace("_", "-")
    if hint is bool:
        if f.default:
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", default=True,
                               help="turn off: " + help_text)
        else:
            group.add_argument(flag, dest=f.name, action="store_true", default=False, help=help_text)
        return
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if args else hint
    if kind not in (int, float, str):
        raise ValueError(f"{method} option {f.name}: type {hint} has no command-line form (use bool, int, float, str "
                         "or an Optional of those).")
    group.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"{help_text}; default {f.default}",
                       metavar=f.metadata.get("metavar"))


def config_from_args(a) -> pipeline.QuantConfig:
    """The :class:`~refquant.pipeline.QuantConfig` of the parsed arguments.

    An option of another method set to a non-default value is an error (it would be silently ignored).
    """
    method = pipeline.METHODS[a.method]
    own = {f.name for f in dataclasses.fields(method.Options)}
    for other_name, other in pipeline.METHODS.items():
        for f in dataclasses.fields(other.Options):
            if f.name not in own and getattr(a, f.name, f.default) != f.default:
                raise ValueError(f"--{f.name.replace('_', '-')} is an option of {other_name}; it has no effect with "
                                 f"--method {a.method}.")
    options = method.Options(**{name: getattr(a, name) for name in own})
    return pipeline.QuantConfig(method=a.method, wbits=a.wbits, group_size=a.group_size, sym=a.sym, abits=a.abits,
                                act_mode=a.act_mode, quantize_bmm_input=a.quantize_bmm_input, options=options)


def _datasets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in data.EVAL_NAMES:
            raise argparse.ArgumentTypeError(f"unknown dataset {n!r}; choose from {', '.join(data.EVAL_NAMES)}")
    return names


# ---------------------------------------------------------------------------------------------


def preflight(backend: str, device: str, methods: list[str]) -> list[dict]:
    """Golden parity check of ``backend`` on ``device`` on the golden suites ``methods`` rely on."""
    be = backends.get_backend(backend)
    unknown = [m for m in methods if m not in pipeline.METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {sorted(pipeline.METHODS)}.")
    wanted = sorted({s for m in methods for s in pipeline.METHODS[m].preflight})
    to_device = (lambda a: be.asarray(a, device=device)) if backend == "torch" else (lambda a: a)
    return golden.parity_check(be, methods=wanted, to_device=to_device, to_numpy=be.to_numpy)


def _run_preflight(a, config, loaded) -> dict | None:
    if loaded.backend != "torch" or not str(loaded.device).startswith("cuda"):
        return None
    t = time.perf_counter()
    reports = preflight("torch", loaded.device, [config.method])
    failed = [r for r in reports if not r["ok"]]
    summary = {"cases": len(reports), "failed": failed, "seconds": time.perf_counter() - t}
    if failed and not a.no_preflight:
        raise SystemExit(f"preflight: the torch backend fails {len(failed)} golden parity case(s) on {loaded.device}: "
                         f"{[r['case'] for r in failed][:5]}; refusing to run (pass --no-preflight to override).")
    return summary


def cmd_quantize(a) -> int:
    config = config_from_args(a)
    out = Path(a.out)
    timings = {}
    t = time.perf_counter()
    loaded = runs.load(a.model, a.backend, a.device, a.dtype)
    timings["load"] = time.perf_counter() - t
    pre = _run_preflight(a, config, loaded)
    calib_ids, calib_info = None, None
    if pipeline.METHODS[config.method].needs_calibration:
        t = time.perf_counter()
        calib_ids, calib_info = data.get_calibration(a.calib, loaded.encode, nsamples=a.nsamples, seqlen=a.seqlen,
                                                     seed=a.seed, data_dir=a.data_dir, variant=a.calib_variant)
        timings["calibration_data"] = time.perf_counter() - t
    t = time.perf_counter()
    result = runs.quantize(loaded, config, calib_ids, out_dir=out, resume=a.resume, run_info=_calib_signature(calib_info),
                           batch_size=a.batch_size)
    timings["quantize"] = time.perf_counter() - t
    timings.update({f"quantize.{k}": v for k, v in result.timings.items()})
    t = time.perf_counter()
    runs.save_model(loaded, out, {"config": config.to_dict(), "act_quant": result_act_quant(loaded),
                                  "source_model": portable_path(loaded.source)})
    timings["save"] = time.perf_counter() - t
    ppl = runs.evaluate_ppl(loaded, a.eval, a.seqlen, a.data_dir, a.max_eval_windows, a.batch_size) if a.eval else {}
    record = runs.results_record(loaded, config, result, calib_info, ppl, timings)
    record["preflight"] = pre
    write_json_atomic(out / "results.json", record)
    print(json.dumps({"out": str(out), "perplexity": {k: v["ppl"] for k, v in ppl.items()}, "timings_s": timings},
                     indent=1, default=str))
    return 0


def result_act_quant(loaded) -> dict:
    return runs.act_quant_to_json(loaded.act_quant)


def _calib_signature(info: dict | None) -> dict:
    if not info:
        return {}
    return {k: info.get(k) for k in ("dataset", "variant", "seed", "nsamples", "seqlen", "n_tokens", "data_variant")}


def _tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = evaluate.TASKS if evaluate is not None else ()
    for n in names:
        if evaluate is not None and n not in known:
            raise argparse.ArgumentTypeError(f"unknown task {n!r}; choose from {', '.join(known)}")
    return names


def cmd_eval(a) -> int:
    loaded = runs.load(a.model, a.backend, a.device, a.dtype)
    datasets = a.ppl if a.ppl is not None else ([] if a.tasks else ["wikitext2", "c4", "ptb"])
    ppl = runs.evaluate_ppl(loaded, datasets, a.seqlen, a.data_dir, a.max_windows, a.batch_size,
                            stream=a.stream) if datasets else {}
    record = runs.results_record(loaded, None, None, None, ppl, {})
    table = None
    if a.tasks:
        if evaluate is None or loaded.backend != "torch":
            raise ImportError("--tasks runs on the torch backend: it needs torch and transformers "
                              "(pip install -e '.[torch]') and --backend torch/auto.")
        res = evaluate.evaluate(loaded.model, evaluate.load_tokenizer(a.model), a.tasks, limit=a.limit, bos=a.bos,
                                mmlu_subjects=a.mmlu_subjects, log_samples=a.log_samples, device=loaded.device,
                                data_dir=a.data_dir, fast=not a.batch1, act_quant=loaded.act_quant,
                                mmlu_letter_space=a.mmlu_letter_space)
        record["evaluation"] = res
        table = evaluate.markdown_table(res)
    out = Path(a.out) if a.out else Path(a.model) / "eval.json" if Path(a.model).is_dir() else Path("eval.json")
    write_json_atomic(out, record)
    for name, r in ppl.items():
        print(f"{name:10s} {r['ppl']:10.4f}  ({r['n_windows']} windows of {r['seqlen']}, {r['data'].get('variant', '')})")
    if table is not None:
        write_text_atomic(out.with_suffix(".md"), table)
        print(table, end="")
        print(f"saved {out.with_suffix('.md')}")
    print(f"saved {out}")
    return 0


def cmd_preflight(a) -> int:
    device = runs.resolve_device(a.backend, a.device)
    reports = preflight(a.backend, device, a.methods.split(","))
    bad = [r for r in reports if not r["ok"]]
    for r in reports:
        print(json.dumps(r, default=float))
    print(f"{len(reports) - len(bad)}/{len(reports)} golden cases pass on {a.backend}/{device}")
    return 1 if bad else 0


def cmd_main(a) -> int:
    return mainjob.run_main(a)


def cmd_study(a) -> int:
    return study_command.run_from_args(a, a.table)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refquant", description="Spec-level reference implementation of LLM quantization.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a LLaMA checkpoint layer by layer and save it")
    q.add_argument("--model", default=str(runs.DEFAULT_MODEL), help="checkpoint directory or Hugging Face id")
    _add_method(q)
    q.add_argument("--calib", default="wikitext2", choices=["wikitext2", "ptb", "c4"])
    q.add_argument("--calib-variant", default="gptq", choices=["gptq", "billm"])
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--resume", action="store_true", help="continue a crashed run in --out (identical results)")
    q.add_argument("--eval", type=_datasets, default=[], help="also evaluate perplexity, e.g. wikitext2,c4,ptb")
    q.add_argument("--max-eval-windows", type=int, default=None)
    q.add_argument("--no-preflight", action="store_true", help="run even if the GPU golden parity check fails")
    _add_common(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, zero-shot accuracy and MMLU of a (quantized) checkpoint")
    e.add_argument("--model", default=str(runs.DEFAULT_MODEL))
    e.add_argument("--ppl", type=_datasets, default=None,
                   help="perplexity data sets (default: wikitext2,c4,ptb unless --tasks is given)")
    e.add_argument("--tasks", type=_tasks, default=[],
                   help="piqa,arc_easy,arc_challenge,hellaswag,winogrande,mmlu (the study's protocol, docs/evaluation.md)")
    e.add_argument("--limit", type=int, default=None, help="the first N documents of each task (MMLU: of each subject)")
    e.add_argument("--mmlu-subjects", default=None, help="comma-separated MMLU subjects (default: all 57)")
    e.add_argument("--log-samples", default=None, metavar="OUTDIR", help="write OUTDIR/<task>.jsonl, one line per document")
    e.add_argument("--bos", action="store_true", help="prepend BOS to the zero-shot contexts (current lm-eval on LLaMA-3)")
    e.add_argument("--mmlu-letter-space", action="store_true", help='score the tokens of " A".." D" instead of "A".."D"')
    e.add_argument("--batch1", action="store_true", help="the batch-1 reference path instead of the fast path")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--stream", action="store_true", help="one layer on the device at a time (models larger than GPU memory)")
    e.add_argument("--out", default=None, help="results JSON (default: MODEL/eval.json)")
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("main", help="the study on the embedded tiny model: every method in this build, every evaluation, "
                       "the paper's numbers beside ours (reduced protocol on a CPU; --full or a GPU: the paper's)")
    mainjob.add_arguments(m)
    m.set_defaults(func=cmd_main)

    st = sub.add_parser("study", help="the LLaMA3 study's tables (recipes) on a model, the paper's numbers beside ours")
    st.add_argument("--table", default="1", help="1, 2, 3 (comma-separated), a path to your own YAML recipe, 'extras' "
                    "(the methods' own rows) or suite:NAME")
    study_command.add_arguments(st)
    st.set_defaults(func=cmd_study)

    p = sub.add_parser("preflight", help="golden parity check of a backend (what a GPU run checks first)")
    p.add_argument("--backend", default="torch", choices=["numpy", "torch"])
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default="rtn,gptq")
    p.set_defaults(func=cmd_preflight)

    distill.add_parser(sub, _add_common, _datasets)  # DB-LLM's training stage (refquant/distill.py)
    if export_cmd is not None:
        export_cmd.add_parser(sub)  # gptq / compressed-tensors / nf4 / refquant checkpoints (refquant/export.py)
    if finetune is not None:
        finetune.add_parser(sub, _datasets)  # QLoRA / IR-QLoRA (refquant/finetune.py)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"refquant {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

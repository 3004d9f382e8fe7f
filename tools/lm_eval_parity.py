#!/usr/bin/env python3
"""lm-eval 0.4 against refquant's evaluator (the v0.3.0 protocol) on the local data: request strings,
tokens, per-request log-likelihoods.

    REFQUANT_DATA_DIR=../shared/data python tools/lm_eval_parity.py --limit 20 [--out parity.json]

1. Writes each task's documents in the Hugging Face layout the lm-eval 0.4 task YAML expects
   (PIQA goal/sol1/sol2/label; ARC question/choices{text,label}/answerKey; HellaSwag
   activity_label/ctx_a/ctx_b/endings/label rebuilt as refquant does; WinoGrande
   sentence/option1/option2/answer) and a local task YAML per task that ``include``s lm-eval's own
   shipped YAML (its prompts, its ``process_docs``) with ``dataset_path: json`` and the local file:
   no hub access.
2. Request strings: lm-eval builds its requests for *every* document
   (``Task.build_all_requests``); each ``(context, continuation)`` is compared with refquant's.
3. Tokens: lm-eval's ``hf`` model encodes ``context + continuation`` jointly and splits it
   (``TemplateLM._encode_pair``, trailing context spaces moved to the continuation); v0.3.0 encodes
   the two separately. Every request whose tokens differ is counted and listed.
4. Log-likelihoods (``--limit`` documents per task): ``lm_eval.simple_evaluate`` with lm-eval's
   ``hf`` model (``add_bos_token=False``, float32) and with the ``refquant`` model, both against
   refquant's evaluator.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from refquant import evaluate as ev  # noqa: E402

TINY = ROOT / "golden" / "models" / "tiny-llama3"
#: our task name -> (lm-eval's shipped YAML relative to lm_eval/tasks, the split it evaluates)
LM_EVAL_TASKS = {
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
}


def hf_rows(task: str, data_dir) -> list[dict]:
    """The task's local documents in the Hugging Face dataset layout."""
    root = ev._data_root(data_dir)
    if task == "piqa":
        rows = ev._jsonl(root / ev.TASK_FILES["piqa"][0])
        labels = [int(x) for x in open(root / ev.TASK_FILES["piqa"][1]) if x.strip()]
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": lab} for r, lab in zip(rows, labels)]
    if task.startswith("arc"):
        out = []
        for r in ev._jsonl(root / ev.TASK_FILES[task][0]):
            letters = "ABCDE"[:len(r["choices"])]
            out.append({"question": r["question"], "choices": {"text": r["choices"], "label": list(letters)},
                        "answerKey": letters[r["gold"]]})
        return out
    if task == "hellaswag":
        lines = open(root / ev.TASK_FILES["hellaswag"][0], encoding="utf-8").read().split("\n")
        out = []
        for i in range(len(lines) // 6):
            block = lines[6 * i: 6 * i + 6]
            label, _, ctx = block[0].partition(": ")
            ctx_a, ctx_b = ev.hellaswag_split(ctx)
            out.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": block[2:6],
                        "label": block[1]})
        return out
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": r["answer"]}
            for r in ev._jsonl(root / ev.TASK_FILES["winogrande"][0])]


def write_local_tasks(outdir: Path, data_dir, limit: int | None = None) -> dict:
    """Local JSONL files and task YAMLs (``rq_<task>``) that include lm-eval's shipped ones."""
    import lm_eval

    shipped = Path(lm_eval.__file__).parent / "tasks"
    outdir.mkdir(parents=True, exist_ok=True)
    names = {}
    for task, (yaml_rel, split) in LM_EVAL_TASKS.items():
        rows = hf_rows(task, data_dir)
        if limit is not None:
            rows = rows[:limit]
        data = outdir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        name = f"rq_{task}"
        splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
        splits["test_split" if split == "test" else "validation_split"] = split
        lines = [f"include: {shipped / yaml_rel}", f"task: {name}", "tag: []", "dataset_path: json",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {split}: {data}"]
        lines += [f"{k}: {v if v is not None else 'null'}" for k, v in splits.items()]
        (outdir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        names[task] = name
    return names


def lm_eval_requests(task_names: dict, include_path: Path) -> dict:
    """lm-eval 0.4's ``(context, continuation)`` of every document, grouped by document, per task."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(include_path))
    out = {}
    for ours, name in task_names.items():
        task = get_task_dict([name], tm)[name]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        docs: dict[int, list] = {}
        for inst in task.instances:
            docs.setdefault(inst.doc_id, []).append((inst.idx, inst.args))
        out[ours] = [[a for _, a in sorted(v)] for _, v in sorted(docs.items())]
    return out


def compare_strings(ours: dict, theirs: dict) -> dict:
    report = {}
    for task, docs in ours.items():
        diffs = []
        for d, req in zip(docs, theirs[task]):
            for j, (a, b) in enumerate(zip(d.requests, req)):
                if tuple(a) != tuple(b):
                    diffs.append({"doc_id": d.doc_id, "choice": j, "v0.3.0": list(a), "lm-eval 0.4": list(b)})
        report[task] = {"documents": len(docs), "lm_eval_documents": len(theirs[task]), "differing": diffs}
    return report


def joint_encoding(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4 ``TemplateLM._encode_pair`` (causal) with ``add_bos_token=False``."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = list(tokenizer(context + continuation, add_special_tokens=False).input_ids)
    ctx = list(tokenizer(context, add_special_tokens=False).input_ids)
    return ctx, whole[len(ctx):]


def compare_tokens(tokenizer, ours: dict) -> dict:
    report = {}
    for task, docs in ours.items():
        diffs, total = [], 0
        for d in docs:
            for j, (c, x) in enumerate(d.requests):
                total += 1
                sep = ev.encode_request(tokenizer, c, x)
                ctx, cont = joint_encoding(tokenizer, c, x)
                if ctx + cont != sep.tokens or len(cont) != sep.n_score:
                    diffs.append({"doc_id": d.doc_id, "choice": j, "context_tail": c[-30:], "continuation": x[:40]})
        report[task] = {"requests": total, "differing": len(diffs), "examples": diffs[:10]}
    return report


def loglikelihood_parity(task_names: dict, include_path: Path, limit: int, data_dir, device: str = "cpu") -> dict:
    """Per-request log-likelihoods: lm-eval's hf model and the refquant model against refquant's evaluator."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from refquant import lm_eval_adapter, torch_pipeline

    tok = ev.load_tokenizer(TINY)
    model = torch_pipeline.load_model(str(TINY), dtype=torch.float32, device=device)
    tm = TaskManager(include_path=str(include_path))
    hf = HFLM(pretrained=str(TINY), add_bos_token=False, dtype="float32", device=device, batch_size=8)
    rq = lm_eval_adapter.RefquantLM(model=model, tokenizer=tok)
    report = {}
    for ours, name in task_names.items():
        docs = ev.load_docs(ours, data_dir, limit)
        reqs, groups = ev.zero_shot_requests(tok, docs)
        ref = ev.score_fast(model, reqs, groups)
        ref_map = {}
        k = 0
        for d in docs:
            for r in d.requests:
                ref_map[(d.doc_id, tuple(r))] = ref[k]
                k += 1
        row = {}
        for label, lm in (("hf", hf), ("refquant", rq)):
            res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=limit, log_samples=True,
                                          bootstrap_iters=0)
            deltas, missing = [], 0
            for s in res["samples"][name]:
                args = [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else tuple(a) for a in s["arguments"]]
                for (c, x), resp in zip(args, s["resps"]):
                    key = (s["doc_id"], (c, x))
                    if key not in ref_map:
                        missing += 1
                        continue
                    deltas.append(abs(float(resp[0][0]) - ref_map[key]))
            row[label] = {"requests": len(deltas), "missing": missing, "max_abs_delta": max(deltas) if deltas else None,
                          "acc": res["results"][name].get("acc,none")}
        row["refquant_evaluator_acc"] = float(np.mean([ev.doc_metrics(d, ref[g[0]:g[-1] + 1])["acc"]
                                                       for d, g in zip(docs, groups)]))
        report[ours] = row
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=20, help="documents per task for the log-likelihood comparison")
    ap.add_argument("--work", default="/tmp/refquant_lm_eval_parity", help="where the local task files go")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-ll", action="store_true", help="only request strings and tokens")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work)
    t = time.perf_counter()
    names = write_local_tasks(work / "all", a.data_dir)
    ours = {task: ev.load_docs(task, a.data_dir) for task in LM_EVAL_TASKS}
    report = {"strings": compare_strings(ours, lm_eval_requests(names, work / "all")),
              "tokens": compare_tokens(ev.load_tokenizer(TINY), ours)}
    if not a.skip_ll:
        report["loglikelihoods"] = loglikelihood_parity(names, work / "all", a.limit, a.data_dir)
    report["seconds"] = time.perf_counter() - t
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    for task in LM_EVAL_TASKS:
        s, k = report["strings"][task], report["tokens"][task]
        print(f"{task:14s} docs {s['documents']:6d} (lm-eval {s['lm_eval_documents']}), differing request strings "
              f"{len(s['differing'])}, requests with different tokens {k['differing']}/{k['requests']}"
              + (f", ll max|delta| hf {report['loglikelihoods'][task]['hf']['max_abs_delta']:.2e} refquant "
                 f"{report['loglikelihoods'][task]['refquant']['max_abs_delta']:.2e}" if "loglikelihoods" in report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot and MMLU evaluation with the LLaMA-3 quantization study's protocol (issue 13).

The study scored every quantized model on PIQA, ARC-Easy, ARC-Challenge, HellaSwag and WinoGrande
(0-shot, ``acc``) with a vendored pre-0.4 lm-evaluation-harness, and the LoRA track on MMLU
(5-shot) with IR-QLoRA's ``evaluate_mmlu.py``. This module reproduces both point by point from
the local data files (``REFQUANT_DATA_DIR``; ``docs/evaluation.md`` has the sources line by line):

Zero-shot (EleutherAI/lm-evaluation-harness tag v0.3.0, commit 62ca18400ebe, ``lm_eval/base.py``
``BaseLM.loglikelihood`` / ``_loglikelihood_tokens`` / ``MultipleChoiceTask``; ``lm_eval/tasks/
{piqa,arc,hellaswag,winogrande}.py``; ``lm_eval/metrics.py`` ``mean_stderr``):

* one request ``(context, continuation)`` per choice; context and continuation tokenized separately
  without special tokens (``--bos`` prepends the BOS id to the context, as current lm-eval does
  for LLaMA-3); an empty context becomes the EOS id; input ``(context + continuation)[-(L+1):][:-1]`` with
  L the model's ``max_position_embeddings`` (the study's ``LMClass.max_length``);
  log-softmax in float32; a request's log-likelihood is the sum over its continuation tokens;
* ``acc``: argmax of the summed log-likelihoods (ties to the first); ``acc_norm``: argmax of the
  log-likelihood divided by the choice's length in characters; standard error: sample standard
  deviation / sqrt(n);
* PIQA ``"Question: {goal}\\nAnswer:"`` / ``" " + sol``; ARC ``"Question: {question}\\nAnswer:"`` /
  ``" " + choice`` (numeric answer keys mapped to letters); HellaSwag
  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` / ``" " + preprocess(ending)``
  (ctx_a/ctx_b rebuilt from the local llama.cpp rendering, :func:`hellaswag_split`); WinoGrande partial
  scoring: context = sentence up to ``_`` with the option, continuation = ``" " + rest.strip()``.

MMLU (htqin/IR-QLoRA ``evaluate_mmlu.py``, commit e6fef4ac; subject categories of hendrycks/test
``categories.py``): per subject the header with two spaces, the first 5 dev rows as shots, shots
dropped from the end while the prompt exceeds 2048 tokens, the prompt tokenized with the tokenizer's
default (BOS for LLaMA-3), prediction = argmax of the last position's logits at the ids of
``tokenizer("A").input_ids[-1]`` ... ``"D"``; accuracy per subject, per category, question-weighted.

Two scoring paths give the same numbers (``tests/test_evaluate.py``):

* ``fast=False``: the reference -- one request (one MMLU prompt) per forward call through the
  Hugging Face model, full-vocabulary float32 log-softmax, as the study's loop;
* ``fast=True``: requests of a document share their common token prefix in one row (a tree-shaped
  attention mask, positions restarting at each branch), rows sorted longest first and batched to a
  token budget, the LM head applied only where a continuation token is scored; MMLU computes each
  subject's shared few-shot prefix once and keeps its keys/values (a KV cache) for all questions,
  which are packed several to a row against it; RMSNorm, RoPE and SiLU-mul run as fused kernels
  where usable (``refquant/backends/eval_kernels.py``) and the batch loop has no host-device sync.
"""
from __future__ import annotations

import contextlib
import csv
import heapq
import json
import logging
import math
import os
import pathlib
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import transformers

from . import data as _data
from .backends import eval_kernels as _kernels
from .pipeline import ActQuant
from .provenance import portable_path, provenance, write_text_atomic
from .spec.progress import progress as _progress
from .torch_pipeline import act_quant_applied

log = logging.getLogger("refquant")

ZERO_SHOT = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
TASKS = ZERO_SHOT + ("mmlu",)

#: the protocol's constants
HARNESS = "EleutherAI/lm-evaluation-harness v0.3.0 (62ca18400ebe0fc0dbb14274b27170d2d5ae9e3d) task definitions"
MMLU_SOURCE = "htqin/IR-QLoRA evaluate_mmlu.py (e6fef4ac13f311350b51bc59aaf971cf6bef021b)"
#: left truncation of a request to max_length + 1 tokens: the study's LMClass.max_length is the model's
#: ``max_position_embeddings`` (8192 for LLaMA-3-8B; :func:`evaluate` reads it); this is the fallback
MAX_LENGTH = 2048
MMLU_SHOTS = 5             # IR-QLoRA ntrain
MMLU_MAX_TOKENS = 2048     # shots are dropped while the prompt is longer
MMLU_LETTERS = ("A", "B", "C", "D")
#: rows of the fast path are batched to this many tokens (padded rows x columns)
TOKEN_BUDGET = {"cuda": 65536, "cpu": 8192}
#: LM-head rows per chunk (float32 logits of this many positions at a time)
HEAD_CHUNK = 4096
#: a zero-shot batch is cut where the next row is more than BATCH_SLACK shorter than its longest row,
#: once it holds BATCH_MIN_FILL of the token budget (see :func:`_batches`)
BATCH_SLACK = 0.01
BATCH_MIN_FILL = 0.25
#: MMLU fast path: the questions after a shared few-shot prefix are packed into rows of this many tokens
#: (at least the longest question's); each attends to the prefix and causally to itself only
PACK_WIDTH = 512
#: ... and batched to TOKEN_BUDGET question tokens and KV_FACTOR x TOKEN_BUDGET prefix + question keys
KV_FACTOR = 4

#: where each task's files live in the data directory (layout of ../shared/data)
TASK_FILES = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/ARC-Easy-test.parsed.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-test.parsed.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "winogrande": ("winogrande/dev.jsonl",),
    "mmlu": ("mmlu/dev", "mmlu/test"),
}
#: the original ARC jsonl (question.stem, question.choices[].{text,label}, answerKey) is read when present
ARC_ORIGINAL = {"arc_easy": "arc/ARC-Easy-Test.jsonl", "arc_challenge": "arc/ARC-Challenge-Test.jsonl"}

# hendrycks/test categories.py: subject -> subcategory, category -> subcategories
MMLU_SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
MMLU_CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}


class EvalDataError(FileNotFoundError):
    """A task's local data file is missing or malformed."""


# =============================================================================================
# Documents and requests


@dataclass(frozen=True)
class Doc:
    """One document of a multiple-choice task: its requests ``(context, continuation)`` (one per
    choice), the gold index and the lengths ``acc_norm`` divides by (characters of each choice)."""

    doc_id: int
    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...]


def _data_root(data_dir) -> pathlib.Path:
    root = _data.resolve_data_dir(data_dir)
    if root is None:
        raise EvalDataError(f"no data directory: pass data_dir / --data-dir or set ${_data.ENV_DATA_DIR} to a "
                            "directory laid out like ../shared/data (piqa/, arc/, hellaswag/, winogrande/, mmlu/).")
    if not root.is_dir():
        raise EvalDataError(f"data directory {root} does not exist; pass data_dir / --data-dir or set "
                            f"${_data.ENV_DATA_DIR} to a directory laid out like ../shared/data.")
    return root


def _need(root: pathlib.Path, rel: str, task: str) -> pathlib.Path:
    p = root / rel
    if not p.exists():
        raise EvalDataError(f"{task}: {p} is missing; the data directory must hold {rel} (layout of ../shared/data, "
                            "see its SOURCES.md).")
    return p


def _jsonl(path: pathlib.Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{path}: line {i + 1} is not JSON ({e}).") from e
    return out


def mc_requests(doc_id: int, context: str, choices: Sequence[str], gold: int) -> Doc:
    """v0.3.0 ``MultipleChoiceTask``: request ``(context, " " + choice)`` per choice; acc_norm by ``len(choice)``."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"document {doc_id}: gold index {gold} outside its {len(choices)} choices.")
    return Doc(doc_id, tuple((context, " " + c) for c in choices), int(gold), tuple(len(c) for c in choices))


def piqa_docs(root) -> list[Doc]:
    """PIQA validation: ``"Question: " + goal + "\\nAnswer:"`` / ``[sol1, sol2]`` (labels from valid-labels.lst)."""
    rows = _jsonl(_need(root, TASK_FILES["piqa"][0], "piqa"))
    labels = [ln.strip() for ln in open(_need(root, TASK_FILES["piqa"][1], "piqa"), encoding="utf-8") if ln.strip()]
    if len(labels) != len(rows):
        raise EvalDataError(f"piqa: {len(rows)} documents but {len(labels)} labels.")
    return [mc_requests(i, "Question: " + r["goal"] + "\nAnswer:", [r["sol1"], r["sol2"]], int(lab))
            for i, (r, lab) in enumerate(zip(rows, labels))]


def arc_gold(answer_key: str) -> int:
    """v0.3.0 ``ARCEasy._process_doc``: numeric keys "1".."5" map to "A".."E", gold = index in A..E."""
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(answer_key, answer_key)
    return ["A", "B", "C", "D", "E"].index(key)


def arc_docs(root, task: str) -> list[Doc]:
    """ARC test: ``"Question: " + question + "\\nAnswer:"`` / the choice texts.

    Reads the original ARC jsonl (``ARC-*-Test.jsonl``) when the data directory has it, else the
    parsed LLM-Adapters rendering (``*.parsed.jsonl``: question, choices, gold index).
    """
    original = root / ARC_ORIGINAL[task]
    if original.exists():
        docs = []
        for i, r in enumerate(_jsonl(original)):
            q = r["question"]
            docs.append(mc_requests(i, "Question: " + q["stem"] + "\nAnswer:", [c["text"] for c in q["choices"]],
                                    arc_gold(r["answerKey"])))
        return docs
    rows = _jsonl(_need(root, TASK_FILES[task][0], task))
    return [mc_requests(i, "Question: " + r["question"] + "\nAnswer:", r["choices"], int(r["gold"]))
            for i, r in enumerate(rows)]


def hellaswag_preprocess(text: str) -> str:
    """v0.3.0 ``HellaSwag.preprocess``: strip, " [title]" -> ". ", drop every [...] span, "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r"[.?!][\"']*\s")


def hellaswag_split(ctx: str) -> tuple[str, str]:
    """``(ctx_a, ctx_b)`` rebuilt from the rendered context (the local file stores ``ctx_a + " " + ctx_b``).

    A context ending in ``. ? ! " '`` has an empty ``ctx_b``; otherwise ``ctx_b`` is the text after the
    last sentence end (``. ? !``, optional quotes, whitespace).
    """
    if ctx.endswith((".", "?", "!", '"', "'")):
        return ctx, ""
    ends = [m.end() for m in _SENTENCE_END.finditer(ctx)]
    if not ends:
        return "", ctx
    return ctx[:ends[-1]].rstrip(), ctx[ends[-1]:]


def hellaswag_query(line: str) -> str:
    """The v0.3.0 query of a rendered line ``activity_label + ": " + ctx``."""
    label, sep, ctx = line.partition(": ")
    if not sep:
        raise ValueError(f"hellaswag: context line {line[:60]!r} has no 'activity_label: ' prefix.")
    ctx_a, ctx_b = hellaswag_split(ctx)
    return hellaswag_preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())


def hellaswag_docs(root) -> list[Doc]:
    """HellaSwag validation from the llama.cpp rendering (6 lines per item: context, gold, 4 endings)."""
    path = _need(root, TASK_FILES["hellaswag"][0], "hellaswag")
    lines = open(path, encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise EvalDataError(f"hellaswag: {path} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings).")
    docs = []
    for i in range(len(lines) // 6):
        block = lines[6 * i: 6 * i + 6]
        docs.append(mc_requests(i, hellaswag_query(block[0]), [hellaswag_preprocess(e) for e in block[2:6]],
                                int(block[1])))
    return docs


def winogrande_doc(doc_id: int, sentence: str, option1: str, option2: str, answer: str) -> Doc:
    """v0.3.0 ``Winogrande``: partial scoring; context = sentence up to "_" + option, continuation =
    ``" " + sentence after "_" .strip()`` (the same for both options); acc_norm divides by its length."""
    if "_" not in sentence:
        raise ValueError(f"winogrande document {doc_id}: sentence has no '_': {sentence[:60]!r}.")
    cut = sentence.index("_")
    target = " " + sentence[cut + 1:].strip()
    reqs = tuple((sentence[:cut] + opt, target) for opt in (option1, option2))
    return Doc(doc_id, reqs, {"1": 0, "2": 1}[str(answer)], (len(target), len(target)))


def winogrande_docs(root) -> list[Doc]:
    rows = _jsonl(_need(root, TASK_FILES["winogrande"][0], "winogrande"))
    return [winogrande_doc(i, r["sentence"], r["option1"], r["option2"], r["answer"]) for i, r in enumerate(rows)]


def load_docs(task: str, data_dir=None, limit: int | None = None) -> list[Doc]:
    """The documents of a zero-shot task in local file order (the first ``limit`` with ``limit``)."""
    if task not in ZERO_SHOT:
        raise ValueError(f"unknown zero-shot task {task!r}; choose from {', '.join(ZERO_SHOT)} (or mmlu).")
    root = _data_root(data_dir)
    docs = {"piqa": piqa_docs, "hellaswag": hellaswag_docs, "winogrande": winogrande_docs}.get(task)
    docs = docs(root) if docs else arc_docs(root, task)
    if not docs:
        raise EvalDataError(f"{task}: no documents in the data directory {root}.")
    return docs if limit is None else docs[:limit]


# ---------------------------------------------------------------------------------------------
# MMLU prompts


_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
_INT = re.compile(r"^\s*[+-]?\d+\s*$")
_BOOL = {"true": True, "false": False}


def _pandas_column(values: list[str]) -> list:
    """One CSV column as ``pandas.read_csv`` (C parser, default NA values) types it, for ``"{}".format``."""
    na = [v in _PANDAS_NA for v in values]
    present = [v for v, m in zip(values, na) if not m]
    nan = float("nan")
    if present and all(_INT.match(v) for v in present):
        if any(na):
            return [nan if m else float(int(v)) for v, m in zip(values, na)]
        return [int(v) for v in values]
    if present and all(v.lower() in _BOOL for v in present) and not any(na):
        return [_BOOL[v.lower()] for v in values]
    try:
        if present:
            floats = [float(v) for v in present]
            if not any(math.isnan(f) for f in floats):
                return [nan if m else float(v) for v, m in zip(values, na)]
    except ValueError:
        pass
    return [nan if m else v for v, m in zip(values, na)]


def read_mmlu_csv(path) -> list[list]:
    """Rows of an MMLU CSV (no header; question, A, B, C, D, answer) with cells as pandas reads them:
    ``pandas.read_csv(path, header=None)`` when pandas is installed, else an equivalent reader (default
    NA strings such as ``None`` become NaN, printed ``nan``; numeric columns typed). The test suite
    checks the two agree on every MMLU file."""
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        df = pd.read_csv(path, header=None)
        return [[df.iloc[i, j] for j in range(df.shape[1])] for i in range(df.shape[0])]
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f)]
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    cols = [_pandas_column([r[j] for r in rows]) for j in range(width)]
    return [[cols[j][i] for j in range(width)] for i in range(len(rows))]


def mmlu_format_subject(subject: str) -> str:
    """IR-QLoRA ``format_subject``: " " before every word (hence the two spaces after "about")."""
    return "".join(" " + w for w in subject.split("_"))


def mmlu_format_example(row: Sequence, include_answer: bool = True) -> str:
    """IR-QLoRA ``format_example``: question, "\\nA. ..", .., "\\nAnswer:" (+ " X\\n\\n")."""
    k = len(row) - 2
    prompt = "{}".format(row[0])
    for j in range(k):
        prompt += "\n{}. {}".format(MMLU_LETTERS[j], row[j + 1])
    prompt += "\nAnswer:"
    if include_answer:
        prompt += " {}\n\n".format(row[k + 1])
    return prompt


def mmlu_prefix(dev_rows: Sequence[Sequence], subject: str, k: int) -> str:
    """IR-QLoRA ``gen_prompt(dev_df, subject, k)``: the header and the first ``k`` dev rows as shots."""
    prompt = "The following are multiple choice questions (with answers) about {}.\n\n".format(
        mmlu_format_subject(subject))
    if k == -1:
        k = len(dev_rows)
    for i in range(k):
        prompt += mmlu_format_example(dev_rows[i])
    return prompt


def available_mmlu_subjects(data_dir=None) -> list[str]:
    root = _data_root(data_dir)
    test = _need(root, TASK_FILES["mmlu"][1], "mmlu")
    return sorted(f.name[: -len("_test.csv")] for f in test.iterdir() if f.name.endswith("_test.csv"))


@dataclass
class MMLUQuestion:
    subject: str
    doc_id: int
    prompt: str
    ids: list[int]
    shots: int
    gold: int


def _encode_default(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _encode_plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def mmlu_questions(tokenizer, subject: str, data_dir=None, limit: int | None = None,
                   shots: int = MMLU_SHOTS, max_tokens: int = MMLU_MAX_TOKENS) -> tuple[list[MMLUQuestion], dict]:
    """The prompts of one subject (IR-QLoRA ``eval``): 5 shots, dropped from the end while the prompt
    (tokenized with the tokenizer's default, BOS included for LLaMA-3) is longer than ``max_tokens``.

    Returns the questions and ``{k: prefix text}`` of the shot counts used.
    """
    root = _data_root(data_dir)
    dev = _need(root, f"mmlu/dev/{subject}_dev.csv", "mmlu")
    test = _need(root, f"mmlu/test/{subject}_test.csv", "mmlu")
    dev_rows = read_mmlu_csv(dev)[:shots]
    test_rows = read_mmlu_csv(test)
    if limit is not None:
        test_rows = test_rows[:limit]
    out, prefixes = [], {}
    for i, row in enumerate(test_rows):
        end = mmlu_format_example(row, include_answer=False)
        k = shots
        while True:
            prefix = prefixes.setdefault(k, mmlu_prefix(dev_rows, subject, k))
            ids = _encode_default(tokenizer, prefix + end)
            if len(ids) <= max_tokens:
                break
            if k == 0:  # the original would go on with k = -1 (all shots) and loop forever
                raise ValueError(f"mmlu {subject} question {i}: the prompt without shots has {len(ids)} tokens > "
                                 f"{max_tokens}; it cannot be evaluated with this protocol.")
            k -= 1
        answer = "{}".format(row[len(row) - 1])
        if answer not in MMLU_LETTERS:
            raise EvalDataError(f"mmlu {subject} question {i}: answer {answer!r} is not one of A-D.")
        out.append(MMLUQuestion(subject, i, prefix + end, ids, k, MMLU_LETTERS.index(answer)))
    return out, {k: prefixes[k] for k in sorted({q.shots for q in out})}


def mmlu_letter_ids(tokenizer, leading_space: bool = False) -> list[int]:
    """IR-QLoRA: ``tokenizer("A").input_ids[-1]`` ...; ``leading_space``: the ids of ``" A"`` ... instead."""
    return [list(tokenizer((" " if leading_space else "") + c).input_ids)[-1] for c in MMLU_LETTERS]


# =============================================================================================
# Scoring engine


@dataclass
class TokenRequest:
    """A tokenized request: ``tokens = context_ids + continuation_ids``; the last ``n_score`` are scored."""

    tokens: list[int]
    n_score: int


def encode_request(tokenizer, context: str, continuation: str, bos: bool = False,
                   max_length: int = MAX_LENGTH) -> TokenRequest:
    """v0.3.0 ``BaseLM.loglikelihood``: separate encodings without special tokens; empty context ->
    the EOS id; ``bos`` prepends the BOS id; left-truncated to ``max_length + 1`` tokens."""
    if context == "":
        ctx = [tokenizer.eos_token_id]
    else:
        ctx = _encode_plain(tokenizer, context)
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token.")
        ctx = [tokenizer.bos_token_id] + ctx
    cont = _encode_plain(tokenizer, continuation)
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens.")
    if len(cont) > max_length:
        raise ValueError(f"continuation of {len(cont)} tokens is longer than the model's {max_length}.")
    return TokenRequest((ctx + cont)[-(max_length + 1):], len(cont))


def load_tokenizer(path) -> "transformers.PreTrainedTokenizerBase":
    """The checkpoint's Hugging Face tokenizer (``AutoTokenizer``)."""
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _head_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 log-softmax of the LM head at ``hidden`` ([N, H]), HEAD_CHUNK rows at a time."""
    out = []
    for s in range(0, hidden.shape[0], HEAD_CHUNK):
        out.append(torch.log_softmax(model.lm_head(hidden[s:s + HEAD_CHUNK]).float(), dim=-1))
    return torch.cat(out) if out else hidden.new_zeros((0, model.lm_head.out_features), dtype=torch.float32)


def _head_scores(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), target is the argmax)`` at ``hidden`` ([N, H]) without keeping the [N, vocab]
    float32 log-softmax: per HEAD_CHUNK rows the float32 logits, their logsumexp, the target's logit minus it
    (the float32 log-softmax at the target up to one rounding) and the argmax of the logits (the
    log-softmax's argmax: it is monotone in the logit)."""
    picked, hits = [], []
    for s in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = model.lm_head(hidden[s:s + HEAD_CHUNK]).float()
        t = targets[s:s + HEAD_CHUNK, None]
        picked.append(logits.gather(1, t)[:, 0] - torch.logsumexp(logits, dim=-1))
        hits.append(logits.argmax(-1) == t[:, 0])
    if not picked:
        return hidden.new_zeros((0,), dtype=torch.float32), torch.zeros((0,), dtype=torch.bool, device=hidden.device)
    return torch.cat(picked), torch.cat(hits)


@torch.no_grad()
def score_batch1(model, requests: Sequence[TokenRequest], desc: str = "loglikelihood", return_greedy: bool = False):
    """The reference: each request alone through the Hugging Face model (v0.3.0 ``_loglikelihood_tokens``
    with batch size 1), full-vocabulary float32 log-softmax, summed over the continuation tokens.
    ``return_greedy``: also whether every continuation token is the argmax (v0.3.0 ``is_greedy``)."""
    dev = _device_of(model)
    out, greedy = [], []
    for r in _progress(requests, total=len(requests), desc=desc):
        inp = torch.tensor(r.tokens[:-1], dtype=torch.long, device=dev)[None]
        logp = torch.log_softmax(model(input_ids=inp, use_cache=False).logits[0].float(), dim=-1)
        n = inp.shape[1]
        target = torch.tensor(r.tokens[-r.n_score:], dtype=torch.long, device=dev)
        rows = logp[n - r.n_score: n]
        out.append(float(rows.gather(1, target[:, None]).sum()))
        greedy.append(bool((rows.argmax(-1) == target).all()))
    return (out, greedy) if return_greedy else out


def _plain_rms_norm(norm) -> bool:
    """A transformers RMSNorm module (``weight``, ``variance_epsilon``) without hooks: :func:`_norm` may
    compute it itself (fused)."""
    return (type(norm).__name__.endswith("RMSNorm") and isinstance(getattr(norm, "variance_epsilon", None), float)
            and isinstance(getattr(norm, "weight", None), torch.Tensor) and norm.weight.dim() == 1
            and not norm._forward_hooks and not norm._forward_pre_hooks)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` (float32 statistics, the result cast to the input dtype, then times
    the gain in the gain's dtype) in one Triton kernel where usable (:mod:`refquant.backends.eval_kernels`),
    else as ``weight * F.rms_norm(x)`` (``F.rms_norm`` computes in float32 for low-precision inputs and
    casts back: the same arithmetic in two kernels instead of six). Any other norm module is called as is."""
    if not _plain_rms_norm(norm):
        return norm(x)
    if _kernels.usable(x.device) and x.dtype == norm.weight.dtype:
        return _kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    return norm.weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)


def _plain_mlp(mlp) -> bool:
    """transformers' ``LlamaMLP`` with SiLU and no hooks on the MLP module itself (its linears may
    have hooks: they are still called as modules)."""
    return (all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and not mlp._forward_hooks and not mlp._forward_pre_hooks)


def _mlp(mlp, h: torch.Tensor) -> torch.Tensor:
    """``down_proj(silu(gate_proj(h)) * up_proj(h))`` with the SiLU and the product as one fused kernel
    where usable (:mod:`refquant.backends.eval_kernels`); other MLP modules are called as they are."""
    if not _plain_mlp(mlp):
        return mlp(h)
    return mlp.down_proj(_kernels.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))


def _additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """The boolean attention mask as the additive 0 / -inf bias SDPA makes of it, built once per batch
    (SDPA would convert the boolean mask again in every layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _forward(model, ids, pos, mask, past=None, keep_kv: bool = False):
    """The LLaMA stack on ``ids`` [B, T] at positions ``pos`` with a boolean attention ``mask``
    [B, 1, T, P + T] (``past``: per layer the keys/values of P prefix tokens, batch 1, broadcast).

    The transformers modules of every layer are called (projections, MLP; the RMSNorms through
    :func:`_norm`, the same arithmetic), so activation quantization hooks on the linears apply;
    attention is SDPA with the explicit mask (as an additive bias, converted once). Returns the
    final-norm hidden states [B, T, H] and, with ``keep_kv``, the per-layer keys/values.
    """
    m, cfg = model.model, model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    B, T = ids.shape
    x = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(x, pos)                                # [B, T, head_dim]
    bias = _additive_mask(mask, x.dtype)
    kv = []
    for i, layer in enumerate(m.layers):
        attn = layer.self_attn
        h = _norm(layer.input_layernorm, x)
        q = _kernels.rope(attn.q_proj(h), cos, sin, n_heads, head_dim)    # [B, n_heads, T, head_dim]
        k = _kernels.rope(attn.k_proj(h), cos, sin, n_kv, head_dim)
        v = attn.v_proj(h).view(B, T, n_kv, head_dim).transpose(1, 2)
        if keep_kv:
            kv.append((k, v))
        if past is not None:
            pk, pv = past[i]
            k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        if n_kv != n_heads:  # as transformers' SDPA path with a mask: the masked kernels take no GQA
            k = k.repeat_interleave(n_heads // n_kv, dim=1)
            v = v.repeat_interleave(n_heads // n_kv, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=getattr(attn, "scaling", head_dim ** -0.5))
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, n_heads * head_dim))
        x = x + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, x))
    return _norm(m.norm, x), kv


@dataclass
class _Row:
    """One row of the fast path: a shared prefix and one branch per request (tree attention)."""

    tokens: list[int]
    positions: list[int]
    segment: list[int]                       # 0: shared prefix, j + 1: branch of request j
    score: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (request, row idx, targets)


def _common_prefix_len(inputs: Sequence[list[int]]) -> int:
    """Length of the longest common prefix of the token lists (all of a single list): list-slice comparisons
    (C speed) with a bisection at the first list that differs, instead of a Python loop over tokens."""
    first = inputs[0]
    s = min(len(t) for t in inputs)
    for t in inputs[1:]:
        if first[:s] == t[:s]:
            continue
        lo, hi = 0, s                      # first[:lo] == t[:lo], first[:hi] != t[:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if first[:mid] == t[:mid]:
                lo = mid
            else:
                hi = mid
        s = lo
    return s


def build_rows(requests: Sequence[TokenRequest], groups: Sequence[Sequence[int]]) -> list[_Row]:
    """Rows of the fast path: each group (a document's requests) shares the longest common prefix of its
    requests' inputs (``tokens[:-1]``); the rest of each input is a branch at its original positions."""
    rows = []
    for group in groups:
        inputs = [requests[j].tokens[:-1] for j in group]
        s = _common_prefix_len(inputs)
        row = _Row(list(inputs[0][:s]), list(range(s)), [0] * s)
        for b, (j, inp) in enumerate(zip(group, inputs)):
            start = len(row.tokens)
            row.tokens += inp[s:]
            row.positions += range(s, len(inp))
            row.segment += [b + 1] * (len(inp) - s)
            n, r = len(inp), requests[j]
            where = [p if p < s else start + p - s for p in range(n - r.n_score, n)]
            row.score.append((j, where, r.tokens[-r.n_score:]))
        rows.append(row)
    return rows


def _batches(lengths: Sequence[int], budget: int, extra: int = 0, slack: float | None = None,
             min_fill: float | None = None) -> list[list[int]]:
    """Indices sorted longest first, cut into batches of at most ``budget`` padded tokens
    (``(extra + longest) * rows``; ``extra``: prefix columns every row also attends to). A batch is also
    cut early where the next row is more than ``slack`` (:data:`BATCH_SLACK`) shorter than the batch's
    longest, once the batch holds ``min_fill`` (:data:`BATCH_MIN_FILL`) of the budget: rows are then
    padded by at most ``slack`` (full-set zero-shot: 1.4 % padded positions instead of 4.8 %)."""
    slack = BATCH_SLACK if slack is None else slack
    min_fill = BATCH_MIN_FILL if min_fill is None else min_fill
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        if cur:
            width = extra + lengths[cur[0]]
            full = width * (len(cur) + 1) > budget
            ragged = lengths[i] < (1 - slack) * lengths[cur[0]] and width * len(cur) >= min_fill * budget
            if full or ragged:
                batches.append(cur)
                cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _to_device(a, dev: torch.device) -> torch.Tensor:
    """A host array on ``dev`` without a host-device sync: on CUDA through pinned memory with a non-blocking
    copy (a pageable ``.to(device)`` synchronizes the stream, so the host could not prepare the next batch
    while the GPU computes this one)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _segment_mask(seg: torch.Tensor, shared: bool = True) -> torch.Tensor:
    """The boolean attention mask [B, 1, T, T] of rows with segment ids ``seg`` [B, T] (on the compute device):
    causal, within a segment, and (``shared``) every segment also sees segment 0 (the shared prefix);
    -1 marks padding, which attends to itself only."""
    T = seg.shape[1]
    idx = torch.arange(T, device=seg.device)
    causal = idx[None, :] <= idx[:, None]                          # [T(q), T(k)]
    same = seg[:, None, :] == seg[:, :, None]                      # [B, q, k]
    if shared:
        same |= seg[:, None, :] == 0
    mask = causal[None] & same & (seg[:, None, :] >= 0)
    mask |= torch.eye(T, dtype=torch.bool, device=seg.device)[None]  # padding rows attend to themselves
    return mask[:, None]


def _tree_mask(rows: Sequence[_Row], T: int, device) -> torch.Tensor:
    seg = np.full((len(rows), T), -1, dtype=np.int64)
    for b, r in enumerate(rows):
        seg[b, :len(r.tokens)] = r.segment
    return _segment_mask(_to_device(seg, torch.device(device)))


@torch.no_grad()
def score_fast(model, requests: Sequence[TokenRequest], groups: Sequence[Sequence[int]] | None = None,
               token_budget: int | None = None, desc: str = "loglikelihood", return_greedy: bool = False):
    """Summed continuation log-likelihoods of ``requests`` with shared prefixes (see :func:`build_rows`),
    rows batched longest-first to ``token_budget`` padded tokens, the LM head only at scored positions.
    ``groups``: lists of request indices that may share a prefix (a document's choices).

    No host-device sync inside the batch loop (inputs through pinned memory, the mask built on the device,
    the scores kept there until the end), so the host prepares batch k + 1 while the GPU runs batch k."""
    dev = _device_of(model)
    budget = token_budget or TOKEN_BUDGET.get(dev.type, TOKEN_BUDGET["cuda"])
    groups = [[j] for j in range(len(requests))] if groups is None else groups
    rows = build_rows(requests, groups)
    batches = _batches([len(r.tokens) for r in rows], budget)
    picked_all, hits_all, owners = [], [], []
    for batch in _progress(batches, total=len(batches), desc=desc):
        rs = [rows[i] for i in batch]
        T = max(len(r.tokens) for r in rs)
        ids = np.zeros((len(rs), T), dtype=np.int64)
        pos = np.zeros((len(rs), T), dtype=np.int64)
        seg = np.full((len(rs), T), -1, dtype=np.int64)
        flat, targets, owner = [], [], []
        for b, r in enumerate(rs):
            n = len(r.tokens)
            ids[b, :n] = r.tokens
            pos[b, :n] = r.positions
            seg[b, :n] = r.segment
            for j, where, tgt in r.score:
                flat += [b * T + w for w in where]
                targets += tgt
                owner += [j] * len(where)
        hidden, _ = _forward(model, _to_device(ids, dev), _to_device(pos, dev), _segment_mask(_to_device(seg, dev)))
        index = _to_device(np.asarray(flat, dtype=np.int64), dev)
        picked, hits = _head_scores(model, hidden.reshape(len(rs) * T, -1)[index],
                                    _to_device(np.asarray(targets, dtype=np.int64), dev))
        picked_all.append(picked)
        hits_all.append(hits)
        owners.append(np.asarray(owner, dtype=np.int64))
    out, greedy = [0.0] * len(requests), [True] * len(requests)
    if batches:
        picked = torch.cat(picked_all).double().cpu().numpy()
        hits = torch.cat(hits_all).cpu().numpy()
        owner = np.concatenate(owners)
        sums = np.zeros(len(requests))
        np.add.at(sums, owner, picked)
        all_hit = np.ones(len(requests), dtype=bool)
        np.logical_and.at(all_hit, owner, hits)
        scored = np.zeros(len(requests), dtype=bool)
        scored[owner] = True
        out = [float(sums[j]) if scored[j] else 0.0 for j in range(len(requests))]
        greedy = [bool(all_hit[j]) for j in range(len(requests))]
    return (out, greedy) if return_greedy else out


def _check_finite(values, what: str) -> None:
    bad = [i for i, v in enumerate(values) if not np.all(np.isfinite(v))]
    if bad:
        raise FloatingPointError(f"{what}: non-finite log-likelihood at request(s) {bad[:5]}; check the model "
                                 "(fp16 overflow? run in bfloat16 or float32).")


# =============================================================================================
# Metrics


def mean_stderr(values: Sequence[float]) -> float | None:
    """v0.3.0 ``metrics.mean_stderr``: sample standard deviation (n - 1) / sqrt(n); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def doc_metrics(doc: Doc, lls: Sequence[float]) -> dict:
    """acc / acc_norm of one document (v0.3.0 ``MultipleChoiceTask.process_results``; ties to the first)."""
    lls = np.asarray(lls, dtype=np.float64)
    acc = int(np.argmax(lls) == doc.gold)
    acc_norm = int(np.argmax(lls / np.asarray(doc.norm_lengths, dtype=np.float64)) == doc.gold)
    return {"acc": acc, "acc_norm": acc_norm}


def aggregate(per_doc: Sequence[dict]) -> dict:
    accs = [d["acc"] for d in per_doc]
    norms = [d["acc_norm"] for d in per_doc]
    return {"acc": float(np.mean(accs)), "acc_stderr": mean_stderr(accs), "acc_norm": float(np.mean(norms)),
            "acc_norm_stderr": mean_stderr(norms), "n": len(per_doc)}


# =============================================================================================
# Tasks


def zero_shot_requests(tokenizer, docs: Sequence[Doc], bos: bool = False,
                       max_length: int = MAX_LENGTH) -> tuple[list[TokenRequest], list[list[int]]]:
    """The tokenized requests of ``docs`` and the groups that may share a row (one per document)."""
    reqs, groups = [], []
    for d in docs:
        groups.append(list(range(len(reqs), len(reqs) + len(d.requests))))
        reqs += [encode_request(tokenizer, c, x, bos=bos, max_length=max_length) for c, x in d.requests]
    # a document with a left-truncated request is not shared: each of its requests gets its own row
    flat = []
    for g, d in zip(groups, docs):
        truncated = any(len(reqs[j].tokens) > max_length for j in g)
        flat += [[j] for j in g] if truncated else [g]
    return reqs, flat


def model_max_length(model) -> int:
    """The study's ``LMClass.max_length``: the model config's ``max_position_embeddings``."""
    return int(getattr(model.config, "max_position_embeddings", None) or MAX_LENGTH)


def run_zero_shot(model, tokenizer, task: str, docs: Sequence[Doc], bos: bool = False, fast: bool = True,
                  token_budget: int | None = None) -> tuple[dict, list[dict]]:
    reqs, groups = zero_shot_requests(tokenizer, docs, bos, model_max_length(model))
    if fast:
        lls = score_fast(model, reqs, groups, token_budget, desc=task)
    else:
        lls = score_batch1(model, reqs, desc=task)
    _check_finite(lls, task)
    samples, k = [], 0
    for d in docs:
        doc_lls = lls[k:k + len(d.requests)]
        k += len(d.requests)
        samples.append({"doc_id": d.doc_id, "loglikelihoods": [float(v) for v in doc_lls], "gold": d.gold,
                        **doc_metrics(d, doc_lls)})
    return aggregate(samples), samples


@torch.no_grad()
def mmlu_logprobs_batch1(model, questions: Sequence[MMLUQuestion], letter_ids: Sequence[int],
                         desc: str = "mmlu") -> np.ndarray:
    """Reference: each prompt alone through the model; float32 log-softmax of the last position at the letters."""
    dev = _device_of(model)
    out = np.zeros((len(questions), len(letter_ids)))
    ids_t = torch.tensor(list(letter_ids), device=dev)
    for i, q in enumerate(_progress(questions, total=len(questions), desc=desc)):
        logits = model(input_ids=torch.tensor(q.ids, device=dev)[None], use_cache=False).logits[0, -1]
        out[i] = torch.log_softmax(logits.float(), dim=-1)[ids_t].double().cpu().numpy()
    return out


def mmlu_logprobs_fast(model, tokenizer, questions: Sequence[MMLUQuestion], prefixes: dict,
                       letter_ids: Sequence[int], token_budget: int | None = None, desc: str = "mmlu") -> np.ndarray:
    """The same numbers as :func:`mmlu_logprobs_batch1` with each shot count's prefix computed once.

    A question whose tokens do not start with its prefix's tokens (a BPE merge across the boundary)
    is run without sharing, so the tokens are always exactly the batch-1 path's.
    """
    items, encoded = [], {}
    for q in questions:
        if q.shots not in encoded:
            encoded[q.shots] = _encode_default(tokenizer, prefixes[q.shots])
        pre = encoded[q.shots]
        if len(pre) < len(q.ids) and q.ids[:len(pre)] == pre:
            items.append((pre, q.ids[len(pre):]))
        else:
            items.append(([], q.ids))
    return prefix_logprobs_fast(model, items, letter_ids, token_budget, desc)


def _pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """The indices of ``lengths`` in ``ceil(sum / max(width, longest))`` (at least one) balanced bins, longest
    first, each into the least filled bin (LPT): the fills end close together, so rows padded to the fullest
    one waste little; a bin may exceed ``max(width, longest)`` by about one item."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = max(1, math.ceil(sum(lengths) / max(int(width), max(lengths, default=1), 1)))
    bins: list[list[int]] = [[] for _ in range(n)]
    heap = [(0, b) for b in range(n)]
    for i in order:
        fill, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (fill + lengths[i], b))
    return [b for b in bins if b]


def prefix_plan(items: Sequence[tuple[Sequence[int], Sequence[int]]], token_budget: int,
                pack_width: int = PACK_WIDTH) -> list[tuple[tuple, list[list[int]], int]]:
    """The batches of :func:`prefix_logprobs_fast`: ``(prefix, rows, width)`` with ``rows`` lists of item
    indices packed into one row each (:func:`_pack`: balanced rows of about ``max(pack_width, longest suffix)``
    tokens; ``width`` is the fullest row's), rows of one prefix batched while ``rows x width <= token_budget``
    (the tokens through the GEMMs) and ``rows x (len(prefix) + width) <= KV_FACTOR x token_budget`` (the keys/values attended to)."""
    by_prefix: dict[tuple, list[int]] = {}
    keys: dict[int, tuple] = {}  # one tuple per prefix object (items share their prefix lists)
    for i, (pre, suf) in enumerate(items):
        if not len(suf):
            raise ValueError(f"item {i}: empty suffix; the last prompt token must not be part of the shared prefix.")
        key = keys.get(id(pre))
        if key is None:
            key = keys[id(pre)] = tuple(pre)
        by_prefix.setdefault(key, []).append(i)
    plan = []
    for pre, idx in by_prefix.items():
        lengths = [len(items[i][1]) for i in idx]
        rows = [[idx[b] for b in row] for row in _pack(lengths, pack_width)]
        width = max(sum(len(items[i][1]) for i in row) for row in rows)
        per_batch = max(1, min(int(token_budget) // width, KV_FACTOR * int(token_budget) // (len(pre) + width)))
        for s in range(0, len(rows), per_batch):
            plan.append((pre, rows[s:s + per_batch], width))
    return plan


@torch.no_grad()
def prefix_logprobs_fast(model, items: Sequence[tuple[Sequence[int], Sequence[int]]], letter_ids: Sequence[int],
                         token_budget: int | None = None, desc: str = "mmlu", pack_width: int = PACK_WIDTH) -> np.ndarray:
    """Float32 log-softmax at ``letter_ids`` after ``prefix + suffix`` for each item ``(prefix, suffix)``.

    Items with the same prefix share it: the prefix runs once (batch 1) and its keys/values are kept.
    The suffixes are packed into rows (:func:`prefix_plan`; several questions per row, no padding but the
    rows' ends) at positions ``len(prefix) ..`` each, every suffix attending to the whole prefix and
    causally to itself only; rows are batched to ``token_budget`` (see :func:`prefix_plan`).
    """
    dev = _device_of(model)
    budget = token_budget or TOKEN_BUDGET.get(dev.type, TOKEN_BUDGET["cuda"])
    out = np.zeros((len(items), len(letter_ids)))
    ids_t = torch.tensor(list(letter_ids), device=dev)
    plan = prefix_plan(items, budget, pack_width)
    past_key, past = None, None
    results, owners = [], []
    for pre, rows, width in _progress(plan, total=len(plan), desc=desc):
        P = len(pre)
        if P and past_key != pre:
            ids = _to_device(np.asarray(pre, dtype=np.int64), dev)[None]
            causal = torch.ones((P, P), dtype=torch.bool, device=dev).tril()[None, None]
            _, past = _forward(model, ids, torch.arange(P, device=dev)[None], causal, keep_kv=True)
            past_key = pre
        T = max(sum(len(items[i][1]) for i in row) for row in rows)
        ids = np.zeros((len(rows), T), dtype=np.int64)
        pos = np.zeros((len(rows), T), dtype=np.int64)
        seg = np.full((len(rows), T), -1, dtype=np.int64)
        last, owner = [], []
        for b, row in enumerate(rows):
            t = 0
            for n, i in enumerate(row):
                suf = items[i][1]
                ids[b, t:t + len(suf)] = suf
                pos[b, t:t + len(suf)] = np.arange(P, P + len(suf))
                seg[b, t:t + len(suf)] = n + 1
                t += len(suf)
                last.append(b * T + t - 1)
                owner.append(i)
        own = _segment_mask(_to_device(seg, dev), shared=False)                  # [B, 1, T, T]
        mask = torch.cat([torch.ones((len(rows), 1, T, P), dtype=torch.bool, device=dev), own], dim=3)
        hidden, _ = _forward(model, _to_device(ids, dev), _to_device(pos, dev), mask, past=past if P else None)
        last_t = _to_device(np.asarray(last, dtype=np.int64), dev)
        logp = _head_logprobs(model, hidden.reshape(len(rows) * T, -1)[last_t])
        results.append(logp[:, ids_t])
        owners += owner
    if results:
        out[owners] = torch.cat(results).double().cpu().numpy()
    return out


def run_mmlu(model, tokenizer, subjects: Sequence[str], data_dir=None, limit: int | None = None, fast: bool = True,
             letter_space: bool = False, token_budget: int | None = None) -> tuple[dict, list[dict]]:
    letter_ids = mmlu_letter_ids(tokenizer, letter_space)
    per_subject, samples, shots_used = {}, [], {}
    for subject in subjects:
        questions, prefixes = mmlu_questions(tokenizer, subject, data_dir, limit)
        if fast:
            lp = mmlu_logprobs_fast(model, tokenizer, questions, prefixes, letter_ids, token_budget,
                                    desc=f"mmlu {subject}")
        else:
            lp = mmlu_logprobs_batch1(model, questions, letter_ids, desc=f"mmlu {subject}")
        _check_finite(lp, f"mmlu {subject}")
        cors = []
        for q, row in zip(questions, lp):
            acc = int(int(np.argmax(row)) == q.gold)
            cors.append(acc)
            samples.append({"doc_id": q.doc_id, "subject": subject, "loglikelihoods": [float(v) for v in row],
                            "gold": q.gold, "acc": acc})
        per_subject[subject] = cors
        shots_used[subject] = {str(k): sum(q.shots == k for q in questions) for k in sorted({q.shots for q in questions})}
    all_cors = [c for cs in per_subject.values() for c in cs]
    cats = {}
    for cat, subcats in MMLU_CATEGORIES.items():
        cs = [c for s, v in per_subject.items() if MMLU_SUBCATEGORIES.get(s) in subcats for c in v]
        if cs:
            cats[cat] = {"acc": float(np.mean(cs)), "n": len(cs)}
    result = {"acc": float(np.mean(all_cors)) if all_cors else None, "n": len(all_cors), "categories": cats,
              "subjects": {s: {"acc": float(np.mean(v)), "n": len(v)} for s, v in per_subject.items()},
              "shots": shots_used, "letter_ids": letter_ids}
    return result, samples


# =============================================================================================
# The public entry point


def recipe_of(act_quant) -> dict:
    """An activation-quantization recipe ``{layer: {linear: ActQuant}}`` from objects or its JSON form."""
    out = {}
    for i, aq in (act_quant or {}).items():
        out[int(i)] = {n: a if isinstance(a, ActQuant) else ActQuant(**a) for n, a in aq.items()}
    return {i: aq for i, aq in out.items() if aq}


def batch_dependent(recipe: dict) -> bool:
    """A per-tensor dynamic activation quantizer: its scale depends on the whole batch."""
    return any(a.mode == "per_tensor" for aq in recipe.values() for a in aq.values())


def write_samples(outdir, task: str, samples: Sequence[dict]) -> pathlib.Path:
    """``OUTDIR/<task>.jsonl``: one JSON object per document in file order."""
    path = pathlib.Path(outdir) / f"{task}.jsonl"
    write_text_atomic(path, "".join(json.dumps(s) + "\n" for s in samples))
    return path


def evaluate(model, tokenizer, tasks, *, limit=None, bos=False, mmlu_subjects=None, log_samples=None, device=None,
             data_dir=None, fast=True, act_quant=None, progress=True, mmlu_letter_space=False,
             token_budget=None) -> dict:
    """Zero-shot accuracy (v0.3.0 protocol) and MMLU 5-shot (IR-QLoRA protocol) of a causal LM.

    Args:
        model: a Hugging Face LLaMA-architecture causal LM (torch); ``device`` moves it there first.
        tokenizer: its Hugging Face tokenizer.
        tasks: names from :data:`TASKS` (a list, or a comma-separated string).
        limit: the first ``limit`` documents of each task (MMLU: of each subject).
        bos: prepend the BOS id to zero-shot contexts (MMLU always uses the tokenizer's default).
        mmlu_subjects: a subset of subjects (default: all, sorted).
        log_samples: a directory; ``<task>.jsonl`` per task is written there.
        data_dir: the data directory (default ``$REFQUANT_DATA_DIR``).
        fast: the batched shared-prefix path (False: the batch-1 reference).
        act_quant: an activation-quantization recipe (``{layer: {linear: ActQuant or its dict}}``) applied
            with :func:`refquant.torch_pipeline.act_quant_applied`; a per-tensor dynamic quantizer
            depends on the batch, so with one the batch-1 path is used.
        progress: progress bars per task (subject to ``REFQUANT_PROGRESS``).
        mmlu_letter_space: score the letter tokens of ``" A"`` .. ``" D"`` instead of ``"A"`` .. ``"D"``.
        token_budget: padded tokens per fast-path batch (default :data:`TOKEN_BUDGET` of the device).
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"no tasks given; choose from {', '.join(TASKS)}.")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}.")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be a positive number of documents; got {limit}.")
    subjects = None
    if "mmlu" in tasks:
        available = available_mmlu_subjects(data_dir)
        subjects = available if not mmlu_subjects_given(mmlu_subjects) else _subject_list(mmlu_subjects)
        missing = [s for s in subjects if s not in available]
        if missing:
            raise ValueError(f"unknown MMLU subject(s) {missing}; the data directory has {len(available)}: "
                             f"{', '.join(available[:6])}, ...")
        subjects = sorted(subjects)
    elif mmlu_subjects_given(mmlu_subjects):
        raise ValueError("mmlu_subjects given but 'mmlu' is not among the tasks.")
    if device is not None:
        model = model.to(device)
    model.eval()
    recipe = recipe_of(act_quant)
    use_fast = bool(fast) and not batch_dependent(recipe)
    old_progress = os.environ.get("REFQUANT_PROGRESS")
    if not progress:
        os.environ["REFQUANT_PROGRESS"] = "0"
    results: dict = {"tasks": {}}
    seconds: dict = {}
    try:
        with act_quant_applied(model, recipe) if recipe else contextlib.nullcontext():
            for task in tasks:
                t = time.perf_counter()
                if task == "mmlu":
                    res, samples = run_mmlu(model, tokenizer, subjects, data_dir, limit, use_fast, mmlu_letter_space,
                                            token_budget)
                    results["mmlu"] = res
                else:
                    docs = load_docs(task, data_dir, limit)
                    res, samples = run_zero_shot(model, tokenizer, task, docs, bos, use_fast, token_budget)
                    results["tasks"][task] = res
                if _device_of(model).type == "cuda":
                    torch.cuda.synchronize(_device_of(model))
                seconds[task] = time.perf_counter() - t
                if log_samples is not None:
                    write_samples(log_samples, task, samples)
                log.info("%s: %s", task, {k: v for k, v in res.items() if k in ("acc", "acc_norm", "n")})
    finally:
        if not progress:
            if old_progress is None:
                os.environ.pop("REFQUANT_PROGRESS", None)
            else:
                os.environ["REFQUANT_PROGRESS"] = old_progress
    zs = [results["tasks"][t]["acc"] for t in tasks if t in ZERO_SHOT]
    results["zero_shot_average"] = float(np.mean(zs)) if zs else None
    dev = _device_of(model)
    results["protocol"] = {
        "zero_shot": HARNESS, "mmlu": MMLU_SOURCE, "bos": bool(bos), "mmlu_bos": "tokenizer default",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(dev),
        "path": "fast" if use_fast else "batch1", "fast_requested": bool(fast),
        "fused_kernels": bool(use_fast and _kernels.usable(dev)),
        "batch_size": "token budget %d" % (token_budget or TOKEN_BUDGET.get(dev.type, TOKEN_BUDGET["cuda"]))
        if use_fast else 1,
        "max_length": model_max_length(model), "log_softmax": "float32", "limit": limit,
        "mmlu_shots": MMLU_SHOTS, "mmlu_max_tokens": MMLU_MAX_TOKENS, "mmlu_letter_space": bool(mmlu_letter_space),
        "mmlu_subjects": subjects, "act_quant": bool(recipe),
        "data_dir": portable_path(_data_root(data_dir)),
        "splits": {"piqa": "validation", "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation",
                   "winogrande": "validation (1.1 dev)", "mmlu": "test (dev rows as shots)"},
    }
    results["seconds"] = seconds
    return results


def mmlu_subjects_given(value) -> bool:
    return value is not None and len(_subject_list(value)) > 0


def _subject_list(value) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return list(value)


# =============================================================================================
# Reports


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (acc in %, the tables' metric; acc_norm and n beside)."""
    lines = ["| task | acc | ± | acc_norm | ± | n |", "|---|---:|---:|---:|---:|---:|"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for task, r in results.get("tasks", {}).items():
        lines.append(f"| {task} | {pct(r['acc'])} | {pct(r['acc_stderr'])} | {pct(r['acc_norm'])} | "
                     f"{pct(r['acc_norm_stderr'])} | {r['n']} |")
    if results.get("zero_shot_average") is not None:
        lines.append(f"| zero-shot average | {pct(results['zero_shot_average'])} | | | | |")
    if "mmlu" in results:
        m = results["mmlu"]
        lines.append(f"| mmlu (5-shot, question-weighted) | {pct(m['acc'])} | | | | {m['n']} |")
        for cat, r in m["categories"].items():
            lines.append(f"| mmlu: {cat} | {pct(r['acc'])} | | | | {r['n']} |")
    return "\n".join(lines) + "\n"


def results_record(results: dict, model_path: str | None = None, device: str | None = None) -> dict:
    """The results JSON: provenance (refquant, commit, packages, device, command) and the protocol."""
    return {"provenance": provenance(device), "model": portable_path(model_path) if model_path else None, **results}


__all__ = ["ZERO_SHOT", "TASKS", "evaluate", "load_docs", "mmlu_questions", "available_mmlu_subjects", "encode_request",
           "score_batch1", "score_fast", "prefix_logprobs_fast", "prefix_plan", "zero_shot_requests", "markdown_table", "results_record", "write_samples", "Doc", "TokenRequest",
           "hellaswag_query", "hellaswag_split", "hellaswag_preprocess", "winogrande_doc", "arc_gold",
           "mean_stderr", "doc_metrics", "aggregate", "read_mmlu_csv", "mmlu_prefix", "mmlu_letter_ids",
           "EvalDataError", "load_tokenizer"]

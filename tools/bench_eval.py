#!/usr/bin/env python3
"""Evaluation benchmarks of tools/bench.py: the five zero-shot tasks and MMLU 5-shot on a resident model.

``tools/bench.py`` runs them (``eval_zero_shot``, ``eval_mmlu``) after the perplexity benchmark, on the
same resident bf16 model with random weights; they need the evaluation data (``--data-dir`` or
``REFQUANT_DATA_DIR``) and are skipped with a message without it.

How the requests are sized. The random model has no LLaMA-3 tokenizer (and the tiny model's
4096-token vocabulary cuts English into more pieces than LLaMA-3's 128k one), so the requests are
built from the *documents*, not from a tokenizer: every request keeps its task, document, choice
structure and sharing (PIQA/ARC/HellaSwag: one context, a continuation per choice; WinoGrande: the
sentence up to the blank shared, an option per request, the same continuation; MMLU: a subject's
few-shot prefix shared) and every piece of text becomes ``round(characters * f)`` random token ids,
with one factor ``f`` per suite fixed so that the totals are the study's counts on LLaMA-3
(issue 13): 60,566 zero-shot requests with 4.2 M tokens counted request by request (unshared), and
14,042 MMLU prompts with ~10 M tokens unshared (+ BOS). MMLU drops shots as the protocol does
when a prompt would exceed 2048 tokens. The JSON records f, the request and token counts, the
tokens the fast path actually computes (shared prefixes once, ``tokens_computed``) and feeds through
the model (padding included, ``tokens_fed``), its batch count, a warm-up call's time (``warmup_s``:
Triton's first-launch compiles, outside the timed run) and whether the fused kernels ran.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from refquant import evaluate as ev

STUDY_ZERO_SHOT_TOKENS = 4_200_000   # 60,566 requests (issue 13; the study's loop on LLaMA-3)
STUDY_ZERO_SHOT_REQUESTS = 60_566
STUDY_MMLU_TOKENS = 10_000_000       # 14,042 questions, 5-shot, unshared
STUDY_MMLU_QUESTIONS = 14_042


def _rand(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, size=max(int(n), 0)).tolist()


def zero_shot_workload(data_dir, vocab: int, seed: int = 0, target_tokens: int = STUDY_ZERO_SHOT_TOKENS,
                       limit: int | None = None, max_length: int = ev.MAX_LENGTH):
    """``(requests, groups, info)``: the five tasks' requests with random ids sized by characters
    (``limit``: the first documents of each task only, for smoke runs)."""
    docs = [d for t in ev.ZERO_SHOT for d in ev.load_docs(t, data_dir, limit)]
    chars = sum(len(c) + len(x) for d in docs for c, x in d.requests)
    if limit is not None:  # the factor of the full sets
        chars_all = sum(len(c) + len(x) for t in ev.ZERO_SHOT for d in ev.load_docs(t, data_dir) for c, x in d.requests)
        f = target_tokens / chars_all
    else:
        f = target_tokens / chars
    rng = np.random.default_rng([seed, 13])
    reqs, groups = [], []
    for d in docs:
        contexts = [c for c, _ in d.requests]
        shared_chars = len(os.path.commonprefix(contexts))
        shared = _rand(rng, round(shared_chars * f), vocab)
        group = []
        for c, x in d.requests:
            n_cont = max(1, round(len(x) * f))
            ctx = shared + _rand(rng, round((len(c) - shared_chars) * f), vocab)
            if not ctx:
                ctx = _rand(rng, 1, vocab)
            group.append(len(reqs))
            reqs.append(ev.TokenRequest((ctx + _rand(rng, n_cont, vocab))[-(max_length + 1):], n_cont))
        groups.append(group)
    flat = []
    for g in groups:
        flat += [[j] for j in g] if any(len(reqs[j].tokens) > max_length for j in g) else [g]
    rows = ev.build_rows(reqs, flat)
    info = {"requests": len(reqs), "documents": len(docs), "characters": chars, "tokens_per_character": f,
            "tokens_unshared": sum(len(r.tokens) for r in reqs),
            "tokens_computed": sum(len(r.tokens) for r in rows), "rows": len(rows),
            "scored_positions": sum(len(w) for r in rows for _, w, _ in r.score)}
    return reqs, flat, info


def zero_shot_fed(reqs, groups, token_budget: int) -> dict:
    """What :func:`refquant.evaluate.score_fast` feeds through the model: padded token positions (batches x
    longest row) and the batch count at ``token_budget``."""
    rows = ev.build_rows(reqs, groups)
    lengths = [len(r.tokens) for r in rows]
    batches = ev._batches(lengths, token_budget)
    return {"tokens_fed": sum(len(b) * max(lengths[i] for i in b) for b in batches), "batches": len(batches)}


def mmlu_fed(items, token_budget: int) -> dict:
    """What :func:`refquant.evaluate.prefix_logprobs_fast` feeds through the model: the prefixes once, the
    packed question rows padded to each batch's fullest row, the batch count and the attention area
    (query x key positions, summed over batches)."""
    plan = ev.prefix_plan(items, token_budget)
    fed = sum(len(p) for p in {pre for pre, _, _ in plan})
    area = 0
    for pre, rows, _ in plan:
        T = max(sum(len(items[i][1]) for i in row) for row in rows)
        fed += len(rows) * T
        area += len(rows) * T * (len(pre) + T)
    return {"tokens_fed": fed, "batches": len(plan), "rows": sum(len(r) for _, r, _ in plan),
            "attention_positions": area}


def mmlu_workload(data_dir, vocab: int, bos_id: int, seed: int = 0, target_tokens: int = STUDY_MMLU_TOKENS,
                  limit: int | None = None):
    """``(items, info)``: ``(prefix ids, suffix ids)`` per MMLU question, sized by characters
    (``limit``: the first questions of each subject only, with the full sets' factor)."""
    per_subject = []
    chars = 0
    for subject in ev.available_mmlu_subjects(data_dir):
        root = ev._data_root(data_dir)
        dev = ev.read_mmlu_csv(root / "mmlu" / "dev" / f"{subject}_dev.csv")[:ev.MMLU_SHOTS]
        test = ev.read_mmlu_csv(root / "mmlu" / "test" / f"{subject}_test.csv")
        prefix_chars = [len(ev.mmlu_prefix(dev, subject, k)) for k in range(ev.MMLU_SHOTS + 1)]
        ends = [len(ev.mmlu_format_example(r, include_answer=False)) for r in test]
        chars += sum(prefix_chars[-1] + e for e in ends)
        per_subject.append((subject, prefix_chars, ends if limit is None else ends[:limit]))
    f = target_tokens / chars
    rng = np.random.default_rng([seed, 14])
    items, shots = [], {}
    for subject, prefix_chars, ends in per_subject:
        prefixes = {}
        for e in ends:
            n_end = max(1, round(e * f))
            k = ev.MMLU_SHOTS
            while k > 0 and 1 + round(prefix_chars[k] * f) + n_end > ev.MMLU_MAX_TOKENS:
                k -= 1
            if k not in prefixes:
                prefixes[k] = [bos_id] + _rand(rng, round(prefix_chars[k] * f), vocab)
            shots[k] = shots.get(k, 0) + 1
            items.append((prefixes[k], _rand(rng, n_end, vocab)[:ev.MMLU_MAX_TOKENS - len(prefixes[k])]))
    distinct = {tuple(p) for p, _ in items}
    info = {"questions": len(items), "characters": chars, "tokens_per_character": f,
            "tokens_unshared": sum(len(p) + len(s) for p, s in items),
            "tokens_computed": sum(len(p) for p in distinct) + sum(len(s) for _, s in items),
            "prefixes": len(distinct), "questions_by_shots": {str(k): v for k, v in sorted(shots.items())}}
    return items, info


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _warmup(model, device) -> float:
    """One small fast-path call of each kind before the timed run: the fused Triton kernels JIT-compile
    on their first launch (a few seconds into an empty cache, once per process and shape class), and cuBLAS /
    SDPA pick their kernels; a study run pays that once for many models. Recorded as ``warmup_s``."""
    vocab = model.lm_head.out_features
    _sync(device)
    t = time.perf_counter()
    a, b, c, d, e = (i % vocab for i in (1, 2, 3, 4, 5))
    ev.score_fast(model, [ev.TokenRequest([a, b, c, d], 2), ev.TokenRequest([a, b, e], 1)], [[0, 1]], desc="warm-up")
    ev.prefix_logprobs_fast(model, [([a, b], [c]), ([a, b], [d, e])], [0, 1], desc="warm-up")
    _sync(device)
    return time.perf_counter() - t


def _kernel_info(device) -> dict:
    return {"fused_kernels": ev._kernels.usable(device), "fused_kernel_failures": list(ev._kernels._BROKEN)}


def bench_zero_shot(model, data_dir, seed: int = 0, token_budget: int | None = None, limit: int | None = None) -> dict:
    vocab = model.lm_head.out_features
    t = time.perf_counter()
    reqs, groups, info = zero_shot_workload(data_dir, vocab, seed, limit=limit, max_length=ev.model_max_length(model))
    build_s = time.perf_counter() - t
    device = next(model.parameters()).device
    warmup_s = _warmup(model, device)
    _sync(device)
    t = time.perf_counter()
    lls = ev.score_fast(model, reqs, groups, token_budget, desc="bench zero-shot")
    _sync(device)
    seconds = time.perf_counter() - t
    if not np.all(np.isfinite(lls)):
        raise FloatingPointError("non-finite log-likelihoods in the zero-shot benchmark")
    budget = token_budget or ev.TOKEN_BUDGET.get(device.type)
    return {"kind": "eval_zero_shot", "seconds": round(seconds, 3), "workload_build_s": round(build_s, 3), **info,
            **zero_shot_fed(reqs, groups, budget), "warmup_s": round(warmup_s, 3), **_kernel_info(device),
            "token_budget": budget, "study_requests": STUDY_ZERO_SHOT_REQUESTS,
            "tokens_per_s": round(info["tokens_unshared"] / seconds, 1),
            "what": "refquant.evaluate.score_fast: a document's requests share one row (tree mask), rows sorted "
                    "longest first, batched to the token budget, LM head only at scored positions; random weights"}


def bench_mmlu(model, data_dir, bos_id: int, seed: int = 0, token_budget: int | None = None,
               limit: int | None = None) -> dict:
    vocab = model.lm_head.out_features
    t = time.perf_counter()
    items, info = mmlu_workload(data_dir, vocab, bos_id, seed, limit=limit)
    build_s = time.perf_counter() - t
    device = next(model.parameters()).device
    letters = [i % vocab for i in (32, 33, 34, 35)]  # LLaMA-3's ids of "A".."D" (tokenizer("A").input_ids[-1])
    warmup_s = _warmup(model, device)
    _sync(device)
    t = time.perf_counter()
    lp = ev.prefix_logprobs_fast(model, items, letters, token_budget, desc="bench mmlu")
    _sync(device)
    seconds = time.perf_counter() - t
    if not np.all(np.isfinite(lp)):
        raise FloatingPointError("non-finite log-probabilities in the MMLU benchmark")
    budget = token_budget or ev.TOKEN_BUDGET.get(device.type)
    return {"kind": "eval_mmlu", "seconds": round(seconds, 3), "workload_build_s": round(build_s, 3), **info,
            **mmlu_fed(items, budget), "warmup_s": round(warmup_s, 3), **_kernel_info(device), "pack_width": ev.PACK_WIDTH,
            "token_budget": budget, "study_questions": STUDY_MMLU_QUESTIONS,
            "what": "refquant.evaluate.prefix_logprobs_fast: each subject's few-shot prefix once (keys/values kept), "
                    "questions packed into rows against it; random weights"}

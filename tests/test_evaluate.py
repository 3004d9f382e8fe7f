"""Zero-shot and MMLU evaluation (refquant/evaluate.py): the study's request strings, metrics, the fast
path against the batch-1 reference, the JSONL layout, --limit and the errors.

Data tests need ``REFQUANT_DATA_DIR`` (../shared/data); they are skipped without it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from refquant import evaluate as ev  # noqa: E402
from refquant import torch_pipeline  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "golden" / "models" / "tiny-llama3"


@pytest.fixture(scope="module")
def shared() -> pathlib.Path:
    env = os.environ.get("REFQUANT_DATA_DIR", "")
    if not env.strip():
        pytest.skip("REFQUANT_DATA_DIR is not set; point it at ../shared/data to run the evaluation data tests.")
    p = pathlib.Path(env)
    if not (p / "piqa").is_dir():
        pytest.skip(f"REFQUANT_DATA_DIR={env} has no evaluation data (piqa/, arc/, ...).")
    return p


@pytest.fixture(scope="module")
def tok():
    return ev.load_tokenizer(TINY)


@pytest.fixture(scope="module")
def model():
    return torch_pipeline.load_model(str(TINY), dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------------------------------------
# request strings of hand-checked documents


def test_piqa_requests(shared):
    d = ev.load_docs("piqa", shared)[0]
    assert d.requests[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                             "strips, you will also need to supply it with a water bottle and a food dish.")
    assert d.requests[1][1].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans")
    assert d.gold == 0 and d.norm_lengths == (len(d.requests[0][1]) - 1, len(d.requests[1][1]) - 1)
    d1 = ev.load_docs("piqa", shared)[1]  # the raw text is kept: trailing space, double space
    assert d1.requests == (("Question: dresser\nAnswer:", " replace drawer with bobby pin "),
                           ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin "))
    assert d1.gold == 1 and len(ev.load_docs("piqa", shared)) == 1838


def test_arc_requests_and_numeric_keys(shared, tmp_path):
    d = ev.load_docs("arc_easy", shared)[0]
    assert d.requests[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most food "
                             "webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.")
    assert len(d.requests) == 4 and d.gold == 0
    assert len(ev.load_docs("arc_easy", shared)) == 2376 and len(ev.load_docs("arc_challenge", shared)) == 1172
    assert {len(x.requests) for x in ev.load_docs("arc_challenge", shared)} == {3, 4, 5}
    # v0.3.0: numeric answer keys map to letters, gold = index in A..E
    assert [ev.arc_gold(k) for k in ("1", "2", "3", "4", "5", "A", "C", "E")] == [0, 1, 2, 3, 4, 0, 2, 4]
    # the original ARC jsonl is read when present (numeric labels and key)
    (tmp_path / "arc").mkdir()
    row = {"id": "Mercury_1", "question": {"stem": "Which is a gas?", "choices": [
        {"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}, {"text": "rock", "label": "3"}]},
        "answerKey": "2"}
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text(json.dumps(row) + "\n")
    (d,) = ev.load_docs("arc_easy", tmp_path)
    assert d.requests == (("Question: Which is a gas?\nAnswer:", " ice"), ("Question: Which is a gas?\nAnswer:", " steam"),
                          ("Question: Which is a gas?\nAnswer:", " rock"))
    assert d.gold == 1


def test_hellaswag_rebuild(shared):
    docs = ev.load_docs("hellaswag", shared)
    assert len(docs) == 10042
    assert docs[0].requests[0] == ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis.")
    assert docs[0].gold == 3
    assert docs[1].requests[3] == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
                                   " stands and lifts the weight over her head.")
    # ctx_b = text after the last sentence end, capitalize() (first upper, rest lower); empty after . ? ! " '
    assert ev.hellaswag_split("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert ev.hellaswag_split('He says "stop!" then the Man') == ('He says "stop!"', "then the Man")
    assert ev.hellaswag_split("She smiles.") == ("She smiles.", "")
    assert ev.hellaswag_query("X: He waves. then the Dog") == "X: He waves. Then the dog"
    assert ev.hellaswag_query("X: Done.") == "X: Done."
    # strip first, then the markers go: a leading marker leaves a leading space (as in v0.3.0)
    assert ev.hellaswag_preprocess("  [header] How to x [title] Do it. [step] Go  now ") == " How to x. Do it. Go now"


def test_winogrande_partial_scoring(shared):
    docs = ev.load_docs("winogrande", shared)
    assert len(docs) == 1267
    d = docs[0]
    assert d.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                          ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert d.gold == 1 and d.norm_lengths == (29, 29)
    d = ev.winogrande_doc(7, "The cup fell on _ .  ", "Ann", "Bob", "1")
    assert d.requests == (("The cup fell on Ann", " ."), ("The cup fell on Bob", " ."))
    with pytest.raises(ValueError, match="no '_'"):
        ev.winogrande_doc(0, "no blank", "a", "b", "1")


def test_mmlu_prompt(shared, tok):
    qs, prefixes = ev.mmlu_questions(tok, "abstract_algebra", shared, limit=2)
    assert prefixes[5].startswith("The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                                  "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\n"
                                  "Answer: B\n\n")
    assert prefixes[5].count("\nAnswer: ") == 5
    assert qs[0].prompt.startswith(prefixes[5]) and qs[0].prompt.endswith("\nAnswer:")
    assert qs[0].ids[0] == tok.bos_token_id and qs[0].ids == list(tok(qs[0].prompt).input_ids)
    assert qs[0].gold == 1 and qs[0].shots == 5
    assert ev.mmlu_letter_ids(tok) == [tok("A").input_ids[-1], tok("B").input_ids[-1], tok("C").input_ids[-1],
                                       tok("D").input_ids[-1]]
    assert ev.mmlu_letter_ids(tok, leading_space=True) == [tok(" " + c).input_ids[-1] for c in "ABCD"]
    assert len(ev.available_mmlu_subjects(shared)) == 57
    # cells as pandas reads them: an option "None" is NaN, printed "nan"
    qs, _ = ev.mmlu_questions(tok, "college_computer_science", shared, limit=11)
    assert "\nA. nan\nB. " in qs[10].prompt


def test_mmlu_shots_dropped_at_2048(shared, tok):
    qs, prefixes = ev.mmlu_questions(tok, "high_school_european_history", shared, limit=1)
    q = qs[0]
    assert q.shots < 5 and len(q.ids) <= 2048
    dev_rows = ev.read_mmlu_csv(shared / "mmlu/dev/high_school_european_history_dev.csv")[:5]
    end = q.prompt[len(prefixes[q.shots]):]
    longer = tok(ev.mmlu_prefix(dev_rows, "high_school_european_history", q.shots + 1) + end).input_ids
    assert len(longer) > 2048  # one more shot would not fit
    with pytest.raises(ValueError, match="without shots"):
        ev.mmlu_questions(tok, "abstract_algebra", shared, limit=1, max_tokens=10)


def test_mmlu_csv_reader_without_pandas_matches_pandas(shared):
    pd = pytest.importorskip("pandas")
    for f in sorted((shared / "mmlu").glob("*/*.csv")):
        df = pd.read_csv(f, header=None)
        with open(f, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
        cols = [ev._pandas_column([r[j] for r in rows]) for j in range(len(rows[0]))]
        ours = ["{}".format(cols[j][i]) for i in range(len(rows)) for j in range(len(rows[0]))]
        theirs = ["{}".format(df.iloc[i, j]) for i in range(df.shape[0]) for j in range(df.shape[1])]
        assert ours == theirs, f
    assert ["{}".format(v) for v in ev._pandas_column(["1", "2", ""])] == ["1.0", "2.0", "nan"]
    assert ev._pandas_column(["1", "2"]) == [1, 2]
    assert ["{}".format(v) for v in ev._pandas_column(["x", "None", "NA"])] == ["x", "nan", "nan"]


# ---------------------------------------------------------------------------------------------
# metrics


def test_acc_acc_norm_and_stderr():
    d = ev.mc_requests(0, "Q", ["a", "bbbb"], gold=1)
    assert d.requests == (("Q", " a"), ("Q", " bbbb"))
    assert ev.doc_metrics(d, [-2.0, -4.0]) == {"acc": 0, "acc_norm": 1}   # -2/1 < -4/4
    assert ev.doc_metrics(d, [-3.0, -3.0]) == {"acc": 0, "acc_norm": 1}   # tie -> first; -3 < -0.75
    assert ev.doc_metrics(ev.mc_requests(0, "Q", ["a", "b"], 0), [-1.0, -1.0]) == {"acc": 1, "acc_norm": 1}
    assert ev.mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)             # sample std 0.5 / sqrt(4)
    assert ev.mean_stderr([1]) is None
    agg = ev.aggregate([{"acc": 1, "acc_norm": 0}, {"acc": 0, "acc_norm": 0}, {"acc": 1, "acc_norm": 1}])
    assert agg["acc"] == pytest.approx(2 / 3) and agg["n"] == 3
    assert agg["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    with pytest.raises(ValueError, match="gold"):
        ev.mc_requests(0, "Q", ["a"], gold=1)


def test_encode_request_protocol(tok):
    r = ev.encode_request(tok, "Question: x\nAnswer:", " yes")
    assert r.tokens == list(tok("Question: x\nAnswer:", add_special_tokens=False).input_ids) + \
        list(tok(" yes", add_special_tokens=False).input_ids)
    assert r.n_score == len(tok(" yes", add_special_tokens=False).input_ids)
    assert ev.encode_request(tok, "Question: x\nAnswer:", " yes", bos=True).tokens == [tok.bos_token_id] + r.tokens
    assert ev.encode_request(tok, "", " yes").tokens[0] == tok.eos_token_id
    long = ev.encode_request(tok, "word " * 3000, " end", max_length=2048)
    assert len(long.tokens) == 2049  # left-truncated to max_length + 1


# ---------------------------------------------------------------------------------------------
# the fast path equals the batch-1 reference


def _compare(a, b, groups):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-3
    for g in groups:
        assert int(np.argmax(a[g])) == int(np.argmax(b[g]))


@pytest.mark.parametrize("task", ev.ZERO_SHOT)
def test_fast_equals_batch1(shared, tok, model, task):
    docs = ev.load_docs(task, shared, limit=2)
    reqs, groups = ev.zero_shot_requests(tok, docs, bos=task == "piqa")
    slow = ev.score_batch1(model, reqs)
    fast, greedy = ev.score_fast(model, reqs, groups, token_budget=512, return_greedy=True)
    _compare(slow, fast, groups)
    _, greedy1 = ev.score_batch1(model, reqs[:2], return_greedy=True)
    assert greedy1 == greedy[:2]


def test_fast_equals_batch1_truncated(tok, model):
    docs = [ev.mc_requests(0, "one two three " * 30, ["four five", "six"], 0), ev.mc_requests(1, "short", ["a", "b c"], 1)]
    reqs, groups = ev.zero_shot_requests(tok, docs, max_length=48)
    assert len(reqs[0].tokens) == 49 and groups[:2] == [[0], [1]] and groups[2] == [2, 3]
    _compare(ev.score_batch1(model, reqs), ev.score_fast(model, reqs, groups), [[0, 1], [2, 3]])


@pytest.mark.parametrize("subject", ["abstract_algebra", pytest.param("high_school_european_history",
                                                                      marks=pytest.mark.slow)])
def test_mmlu_fast_equals_batch1(shared, tok, model, subject):
    ids = ev.mmlu_letter_ids(tok)
    qs, prefixes = ev.mmlu_questions(tok, subject, shared, limit=2)
    a = ev.mmlu_logprobs_batch1(model, qs, ids)
    b = ev.mmlu_logprobs_fast(model, tok, qs, prefixes, ids, token_budget=4096)
    assert np.max(np.abs(a - b)) <= 1e-3
    assert (a.argmax(1) == b.argmax(1)).all()


# ---------------------------------------------------------------------------------------------
# the public entry point, the JSONL layout, the CLI


def test_evaluate_jsonl_layout(shared, tok, model, tmp_path):
    res = ev.evaluate(model, tok, ["winogrande", "mmlu"], limit=2, mmlu_subjects="anatomy,abstract_algebra",
                      log_samples=tmp_path, data_dir=shared, progress=False)
    assert set(res) >= {"tasks", "mmlu", "zero_shot_average", "protocol", "seconds"}
    w = res["tasks"]["winogrande"]
    assert set(w) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"} and w["n"] == 2
    assert res["zero_shot_average"] == w["acc"]
    assert res["mmlu"]["n"] == 4 and set(res["mmlu"]["subjects"]) == {"anatomy", "abstract_algebra"}
    assert set(res["mmlu"]["categories"]) == {"STEM", "other (business, health, misc.)"}
    assert res["protocol"]["bos"] is False and res["protocol"]["mmlu_subjects"] == ["abstract_algebra", "anatomy"]
    lines = [json.loads(x) for x in (tmp_path / "winogrande.jsonl").read_text().splitlines()]
    assert [x["doc_id"] for x in lines] == [0, 1]
    for x in lines:
        assert set(x) == {"doc_id", "loglikelihoods", "gold", "acc", "acc_norm"} and len(x["loglikelihoods"]) == 2
        assert x["acc"] == int(int(np.argmax(x["loglikelihoods"])) == x["gold"])
    m = [json.loads(x) for x in (tmp_path / "mmlu.jsonl").read_text().splitlines()]
    assert [(x["subject"], x["doc_id"]) for x in m] == [("abstract_algebra", 0), ("abstract_algebra", 1),
                                                        ("anatomy", 0), ("anatomy", 1)]
    for x in m:
        assert set(x) == {"doc_id", "subject", "loglikelihoods", "gold", "acc"} and len(x["loglikelihoods"]) == 4
        assert all(v < 0 for v in x["loglikelihoods"])  # full-vocabulary log-softmax values
    assert "| winogrande |" in ev.markdown_table(res)


def test_cli_limit(shared, tmp_path, capsys):
    from refquant import cli

    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--model", str(TINY), "--tasks", "arc_challenge", "--limit", "3", "--log-samples",
                   str(tmp_path / "samples"), "--out", str(out), "--data-dir", str(shared), "--device", "cpu"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["perplexity"] == {} and rec["evaluation"]["tasks"]["arc_challenge"]["n"] == 3
    assert rec["evaluation"]["protocol"]["limit"] == 3 and "provenance" in rec
    assert len((tmp_path / "samples" / "arc_challenge.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "eval.md").read_text().startswith("| task | acc |")
    assert "| arc_challenge |" in capsys.readouterr().out


def test_errors(shared, tok, model, tmp_path, monkeypatch):
    monkeypatch.delenv("REFQUANT_DATA_DIR", raising=False)
    with pytest.raises(ev.EvalDataError, match="REFQUANT_DATA_DIR"):
        ev.load_docs("piqa")
    with pytest.raises(ev.EvalDataError, match="does not exist"):
        ev.load_docs("piqa", tmp_path / "nowhere")
    with pytest.raises(ev.EvalDataError, match="piqa/valid.jsonl is missing"):
        ev.load_docs("piqa", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        ev.evaluate(model, tok, ["piqa", "boolq"], data_dir=shared)
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        ev.evaluate(model, tok, ["mmlu"], mmlu_subjects=["astrology"], data_dir=shared)
    with pytest.raises(ValueError, match="'mmlu' is not among the tasks"):
        ev.evaluate(model, tok, ["piqa"], mmlu_subjects=["anatomy"], data_dir=shared)
    with pytest.raises(ValueError, match="limit"):
        ev.evaluate(model, tok, ["piqa"], limit=0, data_dir=shared)


def test_bench_workload_is_sized_by_characters(shared):
    import sys

    sys.path.insert(0, str(ROOT))
    from tools import bench_eval

    reqs, groups, info = bench_eval.zero_shot_workload(shared, 1000, limit=2)
    docs = [d for t in ev.ZERO_SHOT for d in ev.load_docs(t, shared, 2)]
    assert info["requests"] == len(reqs) == sum(len(d.requests) for d in docs) and len(groups) == len(docs)
    assert 0.2 < info["tokens_per_character"] < 0.3  # ~4.2 characters per LLaMA-3 token
    assert info["tokens_computed"] < info["tokens_unshared"]  # shared contexts are computed once
    for d, g in zip(docs, groups):  # a document's requests share their context tokens
        first = reqs[g[0]].tokens
        n = len(os.path.commonprefix([c for c, _ in d.requests]))
        k = round(n * info["tokens_per_character"])
        assert all(reqs[j].tokens[:k] == first[:k] for j in g)

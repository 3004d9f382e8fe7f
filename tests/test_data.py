"""Tests of refquant.data: rows, calibration windows and evaluation streams of the GPTQ protocols.

A toy tokenizer (one token per UTF-8 byte, BOS id 256 prepended, as ``tokenizer(text)`` of LLaMA
prepends BOS) keeps everything fast. Expected values are re-derived here in the most direct way
from the files (and ``random.Random``), independently of refquant's code paths.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import random
import sys

import numpy as np
import pytest

from refquant import data
from refquant.data import DatasetNotFound, as_encoder, get_calibration, get_eval_tokens, load_rows, resolve_data_dir

BOS = 256


def toy_encode(text: str) -> list[int]:
    return [BOS] + list(text.encode("utf-8"))


def toy_array(text: str) -> np.ndarray:
    return np.concatenate([[BOS], np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]).astype(np.int64)


@pytest.fixture(scope="module")
def shared() -> pathlib.Path:
    env = os.environ.get("REFQUANT_DATA_DIR", "")
    if not env:
        pytest.skip("REFQUANT_DATA_DIR is not set; point it at the shared data directory (../shared/data) to run data tests.")
    root = pathlib.Path(env)
    if not root.is_dir():
        pytest.skip(f"REFQUANT_DATA_DIR={env} is not a directory.")
    return root


def need(root: pathlib.Path, rel: str) -> pathlib.Path:
    p = root / rel
    if not p.is_file():
        pytest.skip(f"{p} is missing from the data directory.")
    return p


@pytest.fixture
def no_hf(monkeypatch):
    """Make `import datasets` fail, so that no test ever reaches the network."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def raw_lines(path: pathlib.Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]  # every line of these files ends with "\n"


# ------------------------------------------------------------------------------------------
# settings and tokenizers


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("REFQUANT_DATA_DIR", raising=False)
    assert resolve_data_dir() is None
    monkeypatch.setenv("REFQUANT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def _tiny_tokenizers_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_as_encoder_tokenizers_and_callable():
    tok = _tiny_tokenizers_tokenizer()
    assert as_encoder(tok)("hello world foo") == [1, 2, 3, 0]
    assert as_encoder(toy_encode)("ab") == [BOS, 97, 98]
    assert as_encoder(lambda t: np.array([5, 6]))("x") == [5, 6]
    with pytest.raises(TypeError, match="callable"):
        as_encoder(42)


def test_as_encoder_hf_tokenizer_adds_special_tokens_like_call():
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizers_tokenizer(), bos_token="<s>", unk_token="<unk>")
    text = "hello  world\n\nhello"
    assert as_encoder(hf)(text) == list(hf(text)["input_ids"]) == [1, 2, 3, 2]


def test_calibration_rejects_bad_encoder_output(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(" a b c \n" * 50, encoding="utf-8")
    with pytest.raises(TypeError, match="integer token ids"):
        get_calibration("ptb", lambda t: [0.5, 1.5], nsamples=1, seqlen=4, data_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# rows (numbers from SOURCES.md)


def test_wikitext2_test_rows_match_hf(shared):
    path = need(shared, "wikitext2/wiki.test.raw")
    rows, info = load_rows("wikitext2", "test", shared)
    assert len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert info == {"dataset": "wikitext2", "split": "test", "source": "wikitext2/wiki.test.raw", "variant": "wikitext-2-raw-v1",
                    "n_rows": 4358}
    # HF rows keep the newline; blank lines (" \n" in the file) are "".
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert all(r == "" or r.endswith("\n") for r in rows)
    expected = [line + "\n" if line.strip() else "" for line in raw_lines(path)]
    assert rows == expected
    # Arrow size check of SOURCES.md: text bytes + (n + 1) 4-byte offsets = HF num_bytes.
    assert sum(len(r.encode("utf-8")) for r in rows) + 4 * (len(rows) + 1) == 1_305_092


def test_wikitext2_validation_rows(shared):
    need(shared, "wikitext2/wiki.valid.raw")
    rows, _ = load_rows("wikitext2", "validation", shared)
    assert len(rows) == 3760
    assert sum(len(r.encode("utf-8")) for r in rows) + 4 * (len(rows) + 1) == 1_159_292


def test_wikitext2_train_standin_is_labelled(shared):
    if (shared / "wikitext2" / "wiki.train.raw").is_file():
        pytest.skip("the raw train split is present; the stand-in is not used")
    path = need(shared, "wikitext2-tokenized/wiki.train.tokens")
    rows, info = load_rows("wikitext2", "train", shared)
    assert len(rows) == 36718
    assert info["source"] == "wikitext2-tokenized/wiki.train.tokens" and path.is_file()
    assert info["variant"] == data.WIKITEXT2_TRAIN_STANDIN
    assert "stand-in" in info["variant"] and "<unk>" in info["variant"]
    assert "wiki.train.raw" in info["caveat"]
    _, cinfo = get_calibration("wikitext2", toy_encode, nsamples=1, seqlen=16, data_dir=shared)
    assert cinfo["data_variant"] == data.WIKITEXT2_TRAIN_STANDIN and cinfo["source"] == "wikitext2-tokenized/wiki.train.tokens"


def test_wikitext2_train_prefers_raw(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2-tokenized").mkdir()
    (tmp_path / "wikitext2" / "wiki.train.raw").write_text(" \n = A = \n \n b c \n", encoding="utf-8")
    (tmp_path / "wikitext2-tokenized" / "wiki.train.tokens").write_text(" \n = <unk> = \n", encoding="utf-8")
    rows, info = load_rows("wikitext2", "train", tmp_path)
    assert rows == ["", " = A = \n", "", " b c \n"]
    assert info["variant"] == "wikitext-2-raw-v1" and "caveat" not in info
    assert info["source"] == "wikitext2/wiki.train.raw"  # relative to the data directory


def test_ptb_rows_are_stripped(shared):
    for split, n in (("train", 42068), ("validation", 3370), ("test", 3761)):
        fname = {"train": "train", "validation": "valid", "test": "test"}[split]
        path = need(shared, f"ptb/ptb.{fname}.txt")
        rows, info = load_rows("ptb", split, shared)
        assert len(rows) == n and info["n_rows"] == n and info["source"] == f"ptb/ptb.{fname}.txt"
        assert rows == [line.strip() for line in raw_lines(path)]
    assert rows[0] == "no it was n't black monday"


def test_c4_validation_subset_has_caveat(shared):
    need(shared, "c4/c4-validation.subset2000.json")
    rows, info = load_rows("c4", "validation", shared)
    assert len(rows) == 2000
    assert "subset2000" in info["source"] and "not" in info["caveat"] and "verified" in info["caveat"]
    assert sum(len(r) for r in rows) == 4_223_732  # text characters, SOURCES.md


def test_c4_gz_shard_is_read(tmp_path):
    (tmp_path / "c4").mkdir()
    docs = [{"text": "first doc", "url": "u"}, {"text": "second\ndoc", "url": "v"}]
    with gzip.open(tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(d) for d in docs) + "\n")
    (tmp_path / "c4" / "c4-validation.subset2000.json").write_text('{"text": "other"}\n', encoding="utf-8")
    rows, info = load_rows("c4", "validation", tmp_path)
    assert rows == ["first doc", "second\ndoc"]
    assert info["variant"] == "en/c4-validation.00000-of-00008" and "caveat" not in info


def test_missing_dataset_lists_every_path(tmp_path, no_hf):
    with pytest.raises(DatasetNotFound) as exc:
        load_rows("wikitext2", "train", tmp_path)
    msg = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    assert str(tmp_path / "wikitext2" / "wiki.train.raw") in msg
    assert str(tmp_path / "wikitext2-tokenized" / "wiki.train.tokens") in msg
    assert "--data-dir" in msg and "REFQUANT_DATA_DIR" in msg and "datasets" in msg


def test_missing_c4_train_in_shared_dir(shared, no_hf):
    if (shared / "c4" / "c4-train.00000-of-01024.json.gz").is_file() or (shared / "c4" / "c4-train.00000-of-01024.json").is_file():
        pytest.skip("a C4 train shard is present")
    with pytest.raises(DatasetNotFound, match="c4-train.00000-of-01024.json.gz") as exc:
        get_calibration("c4", toy_encode, data_dir=shared)
    assert str(shared / "c4" / "c4-train.00000-of-01024.json") in str(exc.value)


def test_no_data_dir_at_all(monkeypatch, no_hf):
    monkeypatch.delenv("REFQUANT_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFound, match="REFQUANT_DATA_DIR") as exc:
        load_rows("ptb", "test")
    assert "ptb/ptb.test.txt" in str(exc.value)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_rows("wikitext103", "test")
    with pytest.raises(ValueError, match="unknown split"):
        load_rows("ptb", "valid")
    with pytest.raises(ValueError, match="no 'test' split"):
        load_rows("c4", "test")
    with pytest.raises(ValueError, match="unknown calibration"):
        get_calibration("pile", toy_encode)
    with pytest.raises(ValueError, match="variant"):
        get_calibration("ptb", toy_encode, variant="awq")
    with pytest.raises(ValueError, match="unknown evaluation"):
        get_eval_tokens("lambada", toy_encode)


# ------------------------------------------------------------------------------------------
# calibration


def rederive_stream(text: str, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    ids = toy_array(text)
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i:i + seqlen])
    return np.stack(out)


def test_wikitext2_calibration_matches_rederivation(shared):
    path = need(shared, "wikitext2/wiki.train.raw") if (shared / "wikitext2/wiki.train.raw").is_file() \
        else need(shared, "wikitext2-tokenized/wiki.train.tokens")
    rows = [line + "\n" if line.strip() else "" for line in raw_lines(path)]
    text = "\n\n".join(rows)
    state = random.getstate()
    win, info = get_calibration("wikitext2", toy_encode, nsamples=16, seqlen=128, seed=3, data_dir=shared)
    assert random.getstate() == state  # the caller's global random state is untouched
    assert win.dtype == np.int64 and win.shape == (16, 128)
    np.testing.assert_array_equal(win, rederive_stream(text, 16, 128, 3))
    assert info["n_tokens"] == len(text.encode("utf-8")) + 1
    assert info["variant"] == "gptq" and info["join"] == "\n\n" and info["seed"] == 3
    assert info["dataset"] == "wikitext2" and info["split"] == "train" and info["nsamples"] == 16 and info["seqlen"] == 128


def test_calibration_deterministic_per_seed_independent_of_global_random(shared):
    need(shared, "ptb/ptb.train.txt")
    random.seed(123)
    a, _ = get_calibration("ptb", toy_encode, nsamples=8, seqlen=64, seed=0, data_dir=shared)
    random.seed(456)
    b, _ = get_calibration("ptb", toy_encode, nsamples=8, seqlen=64, seed=0, data_dir=shared)
    c, _ = get_calibration("ptb", toy_encode, nsamples=8, seqlen=64, seed=1, data_dir=shared)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ptb_calibration_joins(shared):
    path = need(shared, "ptb/ptb.train.txt")
    rows = [line.strip() for line in raw_lines(path)]
    old, oinfo = get_calibration("ptb", toy_encode, nsamples=4, seqlen=32, data_dir=shared)
    new, ninfo = get_calibration("ptb-new", toy_encode, nsamples=4, seqlen=32, data_dir=shared)
    billm, binfo = get_calibration("ptb", toy_encode, nsamples=4, seqlen=32, data_dir=shared, variant="billm")
    np.testing.assert_array_equal(old, rederive_stream("\n\n".join(rows), 4, 32, 0))
    np.testing.assert_array_equal(new, rederive_stream(" ".join(rows), 4, 32, 0))
    np.testing.assert_array_equal(billm, new)
    # "\n\n" is one byte longer than " " at each of the len(rows) - 1 joins
    assert oinfo["n_tokens"] - ninfo["n_tokens"] == len(rows) - 1
    assert (oinfo["join"], ninfo["join"], binfo["join"]) == ("\n\n", " ", " ")
    assert binfo["variant"] == "billm"


def test_stream_too_short(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(" ab \n", encoding="utf-8")  # BOS + "ab" = 3 tokens
    with pytest.raises(ValueError, match="seqlen \\+ 1"):
        get_calibration("ptb", toy_encode, nsamples=1, seqlen=3, data_dir=tmp_path)
    win, info = get_calibration("ptb", toy_encode, nsamples=5, seqlen=2, data_dir=tmp_path)
    assert info["n_tokens"] == 3 and (win == [BOS, 97]).all()  # only i = 0 is possible


def write_c4_train(root: pathlib.Path, texts: list[str]) -> None:
    (root / "c4").mkdir(exist_ok=True)
    with open(root / "c4" / "c4-train.00000-of-01024.json", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "timestamp": "", "url": ""}) + "\n")


def rederive_c4(texts, nsamples, seqlen, seed, strict):
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        while True:
            d = rng.randint(0, len(texts) - 1)
            ids = toy_array(texts[d])
            if (len(ids) > seqlen) if strict else (len(ids) >= seqlen):
                break
        i = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i:i + seqlen])
    return np.stack(out)


def test_c4_calibration_matches_rederivation(tmp_path):
    gen = random.Random(99)
    texts = ["".join(gen.choice("abcdefgh ") for _ in range(gen.randint(1, 60))) for _ in range(200)]
    texts = [t for t in texts if len(t) + 1 != 20]  # no document with exactly seqlen tokens
    write_c4_train(tmp_path, texts)
    for variant, strict in (("gptq", False), ("billm", True)):
        calls = []

        def counting(text):
            calls.append(text)
            return toy_encode(text)

        win, info = get_calibration("c4", counting, nsamples=30, seqlen=20, seed=7, data_dir=tmp_path, variant=variant)
        np.testing.assert_array_equal(win, rederive_c4(texts, 30, 20, 7, strict))
        assert info["n_tokens"] is None and info["n_documents"] == len(texts)
        assert len(info["documents"]) == len(info["starts"]) == 30
        assert len(calls) == len(set(calls)) == info["n_documents_tokenized"]  # each drawn doc tokenized once
    c4new, _ = get_calibration("c4-new", toy_encode, nsamples=30, seqlen=20, seed=7, data_dir=tmp_path)
    np.testing.assert_array_equal(c4new, rederive_c4(texts, 30, 20, 7, False))


def test_c4_exact_length_document_reproduces_original_crash(tmp_path):
    write_c4_train(tmp_path, ["x" * 9])  # BOS + 9 bytes = 10 tokens
    with pytest.raises(ValueError, match="exactly seqlen=10"):
        get_calibration("c4", toy_encode, nsamples=1, seqlen=10, data_dir=tmp_path)
    # billm needs > seqlen: no document qualifies, which is reported instead of looping forever
    with pytest.raises(ValueError, match="never end"):
        get_calibration("c4", toy_encode, nsamples=1, seqlen=10, data_dir=tmp_path, variant="billm")
    win, _ = get_calibration("c4", toy_encode, nsamples=2, seqlen=9, data_dir=tmp_path)
    np.testing.assert_array_equal(win, [toy_array("x" * 9)[:9]] * 2)  # only i = 0 fits


# ------------------------------------------------------------------------------------------
# evaluation streams


def test_wikitext2_eval_stream(shared):
    path = need(shared, "wikitext2/wiki.test.raw")
    rows = [line + "\n" if line.strip() else "" for line in raw_lines(path)]
    tokens, info = get_eval_tokens("wikitext2", toy_encode, data_dir=shared)
    np.testing.assert_array_equal(tokens, toy_array("\n\n".join(rows)))
    assert tokens[0] == BOS and (tokens[1:] != BOS).all()  # one BOS for the whole joined text
    assert info["variant"] == "gptq" and info["split"] == "test" and info["n_tokens"] == len(tokens)
    assert info["source"] == "wikitext2/wiki.test.raw"


def test_ptb_eval_streams(shared):
    valid = need(shared, "ptb/ptb.valid.txt")
    test = need(shared, "ptb/ptb.test.txt")
    old, oinfo = get_eval_tokens("ptb", toy_encode, data_dir=shared)
    new, ninfo = get_eval_tokens("ptb-new", toy_encode, data_dir=shared)
    np.testing.assert_array_equal(old, toy_array("\n\n".join(line.strip() for line in raw_lines(valid))))
    np.testing.assert_array_equal(new, toy_array(" ".join(line.strip() for line in raw_lines(test))))
    assert (oinfo["split"], oinfo["variant"], ninfo["split"], ninfo["variant"]) == ("validation", "gptq", "test", "new")


def test_c4_eval_is_fixed_seed_and_256_windows(shared):
    need(shared, "c4/c4-validation.subset2000.json")
    docs, _ = load_rows("c4", "validation", shared)
    seqlen = 2048
    random.seed(1)
    tokens, info = get_eval_tokens("c4", toy_encode, seqlen=seqlen, data_dir=shared)
    random.seed(2)
    again, _ = get_eval_tokens("c4", toy_encode, seqlen=seqlen, data_dir=shared)
    assert tokens.shape == (256 * seqlen,) and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, again)
    # independent re-derivation: random.Random(0), ">= seqlen", randint(0, n - seqlen - 1)
    rng = random.Random(0)
    expected = []
    for _ in range(256):
        while True:
            ids = toy_array(docs[rng.randint(0, len(docs) - 1)])
            if len(ids) >= seqlen:
                break
        i = rng.randint(0, len(ids) - seqlen - 1)
        expected.append(ids[i:i + seqlen])
    np.testing.assert_array_equal(tokens, np.concatenate(expected))
    assert info["seed"] == 0 and info["variant"] == "gptq" and info["n_tokens"] == 256 * seqlen
    assert "caveat" in info


def test_c4_new_eval(shared):
    need(shared, "c4/c4-validation.subset2000.json")
    docs, _ = load_rows("c4", "validation", shared)
    tokens, info = get_eval_tokens("c4-new", toy_encode, seqlen=512, data_dir=shared)
    np.testing.assert_array_equal(tokens, toy_array(" ".join(docs[:1100]))[: 256 * 512])
    assert info["variant"] == "new" and info["n_documents"] == 1100 and info["n_tokens"] == 256 * 512


def test_info_is_json_serialisable(shared):
    need(shared, "ptb/ptb.test.txt")
    _, info = get_eval_tokens("ptb-new", toy_encode, data_dir=shared)
    assert json.loads(json.dumps(info)) == info

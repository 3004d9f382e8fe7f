"""Tooling of the embedded default model tiny-llama3 (tools/train_tokenizer.py,
tools/prepare_tiny_data.py, tools/train_tiny_llama.py) and its committed tokenizer + config.

Everything here runs on CPU in seconds: a small tokenizer and data slice from a synthetic
``load_rows`` shim, and a micro model trained for a few steps. Tests that read the real data need
``REFQUANT_DATA_DIR`` (skipped otherwise); retraining the committed tokenizer is ``slow``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tools import prepare_tiny_data as prep  # noqa: E402
from tools import train_tiny_llama as ttl  # noqa: E402
from refquant import provenance  # noqa: E402
from tools import train_tokenizer as ttok  # noqa: E402

GOLDEN = ROOT / "golden" / "models" / "tiny-llama3"
SMALL_VOCAB = 384

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) , 1 @,@ 000 \n",
    "mr. <unk> is chairman of <unk> n.v. the dutch publishing group\n\nN years old",
    "  leading spaces, tabs\tand trailing newlines\n\n\n",
    "emoji 🙂 and numbers 1234567 3.14159",
    "",
]


# --------------------------------------------------------------------------------------------
# a synthetic stand-in for refquant.data.load_rows (same signature)

_WORDS = ("the of and to in a is was for on as by with he it at from his that an be were are which this "
          "game series album song river city team war season film company market stock share new first "
          "<unk> N year years million said mr. would its but had also has").split()


def _synthetic_rows(dataset: str, split: str) -> list[str]:
    seed = {"train": 0, "validation": 1, "test": 2}[split] + (10 if dataset == "ptb" else 0)
    rng = np.random.default_rng(seed)
    n_rows = 300 if split == "train" else 80
    rows = []
    for i in range(n_rows):
        words = rng.choice(_WORDS, size=int(rng.integers(5, 25)))
        if dataset == "ptb":
            rows.append(" ".join(words))
        elif i % 20 == 0:
            rows.extend(["", f" = {' '.join(words[:3]).title()} = \n", ""])
        else:
            rows.append(" " + " ".join(words) + " . \n")
    return rows


def shim_load_rows(dataset: str, split: str, data_dir=None):
    rows = _synthetic_rows(dataset, split)
    return rows, {"dataset": dataset, "split": split, "source": "synthetic", "variant": "test shim",
                  "n_rows": len(rows)}


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def small_tok_dir(tmp_path_factory) -> Path:
    docs = [d for s in prep.training_sources(load_rows=shim_load_rows) for d in s.documents]
    out = tmp_path_factory.mktemp("tok")
    ttok.save_tokenizer(ttok.train_tokenizer(docs, vocab_size=SMALL_VOCAB), out)
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, small_tok_dir) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    prep.prepare(out=out, tokenizer_dir=small_tok_dir, load_rows=shim_load_rows, argv=["--test"], log=_quiet)
    return out


SMOKE = ttl.Hyper(seq_len=32, batch_size=4, steps=30, lr=3e-3, warmup_steps=3, eval_every=10, eval_batch_size=8,
                  val_max_windows=8, log_every=5, seed=0, time_limit_s=None)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, small_data, small_tok_dir):
    out = tmp_path_factory.mktemp("model") / "tiny-smoke"
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    record = ttl.train(out, data=small_data, tokenizer_dir=small_tok_dir, hyper=SMOKE, arch=ttl.MICRO_ARCH,
                       device="cpu", argv=["--smoke", "--out", str(out)], log=_quiet)
    rng_unchanged = torch.equal(torch_state, torch.get_rng_state()) and all(
        np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
        for a, b in zip(np_state, np.random.get_state()))
    return out, record, rng_unchanged


# --------------------------------------------------------------------------------------------
# the committed tokenizer and config


def test_committed_tokenizer_round_trip_and_bos():
    from transformers import AutoTokenizer

    raw = tokenizers.Tokenizer.from_file(str(GOLDEN / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(GOLDEN))
    assert hf.is_fast and raw.get_vocab_size() == len(hf) == 4096
    assert (hf.bos_token, hf.bos_token_id) == ("<|begin_of_text|>", 4094)
    assert (hf.eos_token, hf.eos_token_id) == ("<|end_of_text|>", 4095)
    for text in SAMPLES:
        ids = hf(text)["input_ids"]
        assert ids[0] == 4094 and 4094 not in ids[1:] and 4095 not in ids, text
        assert ids == raw.encode(text).ids
        assert hf.decode(ids, skip_special_tokens=True) == text
        assert raw.decode(ids) == text
        assert hf(text, add_special_tokens=False)["input_ids"] == ids[1:]
    # special tokens inside text are single ids (as LLaMA-3's tokenizer)
    assert hf("a<|end_of_text|>")["input_ids"][-1] == 4095


def test_committed_config_architecture():
    cfg = json.loads((GOLDEN / "config.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(GOLDEN / "tokenizer.json"))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_attention_heads"] == 4 * cfg["num_key_value_heads"]  # GQA ratio 4
    assert cfg.get("rope_parameters", {}).get("rope_theta", cfg["rope_theta"]) == 500000.0
    assert cfg["rope_theta"] == 500000.0  # top-level copy for transformers 4.x
    assert cfg.get("rope_parameters", {}).get("rope_type", "default") == "default"
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is False
    assert cfg["intermediate_size"] == 3.5 * cfg["hidden_size"]
    assert cfg["max_position_embeddings"] == 2048
    assert cfg["hidden_act"] == "silu" and not cfg["attention_bias"] and not cfg["mlp_bias"]
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    # group size 128 divides every Linear in_features (hidden and intermediate)
    assert cfg["hidden_size"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0
    assert cfg["vocab_size"] == tok.get_vocab_size()
    assert cfg["bos_token_id"] == tok.token_to_id("<|begin_of_text|>")
    assert cfg["eos_token_id"] == tok.token_to_id("<|end_of_text|>")
    # size budget: bf16 weights + tokenizer <= ~12 MB
    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    params = 2 * v * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert 5.0e6 < params < 6.0e6
    assert 2 * params + (GOLDEN / "tokenizer.json").stat().st_size < ttl.MAX_TOTAL_BYTES
    # the committed config is the one the training tool builds
    built = ttl.build_config(cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]).to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert built[key] == cfg[key], key
    if (GOLDEN / "model.safetensors").is_file():  # once the lead has committed the weights
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(str(GOLDEN))
        assert sum(p.numel() for p in model.parameters()) == params


# --------------------------------------------------------------------------------------------
# tokenizer training


def test_train_tokenizer_deterministic_llama3_style(small_tok_dir):
    from transformers import AutoTokenizer

    docs = [d for s in prep.training_sources(load_rows=shim_load_rows) for d in s.documents]
    a = ttok.train_tokenizer(docs, vocab_size=SMALL_VOCAB)
    b = ttok.train_tokenizer(docs, vocab_size=SMALL_VOCAB)
    assert a.to_str() == b.to_str()
    assert tokenizers.Tokenizer.from_file(str(small_tok_dir / "tokenizer.json")).to_str() == a.to_str()
    assert a.get_vocab_size() == SMALL_VOCAB
    assert a.token_to_id("<|begin_of_text|>") == SMALL_VOCAB - 2 and a.token_to_id("<|end_of_text|>") == SMALL_VOCAB - 1
    # all 256 bytes are tokens: any text round-trips
    for text in SAMPLES:
        ids = a.encode(text).ids
        assert ids[0] == SMALL_VOCAB - 2 and a.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(str(small_tok_dir))
    assert hf("the game")["input_ids"] == a.encode("the game").ids
    assert json.loads((small_tok_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    with pytest.raises(ValueError, match="too small"):
        ttok.train_tokenizer(["tiny text"], vocab_size=SMALL_VOCAB)


@pytest.mark.slow
def test_committed_tokenizer_reproduces_from_data(tmp_path):
    data_dir = os.environ.get("REFQUANT_DATA_DIR", "")
    if not data_dir or not os.path.isdir(data_dir):
        pytest.skip("REFQUANT_DATA_DIR is not set (point it at shared/data).")
    assert ttok.main(["--data-dir", data_dir, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "tokenizer.json").read_bytes() == (GOLDEN / "tokenizer.json").read_bytes()
    assert (tmp_path / "tokenizer_config.json").read_bytes() == (GOLDEN / "tokenizer_config.json").read_bytes()


# --------------------------------------------------------------------------------------------
# prepare step


def test_prepare_layout_and_provenance(small_data, small_tok_dir):
    meta, train, val = prep.read_prepared(small_data)
    tok = tokenizers.Tokenizer.from_file(str(small_tok_dir / "tokenizer.json"))
    bos, eos = SMALL_VOCAB - 2, SMALL_VOCAB - 1
    assert train.dtype == np.uint16 and set(val) == {"wikitext2", "ptb"}
    assert meta["tokenizer"]["sha256"] == prep.sha256_file(small_tok_dir / "tokenizer.json")
    assert meta["tokenizer"]["vocab_size"] == SMALL_VOCAB and meta["command"].endswith("--test")
    # train = [BOS + wiki + EOS, BOS + ptb + EOS], each the rows joined with "\n\n" and encoded in one call
    expect, counts = [], []
    for dataset in ("wikitext2", "ptb"):
        text = "\n\n".join(shim_load_rows(dataset, "train")[0])
        ids = tok.encode(text).ids + [eos]
        expect += ids
        counts.append(len(ids))
    assert train.tolist() == expect
    assert [s["n_tokens"] for s in meta["train"]["sources"]] == counts
    assert meta["files"]["train.npy"]["n_tokens"] == train.size == sum(counts)
    assert np.sum(train == bos) == 2 and np.sum(train == eos) == 2
    for dataset in ("wikitext2", "ptb"):
        text = "\n\n".join(shim_load_rows(dataset, "validation")[0])
        assert val[dataset].tolist() == tok.encode(text).ids
        assert tok.decode(val[dataset].tolist()) == text
    for src in meta["train"]["sources"] + meta["validation"]["sources"]:
        assert src["join"] == "\n\n" and len(src["text_sha256"]) == 64 and src["loader_info"]["source"] == "synthetic"
    for name, rec in meta["files"].items():
        assert rec["sha256"] == prep.sha256_file(small_data / name)
    assert "C4 validation" in meta["not_used"]


def test_prepare_is_atomic_and_checks_hashes(small_data, small_tok_dir, tmp_path):
    import shutil

    out = tmp_path / "d"
    shutil.copytree(small_data, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prep.prepare(out=out, tokenizer_dir=small_tok_dir, load_rows=shim_load_rows, log=_quiet)

    def broken_rows(dataset, split, data_dir=None):
        if dataset == "ptb" and split == "validation":
            raise RuntimeError("boom")
        return shim_load_rows(dataset, split)

    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError, match="boom"):
        prep.prepare(out=out, tokenizer_dir=small_tok_dir, load_rows=broken_rows, overwrite=True, log=_quiet)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folders left

    prep.prepare(out=out, tokenizer_dir=small_tok_dir, load_rows=shim_load_rows, max_rows=50, overwrite=True,
                 log=_quiet)
    meta, train, _ = prep.read_prepared(out)
    assert meta["max_rows"] == 50 and all(s["n_rows"] == 50 for s in meta["train"]["sources"])
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    arr = np.load(out / "train.npy")
    arr[5] ^= 1
    np.save(out / "train.npy", arr)
    with pytest.raises(ValueError, match="sha256"):
        prep.read_prepared(out)


def test_c4_train_option_and_validation_refused(small_tok_dir, tmp_path):
    docs = [{"text": "first document about the game"}, {"text": "second document , the river"}]
    val = tmp_path / "c4-validation.00000-of-00008.json"
    val.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    with pytest.raises(ValueError, match="validation"):
        prep.prepare(out=tmp_path / "x", tokenizer_dir=small_tok_dir, load_rows=shim_load_rows, c4_train=val,
                     log=_quiet)
    shard = tmp_path / "c4-train.00000-of-01024.json"
    shard.write_text("\n".join(json.dumps(d) for d in docs * 3) + "\n")
    meta = prep.prepare(out=tmp_path / "y", tokenizer_dir=small_tok_dir, load_rows=shim_load_rows, c4_train=shard,
                        c4_max_docs=4, log=_quiet)
    c4 = meta["train"]["sources"][-1]
    assert c4["dataset"] == "c4" and c4["n_documents"] == 4 and c4["input_sha256"] == prep.sha256_file(shard)
    _, train, _ = prep.read_prepared(tmp_path / "y")
    assert np.sum(train == SMALL_VOCAB - 2) == 2 + 4 and np.sum(train == SMALL_VOCAB - 1) == 2 + 4


def test_prepare_real_data_slice(tmp_path):
    data_dir = os.environ.get("REFQUANT_DATA_DIR", "")
    if not data_dir or not os.path.isdir(data_dir):
        pytest.skip("REFQUANT_DATA_DIR is not set (point it at shared/data).")
    meta = prep.prepare(out=tmp_path / "d", tokenizer_dir=GOLDEN, data_dir=data_dir, max_rows=40, log=_quiet)
    names = [(s["dataset"], s["split"]) for s in meta["train"]["sources"] + meta["validation"]["sources"]]
    assert names == [("wikitext2", "train"), ("ptb", "train"), ("wikitext2", "validation"), ("ptb", "validation")]
    wiki = meta["train"]["sources"][0]
    assert "wikitext2-tokenized" in wiki["loader_info"]["source"] and "caveat" in wiki["loader_info"]
    assert all(len(s["input_sha256"]) == 64 for s in meta["train"]["sources"])
    _, train, val = prep.read_prepared(tmp_path / "d")
    assert train.max() < 4096 and train[0] == 4094 and val["ptb"][0] == 4094


# --------------------------------------------------------------------------------------------
# training


def test_lr_schedule():
    h = ttl.Hyper(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert ttl.lr_at(0, h, 100) == pytest.approx(0.1)
    assert ttl.lr_at(9, h, 100) == pytest.approx(1.0)
    assert ttl.lr_at(10, h, 100) == pytest.approx(1.0)
    assert ttl.lr_at(55, h, 100) == pytest.approx(0.55)
    assert ttl.lr_at(100, h, 100) == pytest.approx(0.1)
    lrs = [ttl.lr_at(s, h, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cli_options():
    args = ttl.build_parser().parse_args(["--smoke", "--out", "x", "--steps", "7", "--lr", "1e-3"])
    h, arch = ttl.hyper_from_args(args)
    assert arch == ttl.MICRO_ARCH and h.steps == 7 and h.lr == 1e-3 and h.seq_len == 64 and h.time_limit_s is None
    h, arch = ttl.hyper_from_args(ttl.build_parser().parse_args(["--out", "x", "--time-limit-s", "0"]))
    assert arch == ttl.DEFAULT_ARCH and h == ttl.Hyper(time_limit_s=None)
    # the micro model keeps the default's ratios
    for a in (ttl.DEFAULT_ARCH, ttl.MICRO_ARCH):
        assert a.num_attention_heads == 4 * a.num_key_value_heads
        assert a.intermediate_size == 3.5 * a.hidden_size and a.head_dim * a.num_attention_heads == a.hidden_size


def test_smoke_training_loss_decreases_and_reloads(smoke_run, small_tok_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out, record, rng_unchanged = smoke_run
    assert rng_unchanged, "train() changed the caller's global RNG state"
    hist = record["eval_history"]
    assert [e["step"] for e in hist] == [0, 10, 20, 30]
    assert hist[0]["val_all"] == pytest.approx(math.log(SMALL_VOCAB), abs=0.3)
    assert record["val_loss_best"]["all"] < hist[0]["val_all"] - 1.0
    assert record["train_log"][-1]["loss"] < record["train_log"][0]["loss"]
    assert record["val_loss_saved_bf16"]["all"] == pytest.approx(record["val_loss_best"]["all"], abs=0.05)
    assert record["steps_done"] == 30 and record["stopped_early"] is None
    for key in ("command", "seed", "hyperparameters", "wall_seconds", "device", "versions", "git_commit",
                "tokenizer_sha256", "best_step", "val_loss_final"):
        assert key in record
    assert json.loads((out / "training.json").read_text())["best_step"] == record["best_step"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "training.json"} <= {
        p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folders left
    assert (out / "tokenizer.json").read_bytes() == (small_tok_dir / "tokenizer.json").read_bytes()

    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" and cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == 500000.0
    model = LlamaForCausalLM.from_pretrained(str(out))
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(500000.0 ** (-2 / 16))
    assert model.dtype == torch.bfloat16
    assert model.config.num_attention_heads == 4 * model.config.num_key_value_heads
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("the game was a new series", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id == SMALL_VOCAB - 2
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], SMALL_VOCAB) and torch.isfinite(logits).all()


def test_training_is_seeded_and_output_write_is_atomic(smoke_run, small_data, small_tok_dir, tmp_path):
    out, record, _ = smoke_run
    with pytest.raises(FileExistsError, match="--overwrite"):
        ttl.train(out, data=small_data, tokenizer_dir=small_tok_dir, hyper=SMOKE, arch=ttl.MICRO_ARCH,
                  device="cpu", log=_quiet)
    # same seed, same data -> same weights (CPU)
    again = tmp_path / "again"
    ttl.train(again, data=small_data, tokenizer_dir=small_tok_dir, hyper=SMOKE, arch=ttl.MICRO_ARCH, device="cpu",
              log=_quiet)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # a wrong tokenizer is refused before any training
    other = tmp_path / "other-tok"
    other.mkdir()
    (other / "tokenizer.json").write_text((small_tok_dir / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="not the tokenizer"):
        ttl.train(tmp_path / "z", data=small_data, tokenizer_dir=other, hyper=SMOKE, arch=ttl.MICRO_ARCH,
                  device="cpu", log=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other-tok"]


def test_git_commit_prefers_the_environment(monkeypatch):
    """A copied tree (the GPU machine's) may hold a stale .git: REFQUANT_GIT_COMMIT, when set, is what is recorded."""
    monkeypatch.setenv("REFQUANT_GIT_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234"
    monkeypatch.delenv("REFQUANT_GIT_COMMIT")
    assert provenance.git_commit() != "abc1234"

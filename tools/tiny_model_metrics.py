#!/usr/bin/env python3
"""Write golden/models/tiny-llama3/metrics.json: FP perplexities (GPTQ protocol) and unigram baselines.

    REFQUANT_DATA_DIR=../shared/data python tools/tiny_model_metrics.py [--backend torch] [--device cpu]

Perplexity: WikiText-2, C4 and PTB with refquant's GPTQ-lineage protocol (all windows of 2048).
Baselines, to show the tiny model is a real language model: a unigram model with add-one smoothing
fitted on the training text (WikiText-2 stand-in + PTB + the unreachable C4 documents, as the
model saw), and an "oracle" unigram fitted on each test stream itself (the best any unigram can do),
both scored on the same windows and positions as the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refquant import data, runs  # noqa: E402
from refquant.provenance import provenance, write_json_atomic  # noqa: E402

MODEL = ROOT / "golden" / "models" / "tiny-llama3"


def scored_tokens(tokens: np.ndarray, seqlen: int) -> np.ndarray:
    """The labels the perplexity protocol scores: positions 1..seqlen-1 of every full window."""
    n = tokens.size // seqlen
    return tokens[: n * seqlen].reshape(n, seqlen)[:, 1:].ravel()


def unigram_ppl(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.exp(-np.mean(np.log(probs[labels]))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-tokens", default=str(ROOT / ".device-data" / "tiny-llama3" / "train.npy"),
                    help="training token stream written by tools/prepare_tiny_data.py")
    ap.add_argument("--out", default=str(MODEL / "metrics.json"))
    a = ap.parse_args(argv)

    loaded = runs.load(MODEL, a.backend, a.device, "float32")
    seqlen = 2048
    ppl = runs.evaluate_ppl(loaded, ["wikitext2", "c4", "ptb"], seqlen, a.data_dir)
    vocab = loaded.config_json["vocab_size"]
    train = np.load(a.train_tokens).astype(np.int64)
    p_train = (np.bincount(train, minlength=vocab) + 1.0) / (train.size + vocab)
    baselines = {}
    for name in ppl:
        tokens, _ = data.get_eval_tokens(name, loaded.encode, seqlen=seqlen, data_dir=a.data_dir)
        labels = scored_tokens(tokens, seqlen)
        counts = np.bincount(labels, minlength=vocab).astype(np.float64)
        p_oracle = np.where(counts > 0, counts / counts.sum(), 1.0)
        baselines[name] = {"unigram_train_add_one": unigram_ppl(p_train, labels),
                           "unigram_oracle_fit_on_test": unigram_ppl(p_oracle, labels)}
    record = {
        "model": "golden/models/tiny-llama3",
        "protocol": "GPTQ lineage: non-overlapping 2048-token windows, exp of the mean window loss, tail dropped",
        "perplexity": {k: {"ppl": v["ppl"], "n_windows": v["n_windows"], "data": v["data"]} for k, v in ppl.items()},
        "unigram_baselines": baselines,
        "training": json.loads((MODEL / "training.json").read_text()).get("command"),
        "provenance": provenance(loaded.device),
    }
    write_json_atomic(a.out, record)
    for name in ppl:
        b = baselines[name]
        print(f"{name:10s} model {ppl[name]['ppl']:9.3f}   unigram(train) {b['unigram_train_add_one']:9.1f}   "
              f"unigram(oracle) {b['unigram_oracle_fit_on_test']:9.1f}")
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train the byte-level BPE tokenizer of the tiny-llama3 model (LLaMA-3 style).

Writes ``tokenizer.json`` and ``tokenizer_config.json`` into the model folder (default
``golden/models/tiny-llama3/``). The tokenizer follows Meta's LLaMA-3 ``tokenizer.json``:

* model: BPE over bytes (``ignore_merges`` as LLaMA-3), no normalizer, no unknown token;
* pre-tokenizer: the LLaMA-3 (tiktoken ``cl100k``-style) split regex, then ByteLevel without regex;
* specials appended after the BPE vocabulary (like LLaMA-3's ids 128000/128001):
  ``<|begin_of_text|>`` (BOS) = ``vocab_size - 2``, ``<|end_of_text|>`` (EOS) = ``vocab_size - 1``;
* post-processor: ByteLevel + ``TemplateProcessing`` that prepends BOS, so both
  ``tokenizers.Tokenizer.from_file(...).encode(text)`` and
  ``transformers.AutoTokenizer.from_pretrained(dir)(text)`` start with BOS and add no EOS;
* ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` (as Meta's LLaMA-3 repositories), model
  max length 2048, ``clean_up_tokenization_spaces = false`` (LLaMA-3 sets true; false keeps
  ``decode(encode(text)) == text`` exact).

Training text: WikiText-2 train (tokenized stand-in) + PTB train [+ ``--c4-train``], the same
documents as ``tools/prepare_tiny_data.py`` uses, in a fixed order; BPE training with ``tokenizers``
is deterministic for a fixed input (checked: byte-identical ``tokenizer.json`` across processes).

    PYTHONPATH=. python tools/train_tokenizer.py --data-dir /work/shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python tools/train_tokenizer.py` finds tools.* and refquant
    sys.path.insert(0, str(ROOT))

from tools.prepare_tiny_data import (  # noqa: E402
    BOS_TOKEN,
    DEFAULT_TOKENIZER_DIR,
    EOS_TOKEN,
    sha256_file,
    training_sources,
    write_json,
)

DEFAULT_VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 2048
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)

#: Meta LLaMA-3 tokenizer.json pre-tokenizer split pattern.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

TOKENIZER_CONFIG = {
    "bos_token": BOS_TOKEN,
    "clean_up_tokenization_spaces": False,
    "eos_token": EOS_TOKEN,
    "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": MODEL_MAX_LENGTH,
    "tokenizer_class": "PreTrainedTokenizerFast",
}


def train_tokenizer(documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2):
    """A LLaMA-3-style byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` ids in total
    (``vocab_size - 2`` BPE tokens, then BOS and EOS)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves no room beyond the 256 byte tokens and the specials.")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(documents), trainer=trainer)
    if tok.get_vocab_size() != n_bpe:
        raise ValueError(f"BPE training reached only {tok.get_vocab_size()} of {n_bpe} tokens: the text is too "
                         "small for this vocab_size.")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = tok.token_to_id(BOS_TOKEN)
    assert bos == vocab_size - 2 and tok.token_to_id(EOS_TOKEN) == vocab_size - 1
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                                      special_tokens=[(BOS_TOKEN, bos)]),
    ])
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir`` (each file atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"tokenizer.json": out_dir / "tokenizer.json", "tokenizer_config.json": out_dir / "tokenizer_config.json"}
    tmp_tok = out_dir / f".tokenizer.json.{os.getpid()}.tmp"
    tmp_cfg = out_dir / f".tokenizer_config.json.{os.getpid()}.tmp"
    try:
        tok.save(str(tmp_tok), pretty=True)
        write_json(tmp_cfg, TOKENIZER_CONFIG)
        os.replace(tmp_tok, paths["tokenizer.json"])
        os.replace(tmp_cfg, paths["tokenizer_config.json"])
    finally:
        for t in (tmp_tok, tmp_cfg):
            if t.exists():
                t.unlink()
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="data folder laid out like shared/data (default: env REFQUANT_DATA_DIR)")
    p.add_argument("--out", default=str(DEFAULT_TOKENIZER_DIR), help="model folder to write the tokenizer files into")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="total ids, including BOS and EOS")
    p.add_argument("--c4-train", default=None, metavar="PATH",
                   help="a real C4 *train* shard (JSON Lines) to add to the training text")
    p.add_argument("--c4-max-docs", type=int, default=None, help="first N documents of --c4-train only")
    p.add_argument("--max-rows", type=int, default=None, help="first N rows of each source only (quick tests)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    sources = training_sources(args.data_dir, c4_train=args.c4_train, c4_max_docs=args.c4_max_docs,
                               max_rows=args.max_rows)
    docs = [d for s in sources for d in s.documents]
    for s in sources:
        print(f"{s.name}: {s.provenance['n_chars']:,} chars ({s.provenance['loader_info'].get('source')})")
    tok = train_tokenizer(docs, vocab_size=args.vocab_size)
    paths = save_tokenizer(tok, args.out)
    print(json.dumps({"vocab_size": tok.get_vocab_size(), "bos_token_id": tok.token_to_id(BOS_TOKEN),
                      "eos_token_id": tok.token_to_id(EOS_TOKEN),
                      "tokenizer.json sha256": sha256_file(paths["tokenizer.json"]),
                      "seconds": round(time.time() - t0, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Calibration and evaluation data of the GPTQ code lineage.

Every full-model number in refquant (calibration of GPTQ/AWQ/..., WikiText-2/PTB/C4 perplexity)
comes from the protocols in this module. They reproduce ``datautils.py`` of IST-DASLab/gptq
(commit 2d65066e, the file behind the GPTQ paper's tables; copied unchanged into QuIP, OmniQuant,
the LLaMA-3 study and many more), with the PB-LLM / BiLLM / SliM-LLM changes as ``variant="billm"``.
See ``docs/data.md`` for the full description and the local data layout.

Rows (:func:`load_rows`) are what Hugging Face ``datasets`` yields for the dataset the original
loads -- the old in-repo builder scripts, read in this repository:

* ``wikitext`` / ``wikitext-2-raw-v1``, field ``text``: one row per line of ``wiki.<split>.raw``,
  the line *with* its trailing ``"\\n"``; a line that is only whitespace becomes ``""``;
* ``ptb_text_only`` / ``penn_treebank``, field ``sentence``: one row per line of
  ``ptb.<split>.txt``, ``line.strip()`` (leading space and newline removed);
* ``allenai/c4``, files ``en/c4-train.00000-of-01024.json.gz`` and
  ``en/c4-validation.00000-of-00008.json.gz``, field ``text``: one row per JSON line.

Calibration (:func:`get_calibration`), per the original ``get_wikitext2`` / ``get_ptb`` /
``get_ptb_new`` / ``get_c4``:

* WikiText-2 / PTB: the train rows joined with ``"\\n\\n"`` (``ptb-new``: ``" "``; ``billm``:
  ``" "`` for both), tokenized once (so the only BOS is at position 0); ``nsamples`` times
  ``i = randint(0, N - seqlen - 1)`` (inclusive bounds), window ``tokens[i : i + seqlen]``;
* C4: per sample, draw ``d = randint(0, n_docs - 1)`` and tokenize document ``d`` until it has
  ``>= seqlen`` tokens (``billm``: ``> seqlen``), then ``i = randint(0, n - seqlen - 1)`` in it.

Evaluation token streams (:func:`get_eval_tokens`):

* ``wikitext2``: test rows joined with ``"\\n\\n"``;
* ``ptb``: *validation* rows joined with ``"\\n\\n"``; ``ptb-new``: test rows joined with ``" "``;
* ``c4``: a fresh ``random.Random(0)`` whatever the run's seed; 256 times: draw validation
  documents as for calibration (``>= seqlen``), take ``randint(0, n - seqlen - 1)``, the
  ``seqlen`` window; concatenated -> ``256 * seqlen`` tokens;
* ``c4-new``: the first 1100 validation documents joined with ``" "``, tokenized, the first
  ``256 * seqlen`` tokens.

The originals call ``random.seed(seed)`` and then the module-level ``random.randint``. Here each
call owns a ``random.Random(seed)`` instance, which yields the same sequence without touching the
caller's global random state.

Data is read from a local directory laid out like ``shared/data`` (explicit ``data_dir`` /
CLI ``--data-dir``, else env ``REFQUANT_DATA_DIR``), else -- when ``datasets`` is installed --
through ``datasets.load_dataset`` with the original's arguments. Every result carries an info
dict naming the protocol variant and the exact data source, including stand-ins.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import pathlib
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .spec.progress import progress

log = logging.getLogger("refquant")

ENV_DATA_DIR = "REFQUANT_DATA_DIR"

#: Calibration data sets (``get_loaders`` names of the original) and evaluation streams.
CALIBRATION_NAMES = ("wikitext2", "ptb", "c4", "ptb-new", "c4-new")
EVAL_NAMES = ("wikitext2", "ptb", "ptb-new", "c4", "c4-new")
CALIBRATION_VARIANTS = ("gptq", "billm")
SPLITS = ("train", "validation", "test")

#: Fixed constants of the original C4 evaluation.
C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0
C4_NEW_DOCS = 1100

WIKITEXT2_TRAIN_STANDIN = (
    "wikitext2-tokenized train (stand-in for the missing raw train split; rare words are <unk>)"
)
_WIKITEXT2_STANDIN_CAVEAT = (
    "WikiText-2 raw train (wiki.train.raw) was not found; the tokenized wikitext-2-v1 train split "
    "(36,718 rows like the raw split, but words outside its vocabulary are replaced by '<unk>') "
    "stands in for it. Calibration windows therefore differ from the original's; put the raw "
    "wikitext2/wiki.train.raw into the data directory to use the real split."
)
_C4_SUBSET_CAVEAT = (
    "local 2,000-document C4 'en' validation subset (c4/c4-validation.subset2000.json); it is not "
    "verified to be the head of en/c4-validation.00000-of-00008.json.gz. 'c4-new' takes its first "
    "1100 documents and 'c4' draws from its 2,000 documents instead of the full shard, so C4 "
    "perplexity on it is not directly comparable to published GPTQ-style C4 numbers."
)


class DatasetNotFound(FileNotFoundError):
    """No local copy of a data split was found and Hugging Face ``datasets`` could not provide it."""


# --------------------------------------------------------------------------------------------
# settings and tokenizers


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The data directory: ``data_dir`` if given, else env ``REFQUANT_DATA_DIR``, else ``None``.

    The directory is laid out like ``shared/data`` (``wikitext2/``, ``ptb/``, ``c4/``, ...; see
    ``docs/data.md``). Nothing is checked here; a missing file is reported when it is needed.
    """
    if data_dir is not None and str(data_dir) != "":
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA_DIR, "")
    if env.strip():
        return pathlib.Path(env.strip()).expanduser()
    return None


def _is_hf_tokenizer(obj) -> bool:
    # Checked by class name so that transformers is not imported just to ask.
    return any(c.__name__ == "PreTrainedTokenizerBase" for c in type(obj).__mro__)


def _is_tokenizers_tokenizer(obj) -> bool:
    return type(obj).__module__.startswith("tokenizers") and type(obj).__name__ == "Tokenizer"


def as_encoder(tokenizer) -> Callable[[str], list[int]]:
    """A function ``text -> list of token ids`` for any supported tokenizer.

    * a Hugging Face tokenizer (``PreTrainedTokenizerBase``): ``tokenizer(text)["input_ids"]`` --
      special tokens (e.g. LLaMA's BOS) are added exactly as the originals'
      ``tokenizer(text, return_tensors='pt')`` adds them. The originals load the *slow* tokenizer
      (``AutoTokenizer.from_pretrained(model, use_fast=False)``); a fast one can differ on rare
      inputs;
    * a ``tokenizers.Tokenizer``: ``tokenizer.encode(text).ids`` (its post-processor adds the
      special tokens);
    * any other callable returning a sequence of ints (returned as a list).
    """
    if _is_hf_tokenizer(tokenizer):
        def encode_hf(text: str) -> list[int]:
            return list(tokenizer(text)["input_ids"])

        return encode_hf
    if _is_tokenizers_tokenizer(tokenizer):
        def encode_tokenizers(text: str) -> list[int]:
            return list(tokenizer.encode(text).ids)

        return encode_tokenizers
    if callable(tokenizer):
        def encode_callable(text: str) -> list[int]:
            return list(tokenizer(text))

        return encode_callable
    raise TypeError(
        f"cannot tokenize with a {type(tokenizer).__name__}: pass a Hugging Face tokenizer "
        "(AutoTokenizer.from_pretrained(...)), a tokenizers.Tokenizer, or a callable text -> list[int]."
    )


def _token_array(encode, text: str, what: str) -> np.ndarray:
    """``encode(text)`` as a 1-D int64 array, with a clear error for a misbehaving encoder."""
    ids = encode(text)
    try:
        arr = np.asarray(ids)
    except Exception as e:  # pragma: no cover - exotic return types
        raise TypeError(f"the tokenizer returned {type(ids).__name__} for {what}; expected a list of ints.") from e
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(
            f"the tokenizer returned {arr.dtype} values of shape {arr.shape} for {what}; expected a flat "
            "list of integer token ids. Pass a callable text -> list[int] (or a tokenizer; see as_encoder)."
        )
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# rows


def _read_wikitext_rows(path: pathlib.Path) -> list[str]:
    # HF `wikitext` builder: each line of the file (universal newlines, newline kept) is a row;
    # a whitespace-only line becomes "".
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def _read_ptb_rows(path: pathlib.Path) -> list[str]:
    # HF `ptb_text_only` builder: `sentence` is each line stripped.
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def _read_c4_rows(path: pathlib.Path) -> list[str]:
    # JSON Lines (optionally gzip-compressed) with a `text` field, as the C4 shards.
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}, line {lineno}: expected a JSON object with a 'text' field (C4 JSON Lines); {e}"
                ) from e
    return rows


@dataclass(frozen=True)
class _LocalFile:
    relpath: str
    reader: Callable[[pathlib.Path], list[str]]
    variant: str
    caveat: str | None = None


_WT2_SPLIT_FILE = {"train": "train", "validation": "valid", "test": "test"}

_LOCAL: dict[tuple[str, str], tuple[_LocalFile, ...]] = {
    ("wikitext2", "train"): (
        _LocalFile("wikitext2/wiki.train.raw", _read_wikitext_rows, "wikitext-2-raw-v1"),
        _LocalFile("wikitext2-tokenized/wiki.train.tokens", _read_wikitext_rows, WIKITEXT2_TRAIN_STANDIN,
                   _WIKITEXT2_STANDIN_CAVEAT),
    ),
    ("wikitext2", "validation"): (_LocalFile("wikitext2/wiki.valid.raw", _read_wikitext_rows, "wikitext-2-raw-v1"),),
    ("wikitext2", "test"): (_LocalFile("wikitext2/wiki.test.raw", _read_wikitext_rows, "wikitext-2-raw-v1"),),
    ("ptb", "train"): (_LocalFile("ptb/ptb.train.txt", _read_ptb_rows, "penn_treebank"),),
    ("ptb", "validation"): (_LocalFile("ptb/ptb.valid.txt", _read_ptb_rows, "penn_treebank"),),
    ("ptb", "test"): (_LocalFile("ptb/ptb.test.txt", _read_ptb_rows, "penn_treebank"),),
    ("c4", "train"): (
        _LocalFile("c4/c4-train.00000-of-01024.json.gz", _read_c4_rows, "en/c4-train.00000-of-01024"),
        _LocalFile("c4/c4-train.00000-of-01024.json", _read_c4_rows, "en/c4-train.00000-of-01024"),
    ),
    ("c4", "validation"): (
        _LocalFile("c4/c4-validation.00000-of-00008.json.gz", _read_c4_rows, "en/c4-validation.00000-of-00008"),
        _LocalFile("c4/c4-validation.00000-of-00008.json", _read_c4_rows, "en/c4-validation.00000-of-00008"),
        _LocalFile("c4/c4-validation.subset2000.json", _read_c4_rows,
                   "en validation subset (2,000 documents)", _C4_SUBSET_CAVEAT),
    ),
}

# What the originals pass to datasets.load_dataset, per dataset: (args, kwargs, field).
_C4_HF_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
_DATASET_TITLES = {"wikitext2": "WikiText-2 raw", "ptb": "Penn Treebank", "c4": "C4 (en)"}


def _hf_call(dataset: str, split: str) -> tuple[tuple, dict, str]:
    if dataset == "wikitext2":
        return ("wikitext", "wikitext-2-raw-v1"), {"split": split}, "text"
    if dataset == "ptb":
        return ("ptb_text_only", "penn_treebank"), {"split": split}, "sentence"
    # The originals also pass the config name 'allenai--c4', which current `datasets` releases
    # reject; the data files (and so the rows) are the same without it.
    return ("allenai/c4",), {"data_files": {split: _C4_HF_FILES[split]}, "split": split}, "text"


def _hf_call_repr(dataset: str, split: str) -> str:
    args, kwargs, _ = _hf_call(dataset, split)
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"datasets.load_dataset({', '.join(parts)})"


def load_rows(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> tuple[list[str], dict]:
    """The Hugging Face-equivalent rows of ``dataset``'s ``split``, and where they came from.

    ``dataset`` is ``"wikitext2"``, ``"ptb"`` or ``"c4"``; ``split`` is ``"train"``,
    ``"validation"`` or ``"test"`` (C4 has no test split). Local files under the data directory
    (see :func:`resolve_data_dir`) are tried first, in order:

    * wikitext2: ``wikitext2/wiki.{train,valid,test}.raw``; for train, if the raw file is missing,
      ``wikitext2-tokenized/wiki.train.tokens`` as a labelled stand-in;
    * ptb: ``ptb/ptb.{train,valid,test}.txt``;
    * c4: ``c4/c4-train.00000-of-01024.json[.gz]``; ``c4/c4-validation.00000-of-00008.json[.gz]``,
      then ``c4/c4-validation.subset2000.json`` (with a caveat).

    If none exists and ``datasets`` is importable, ``datasets.load_dataset`` is called as in the
    originals. Otherwise :class:`DatasetNotFound` lists every path tried.

    Returns ``(rows, info)`` with ``info = {"dataset", "split", "source" (a path relative to the data directory, or
    "huggingface"), "variant", "n_rows"}`` plus ``"caveat"`` for stand-ins and subsets.
    """
    if dataset not in _DATASET_TITLES:
        hint = " (the '-new' names are evaluation protocols; their rows are 'ptb' / 'c4')" if dataset in ("ptb-new", "c4-new") else ""
        raise ValueError(f"unknown dataset {dataset!r}{hint}; choose one of {tuple(_DATASET_TITLES)}.")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}.")
    if (dataset, split) not in _LOCAL:
        raise ValueError(
            f"{dataset} has no {split!r} split in the GPTQ protocols (C4 uses 'train' for calibration and "
            "'validation' for evaluation)."
        )

    root = resolve_data_dir(data_dir)
    tried: list[str] = []
    for cand in _LOCAL[(dataset, split)]:
        if root is None:
            break
        path = root / cand.relpath
        if path.is_file():
            rows = cand.reader(path)
            # relative to the data directory: results never record a machine's absolute paths
            info = {"dataset": dataset, "split": split, "source": cand.relpath, "variant": cand.variant,
                    "n_rows": len(rows)}
            if cand.caveat:
                info["caveat"] = cand.caveat
                log.warning("%s %s: %s", dataset, split, cand.caveat)
            return rows, info
        tried.append(f"{path} (missing)")

    call = _hf_call_repr(dataset, split)
    try:
        import datasets  # noqa: F401  (optional dependency: pip install 'refquant[hf]')
    except ImportError:
        hf_note = f"Hugging Face `datasets` is not installed, so {call} was not tried."
    else:
        args, kwargs, field = _hf_call(dataset, split)
        try:
            ds = datasets.load_dataset(*args, **kwargs)
            rows = list(ds[field])
        except Exception as e:
            hf_note = f"{call} failed: {type(e).__name__}: {e}"
        else:
            info = {"dataset": dataset, "split": split, "source": "huggingface", "variant": call,
                    "n_rows": len(rows)}
            return rows, info

    expected = ", ".join(c.relpath for c in _LOCAL[(dataset, split)])
    if root is None:
        where = (f"No data directory was given (neither data_dir / --data-dir nor ${ENV_DATA_DIR} is set), "
                 f"so no local file was tried; expected (relative to it): {expected}.")
    else:
        missing_root = "" if root.is_dir() else f" (the directory {root} does not exist)"
        where = "Looked for local files" + missing_root + ":\n" + "\n".join(f"  - {t}" for t in tried)
    raise DatasetNotFound(
        f"{_DATASET_TITLES[dataset]} ({dataset}) split {split!r} was not found.\n{where}\n{hf_note}\n"
        f"To provide it: pass --data-dir DIR (data_dir=DIR) or set {ENV_DATA_DIR}=DIR, where DIR is laid out "
        f"like shared/data (DIR/{_LOCAL[(dataset, split)][0].relpath}; see docs/data.md), "
        "or install `datasets` (pip install 'refquant[hf]') and be online."
    )


# --------------------------------------------------------------------------------------------
# calibration


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def _rows_summary(rows_info: dict) -> dict:
    out = {"source": rows_info["source"], "data_variant": rows_info["variant"]}
    if "caveat" in rows_info:
        out["caveat"] = rows_info["caveat"]
    return out


def _stream_separator(name: str, variant: str) -> str:
    if variant == "billm" or name == "ptb-new":
        return " "
    return "\n\n"


def _too_short(what: str, n_tokens: int, seqlen: int) -> ValueError:
    return ValueError(
        f"{what} has {n_tokens} tokens but a window of seqlen={seqlen} needs at least seqlen + 1 = "
        f"{seqlen + 1} (the original draws randint(0, N - seqlen - 1)). Use a smaller seqlen or more data."
    )


def get_calibration(name: str, encode, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                    data_dir: str | os.PathLike | None = None, variant: str = "gptq") -> tuple[np.ndarray, dict]:
    """``nsamples`` calibration windows of ``seqlen`` tokens, as the original ``get_loaders``.

    Args:
        name: ``"wikitext2"``, ``"ptb"``, ``"c4"``, or ``"ptb-new"`` / ``"c4-new"`` (the original's
            ``get_ptb_new`` joins the PTB train rows with ``" "``; ``get_c4_new`` calibrates like
            ``get_c4``).
        encode: a tokenizer or a callable ``text -> list[int]`` (see :func:`as_encoder`).
        nsamples, seqlen, seed: as the original (defaults 128, 2048, 0).
        data_dir: data directory (see :func:`resolve_data_dir`).
        variant: ``"gptq"`` (IST-DASLab/gptq) or ``"billm"`` (PB-LLM / BiLLM / SliM-LLM: WikiText-2
            and PTB train joined with ``" "``; C4 documents need strictly more than ``seqlen`` tokens).

    Returns:
        ``(windows, info)``: int64 array (nsamples, seqlen) in sample order, and a dict with
        ``dataset, split, variant, seed, nsamples, seqlen, n_tokens`` (of the joined stream;
        ``None`` for C4), ``source, data_variant`` (+ ``caveat``) and the draws (``starts``; for C4
        also ``documents``).
    """
    if name not in CALIBRATION_NAMES:
        raise ValueError(f"unknown calibration data set {name!r}; choose one of {CALIBRATION_NAMES}.")
    if variant not in CALIBRATION_VARIANTS:
        raise ValueError(f"unknown calibration variant {variant!r}; choose one of {CALIBRATION_VARIANTS}.")
    nsamples = _check_positive_int(nsamples, "nsamples")
    seqlen = _check_positive_int(seqlen, "seqlen")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    encode = as_encoder(encode)
    base = name.removesuffix("-new")
    rows, rows_info = load_rows(base, "train", data_dir)
    info = {"dataset": name, "split": "train", "variant": variant, "seed": int(seed), "nsamples": nsamples,
            "seqlen": seqlen}
    rng = random.Random(int(seed))

    if base == "c4":
        windows, documents, starts, n_tokenized = _c4_windows(
            rows, encode, rng, nsamples, seqlen, strict=(variant == "billm"), what="C4 train")
        info.update(n_tokens=None, n_documents=len(rows), n_documents_tokenized=n_tokenized,
                    documents=documents, starts=starts, **_rows_summary(rows_info))
        return windows, info

    sep = _stream_separator(name, variant)
    tokens = _token_array(encode, sep.join(rows), f"the joined {base} train split")
    n = len(tokens)
    if n < seqlen + 1:
        raise _too_short(f"the joined {base} train split", n, seqlen)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    windows = np.stack([tokens[i:i + seqlen] for i in starts])
    info.update(n_tokens=n, join=sep, starts=starts, **_rows_summary(rows_info))
    return windows, info


def _c4_windows(docs: list[str], encode, rng: random.Random, count: int, seqlen: int, strict: bool, what: str,
                desc: str | None = None):
    """The original's C4 loop: ``count`` times draw documents until one is long enough, then a window.

    Draw ``d = randint(0, len(docs) - 1)`` until document ``d`` has ``>= seqlen`` tokens (``strict``:
    ``> seqlen``), then ``i = randint(0, n - seqlen - 1)`` and take ``tokens[i : i + seqlen]``.
    Each drawn document is tokenized once per call (a redraw reuses the ids; the random sequence
    is unchanged).
    """
    if not docs:
        raise ValueError(f"{what} has no documents.")
    cache: dict[int, np.ndarray] = {}
    n_long = 0  # tokenized documents that are long enough
    windows, documents, starts = [], [], []
    for _ in progress(range(count), total=count, desc=desc or f"{what} windows"):
        while True:
            d = rng.randint(0, len(docs) - 1)
            if d not in cache:
                cache[d] = _token_array(encode, docs[d], f"{what} document {d}")
                n_long += (len(cache[d]) > seqlen) if strict else (len(cache[d]) >= seqlen)
            n = len(cache[d])
            if (n > seqlen) if strict else (n >= seqlen):
                break
            if n_long == 0 and len(cache) == len(docs):
                rule = ">" if strict else ">="
                raise ValueError(
                    f"no document of {what} ({len(docs)} documents) has {rule} {seqlen} tokens, so the "
                    "original's draw loop would never end. Use a smaller seqlen or more documents."
                )
        if n == seqlen:
            # Accepted by `>= seqlen`, but randint(0, -1) has an empty range: the original raises here.
            raise ValueError(
                f"{what} document {d} has exactly seqlen={seqlen} tokens. The original accepts it "
                f"(>= seqlen) and then calls random.randint(0, {n - seqlen - 1}), which raises ValueError: "
                "the original run crashes at this point too. Use another seed, another seqlen, or (for "
                "calibration) variant='billm', which requires > seqlen tokens."
            )
        i = rng.randint(0, n - seqlen - 1)
        windows.append(cache[d][i:i + seqlen])
        documents.append(d)
        starts.append(i)
    return np.stack(windows), documents, starts, len(cache)


# --------------------------------------------------------------------------------------------
# evaluation


def get_eval_tokens(name: str, encode, seqlen: int = 2048,
                    data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, dict]:
    """The token stream the original evaluates perplexity on (cut into ``seqlen`` windows later).

    ``name`` is one of ``"wikitext2"`` (test rows joined ``"\\n\\n"``), ``"ptb"`` (validation rows
    joined ``"\\n\\n"``), ``"ptb-new"`` (test rows joined ``" "``), ``"c4"`` (256 random
    ``seqlen`` windows of validation documents drawn with ``random.Random(0)``) or ``"c4-new"``
    (the first 1100 validation documents joined ``" "``, tokenized, first ``256 * seqlen`` tokens).
    ``seqlen`` only matters for the two C4 protocols. See the module docstring.

    Returns ``(tokens, info)``: a 1-D int64 array and a dict with ``dataset, split, variant``
    (``"gptq"``, or ``"new"`` for ``ptb-new`` / ``c4-new``), ``seqlen, n_tokens, source,
    data_variant`` (+ ``caveat``), and for ``c4`` the ``seed`` and draws.
    """
    if name not in EVAL_NAMES:
        raise ValueError(f"unknown evaluation data set {name!r}; choose one of {EVAL_NAMES}.")
    seqlen = _check_positive_int(seqlen, "seqlen")
    encode = as_encoder(encode)
    variant = "new" if name.endswith("-new") else "gptq"
    split = {"wikitext2": "test", "ptb": "validation", "ptb-new": "test"}.get(name, "validation")
    base = name.removesuffix("-new")
    rows, rows_info = load_rows(base, split, data_dir)
    info = {"dataset": name, "split": split, "variant": variant, "seqlen": seqlen}

    if name == "c4":
        rng = random.Random(C4_EVAL_SEED)
        windows, documents, starts, n_tokenized = _c4_windows(
            rows, encode, rng, C4_EVAL_WINDOWS, seqlen, strict=False, what="C4 validation",
            desc="c4 eval windows")
        tokens = windows.reshape(-1)
        info.update(seed=C4_EVAL_SEED, n_tokens=len(tokens), n_documents=len(rows),
                    n_documents_tokenized=n_tokenized, documents=documents, starts=starts,
                    **_rows_summary(rows_info))
        return tokens, info

    if name == "c4-new":
        docs = rows[:C4_NEW_DOCS]
        if len(docs) < C4_NEW_DOCS:
            log.warning("c4-new: only %d validation documents available (the protocol uses the first %d).",
                        len(docs), C4_NEW_DOCS)
        tokens = _token_array(encode, " ".join(docs), "the first C4 validation documents")
        limit = C4_EVAL_WINDOWS * seqlen
        if len(tokens) < limit:
            log.warning("c4-new: %d tokens, fewer than %d windows x %d; evaluating what there is (as the original).",
                        len(tokens), C4_EVAL_WINDOWS, seqlen)
        tokens = tokens[:limit]
        info.update(n_tokens=len(tokens), n_documents=len(docs), join=" ", **_rows_summary(rows_info))
        return tokens, info

    sep = " " if name == "ptb-new" else "\n\n"
    tokens = _token_array(encode, sep.join(rows), f"the joined {base} {split} split")
    info.update(n_tokens=len(tokens), join=sep, **_rows_summary(rows_info))
    return tokens, info


# --------------------------------------------------------------------------------------------
# instruction data for LoRA finetuning (QLoRA / IR-QLoRA): the Alpaca layout

#: The Alpaca prompt template of artidoro/qlora and htqin/IR-QLoRA (``ALPACA_PROMPT_DICT``); note the
#: space after "### Response:".
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
#: The Hugging Face id the originals load (``load_dataset("tatsu-lab/alpaca")``).
ALPACA_HF_ID = "tatsu-lab/alpaca"
#: ``--data`` value of the stand-in built from local WikiText-2 train text.
ALPACA_STANDIN = "standin:wikitext2-continue"
ALPACA_STANDIN_INSTRUCTION = "Continue the following passage from a Wikipedia article."
_ALPACA_STANDIN_CAVEAT = (
    "No Alpaca copy exists locally: a stand-in in the Alpaca layout was built from WikiText-2 train "
    "(the tokenized wikitext-2-v1 split, rare words as <unk>; NOT an evaluation split): every paragraph "
    "of >= 24 words is one example, instruction = 'Continue the following passage from a Wikipedia "
    "article.', input = its first third (12..160 words), output = the next <= 96 words. The tiny model "
    "was pretrained on this text, so the finetuning data is in-domain for it (unlike Alpaca for LLaMA)."
)


def format_alpaca(example: dict) -> str:
    """The prompt (the collator's source) of one Alpaca example, as the originals'
    ``extract_alpaca_dataset``: with ``prompt_input`` when ``input`` is non-empty, else ``prompt_no_input``."""
    for key in ("instruction", "output"):
        if key not in example:
            raise ValueError(f"an Alpaca example needs 'instruction', 'input' (may be empty) and 'output'; "
                             f"{key!r} is missing in {sorted(example)}.")
    template = ALPACA_PROMPT_INPUT if example.get("input", "") != "" else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def _alpaca_records(rows, where: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
            raise ValueError(f"{where}: record {i} is not an Alpaca example (an object with 'instruction', "
                             f"'input', 'output'); got {str(row)[:120]!r}.")
        out.append({"instruction": str(row["instruction"]), "input": str(row.get("input", "") or ""),
                    "output": str(row["output"])})
    if not out:
        raise ValueError(f"{where} has no examples.")
    return out


def alpaca_standin(data_dir: str | os.PathLike | None = None, max_examples: int | None = None) -> tuple[list[dict], dict]:
    """The local Alpaca stand-in: WikiText-2 train paragraphs as "continue the text" examples.

    Rows come from :func:`load_rows` ``("wikitext2", "train")`` (the raw split if present, else the
    tokenized stand-in); headings (``= ... =``) and paragraphs under 24 words are skipped. For a
    paragraph of ``n`` words: ``input`` = the first ``min(max(12, n // 3), 160)`` words, ``output`` =
    the next at most 96. Deterministic; ``max_examples`` keeps the first ones.
    """
    rows, info = load_rows("wikitext2", "train", data_dir)
    records = []
    for row in rows:
        line = row.strip()
        if not line or line.startswith("="):
            continue
        words = line.split()
        if len(words) < 24:
            continue
        cut = min(max(12, len(words) // 3), 160)
        records.append({"instruction": ALPACA_STANDIN_INSTRUCTION, "input": " ".join(words[:cut]),
                        "output": " ".join(words[cut:cut + 96])})
        if max_examples is not None and len(records) >= max_examples:
            break
    out = {"name": ALPACA_STANDIN, "layout": "alpaca (instruction, input, output)", "n_examples": len(records),
           "built_from": {k: info[k] for k in ("dataset", "split", "source", "variant")}, "caveat": _ALPACA_STANDIN_CAVEAT}
    return records, out


def load_alpaca(source: str, data_dir: str | os.PathLike | None = None, split: str = "train",
                max_examples: int | None = None) -> tuple[list[dict], dict]:
    """Alpaca-layout examples (``instruction``, ``input``, ``output``) and where they came from.

    ``source`` is one of:

    * :data:`ALPACA_STANDIN` (``"standin:wikitext2-continue"``): :func:`alpaca_standin`;
    * a local ``alpaca_data.json`` (a JSON list of objects, Stanford's layout) or ``.jsonl`` file;
    * a local directory or a Hugging Face dataset id (``tatsu-lab/alpaca``, as the originals), read
      with ``datasets.load_dataset(source)[split]`` (needs ``datasets``; a directory saved by
      ``save_to_disk`` is read with ``datasets.load_from_disk``).

    The ``info`` dict names the data (``name``, ``source``, ``n_examples``, + ``caveat`` for the stand-in);
    paths are recorded relative (never a machine's absolute path).
    """
    if source == ALPACA_STANDIN:
        return alpaca_standin(data_dir, max_examples)
    path = pathlib.Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path.name}: not a JSON file in the alpaca_data.json layout ({e}).") from e
            if isinstance(rows, dict):  # {"train": [...]} style
                rows = rows.get(split, rows.get("data"))
            if not isinstance(rows, list):
                raise ValueError(f"{path.name}: expected a JSON list of {{instruction, input, output}} objects.")
        records = _alpaca_records(rows, path.name)
        kind = "local file"
    else:
        try:
            import datasets
        except ImportError as e:
            raise DatasetNotFound(
                f"{source!r} is neither the stand-in ({ALPACA_STANDIN!r}) nor a local file, and Hugging Face "
                "`datasets` is not installed to load it as a dataset id or directory. Pass an alpaca_data.json "
                "path, or install datasets (pip install 'refquant[hf]')."
            ) from e
        try:
            if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(source))
            if hasattr(ds, "keys"):
                ds = ds[split]
        except Exception as e:
            raise DatasetNotFound(f"datasets could not load {source!r} (split {split!r}): {type(e).__name__}: {e}") from e
        records = _alpaca_records(list(ds), str(source))
        kind = "local directory" if path.is_dir() else "huggingface"
    if max_examples is not None:
        records = records[:max_examples]
    recorded = path.name if path.exists() else str(source)
    return records, {"name": recorded, "source": kind, "layout": "alpaca (instruction, input, output)",
                     "n_examples": len(records)}


def alpaca_train_eval_split(n: int, eval_size: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the originals' held-out split: ``train_test_split(test_size=eval_size, shuffle=True, seed=42)``.

    ``datasets`` draws ``np.random.default_rng(seed).permutation(n)``; the test rows are its first
    ``eval_size`` entries, the train rows the rest (in permutation order). ``eval_size=0``: no split,
    train = ``range(n)``.
    """
    if eval_size <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    if eval_size >= n:
        raise ValueError(f"eval_size={eval_size} leaves no training example out of {n}; use a smaller eval size.")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[eval_size:], perm[:eval_size]

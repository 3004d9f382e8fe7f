#!/usr/bin/env python
"""Tokenize the tiny-llama3 training and validation text into compact uint16 ``.npy`` files.

The embedded default model (``golden/models/tiny-llama3/``, see ``docs/tiny-model.md``) is trained
on a GPU machine that has no data access. This step runs where the data is and writes everything
the training run needs into one folder (default ``.device-data/tiny-llama3/``, git-ignored, carried
to the GPU machine)::

    train.npy            uint16 training stream: per source BOS + tokens + EOS, sources concatenated
    val_wikitext2.npy    uint16 WikiText-2 *raw* validation stream (BOS + tokens)
    val_ptb.npy          uint16 PTB validation stream (BOS + tokens)
    tiny-llama3-data.json  provenance: sources, sha256 of inputs and outputs, token counts, tokenizer hash

Text of a source = its Hugging Face-equivalent rows (``refquant.data.load_rows``) joined with
``"\\n\\n"`` -- the join the GPTQ-lineage evaluation (``refquant.data.get_eval_tokens``) uses for
WikiText-2 and PTB -- tokenized in one call with the committed tokenizer (whose post-processor
prepends ``<|begin_of_text|>``). A user-supplied C4 *train* shard (``--c4-train``) is added
document by document (BOS + document + EOS each). The local C4 *validation* documents are the C4
evaluation set and are never used.

    PYTHONPATH=. python tools/prepare_tiny_data.py --data-dir /work/shared/data

This module also holds the helpers shared by ``tools/train_tokenizer.py`` and
``tools/train_tiny_llama.py`` (corpus loading, hashing, atomic output folders, reading the
prepared files back).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER_DIR = ROOT / "golden" / "models" / "tiny-llama3"
DEFAULT_DATA_OUT = ROOT / ".device-data" / "tiny-llama3"
META_NAME = "tiny-llama3-data.json"
FORMAT = "refquant-tiny-llama3-tokens/1"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
#: Rows of WikiText-2 and PTB are joined like the GPTQ-lineage evaluation streams.
JOIN = "\n\n"
TRAIN_SOURCES = (("wikitext2", "train"), ("ptb", "train"))
VAL_SOURCES = (("wikitext2", "validation"), ("ptb", "validation"))

C4_VALIDATION_REFUSED = (
    "refusing to train on {path}: it looks like a C4 *validation* file, and C4 validation documents are "
    "the C4 evaluation set of refquant (refquant.data get_eval_tokens 'c4' / 'c4-new'). Pass a C4 *train* "
    "shard (e.g. en/c4-train.00000-of-01024.json.gz)."
)

RowsLoader = Callable[..., tuple[list[str], dict]]


# --------------------------------------------------------------------------------------------
# small shared helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_texts(texts: Sequence[str]) -> str:
    """sha256 over the UTF-8 texts, each prefixed by its byte length (so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def git_commit(root: Path = ROOT) -> str | None:
    """``git rev-parse HEAD`` of the checkout, or None (e.g. a copy without ``.git``)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line(argv: Sequence[str] | None) -> str:
    """The command as typed (best effort): ``python <script> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    script = Path(sys.argv[0]).as_posix() if sys.argv and sys.argv[0] else "<python>"
    return shlex.join(["python", script, *args])


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success it becomes ``out`` by rename.

    On any exception the temporary folder is removed and ``out`` is left as it was, so a crash
    never leaves a half-written output. An existing ``out`` is only replaced with ``overwrite``.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        check_output_dir(out, overwrite)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it (it is replaced atomically).")


# --------------------------------------------------------------------------------------------
# corpus


@dataclass
class Source:
    """One source of the stream: its documents (already joined) and where they came from."""

    name: str  # e.g. "wikitext2/train"
    documents: list[str]
    provenance: dict = field(default_factory=dict)


def _default_load_rows() -> RowsLoader:
    try:
        from refquant.data import load_rows
    except ImportError as e:  # pragma: no cover - depends on the checkout
        raise ImportError(
            "refquant.data.load_rows is needed to read WikiText-2 / PTB; run from the repository root with "
            "PYTHONPATH=. (or install refquant)."
        ) from e
    return load_rows


def _row_source(dataset: str, split: str, data_dir, load_rows: RowsLoader, max_rows: int | None) -> Source:
    rows, info = load_rows(dataset, split, data_dir=data_dir)
    n_rows_total = len(rows)
    if max_rows is not None:
        rows = rows[:max_rows]
    text = JOIN.join(rows)
    prov = {
        "dataset": dataset,
        "split": split,
        "loader_info": _jsonable(info),
        "input_sha256": _maybe_sha256_file(info.get("source"), data_dir),
        "n_rows": len(rows),
        "n_rows_available": n_rows_total,
        "join": JOIN,
        "n_chars": len(text),
        "text_sha256": sha256_texts([text]),
    }
    return Source(f"{dataset}/{split}", [text], prov)


def read_c4_documents(path: str | os.PathLike, max_docs: int | None = None) -> list[str]:
    """The ``text`` fields of a C4 JSON Lines shard (``.json`` or ``.json.gz``), in file order."""
    path = Path(path)
    if "validation" in path.name.lower():
        raise ValueError(C4_VALIDATION_REFUSED.format(path=path))
    opener = gzip.open if path.name.endswith(".gz") else open
    docs: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_docs is not None and len(docs) >= max_docs:
                break
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {lineno}: expected a JSON object with a 'text' field; {e}") from e
    if not docs:
        raise ValueError(f"{path} has no documents.")
    return docs


def _c4_source(path, max_docs: int | None) -> Source:
    docs = read_c4_documents(path, max_docs)
    prov = {
        "dataset": "c4",
        "split": "train",
        "loader_info": {"source": Path(path).name, "variant": "user-supplied C4 train shard (--c4-train)"},
        "input_sha256": sha256_file(path),
        "n_documents": len(docs),
        "max_documents": max_docs,
        "join": "one BOS ... EOS sequence per document",
        "n_chars": sum(len(d) for d in docs),
        "text_sha256": sha256_texts(docs),
    }
    return Source("c4/train", docs, prov)


def c4_unreachable_source(encode: Callable[[str], list[int]], data_dir=None, load_rows: RowsLoader | None = None,
                          seqlen: int = 2048) -> Source:
    """C4 validation documents that neither C4 evaluation protocol of refquant can ever read.

    ``c4-new`` reads documents ``0 .. C4_NEW_DOCS-1`` only; ``c4`` (the GPTQ protocol) samples only
    documents with ``>= seqlen`` tokens under the model's tokenizer. The documents with index
    ``>= C4_NEW_DOCS`` and fewer than ``seqlen`` tokens are therefore unreachable by both, and are
    the only C4 text available here to make C4 in-domain for the tiny model (no C4 *train* shard
    exists in shared/data). The selection is re-checked against the documents the ``c4`` protocol
    actually draws.
    """
    from refquant import data as rqdata

    load_rows = load_rows or _default_load_rows()
    rows, info = load_rows("c4", "validation", data_dir=data_dir)
    lengths = [len(encode(doc)) for doc in rows]
    chosen = [i for i in range(rqdata.C4_NEW_DOCS, len(rows)) if lengths[i] < seqlen]
    _, eval_info = rqdata.get_eval_tokens("c4", encode, seqlen=seqlen, data_dir=data_dir)
    overlap = set(chosen) & set(eval_info["documents"])
    if overlap:  # cannot happen by construction; a guard against a changed protocol
        raise RuntimeError(f"C4 training documents {sorted(overlap)[:5]} are read by the c4 evaluation protocol.")
    docs = [rows[i] for i in chosen]
    prov = {
        "dataset": "c4",
        "split": "validation (documents unreachable by the c4 and c4-new evaluation protocols)",
        "loader_info": _jsonable(info),
        "input_sha256": _maybe_sha256_file(info.get("source"), data_dir),
        "selection": f"index >= {rqdata.C4_NEW_DOCS} (c4-new reads 0..{rqdata.C4_NEW_DOCS - 1}) and fewer than "
                     f"{seqlen} tokens (the c4 protocol only samples documents with >= {seqlen})",
        "documents": chosen,
        "n_documents": len(docs),
        "join": "one BOS ... EOS sequence per document",
        "n_chars": sum(len(d) for d in docs),
        "text_sha256": sha256_texts(docs),
    }
    return Source("c4/validation-unreachable", docs, prov)


def training_sources(data_dir=None, load_rows: RowsLoader | None = None, c4_train=None, c4_max_docs=None,
                     max_rows: int | None = None, c4_unreachable_encode=None) -> list[Source]:
    """WikiText-2 train (the tokenized stand-in where the raw split is missing) + PTB train
    [+ C4 validation documents no evaluation protocol reads] [+ a user-supplied C4 train shard].
    ``max_rows`` keeps the first rows/documents of each source."""
    load_rows = load_rows or _default_load_rows()
    sources = [_row_source(d, s, data_dir, load_rows, max_rows) for d, s in TRAIN_SOURCES]
    if c4_unreachable_encode is not None:
        sources.append(c4_unreachable_source(c4_unreachable_encode, data_dir, load_rows))
    if c4_train is not None:
        limit = c4_max_docs if max_rows is None else min(x for x in (c4_max_docs, max_rows) if x is not None)
        sources.append(_c4_source(c4_train, limit))
    return sources


def validation_sources(data_dir=None, load_rows: RowsLoader | None = None, max_rows: int | None = None) -> list[Source]:
    """WikiText-2 (raw) validation + PTB validation, for early stopping."""
    load_rows = load_rows or _default_load_rows()
    return [_row_source(d, s, data_dir, load_rows, max_rows) for d, s in VAL_SOURCES]


def _maybe_sha256_file(path, data_dir=None) -> str | None:
    """sha256 of a loader's ``source``: a path relative to the data directory (refquant.data records no
    absolute paths), or an absolute path; None for a source that is not a file (e.g. ``huggingface``)."""
    if not isinstance(path, str):
        return None
    if not os.path.isabs(path):
        from refquant.data import resolve_data_dir

        root = resolve_data_dir(data_dir)
        path = os.path.join(root, path) if root is not None else path
    return sha256_file(path) if os.path.isfile(path) else None


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return repr(obj)


# --------------------------------------------------------------------------------------------
# tokenization


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """``(tokenizers.Tokenizer, path of tokenizer.json)`` from a model folder."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; train it first: python tools/train_tokenizer.py")
    return Tokenizer.from_file(str(path)), path


def special_ids(tok) -> tuple[int, int]:
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer lacks {BOS_TOKEN} / {EOS_TOKEN}.")
    return bos, eos


def encode_source(tok, source: Source, append_eos: bool) -> np.ndarray:
    """Each document encoded with the post-processor (BOS first) [+ EOS], concatenated, as uint16."""
    bos, eos = special_ids(tok)
    encs = tok.encode_batch(source.documents)
    parts = []
    for enc in encs:
        ids = enc.ids
        if not ids or ids[0] != bos:
            raise ValueError(f"{source.name}: the tokenizer did not prepend {BOS_TOKEN}; wrong tokenizer.json?")
        parts.append(np.asarray(ids, dtype=np.int64))
        if append_eos:
            parts.append(np.asarray([eos], dtype=np.int64))
    arr = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return to_uint16(arr, tok.get_vocab_size())


def to_uint16(arr: np.ndarray, vocab_size: int) -> np.ndarray:
    if vocab_size > 1 << 16:
        raise ValueError(f"vocabulary of {vocab_size} tokens does not fit uint16.")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError("token id out of the vocabulary range.")
    return arr.astype(np.uint16)


def prepare(out: str | os.PathLike = DEFAULT_DATA_OUT, tokenizer_dir: str | os.PathLike = DEFAULT_TOKENIZER_DIR,
            data_dir=None, load_rows: RowsLoader | None = None, c4_train=None, c4_max_docs: int | None = None,
            max_rows: int | None = None, overwrite: bool = False, argv: Sequence[str] | None = None,
            log: Callable[[str], None] = print, c4_unreachable: bool = False) -> dict:
    """Write the token files and their provenance JSON into ``out`` (atomically); return the JSON."""
    check_output_dir(out, overwrite)
    tok, tok_path = load_tokenizer(tokenizer_dir)
    bos, eos = special_ids(tok)
    encode = (lambda text: tok.encode(text).ids) if c4_unreachable else None  # BOS included, as refquant.data
    train_src = training_sources(data_dir, load_rows, c4_train, c4_max_docs, max_rows, encode)
    val_src = validation_sources(data_dir, load_rows, max_rows)

    arrays: dict[str, np.ndarray] = {}
    train_parts = []
    for src in train_src:
        log(f"tokenizing {src.name} ({src.provenance['n_chars']:,} chars)")
        ids = encode_source(tok, src, append_eos=True)
        src.provenance["n_tokens"] = int(ids.size)
        train_parts.append(ids)
    arrays["train.npy"] = np.concatenate(train_parts)
    val_files = {}
    for src in val_src:
        log(f"tokenizing {src.name} ({src.provenance['n_chars']:,} chars)")
        ids = encode_source(tok, src, append_eos=False)
        src.provenance["n_tokens"] = int(ids.size)
        fname = f"val_{src.provenance['dataset']}.npy"
        arrays[fname] = ids
        val_files[src.provenance["dataset"]] = fname

    meta = {
        "format": FORMAT,
        "created_by": "tools/prepare_tiny_data.py",
        "command": command_line(argv),
        "git_commit": git_commit(),
        "tokenizer": {
            "path": _rel(tok_path),
            "sha256": sha256_file(tok_path),
            "vocab_size": tok.get_vocab_size(),
            "bos_token": BOS_TOKEN, "bos_token_id": bos,
            "eos_token": EOS_TOKEN, "eos_token_id": eos,
        },
        "dtype": "uint16",
        "train": {
            "file": "train.npy",
            "layout": "for each source in order: BOS + tokens(text) + EOS (C4: per document)",
            "sources": [s.provenance for s in train_src],
        },
        "validation": {
            "files": val_files,
            "layout": "BOS + tokens(rows joined with '\\n\\n'), one stream per data set",
            "sources": [s.provenance for s in val_src],
        },
        "not_used": (
            "C4 validation documents that an evaluation protocol can read (c4: documents with >= 2048 tokens; "
            "c4-new: the first 1100). No C4 train shard exists in shared/data; with --c4-unreachable-validation "
            "(the committed model) only the documents neither protocol can read are trained on."
        ),
        "caveats": [s.provenance["loader_info"]["caveat"] for s in train_src + val_src
                    if isinstance(s.provenance.get("loader_info"), dict) and "caveat" in s.provenance["loader_info"]],
        "max_rows": max_rows,
        "files": {},
        "versions": _versions(),
    }
    with atomic_output_dir(out, overwrite) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / name, arr, allow_pickle=False)
            meta["files"][name] = {"n_tokens": int(arr.size), "bytes": (tmp / name).stat().st_size,
                                   "sha256": sha256_file(tmp / name)}
        write_json(tmp / META_NAME, meta)
    total = sum(f["bytes"] for f in meta["files"].values())
    for name, f in meta["files"].items():
        log(f"{name}: {f['n_tokens']:,} tokens, {f['bytes']:,} bytes")
    log(f"total {total / 2**20:.2f} MiB in {out}")
    return meta


def read_prepared(data: str | os.PathLike, verify: bool = True) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """``(meta, train, {name: val})`` from a folder written by :func:`prepare` (hashes checked)."""
    data = Path(data)
    meta_path = data / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found. Prepare the data where the text is (python tools/prepare_tiny_data.py) and "
            "carry the folder to this machine.")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {FORMAT!r}).")

    def load(name: str) -> np.ndarray:
        path = data / name
        rec = meta["files"][name]
        if verify and sha256_file(path) != rec["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {META_NAME}; re-run the prepare step.")
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint16 or arr.ndim != 1 or arr.size != rec["n_tokens"]:
            raise ValueError(f"{path}: expected {rec['n_tokens']} uint16 tokens, got {arr.dtype} {arr.shape}.")
        return arr

    train = load(meta["train"]["file"])
    val = {name: load(fname) for name, fname in meta["validation"]["files"].items()}
    return meta, train, val


def _rel(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import tokenizers

        out["tokenizers"] = tokenizers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="data folder laid out like shared/data (default: env REFQUANT_DATA_DIR)")
    p.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR), help="folder with tokenizer.json")
    p.add_argument("--out", default=str(DEFAULT_DATA_OUT), help="output folder (replaced atomically)")
    p.add_argument("--c4-train", default=None, metavar="PATH",
                   help="a real C4 *train* shard (JSON Lines, .json or .json.gz) to add to the training text; "
                        "C4 validation files are refused")
    p.add_argument("--c4-max-docs", type=int, default=None,
                   help="use only the first N documents of --c4-train (keep the carry folder small)")
    p.add_argument("--c4-unreachable-validation", action="store_true",
                   help="also train on the C4 validation documents that neither C4 evaluation protocol reads "
                        "(index >= 1100 and < 2048 tokens); used for the committed model")
    p.add_argument("--max-rows", type=int, default=None, help="first N rows of each source only (quick tests)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepare(out=args.out, tokenizer_dir=args.tokenizer_dir, data_dir=args.data_dir, c4_train=args.c4_train,
            c4_max_docs=args.c4_max_docs, max_rows=args.max_rows, overwrite=args.overwrite, argv=argv,
            c4_unreachable=args.c4_unreachable_validation)
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())

#!/usr/bin/env python
"""Train refquant's embedded default model, tiny-llama3 (a ~5.5M-parameter LLaMA-3-architecture
``LlamaForCausalLM``), on the token files of ``tools/prepare_tiny_data.py``.

Runs on one CUDA GPU (bf16 autocast, SDPA attention) or, for smoke tests, on CPU (fp32)::

    PYTHONPATH=. python tools/train_tiny_llama.py --out $OUT/tiny-llama3          # GPU, defaults
    PYTHONPATH=. python tools/train_tiny_llama.py --smoke --out /tmp/tiny-smoke   # CPU, micro model, seconds
    PYTHONPATH=. python tools/train_tiny_llama.py --write-config golden/models/tiny-llama3   # config only

Training: seeded; each step draws ``--batch-size`` random windows of ``--seq-len + 1`` tokens from
the training stream with a seeded ``torch.Generator`` (inputs = first ``seq_len``, targets = last
``seq_len``); AdamW (no weight decay on norms), linear warmup then cosine decay to
``--min-lr-ratio * --lr``, gradient clipping; every ``--eval-every`` steps the validation loss
(mean over non-overlapping ``seq_len`` windows of each validation stream, scored as
``refquant.perplexity`` does) and the best checkpoint is kept. The best weights are saved in bf16
with ``save_pretrained`` together with the tokenizer files (byte copies) and ``training.json``
into a temporary folder that is renamed to ``--out`` only when everything is written.

The caller's global RNG state and torch flags are left alone: initialisation runs inside
``torch.random.fork_rng`` with the run's seed.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python tools/train_tiny_llama.py` finds tools.*
    sys.path.insert(0, str(ROOT))

from tools.prepare_tiny_data import (  # noqa: E402
    DEFAULT_DATA_OUT,
    DEFAULT_TOKENIZER_DIR,
    atomic_output_dir,
    check_output_dir,
    command_line,
    git_commit,
    read_prepared,
    sha256_file,
    write_json,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_TOTAL_BYTES = 12_500_000  # model + tokenizer budget of the committed folder (~12 MB)


@dataclass(frozen=True)
class Arch:
    """The LLaMA-3 architecture knobs (everything else is LlamaConfig's LLaMA default)."""

    hidden_size: int = 256
    intermediate_size: int = 896  # 3.5 x hidden (LLaMA-3 8B: 14336 / 4096); 7 * 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # GQA: 4 query heads per KV head (LLaMA-3 8B: 32 / 8)
    head_dim: int = 32
    max_position_embeddings: int = 2048
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02


DEFAULT_ARCH = Arch()
#: Micro model for CPU smoke tests: same ratios (GQA 4, 3.5x MLP), tiny widths.
MICRO_ARCH = Arch(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16)


@dataclass
class Hyper:
    """Training hyperparameters (recorded verbatim in training.json)."""

    seq_len: int = 2048
    batch_size: int = 16  # 16 x 2048 = 32,768 tokens per step
    epochs: float = 8.0  # used when steps is None: steps = ceil(epochs * train tokens / tokens per step)
    steps: int | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batch_size: int = 16
    val_max_windows: int | None = None  # per validation stream; None = all
    log_every: int = 10
    seed: int = 0
    time_limit_s: float | None = 480.0  # stop (and save the best so far) after this much training time


SMOKE_HYPER = dict(seq_len=64, batch_size=8, steps=40, lr=3e-3, warmup_steps=5, eval_every=10, eval_batch_size=8,
                   val_max_windows=8, log_every=5, time_limit_s=None)


# --------------------------------------------------------------------------------------------
# model


def _portable(path) -> str:
    """``path`` relative to the checkout when it lies inside it, else its last component: records never
    hold a machine's absolute paths."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return p.name


def build_config(vocab_size: int, bos_token_id: int, eos_token_id: int, arch: Arch = DEFAULT_ARCH):
    """The ``LlamaConfig`` of tiny-llama3 (untied embeddings, bf16 checkpoint dtype)."""
    import inspect

    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
              num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
              num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim, hidden_act="silu",
              max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.rms_norm_eps,
              initializer_range=arch.initializer_range, tie_word_embeddings=False, attention_bias=False,
              mlp_bias=False, attention_dropout=0.0, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(arch.rope_theta)}
    else:  # transformers 4.x
        kw["rope_theta"] = float(arch.rope_theta)
    cfg = LlamaConfig(**kw)
    if "dtype" in params:
        cfg.dtype = "bfloat16"
    else:  # pragma: no cover - transformers 4.x
        cfg.torch_dtype = "bfloat16"
    return cfg


def init_model(config, seed: int):
    """``LlamaForCausalLM(config)`` in fp32 on CPU, initialised from ``seed`` without touching the
    caller's global RNG state, with SDPA attention."""
    import torch
    from transformers import LlamaForCausalLM

    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def add_legacy_rope_theta(config_json: str | os.PathLike) -> None:
    """Also write the top-level ``rope_theta`` that transformers 4.x reads. transformers 5 writes only
    ``rope_parameters`` (and ignores the extra key when loading), so without it a 4.x install would
    silently fall back to theta 10000."""
    import json

    path = Path(config_json)
    cfg = json.loads(path.read_text(encoding="utf-8"))
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# training pieces


def lr_at(step: int, h: Hyper, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 -> lr / warmup), then cosine to ``min_lr_ratio * lr``."""
    if h.warmup_steps > 0 and step < h.warmup_steps:
        return h.lr * (step + 1) / h.warmup_steps
    span = max(1, total_steps - h.warmup_steps)
    progress = min(1.0, (step - h.warmup_steps) / span)
    return h.lr * (h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, h: Hyper, device):
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=h.lr, betas=(h.beta1, h.beta2), eps=1e-8, **extra)


def autocast_ctx(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model, val: dict, seq_len: int, batch_size: int, device, max_windows: int | None = None) -> dict:
    """Per stream: mean over non-overlapping ``seq_len`` windows of the window's mean next-token
    loss (``refquant.perplexity``'s ``L_i``); ``"all"``: mean over all windows of all streams."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    out, all_losses = {}, []
    with torch.no_grad(), autocast_ctx(device):
        for name, stream in val.items():
            n = stream.numel() // seq_len
            if max_windows is not None:
                n = min(n, max_windows)
            if n == 0:
                raise ValueError(f"validation stream {name} has fewer than seq_len={seq_len} tokens.")
            wins = stream[: n * seq_len].view(n, seq_len)
            losses = []
            for i in range(0, n, batch_size):
                x = wins[i:i + batch_size]
                logits = model(input_ids=x, use_cache=False).logits
                ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
                losses.append(ce.mean(dim=1))
            losses = torch.cat(losses).double().cpu()
            out[name] = float(losses.mean())
            all_losses.append(losses)
    out["all"] = float(torch.cat(all_losses).mean())
    model.train(was_training)
    return out


def versions() -> dict:
    import importlib

    import torch

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "transformers", "tokenizers", "safetensors"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except (ImportError, AttributeError):  # pragma: no cover - recorded as missing, never fatal
            out[mod] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def device_description(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}"


# --------------------------------------------------------------------------------------------
# the run


def train(out: str | os.PathLike, data: str | os.PathLike = DEFAULT_DATA_OUT,
          tokenizer_dir: str | os.PathLike = DEFAULT_TOKENIZER_DIR, hyper: Hyper | None = None,
          arch: Arch = DEFAULT_ARCH, device: str = "auto", overwrite: bool = False,
          argv: Sequence[str] | None = None, git_commit_override: str | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Train, keep the best checkpoint by validation loss, write ``out`` atomically; return training.json."""
    import torch
    import torch.nn.functional as F

    h = hyper or Hyper()
    t_start = time.time()
    check_output_dir(out, overwrite)
    tokenizer_dir = Path(tokenizer_dir)
    meta, train_np, val_np = read_prepared(data)
    tok_sha = sha256_file(tokenizer_dir / "tokenizer.json")
    if tok_sha != meta["tokenizer"]["sha256"]:
        raise ValueError(
            f"{tokenizer_dir / 'tokenizer.json'} (sha256 {tok_sha[:12]}...) is not the tokenizer the data was "
            f"prepared with ({meta['tokenizer']['sha256'][:12]}...); re-run tools/prepare_tiny_data.py.")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)

    config = build_config(meta["tokenizer"]["vocab_size"], meta["tokenizer"]["bos_token_id"],
                          meta["tokenizer"]["eos_token_id"], arch)
    if h.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={h.seq_len} exceeds max_position_embeddings={config.max_position_embeddings}.")
    n_train = int(train_np.size)
    if n_train < h.seq_len + 2:
        raise ValueError(f"the training stream has {n_train} tokens, too few for seq_len={h.seq_len}.")
    tokens_per_step = h.batch_size * h.seq_len
    total_steps = h.steps if h.steps is not None else max(1, math.ceil(h.epochs * n_train / tokens_per_step))

    model = init_model(config, h.seed).to(dev)
    model.train()
    opt = make_optimizer(model, h, dev)
    train_t = torch.from_numpy(train_np.astype(np.int64)).to(dev)
    val_t = {k: torch.from_numpy(v.astype(np.int64)).to(dev) for k, v in val_np.items()}
    gen = torch.Generator(device="cpu").manual_seed(h.seed)
    offsets_base = torch.arange(h.seq_len + 1, device=dev)
    n_par = n_params(model)
    log(f"device {device_description(dev)}; {n_par:,} parameters; train stream {n_train:,} tokens; "
        f"{total_steps} steps x {tokens_per_step:,} tokens = {total_steps * tokens_per_step:,} tokens "
        f"({total_steps * tokens_per_step / n_train:.2f} epochs)")

    history, train_log = [], []
    best = {"loss": math.inf, "step": -1, "state": None, "val": None}

    def run_eval(step: int):
        res = evaluate(model, val_t, h.seq_len, h.eval_batch_size, dev, h.val_max_windows)
        history.append({"step": step, "tokens": step * tokens_per_step, **{f"val_{k}": v for k, v in res.items()}})
        improved = res["all"] < best["loss"]
        if improved:
            best.update(loss=res["all"], step=step, val=res,
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        log(f"step {step:5d} | val " + " ".join(f"{k} {v:.4f}" for k, v in res.items())
            + (" | best" if improved else ""))

    t_train = time.time()
    run_eval(0)
    step, stopped = 0, None
    t_log, tok_since = time.time(), 0
    last_loss = float("nan")
    while step < total_steps:
        if h.time_limit_s is not None and time.time() - t_train > h.time_limit_s:
            stopped = f"time limit {h.time_limit_s:g} s reached after {step} of {total_steps} steps"
            log("stopping: " + stopped)
            break
        lr = lr_at(step, h, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_train - h.seq_len, (h.batch_size,), generator=gen)
        batch = train_t[starts.to(dev)[:, None] + offsets_base]
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast_ctx(dev):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip)
        opt.step()
        step += 1
        tok_since += tokens_per_step
        if step % h.log_every == 0 or step == total_steps:
            last_loss = float(loss.detach())  # synchronises
            now = time.time()
            tps = tok_since / max(now - t_log, 1e-9)
            eta = (total_steps - step) * tokens_per_step / max(tps, 1e-9)
            train_log.append({"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(gnorm),
                              "tokens_per_s": tps})
            log(f"step {step:5d} | loss {last_loss:.4f} | lr {lr:.2e} | gnorm {float(gnorm):.3f} | "
                f"{tps:,.0f} tok/s | elapsed {now - t_train:.1f} s | eta {eta:.0f} s")
            t_log, tok_since = now, 0
            if not math.isfinite(last_loss):
                stopped = f"non-finite training loss at step {step}"
                log("stopping: " + stopped)
                break
        if step % h.eval_every == 0 and step != total_steps:
            run_eval(step)
    if not history or history[-1]["step"] != step:
        run_eval(step)
    train_seconds = time.time() - t_train

    if best["state"] is None:
        raise RuntimeError(f"no finite validation loss in {len(history)} evaluations (training diverged); "
                           "nothing was written. Try a lower --lr.")
    # The saved model: the best weights in bf16, evaluated again as saved.
    model.load_state_dict(best["state"])
    model = model.to(torch.bfloat16)
    saved_val = evaluate(model, val_t, h.seq_len, h.eval_batch_size, dev, h.val_max_windows)
    final_val = {k.removeprefix("val_"): v for k, v in history[-1].items() if k.startswith("val_")}
    evals = [e["step"] for e in history]
    if best["step"] == evals[-1] and len(evals) > 1:
        hint = "validation loss was still improving at the last evaluation: more steps (--epochs) may help"
    else:
        hint = f"best validation loss at step {best['step']} of {step}: fewer steps would do (or overfitting)"
    log(hint)

    record = {
        "model": "tiny-llama3",
        "command": command_line(argv),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "seed": h.seed,
        "hyperparameters": asdict(h),
        "architecture": asdict(arch),
        "config": config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict(),
        "n_parameters": n_par,
        "steps_planned": total_steps,
        "steps_done": step,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": step * tokens_per_step,
        "epochs_seen": step * tokens_per_step / n_train,
        "stopped_early": stopped,
        "train_loss_last": last_loss,
        "val_loss_final": final_val,
        "val_loss_best": best["val"],
        "best_step": best["step"],
        "val_loss_saved_bf16": saved_val,
        "val_ppl_saved_bf16": {k: math.exp(v) for k, v in saved_val.items()},
        "val_note": ("loss = mean over non-overlapping seq_len windows of the mean next-token cross-entropy (nats, "
                     "per tiny-llama3 token); wikitext2 = raw validation split, ptb = validation split (the stream "
                     "the GPTQ-lineage 'ptb' perplexity protocol evaluates, so it was also used to pick the "
                     "checkpoint); ppl here is per token, not comparable across tokenizers"),
        "hint": hint,
        "train_seconds": train_seconds,
        "tokens_per_s": step * tokens_per_step / max(train_seconds, 1e-9),
        "wall_seconds": None,  # filled below
        "device": device_description(dev),
        "versions": versions(),
        "git_commit": git_commit_override or git_commit(),
        "script_sha256": {p: sha256_file(ROOT / p) for p in
                          ("tools/train_tiny_llama.py", "tools/prepare_tiny_data.py", "tools/train_tokenizer.py")
                          if (ROOT / p).is_file()},
        "data": {"path": _portable(data), "meta_sha256": sha256_file(Path(data) / "tiny-llama3-data.json"),
                 "train_tokens": n_train, "val_tokens": {k: int(v.size) for k, v in val_np.items()},
                 "prepared_at_git_commit": meta.get("git_commit"),
                 "train_sources": [{k: s.get(k) for k in ("dataset", "split", "input_sha256", "n_tokens")}
                                   | {"caveat": s.get("loader_info", {}).get("caveat")}
                                   for s in meta["train"]["sources"]],
                 "not_used": meta.get("not_used")},
        "tokenizer_sha256": tok_sha,
        "eval_history": history,
        "train_log": train_log,
    }

    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        add_legacy_rope_theta(tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)  # safetensors writes 0600 files
        record["wall_seconds"] = time.time() - t_start
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        record["output_bytes"] = sizes
        write_json(tmp / "training.json", record)
    total = sum(sizes.values())
    log(f"wrote {out} ({total / 1e6:.2f} MB); best val loss {best['loss']:.4f} at step {best['step']}; "
        f"saved bf16 val {saved_val['all']:.4f}; {record['tokens_per_s']:,.0f} tok/s; "
        f"train {train_seconds:.1f} s, wall {record['wall_seconds']:.1f} s")
    if arch == DEFAULT_ARCH and total > MAX_TOTAL_BYTES:
        log(f"WARNING: the output is {total:,} bytes, over the ~12 MB budget of the committed model folder.")
    return record


def write_config(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike = DEFAULT_TOKENIZER_DIR,
                 arch: Arch = DEFAULT_ARCH) -> list[Path]:
    """Write ``config.json`` + ``generation_config.json`` of the default model (as ``save_pretrained``
    writes them) into ``out_dir`` without weights."""
    import tempfile

    from tools.prepare_tiny_data import load_tokenizer, special_ids

    tok, _ = load_tokenizer(tokenizer_dir)
    bos, eos = special_ids(tok)
    config = build_config(tok.get_vocab_size(), bos, eos, arch)
    model = init_model(config, seed=0)
    import torch

    model = model.to(torch.bfloat16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        add_legacy_rope_theta(Path(tmp) / "config.json")
        for name in ("config.json", "generation_config.json"):
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out_dir / name)
                written.append(out_dir / name)
    return written


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    d = Hyper()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="output model folder (written atomically)")
    p.add_argument("--data", default=str(DEFAULT_DATA_OUT), help="folder written by tools/prepare_tiny_data.py")
    p.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR), help="folder with the tokenizer files")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--smoke", action="store_true",
                   help="micro model and a few short steps (CPU test); other options still override")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=d.epochs, help="training-stream passes when --steps is not given")
    p.add_argument("--seq-len", type=int, default=None, help=f"window length (default {d.seq_len}; smoke 64)")
    p.add_argument("--batch-size", type=int, default=None, help=f"windows per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=None, help=f"default {d.warmup_steps}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--beta1", type=float, default=d.beta1)
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--eval-every", type=int, default=None, help=f"default {d.eval_every}")
    p.add_argument("--eval-batch-size", type=int, default=None, help=f"default {d.eval_batch_size}")
    p.add_argument("--val-max-windows", type=int, default=None, help="cap windows per validation stream")
    p.add_argument("--log-every", type=int, default=None, help=f"default {d.log_every}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-limit-s", type=float, default=None,
                   help=f"stop training after this many seconds and save the best so far (default {d.time_limit_s}; "
                        "0 = no limit)")
    p.add_argument("--git-commit", default=None, help="commit to record when the checkout has no .git")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--write-config", metavar="DIR", default=None,
                   help="only write config.json + generation_config.json of the default model into DIR")
    return p


def hyper_from_args(args) -> tuple[Hyper, Arch]:
    base = asdict(Hyper())
    if args.smoke:
        base.update(SMOKE_HYPER)
    base["epochs"] = args.epochs
    for key in ("steps", "seq_len", "batch_size", "lr", "warmup_steps", "eval_every", "eval_batch_size",
                "val_max_windows", "log_every"):
        val = getattr(args, key)
        if val is not None:
            base[key] = val
    for key in ("min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "seed"):
        base[key] = getattr(args, key)
    if args.time_limit_s is not None:
        base["time_limit_s"] = args.time_limit_s if args.time_limit_s > 0 else None
    return Hyper(**base), (MICRO_ARCH if args.smoke else DEFAULT_ARCH)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_config:
        for path in write_config(args.write_config, args.tokenizer_dir):
            print(f"wrote {path}")
        return 0
    if not args.out:
        parser.error("--out is required (or --write-config DIR)")
    h, arch = hyper_from_args(args)
    train(args.out, data=args.data, tokenizer_dir=args.tokenizer_dir, hyper=h, arch=arch, device=args.device,
          overwrite=args.overwrite, argv=argv, git_commit_override=args.git_commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

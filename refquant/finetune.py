"""LoRA finetuning on a frozen NF4 base: QLoRA and IR-QLoRA (``refquant finetune``).

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"; code artidoro/qlora,
commit 7f4e95a6, ``qlora.py`` and ``scripts/finetune.sh``) and IR-QLoRA (Qin et al. 2024, "Accurate
LoRA-Finetuning Quantization of LLMs via Information Retention", ICML; code htqin/IR-QLoRA, commit
e6fef4ac, ``irlora.py``, ``utils.py``, ``scripts/finetune.sh``, ``evaluate_mmlu.py``). The settings are
the originals' Alpaca runs (the docs: ``docs/methods/qlora.md``, ``docs/methods/irqlora.md``):

* every decoder linear (q, k, v, o, gate, up, down; not ``lm_head``) becomes an NF4 base
  (:class:`refquant.backends.nf4_linear.NF4Linear`, blocksize 64, double quantization; IR-QLoRA: ICQ,
  ``tau_range`` 0.1, ``tau_n`` 100, ``blocksize2`` 256) with a peft LoRA adapter (r 64, alpha 16,
  dropout 0.0; IR-QLoRA: with IEC); the other parameters (embeddings, norms, ``lm_head``) are frozen
  in float32 (peft's ``prepare_model_for_kbit_training`` casts them so);
* AdamW (bitsandbytes' paged 32-bit AdamW where it is installed, else ``torch.optim.AdamW``; betas
  0.9/0.999, eps 1e-8, weight decay 0), lr 2e-4, ``max_grad_norm`` 0.3, batch 16, 10,000 steps;
* learning-rate schedule: the scripts pass ``lr_scheduler_type constant`` and ``warmup_ratio 0.03``;
  transformers' ``get_scheduler("constant")`` ignores the warmup, so the originals ran a constant
  2e-4 from the first step. ``lr_schedule="constant"`` (default) does that;
  ``lr_schedule="constant_with_warmup"`` applies the 3 % linear warmup the flags ask for;
* data: Alpaca (``instruction``, ``input``, ``output``), the prompt template of the originals, source
  = BOS + prompt truncated to 384 tokens, target = output + EOS truncated to 128 tokens, loss on the
  target tokens only; 1024 examples held out (``train_test_split(test_size=1024, seed=42)``);
  batches grouped by length (transformers' ``LengthGroupedSampler`` algorithm, length = characters
  of prompt + output); compute dtype float32 (neither Alpaca script passes ``--bf16``); gradient
  checkpointing on;
* IR-QLoRA evaluation re-runs ICQ on the full-precision weights with ``tau_n`` 125 (its
  ``scripts/evaluate_mmlu.sh``) and loads the trained adapters on that base (``eval_tau_n``).

Output directory (``--out``): ``checkpoint/`` (adapters, optimizer, RNG and loss history; rewritten
every ``save_steps`` steps so ``--resume`` continues a crashed run with identical results),
``adapter/`` (the final adapters, safetensors, plus the NF4 base's tensors), ``merged/`` (with
``--merge``: a transformers checkpoint with ``dequantize(W) + delta`` that ``refquant eval`` and
:func:`refquant.runs.load` read), ``loss.png`` + ``loss.json`` (the loss curve), ``results.json``
(provenance, settings, the data used, timings, perplexities).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peft
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from . import data, runs
from .backends.nf4_linear import NF4IECLoraLinear, NF4Linear, NF4LoraLinear, lora_config
from .provenance import ROOT, portable_path, provenance, write_json_atomic
from .spec import llama
from .spec.progress import progress

try:  # zero-shot / MMLU scoring lives in refquant/evaluate.py once it exists
    from . import evaluate as _evaluate
except ImportError:
    _evaluate = None

log = logging.getLogger("refquant")

IGNORE_INDEX = -100
METHODS = ("qlora", "irqlora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR_SCHEDULES = ("constant", "constant_with_warmup")


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of a run; defaults are the originals' Alpaca scripts (see the module docstring)."""

    method: str = "qlora"
    r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "float32"
    lr: float = 2e-4
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 0.3
    batch_size: int = 16
    micro_batch_size: int = 16
    source_max_len: int = 384
    target_max_len: int = 128
    train_on_source: bool = False
    group_by_length: bool = True
    gradient_checkpointing: bool = True
    steps: int = 10000
    seed: int = 42
    data_seed: int = 42
    eval_dataset_size: int = 1024
    max_eval_samples: int = 1000
    save_steps: int = 250
    tau_range: float = 0.1
    tau_n: int = 100
    blocksize2: int = 256
    eval_tau_n: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}.")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {tuple(DTYPES)}; got {self.compute_dtype!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}.")
        for name in ("r", "batch_size", "micro_batch_size", "source_max_len", "target_max_len", "steps", "save_steps",
                     "blocksize", "tau_n", "blocksize2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}.")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise ValueError("lr and max_grad_norm must be positive.")

    @classmethod
    def for_method(cls, method: str, **overrides) -> "FinetuneConfig":
        """The originals' defaults of ``method``; IR-QLoRA evaluates on an ICQ base re-run with tau_n 125."""
        base = {"eval_tau_n": 125} if method == "irqlora" else {}
        base.update(overrides)
        return cls(method=method, **base)

    @property
    def icq(self) -> bool:
        return self.method == "irqlora"

    @property
    def iec(self) -> bool:
        return self.method == "irqlora"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_signature(self) -> dict:
        """What must match for ``--resume`` (everything except the step count and evaluation settings)."""
        d = self.to_dict()
        for k in ("steps", "save_steps", "eval_tau_n", "max_eval_samples"):
            d.pop(k)
        return d


# -------------------------------------------------------------------------------------------------
# the model: NF4 bases and adapters


def decoder_linears(model) -> list[str]:
    """Qualified names of every decoder linear (all ``llama.LINEARS`` of every layer; not ``lm_head``)."""
    return [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for n in llama.LINEARS]


def _set_submodule(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def quantize_to_nf4(model, cfg: FinetuneConfig, tau_n: int | None = None, desc: str = "NF4 bases") -> list[str]:
    """Replace every decoder linear by a frozen :class:`NF4Linear` (ICQ for IR-QLoRA); freeze and cast
    the other parameters to float32 (peft's ``prepare_model_for_kbit_training``). Returns the names."""
    names = decoder_linears(model)
    dtype = DTYPES[cfg.compute_dtype]
    for name in progress(names, desc=desc):
        lin = model.get_submodule(name)
        if not isinstance(lin, torch.nn.Linear):
            raise TypeError(f"{name} is a {type(lin).__name__}, not an nn.Linear: quantize an unquantized model.")
        _set_submodule(model, name, NF4Linear.from_linear(
            lin, blocksize=cfg.blocksize, double_quant=cfg.double_quant, compute_dtype=dtype, icq=cfg.icq,
            tau_range=cfg.tau_range, tau_n=tau_n or cfg.tau_n, blocksize2=cfg.blocksize2))
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return names


def add_adapters(model, cfg: FinetuneConfig) -> list[str]:
    """peft LoRA adapters (IR-QLoRA: with IEC) on every NF4 base; only adapter parameters train."""
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    if not names:
        raise ValueError("the model has no NF4 linear layers; call quantize_to_nf4 first.")
    config = lora_config(names, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, iec=cfg.iec)
    # peft draws lora_A from torch's global RNG (kaiming_uniform): a forked RNG seeded with cfg.seed keeps the
    # adapters reproducible and the caller's RNG untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft.inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return names


def lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4LoraLinear)}


def adapter_state(model) -> dict:
    """The trainable tensors (LoRA A/B, IEC betas), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in params if params[n].requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"adapter state does not match the model: missing {missing[:3]}, unknown {unknown[:3]} "
                         "(was it saved with another method, rank or model?).")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def merge_adapters(model) -> None:
    """Replace every NF4 LoRA layer by a plain ``nn.Linear`` with ``dequantize(W) + delta`` (float32)."""
    for name, layer in list(lora_layers(model).items()):
        _set_submodule(model, name, layer.merged_linear(torch.float32))


def requantize_icq(model, fp_model, cfg: FinetuneConfig, tau_n: int) -> None:
    """IR-QLoRA's evaluation: a fresh ICQ base (``tau_n``) from the full-precision weights under each adapter."""
    for name, layer in progress(list(lora_layers(model).items()), desc=f"ICQ tau_n={tau_n}"):
        base = layer.get_base_layer()
        fp = fp_model.get_submodule(name)
        layer.base_layer = NF4Linear.from_linear(
            fp, blocksize=cfg.blocksize, double_quant=cfg.double_quant, compute_dtype=base.compute_dtype, icq=True,
            tau_range=cfg.tau_range, tau_n=tau_n, blocksize2=cfg.blocksize2).to(base.codes.device)


# -------------------------------------------------------------------------------------------------
# data: tokenized examples, length-grouped batches, the collator


@dataclass
class Examples:
    sources: list  # token ids: BOS + prompt, truncated to source_max_len
    targets: list  # token ids: output + EOS, truncated to target_max_len
    lengths: list  # characters of prompt + output (the originals' `length` column)


def tokenize_examples(records: list[dict], tokenizer, cfg: FinetuneConfig) -> Examples:
    """The originals' ``DataCollatorForCausalLM`` tokenization: ``f"{bos}{prompt}"`` and ``f"{output}{eos}"``,
    each tokenized without added special tokens and truncated on the right."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the tokenizer needs BOS and EOS tokens (the Alpaca collator adds both).")
    prompts = [data.format_alpaca(r) for r in records]
    outputs = [r["output"] for r in records]
    enc_p = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    enc_o = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    sources = [([bos] + list(p))[:cfg.source_max_len] for p in enc_p]
    targets = [(list(o) + [eos])[:cfg.target_max_len] for o in enc_o]
    return Examples(sources, targets, [len(p) + len(o) for p, o in zip(prompts, outputs)])


def length_grouped_indices(lengths, batch_size: int, generator: torch.Generator) -> list[int]:
    """transformers' ``get_length_grouped_indices``: a random permutation cut into megabatches of
    ``min(n // (4 * batch_size), 50) * batch_size`` (at least one batch), each sorted by length
    (descending), and the longest example moved to the very first position."""
    n = len(lengths)
    mult = min(n // (batch_size * 4), 50) or 1
    indices = torch.randperm(n, generator=generator)
    size = mult * batch_size
    megabatches = [sorted(indices[i:i + size].tolist(), key=lambda j: lengths[j], reverse=True) for i in range(0, n, size)]
    maxima = [lengths[m[0]] for m in megabatches]
    k = int(np.argmax(maxima))
    megabatches[0][0], megabatches[k][0] = megabatches[k][0], megabatches[0][0]
    return [i for m in megabatches for i in m]


def batch_indices(step: int, n: int, lengths, cfg: FinetuneConfig) -> list[int]:
    """The examples of optimizer step ``step`` (0-based): epoch ``e`` is ordered by a generator seeded
    ``data_seed + e`` (length-grouped or a plain permutation); a step is the next ``batch_size`` of it."""
    per_epoch = math.ceil(n / cfg.batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(cfg.data_seed + epoch)
    order = length_grouped_indices(lengths, cfg.batch_size, g) if cfg.group_by_length else torch.randperm(n, generator=g).tolist()
    return order[k * cfg.batch_size:(k + 1) * cfg.batch_size]


def collate(ex: Examples, idx: list[int], pad_id: int, train_on_source: bool = False):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX on the source and padding)."""
    seqs = [ex.sources[i] + ex.targets[i] for i in idx]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    for b, i in enumerate(idx):
        s = seqs[b]
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
        start = 0 if train_on_source else len(ex.sources[i])
        labels[b, start:len(s)] = torch.tensor(s[start:])
    return ids, mask, labels


def loss_sum(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Sum of the next-token cross-entropies over the labelled positions (float32 logits), and their count.

    The logits are computed only where a label exists (the head on the selected hidden states), which
    gives the same numbers as the full logits and keeps the memory small for a 128k vocabulary."""
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != IGNORE_INDEX
    h = hidden[:, :-1][sel]
    logits = model.lm_head(h).float()
    return torch.nn.functional.cross_entropy(logits, tgt[sel], reduction="sum"), int(sel.sum())


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based), as transformers' schedulers compute it.

    ``constant``: ``lr`` at every step (``get_scheduler("constant")`` ignores ``warmup_ratio``).
    ``constant_with_warmup``: ``lr * step / warmup`` for ``step < warmup`` with
    ``warmup = ceil(warmup_ratio * steps)`` (``TrainingArguments.get_warmup_steps``), then ``lr``.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
    return cfg.lr * (step / max(1, warmup) if step < warmup else 1.0)


def make_optimizer(params, cfg: FinetuneConfig, device: torch.device):
    """bitsandbytes' ``PagedAdamW32bit`` (the originals' ``paged_adamw_32bit``) where it is installed and
    the run is on CUDA; ``torch.optim.AdamW`` otherwise. Returns ``(optimizer, name)``."""
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW32bit(params, **kw), "bitsandbytes.optim.PagedAdamW32bit"
        except ImportError:
            pass
    return torch.optim.AdamW(params, **kw), "torch.optim.AdamW"


# -------------------------------------------------------------------------------------------------
# the training loop with a resumable checkpoint


@dataclass
class TrainState:
    step: int = 0
    history: list = dataclasses.field(default_factory=list)  # per step: loss, lr, grad_norm, tokens, seconds


def _write_checkpoint(ckpt: Path, model, optimizer, state: TrainState, signature: dict, rng: dict) -> None:

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in adapter_state(model).items()}, str(tmp / "adapters.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "optimizer.pt")
    write_json_atomic(tmp / "state.json", {"step": state.step, "history": state.history, "signature": signature})
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    if old.exists():
        shutil.rmtree(old)


def _read_checkpoint(ckpt: Path, model, optimizer, signature: dict) -> tuple[TrainState, dict]:

    meta = json.loads((ckpt / "state.json").read_text())
    if meta["signature"] != json.loads(json.dumps(signature, default=str)):
        raise ValueError(f"--resume: the checkpoint in {ckpt} was made with different settings:\n"
                         f"  saved: {meta['signature']}\n  now:   {signature}")
    load_adapter_state(model, load_file(str(ckpt / "adapters.safetensors")))
    blob = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    return TrainState(step=int(meta["step"]), history=list(meta["history"])), blob["rng"]


def _rng_state(device: torch.device) -> dict:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def train(model, ex: Examples, cfg: FinetuneConfig, out_dir: str | os.PathLike | None, pad_id: int,
          device="cpu", resume: bool = False, stop_after: int | None = None, signature_extra: dict | None = None):
    """Train the adapters of ``model`` for ``cfg.steps`` optimizer steps; returns ``(TrainState, info)``.

    With ``out_dir``, ``out_dir/checkpoint`` is written every ``save_steps`` steps and at the end;
    ``resume=True`` continues from it (same adapters, optimizer state, RNG state and data order, so
    the result equals an uninterrupted run). ``stop_after`` ends this call after that many steps of
    the run (a checkpoint is written first): a crash stand-in for tests. The caller's global torch
    RNG is left as it was (the run draws from a forked RNG seeded with ``cfg.seed``).
    """
    device = torch.device(device)
    n = len(ex.sources)
    if n == 0:
        raise ValueError("no training examples.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call add_adapters first.")
    optimizer, opt_name = make_optimizer(params, cfg, device)
    signature = {"config": cfg.training_signature(), "n_examples": n, **(signature_extra or {})}
    ckpt = Path(out_dir) / "checkpoint" if out_dir is not None else None
    state, rng = TrainState(), None
    if ckpt is not None and (ckpt / "state.json").exists():
        if not resume:
            raise FileExistsError(f"{ckpt} holds a partial or finished run; pass --resume to continue it or choose "
                                  "another --out.")
        state, rng = _read_checkpoint(ckpt, model, optimizer, signature)
        log.info("resuming after %d step(s)", state.step)
    # newer transformers rename gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    new_api = hasattr(model, "activation_checkpointing_enable")
    disable = getattr(model, "activation_checkpointing_disable" if new_api else "gradient_checkpointing_disable", None)
    if cfg.gradient_checkpointing and new_api:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    devices = [device] if device.type == "cuda" else []
    t_start = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        if rng is not None:
            _set_rng_state(rng, device)
        else:
            torch.manual_seed(cfg.seed)
        steps_here = range(state.step, cfg.steps)
        bar = progress(steps_here, total=len(steps_here), desc=f"{cfg.method} finetune")
        for step in bar:
            t = time.perf_counter()
            idx = batch_indices(step, n, ex.lengths, cfg)
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            micro = [idx[i:i + cfg.micro_batch_size] for i in range(0, len(idx), cfg.micro_batch_size)]
            batches = [collate(ex, m, pad_id, cfg.train_on_source) for m in micro]
            n_tokens = sum(int((b[2][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            if n_tokens == 0:
                raise ValueError(f"step {step}: the batch has no target tokens (target_max_len={cfg.target_max_len}).")
            total = 0.0
            for ids, mask, labels in batches:
                s, _ = loss_sum(model, ids.to(device), mask.to(device), labels.to(device))
                (s / n_tokens).backward()
                total += float(s.detach())
            loss = total / n_tokens
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: the loss is {loss}; lower the learning rate or check the data.")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            state.step = step + 1
            state.history.append({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens": int(sum(int(b[1].sum()) for b in batches)), "seconds": time.perf_counter() - t})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}")
            done = state.step == cfg.steps
            stopping = stop_after is not None and state.step >= stop_after
            if ckpt is not None and (state.step % cfg.save_steps == 0 or done or stopping):
                _write_checkpoint(ckpt, model, optimizer, state, signature, _rng_state(device))
            if stopping and not done:
                break
    model.eval()
    if cfg.gradient_checkpointing and disable is not None:
        disable()
    return state, {"optimizer": opt_name, "seconds": time.perf_counter() - t_start}


@torch.no_grad()
def eval_loss(model, ex: Examples, idx, cfg: FinetuneConfig, pad_id: int, device="cpu") -> float | None:
    """Mean target-token loss on the held-out examples ``idx`` (the originals' ``eval_loss``)."""
    if len(idx) == 0:
        return None
    model.eval()
    s_all, n_all = 0.0, 0
    for i in range(0, len(idx), cfg.micro_batch_size):
        ids, mask, labels = collate(ex, list(idx[i:i + cfg.micro_batch_size]), pad_id, cfg.train_on_source)
        s, n = loss_sum(model, ids.to(device), mask.to(device), labels.to(device))
        s_all, n_all = s_all + float(s), n_all + n
    return s_all / max(n_all, 1)


# -------------------------------------------------------------------------------------------------
# the loss curve, saving, loading


def save_loss_curve(history: list, path: Path, title: str) -> str | None:
    """``loss.json`` beside ``path`` always; the PNG when matplotlib is installed (no pyplot state touched)."""
    write_json_atomic(path.with_suffix(".json"), history)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: the loss curve is saved as %s only.", path.with_suffix(".json").name)
        return None
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], lw=1, label="training loss (target tokens)")
    if len(history) >= 10:
        k = max(2, len(history) // 20)
        sm = np.convolve([h["loss"] for h in history], np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path.name


def save_adapters(model, out: Path, recipe: dict) -> None:
    """``out/adapter/``: ``adapters.safetensors`` (LoRA A/B, IEC betas), ``nf4_base.safetensors`` (every
    NF4 base's codes, absmax and double-quant tensors, ICQ tau) and ``adapter_config.json`` (the recipe)."""

    d = out / "adapter"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in adapter_state(model).items()}, str(d / "adapters.safetensors"))
    base = {}
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            for bn, b in m.named_buffers(recurse=False):
                base[f"{name}.{bn}"] = b.contiguous().cpu()
    save_file(base, str(d / "nf4_base.safetensors"))
    write_json_atomic(d / "adapter_config.json", recipe)


def load_finetuned(out_dir: str | os.PathLike, model: str | os.PathLike | None = None, device="cpu"):
    """The finetuned model of a ``refquant finetune`` run with its adapters kept separate: the source
    model (``model`` or the one recorded), NF4 bases as saved, the trained adapters. Returns
    ``(hf_model, recipe)``."""

    d = Path(out_dir) / "adapter"
    recipe = json.loads((d / "adapter_config.json").read_text())
    cfg = FinetuneConfig(**recipe["config"])
    src = Path(model or recipe["model"])
    if not src.is_absolute() and not src.exists() and (ROOT / src).exists():
        src = ROOT / src
    hf = runs.load(src, "torch", "cpu", "float32").model
    quantize_to_nf4(hf, cfg, tau_n=recipe.get("base_tau_n"))
    add_adapters(hf, cfg)
    base = load_file(str(d / "nf4_base.safetensors"))
    for name, m in hf.named_modules():
        if isinstance(m, NF4Linear):
            for bn, b in m.named_buffers(recurse=False):
                saved = base[f"{name}.{bn}"]
                if bn == "codes" and not torch.equal(saved, b):
                    log.warning("%s: NF4 codes re-quantized here differ from the saved ones; using the saved ones.", name)
                b.copy_(saved)
    load_adapter_state(hf, load_file(str(d / "adapters.safetensors")))
    return hf.to(device).eval(), recipe


def _save_merged(model, tokenizer_src: Path, out: Path, recipe: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in runs.TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, tmp / name)
    write_json_atomic(tmp / "refquant.json", recipe)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# -------------------------------------------------------------------------------------------------
# the whole run (what `refquant finetune` does)


def c4_eval_head(encode, seqlen: int, n_windows: int, data_dir=None) -> tuple[np.ndarray, dict]:
    """The first ``n_windows`` windows of the C4 evaluation protocol (:func:`refquant.data.get_eval_tokens`
    ``"c4"``): the draws are sequential, so window k depends only on the draws before it and these are
    exactly the protocol's first windows -- without tokenizing the documents of the other 256 - n draws."""
    rows, rows_info = data.load_rows("c4", "validation", data_dir)
    windows, documents, starts, _ = data._c4_windows(rows, data.as_encoder(encode), random.Random(data.C4_EVAL_SEED),
                                                     n_windows, seqlen, strict=False, what="C4 validation")
    info = {"dataset": "c4", "split": "validation", "variant": "gptq", "seqlen": seqlen, "seed": data.C4_EVAL_SEED,
            "n_tokens": int(windows.size), "first_windows_only": n_windows, "documents": documents, "starts": starts,
            "source": rows_info["source"], "data_variant": rows_info["variant"]}
    if "caveat" in rows_info:
        info["caveat"] = rows_info["caveat"]
    return windows.reshape(-1), info


def training_data(data_source: str, tokenizer, cfg: FinetuneConfig, data_dir=None, max_examples: int | None = None):
    """``(examples, train examples, held-out indices, data info)``: the Alpaca-layout data tokenized as the
    originals do, with their held-out split (``min(eval_dataset_size, n // 10)`` examples, seed 42)."""
    records, data_info = data.load_alpaca(data_source, data_dir=data_dir, max_examples=max_examples)
    ex = tokenize_examples(records, tokenizer, cfg)
    train_idx, eval_idx = data.alpaca_train_eval_split(len(records), min(cfg.eval_dataset_size, len(records) // 10)
                                                       if cfg.eval_dataset_size else 0, seed=42)
    eval_idx = eval_idx[:cfg.max_eval_samples]
    train_ex = Examples([ex.sources[i] for i in train_idx], [ex.targets[i] for i in train_idx],
                        [ex.lengths[i] for i in train_idx])
    data_info = {**data_info, "n_train": len(train_idx), "n_heldout": len(eval_idx),
                 "target_tokens_mean": float(np.mean([len(s) for s in train_ex.targets]))}
    return ex, train_ex, eval_idx, data_info


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def run(model: str, cfg: FinetuneConfig, data_source: str, out_dir: str | os.PathLike, *, device: str = "auto",
        resume: bool = False, merge: bool = False, ppl: list | None = None, seqlen: int = 2048, data_dir=None,
        max_eval_windows: int | None = None, eval_batch_size: int = 4, max_examples: int | None = None,
        eval_base: bool = False, stop_after: int | None = None, zero_shot: list | None = None,
        token_cache: dict | None = None, zero_shot_limit: int | None = None, eval_fp: bool = True) -> dict:
    """Quantize, add adapters, finetune, save (adapters; ``merge``: also the merged model), evaluate."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = runs.resolve_device("torch", device)
    timings: dict = {}
    t = time.perf_counter()
    loaded = runs.load(model, "torch", "cpu", "float32")
    hf = loaded.model
    tokenizer = AutoTokenizer.from_pretrained(model)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    ex, train_ex, eval_idx, data_info = training_data(data_source, tokenizer, cfg, data_dir, max_examples)
    timings["data"] = time.perf_counter() - t
    pad_id = pad_id_of(tokenizer)

    results: dict = {"perplexity": {}}
    encode = loaded.encode
    token_cache = {} if token_cache is None else token_cache  # tokenized once for every evaluation of the run
    if ppl and "c4" in ppl and max_eval_windows and "c4" not in token_cache:
        token_cache["c4"] = c4_eval_head(encode, seqlen, max_eval_windows, data_dir)

    def evaluate_ppl(m, tag):
        if not ppl:
            return {}
        lm = runs.LoadedModel("torch", m, encode, str(model), device, "float32", loaded.config_json)
        r = runs.evaluate_ppl(lm, ppl, seqlen, data_dir, max_eval_windows, eval_batch_size, token_cache=token_cache)
        log.info("%s perplexity: %s", tag, {k: round(v["ppl"], 4) for k, v in r.items()})
        return r

    if eval_base and eval_fp:
        t = time.perf_counter()
        results["perplexity"]["fp"] = evaluate_ppl(hf, "unquantized")
        hf.to("cpu")
        timings["eval_fp"] = time.perf_counter() - t
    t = time.perf_counter()
    quantize_to_nf4(hf, cfg, desc="ICQ bases" if cfg.icq else "NF4 bases")
    timings["quantize"] = time.perf_counter() - t

    if eval_base:
        t = time.perf_counter()
        results["perplexity"]["base"] = evaluate_ppl(hf, "NF4/ICQ base")
        timings["eval_base"] = time.perf_counter() - t
    add_adapters(hf, cfg)
    hf.to(device)
    n_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)

    t = time.perf_counter()
    source_sig = {"model": portable_path(model), "data": {k: data_info.get(k) for k in ("name", "n_examples")}}
    state, train_info = train(hf, train_ex, cfg, out, pad_id, device=device, resume=resume, stop_after=stop_after,
                              signature_extra=source_sig)
    timings["train"] = time.perf_counter() - t
    finished = state.step >= cfg.steps
    title = f"{cfg.method} on {Path(str(model)).name}: {state.step} steps, {data_info['name']}"
    plot = save_loss_curve(state.history, out / "loss.png", title)
    record = {
        "provenance": provenance(device),
        "model": portable_path(model),
        "method": cfg.method,
        "config": cfg.to_dict(),
        "data": data_info,
        "steps_done": state.step,
        "finished": finished,
        "optimizer": train_info["optimizer"],
        "peft_version": getattr(peft, "__version__", None),
        "trainable_parameters": n_trainable,
        "loss_first": state.history[0]["loss"] if state.history else None,
        "loss_last_10_mean": float(np.mean([h["loss"] for h in state.history[-10:]])) if state.history else None,
        "tokens_per_second": (sum(h["tokens"] for h in state.history) / max(sum(h["seconds"] for h in state.history), 1e-9))
        if state.history else None,
        "loss_curve": plot,
        "timings_s": timings,
    }
    if not finished:
        write_json_atomic(out / "results.json", {**record, **results})
        return {**record, **results}

    t = time.perf_counter()
    record["eval_loss"] = eval_loss(hf, ex, eval_idx, cfg, pad_id, device)
    timings["eval_loss"] = time.perf_counter() - t
    recipe = {"model": portable_path(model), "config": cfg.to_dict(), "data": data_info, "base_tau_n": cfg.tau_n}
    save_adapters(hf, out, recipe)
    if cfg.icq and cfg.eval_tau_n and cfg.eval_tau_n != cfg.tau_n:
        t = time.perf_counter()
        fp = runs.load(model, "torch", "cpu", "float32").model
        requantize_icq(hf, fp, cfg, cfg.eval_tau_n)
        del fp
        timings["icq_eval_requantize"] = time.perf_counter() - t
        record["evaluated_base"] = f"ICQ re-run with tau_n={cfg.eval_tau_n} (the original's evaluation)"
    else:
        record["evaluated_base"] = "the training base"
    t = time.perf_counter()
    if merge:
        merge_adapters(hf)
        _save_merged(hf.to("cpu"), Path(model), out / "merged",
                     {"finetune": recipe, "note": "dequantize(NF4 base) + merged LoRA delta, float32"})
        hf.to(device)
        record["merged"] = "merged"
    results["perplexity"]["finetuned"] = evaluate_ppl(hf, "finetuned")
    timings["eval"] = time.perf_counter() - t
    if zero_shot:
        if _evaluate is None:
            raise ImportError("zero-shot / MMLU scoring needs refquant/evaluate.py, which could not be imported.")
        t = time.perf_counter()
        results["zero_shot"] = _evaluate.evaluate(hf, tokenizer, zero_shot, limit=zero_shot_limit, device=device,
                                                  data_dir=data_dir)
        timings["zero_shot"] = time.perf_counter() - t
    record = {**record, **results, "adapters": "adapter/", "merged_checkpoint": "merged/" if merge else None}
    write_json_atomic(out / "results.json", record)
    return record


# -------------------------------------------------------------------------------------------------
# the study's entry point (Table 3: QLoRA and IR-QLoRA rows)

#: A study row's finetuning per protocol: ``full`` = the originals' settings (10,000 steps of batch 16 on every
#: example, sources/targets up to 384/128 tokens, 1,000 held out; IR-QLoRA evaluated on an ICQ base re-run with
#: tau_n 125); ``reduced`` = a look at the whole path that fits the main job on a CPU: 2 steps of batch 4 on the
#: first 256 examples, sources/targets up to 128/64 tokens, 16 held out, IR-QLoRA evaluated on its training base
#: (no third ICQ pass). The reduced numbers show the machinery runs, not what finetuning buys.
STUDY_PRESETS = {
    "full": {"config": {}, "max_examples": None},
    "reduced": {"config": {"steps": 2, "save_steps": 2, "batch_size": 4, "micro_batch_size": 4, "source_max_len": 128,
                           "target_max_len": 64, "max_eval_samples": 16, "eval_tau_n": None}, "max_examples": 256},
}


def study_alpaca_source(data_dir=None) -> str:
    """``<data dir>/alpaca/alpaca_data.json`` when it exists, else the local stand-in (recorded with its caveat)."""
    root = data.resolve_data_dir(data_dir)
    if root is not None and (root / "alpaca" / "alpaca_data.json").is_file():
        return str(root / "alpaca" / "alpaca_data.json")
    return data.ALPACA_STANDIN


def study_finetune(loaded, kind: str, *, data_dir=None, protocol: str = "full", data_source: str | None = None) -> dict:
    """Finetune a study row's model in place: QLoRA (``kind="qlora"``) or IR-QLoRA (``"irqlora"``).

    ``loaded`` is the :class:`refquant.runs.LoadedModel` the study quantized with the row's method (NF4 or ICQ).
    The originals train LoRA on an NF4 base built from the full-precision weights, so this builds that base
    from ``loaded.source`` (:func:`quantize_to_nf4`; the same quantizer as the row's method, so the base equals
    the study's quantized weights: ``base_max_abs_diff`` records the check), adds the adapters, trains with the
    originals' settings (``STUDY_PRESETS`` per protocol; Alpaca from ``<data dir>/alpaca/alpaca_data.json``, else
    the documented stand-in), re-runs ICQ with ``tau_n`` 125 for IR-QLoRA's evaluation, and writes
    ``dequantize(base) + B A`` into ``loaded.model``'s linears (in its dtype), where the study's evaluations read
    them. Returns what was done (settings, data, steps, losses, throughput) for the row's record.
    """
    if kind not in METHODS:
        raise ValueError(f"kind must be one of {METHODS}; got {kind!r}.")
    if loaded.backend != "torch":
        raise ValueError(f"finetuning needs the torch backend; this row was loaded with {loaded.backend!r} "
                         "(run the study with --backend torch).")
    devices = [torch.device(loaded.device)] if torch.device(loaded.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # loading and peft draw from torch's global RNG: keep the caller's
        return _study_finetune(loaded, kind, data_dir, protocol, data_source)


def _study_finetune(loaded, kind: str, data_dir, protocol: str, data_source: str | None) -> dict:
    preset = STUDY_PRESETS["full" if str(protocol).startswith("full") else "reduced"]
    cfg = FinetuneConfig.for_method(kind, **preset["config"])
    source = data_source or study_alpaca_source(data_dir)
    device = torch.device(loaded.device)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(loaded.source)
    ex, train_ex, eval_idx, data_info = training_data(source, tokenizer, cfg, data_dir, preset["max_examples"])
    pad_id = pad_id_of(tokenizer)
    t_data = time.perf_counter() - t0
    model = runs.load(loaded.source, "torch", "cpu", "float32").model
    names = quantize_to_nf4(model, cfg, desc="ICQ bases" if cfg.icq else "NF4 bases")
    target = loaded.model
    with torch.no_grad():
        base_diff = max(float((model.get_submodule(n).dequantize(torch.float32).cpu()
                               - target.get_submodule(n).weight.detach().float().cpu()).abs().max()) for n in names)
    add_adapters(model, cfg)
    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state, train_info = train(model, train_ex, cfg, None, pad_id, device=device)
    heldout = eval_loss(model, ex, eval_idx, cfg, pad_id, device)
    requantized = cfg.icq and cfg.eval_tau_n is not None and cfg.eval_tau_n != cfg.tau_n
    if requantized:
        requantize_icq(model, runs.load(loaded.source, "torch", "cpu", "float32").model, cfg, cfg.eval_tau_n)
    merge_adapters(model)
    with torch.no_grad():
        for n in names:
            dst = target.get_submodule(n).weight
            dst.copy_(model.get_submodule(n).weight.to(dst.device, dst.dtype))
    hist = state.history
    return {
        "method": kind, "config": cfg.to_dict(), "data": data_info, "protocol": protocol, "steps_done": state.step,
        "trainable_parameters": n_trainable, "optimizer": train_info["optimizer"],
        "loss_first": hist[0]["loss"] if hist else None,
        "loss_last_10_mean": float(np.mean([h["loss"] for h in hist[-10:]])) if hist else None,
        "eval_loss": heldout,
        "tokens_per_second": sum(h["tokens"] for h in hist) / max(sum(h["seconds"] for h in hist), 1e-9) if hist else None,
        "base_max_abs_diff": base_diff,
        "evaluated_base": (f"ICQ re-run with tau_n={cfg.eval_tau_n} (the original's evaluation)"
                           if requantized else "the training base"),
        "weights": "dequantize(base) + merged LoRA delta, cast to the study's dtype",
        "seconds": time.perf_counter() - t0, "data_seconds": t_data, "train_seconds": train_info["seconds"],
    }


# -------------------------------------------------------------------------------------------------
# the command line: refquant finetune


def add_parser(sub, datasets_type) -> None:
    """``refquant finetune``: its arguments (every :class:`FinetuneConfig` field has a flag)."""
    f = sub.add_parser("finetune", help="QLoRA / IR-QLoRA: LoRA finetuning on a frozen NF4 base (Alpaca layout)")
    f.add_argument("--model", default=str(runs.DEFAULT_MODEL), help="checkpoint directory or Hugging Face id")
    f.add_argument("--method", default="qlora", choices=METHODS)
    f.add_argument("--data", default=data.ALPACA_STANDIN,
                   help=f"alpaca_data.json path, a dataset directory, a Hugging Face id ({data.ALPACA_HF_ID}), or "
                        f"{data.ALPACA_STANDIN} (local WikiText-2 train stand-in; default)")
    f.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the originals' 10000)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--resume", action="store_true", help="continue a crashed run in --out (identical results)")
    f.add_argument("--merge", action="store_true", help="also save the merged model (dequantized base + adapters) "
                   "as a transformers checkpoint in OUT/merged and evaluate it; adapters are always saved separately")
    f.add_argument("--device", default="auto")
    f.add_argument("--data-dir", default=None, help="datasets in the layout of ../shared/data (else $REFQUANT_DATA_DIR)")
    f.add_argument("--max-examples", type=int, default=None, help="use only the first N examples of --data")
    f.add_argument("--eval", type=datasets_type, default=["wikitext2", "c4", "ptb"], help="perplexity after finetuning")
    f.add_argument("--seqlen", type=int, default=2048, help="perplexity window")
    f.add_argument("--max-eval-windows", type=int, default=None)
    f.add_argument("--eval-batch-size", type=int, default=4)
    f.add_argument("--eval-base", action="store_true", help="also evaluate the unquantized model and the NF4/ICQ base "
                   "before finetuning")
    f.add_argument("--zero-shot", default=None, help="comma-separated zero-shot / MMLU tasks after finetuning "
                   "(refquant.evaluate.evaluate, e.g. piqa,arc_easy,arc_challenge,hellaswag,winogrande,mmlu)")
    f.add_argument("--zero-shot-limit", type=int, default=None, help="only the first N documents per task")
    f.add_argument("-v", "--verbose", action="store_true")
    g = f.add_argument_group("training settings (defaults: the originals' Alpaca scripts)")
    for fld in dataclasses.fields(FinetuneConfig):
        if fld.name in ("method", "steps"):
            continue
        flag = "--" + fld.name.replace("_", "-")
        if fld.type in ("bool", bool):
            g.add_argument(flag, dest=fld.name, default=None, action=argparse.BooleanOptionalAction)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(fld.type), str)
            g.add_argument(flag, dest=fld.name, type=kind, default=None, help=f"default {fld.default}")
    f.set_defaults(func=cmd_finetune)


def config_from_args(a) -> FinetuneConfig:
    overrides = {fld.name: getattr(a, fld.name) for fld in dataclasses.fields(FinetuneConfig)
                 if fld.name not in ("method", "steps") and getattr(a, fld.name, None) is not None}
    if a.steps is not None:
        overrides["steps"] = a.steps
    return FinetuneConfig.for_method(a.method, **overrides)


def cmd_finetune(a) -> int:
    cfg = config_from_args(a)
    zero_shot = [t.strip() for t in a.zero_shot.split(",") if t.strip()] if a.zero_shot else None
    rec = run(a.model, cfg, a.data, a.out, device=a.device, resume=a.resume, merge=a.merge, ppl=a.eval,
              seqlen=a.seqlen, data_dir=a.data_dir, max_eval_windows=a.max_eval_windows,
              eval_batch_size=a.eval_batch_size, max_examples=a.max_examples, eval_base=a.eval_base, zero_shot=zero_shot,
              zero_shot_limit=a.zero_shot_limit)
    print(json.dumps({"out": str(a.out), "steps_done": rec["steps_done"], "loss_first": rec["loss_first"],
                      "loss_last_10_mean": rec["loss_last_10_mean"], "eval_loss": rec.get("eval_loss"),
                      "perplexity": {tag: {k: v["ppl"] for k, v in r.items()} for tag, r in rec["perplexity"].items()}},
                     indent=1, default=str))
    return 0

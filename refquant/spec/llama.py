"""A readable NumPy LLaMA forward pass (float64): the model the reference pipeline quantizes.

Touvron et al. 2023 (LLaMA), with the LLaMA3 choices of Meta's release (grouped-query attention,
RoPE with theta 500000, SwiGLU MLP, RMSNorm, untied embeddings), matching transformers'
``LlamaForCausalLM`` tensor for tensor (``tests/test_llama.py`` checks logits to 1e-9 relative):

    h_0 = E[ids]
    a   = h + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = RMSNorm_1(h)
    h'  = a + down_proj(silu(gate_proj(m)) * up_proj(m)),                  m = RMSNorm_2(a)
    logits = lm_head(RMSNorm_f(h_L))

with ``RMSNorm(x) = gamma * x / sqrt(mean(x^2) + eps)``, causal softmax attention scaled by
``head_dim^-0.5``, and query head ``h`` reading key/value head ``h // (n_heads / n_kv_heads)``.

Linear layers compute ``y = x W^T (+ b)`` with ``W`` of shape (out, in), HF names inside a layer
(``self_attn.q_proj`` ... ``mlp.down_proj``). :class:`LinearHooks` let the pipeline observe or
transform every linear's input (calibration statistics, activation fake-quantization) and output.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import safetensors_io

LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
NORMS = ("input_layernorm", "post_attention_layernorm")

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
INPUT_LINEARS = {"attn_in": (Q, K, V), "o_in": (O,), "mlp_in": (GATE, UP), "down_in": (DOWN,)}
"""The distinct linear inputs of a LLaMA decoder layer and the linears that read each."""
INPUT_OF = {name: group for group, names in INPUT_LINEARS.items() for name in names}
NORM_OF = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
"""The RMSNorm that produces an input (where a per-channel scale can be folded)."""


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, cfg: dict) -> "LlamaConfig":
        if cfg.get("model_type", "llama") != "llama":
            raise ValueError(f"refquant's NumPy reference implements LLaMA; config has model_type={cfg.get('model_type')!r}.")
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


@dataclass
class LlamaModel:
    """Weights of a LLaMA checkpoint as float64 arrays; ``layers[i]`` maps HF names within layer i."""

    config: LlamaConfig
    embed_tokens: np.ndarray
    layers: list[dict[str, np.ndarray]]
    norm: np.ndarray
    lm_head: np.ndarray
    source: str = ""


def load(model_dir: str | os.PathLike, dtype=np.float64) -> LlamaModel:
    """Load a Hugging Face LLaMA checkpoint directory (config.json + safetensors) into NumPy."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a Hugging Face LLaMA checkpoint directory.")
    config = LlamaConfig.from_dict(json.loads(cfg_path.read_text()))
    t = {k: v.astype(dtype) for k, v in safetensors_io.read_dir(model_dir).items()}
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {name: t[p + name + ".weight"] for name in LINEARS + NORMS}
        layer.update({name + ".bias": t[p + name + ".bias"] for name in LINEARS if p + name + ".bias" in t})
        layers.append(layer)
    lm_head = t["model.embed_tokens.weight"] if config.tie_word_embeddings else t["lm_head.weight"]
    return LlamaModel(config, t["model.embed_tokens.weight"], layers, t["model.norm.weight"], lm_head, str(model_dir))


# ---------------------------------------------------------------------------------------------
# Building blocks


@dataclass
class LinearHooks:
    """Callbacks around every linear of a decoder layer.

    ``on_input(name, x) -> x`` sees (and may replace, e.g. fake-quantize) the input of linear
    ``name``; ``on_output(name, y) -> y`` likewise its output. Either may be None.
    """

    on_input: Callable[[str, np.ndarray], np.ndarray] | None = None
    on_output: Callable[[str, np.ndarray], np.ndarray] | None = None


NO_HOOKS = LinearHooks()


def linear(layer: dict, name: str, x: np.ndarray, hooks: LinearHooks = NO_HOOKS) -> np.ndarray:
    """``y = x W^T + b`` for the linear ``name`` of ``layer`` (bias only if the layer has one)."""
    if hooks.on_input is not None:
        x = hooks.on_input(name, x)
    y = x @ layer[name].T
    if name + ".bias" in layer:
        y = y + layer[name + ".bias"]
    if hooks.on_output is not None:
        y = hooks.on_output(name, y)
    return y


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """``gamma * x / sqrt(mean(x^2) + eps)`` over the last axis (Zhang & Sennrich 2019)."""
    return gamma * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``theta^(-2i/d)`` (Su et al. 2021), with LLaMA3.1 scaling if configured."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    sc = config.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif sc and sc.get("rope_type", sc.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {sc} is not implemented in the NumPy reference (default and llama3 are).")
    return inv_freq


def rope_tables(config: LlamaConfig, seqlen: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` of shape (seqlen, head_dim) for positions 0..seqlen-1."""
    freqs = np.arange(seqlen, dtype=np.float64)[:, None] * rope_inv_freq(config)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``x`` (..., T, head_dim) by position: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(layer: dict, x: np.ndarray, config: LlamaConfig, cos, sin, hooks: LinearHooks = NO_HOOKS) -> np.ndarray:
    """Causal grouped-query self-attention of ``x`` (B, T, hidden) -> (B, T, hidden)."""
    B, T, _ = x.shape
    H, Hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = linear(layer, "self_attn.q_proj", x, hooks).reshape(B, T, H, d).transpose(0, 2, 1, 3)
    k = linear(layer, "self_attn.k_proj", x, hooks).reshape(B, T, Hkv, d).transpose(0, 2, 1, 3)
    v = linear(layer, "self_attn.v_proj", x, hooks).reshape(B, T, Hkv, d).transpose(0, 2, 1, 3)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = np.repeat(k, H // Hkv, axis=1)  # query head h reads kv head h // (H / Hkv)
    v = np.repeat(v, H // Hkv, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * d ** -0.5
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    out = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(B, T, H * d)
    return linear(layer, "self_attn.o_proj", out, hooks)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def mlp(layer: dict, x: np.ndarray, hooks: LinearHooks = NO_HOOKS) -> np.ndarray:
    """SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""
    return linear(layer, "mlp.down_proj",
                  silu(linear(layer, "mlp.gate_proj", x, hooks)) * linear(layer, "mlp.up_proj", x, hooks), hooks)


def decoder_layer(layer: dict, x: np.ndarray, config: LlamaConfig, cos, sin, hooks: LinearHooks = NO_HOOKS) -> np.ndarray:
    """One pre-norm decoder layer on ``x`` (B, T, hidden)."""
    eps = config.rms_norm_eps
    h = x + attention(layer, rms_norm(x, layer["input_layernorm"], eps), config, cos, sin, hooks)
    return h + mlp(layer, rms_norm(h, layer["post_attention_layernorm"], eps), hooks)


def embed(model: LlamaModel, ids: np.ndarray) -> np.ndarray:
    """Token embeddings of ``ids`` (B, T) -> (B, T, hidden)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"token ids must have shape (batch, tokens); got {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {model.config.vocab_size}); got range [{ids.min()}, {ids.max()}].")
    return model.embed_tokens[ids]


def head(model: LlamaModel, h: np.ndarray) -> np.ndarray:
    """Final RMSNorm and LM head: hidden states -> logits (B, T, vocab)."""
    return rms_norm(h, model.norm, model.config.rms_norm_eps) @ model.lm_head.T


def forward(model: LlamaModel, ids: np.ndarray, hooks: LinearHooks | Callable[[int], LinearHooks] = NO_HOOKS) -> np.ndarray:
    """Logits (B, T, vocab) of token ids (B, T); ``hooks`` for every layer, or ``i -> hooks`` per layer."""
    h = embed(model, ids)
    cos, sin = rope_tables(model.config, h.shape[1])
    for i, layer in enumerate(model.layers):
        h = decoder_layer(layer, h, model.config, cos, sin, hooks(i) if callable(hooks) else hooks)
    return head(model, h)


def save(model: LlamaModel, out_dir: str | os.PathLike, config_json: dict, bf16: bool = False) -> None:
    """Write ``model`` as a transformers-loadable checkpoint (config.json + model.safetensors)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm}
    if not model.config.tie_word_embeddings:
        t["lm_head.weight"] = model.lm_head
    has_bias = any(name.endswith(".bias") for layer in model.layers for name in layer)
    for i, layer in enumerate(model.layers):
        for name, w in layer.items():
            key = name if name.endswith(".bias") else name + ".weight"
            t[f"model.layers.{i}.{key}"] = w
        if has_bias:  # transformers' attention_bias/mlp_bias switch biases on for every linear
            for name in LINEARS:
                t.setdefault(f"model.layers.{i}.{name}.bias", np.zeros(layer[name].shape[0]))
    dtype = "bfloat16" if bf16 else "float32"
    t = t if bf16 else {k: v.astype(np.float32) for k, v in t.items()}
    safetensors_io.write(out_dir / "model.safetensors", t, bf16=bf16)
    cfg = dict(config_json, torch_dtype=dtype, dtype=dtype)
    if has_bias:
        cfg["mlp_bias"] = cfg["attention_bias"] = True
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


__all__ = [
    "LlamaConfig", "LlamaModel", "LinearHooks", "LINEARS", "NORMS", "load", "save", "forward", "embed", "head",
    "decoder_layer", "attention", "mlp", "linear", "rms_norm", "rope_tables", "apply_rope",
]

"""The layer-wise pipeline on Hugging Face LLaMA models in torch (CPU, or one GPU with layer streaming).

:class:`HFRunner` adapts a ``LlamaForCausalLM`` to :func:`refquant.pipeline.quantize_model`: the
model stays where it is (CPU memory, or the meta device with layers built on demand by a
``layer_source``) and one decoder layer at a time is moved to the compute device together with the
calibration activations (kept in the activation dtype, bf16 for real models). Hooks on the
``nn.Linear`` modules feed the statistics; Hessians accumulate in float32.

:func:`perplexity` evaluates a model with the original protocol (non-overlapping windows, tail
dropped, ``exp`` of the mean window loss, :func:`refquant.spec.perplexity.perplexity_from_losses`), either
with the whole model on the device or streaming layers like the original ``llama_eval``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import numpy as np
import torch

from . import backends
from .backends import eval_kernels
from .pipeline import CalibrationOverflow, PassDone, act_quant_hooks, stopping_hooks
from .spec import llama
from .spec.perplexity import PerplexityResult, perplexity_from_losses
from .spec.progress import progress

log = logging.getLogger("refquant")




def load_model(path_or_id: str, dtype=torch.bfloat16, device: str = "cpu"):
    """``LlamaForCausalLM.from_pretrained`` with SDPA attention (causal without an explicit mask).

    ``path_or_id`` is a local checkpoint directory or a Hugging Face id (needs the hub or its cache).
    """
    import transformers

    try:
        model = transformers.LlamaForCausalLM.from_pretrained(path_or_id, dtype=dtype, attn_implementation="sdpa")
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = transformers.LlamaForCausalLM.from_pretrained(path_or_id, torch_dtype=dtype, attn_implementation="sdpa")
    except OSError as e:
        raise FileNotFoundError(
            f"could not load a LLaMA checkpoint from {path_or_id!r}: {e}. Pass a local directory with config.json "
            "and safetensors weights, or a Hugging Face id with the hub (or its cache) reachable."
        ) from e
    return model.to(device).eval()


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


class HFRunner:
    """Runs the refquant layer loop on a transformers LLaMA model.

    Args:
        model: a ``LlamaForCausalLM`` (any device; layers are moved to ``device`` one at a time).
        device: the compute device.
        act_dtype: dtype of the calibration activations (default: the model's dtype).
        batch_size: calibration sequences per forward call.
        layer_source: optional ``i -> LlamaDecoderLayer`` on ``device`` (e.g. read from safetensors or
            built with random weights); by default ``model.model.layers[i]`` is moved to ``device``.
        keep_layers: write the quantized layer back into ``model`` (moved back to the model's device);
            False drops it after ``on_layer`` has seen it (benchmarks, or runs that save per layer).
    """

    def __init__(self, model, device="cpu", act_dtype=None, batch_size: int = 8,
                 layer_source: Callable | None = None, keep_layers: bool = True):
        self.model = model
        self.config = llama.LlamaConfig.from_dict(model.config.to_dict())
        self.ops = backends.get_backend("torch")
        self.device = torch.device(device)
        self.home = next(iter(model.model.norm.parameters())).device
        self.act_dtype = act_dtype or model.model.norm.weight.dtype
        self.batch_size = int(batch_size)
        self.layer_source = layer_source
        self.keep_layers = keep_layers
        self.saved_act_quant: dict[int, dict] = {}
        self._pe = {}
        model.config._attn_implementation = "sdpa"  # the runner's own model object; causal without a mask

    @property
    def _dims(self) -> tuple:
        """``(eps, n_heads, n_kv, head_dim)`` of :func:`hooked_layer_forward`."""
        c = self.config
        return c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_dim

    @property
    def timing_event(self):
        """A factory of CUDA timing events (the StageTimer times parts of stages without synchronizing), or None."""
        return (lambda: torch.cuda.Event(enable_timing=True)) if self.device.type == "cuda" else None

    def sync(self) -> None:
        """Wait for the device (stage timings attribute GPU work to the right stage)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- geometry -------------------------------------------------------------------------
    def in_features(self, group: str) -> int:
        c = self.config
        return {"attn_in": c.hidden_size, "o_in": c.num_attention_heads * c.head_dim,
                "mlp_in": c.hidden_size, "down_in": c.intermediate_size}[group]

    def position_embeddings(self, T: int):
        if T not in self._pe:
            rotary = self.model.model.rotary_emb
            if rotary.inv_freq.device != self.device:
                rotary = rotary.to(self.device)
            probe = torch.zeros(1, T, 1, dtype=self.act_dtype, device=self.device)
            self._pe[T] = rotary(probe, torch.arange(T, device=self.device)[None, :])
        return self._pe[T]

    # ---- the loop's protocol ----------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: np.ndarray):
        emb = self.model.model.embed_tokens
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        out = torch.empty(ids.shape[0], ids.shape[1], self.config.hidden_size, dtype=self.act_dtype, device=self.device)
        for s in range(0, ids.shape[0], self.batch_size):
            chunk = ids[s:s + self.batch_size].to(emb.weight.device)
            out[s:s + self.batch_size] = emb(chunk).to(self.device, self.act_dtype)
        return out

    def load_layer(self, i: int):
        self.current_index = i  # names the layer in overflow errors
        if self.layer_source is not None:
            return self.layer_source(i)
        return self.model.model.layers[i].to(self.device)

    def finish_layer(self, i: int, layer) -> None:
        if self.keep_layers and self.layer_source is None:
            self.model.model.layers[i] = layer.to(self.home)
        elif self.keep_layers:
            self.model.model.layers[i] = layer
        if self.device.type == "cuda" and not self.keep_layers:
            del layer

    @torch.no_grad()
    def forward(self, layer, acts, hooks: llama.LinearHooks | None = None, index: int | None = None,
                keep_output: bool = True, stop_after: str | None = None):
        """Run ``layer`` on all sequences of ``acts``; ``keep_output=False`` (statistics passes) keeps
        no output buffer, and with ``stop_after`` each batch ends right after that linear's input hook
        (:func:`refquant.pipeline.stopping_hooks`). Non-finite outputs raise :class:`CalibrationOverflow`
        naming the linear."""
        out = torch.empty_like(acts) if keep_output else None
        if keep_output:
            stop_after = None
        pe = self.position_embeddings(acts.shape[1])
        finite = torch.ones((), dtype=torch.bool, device=acts.device)
        hooks = stopping_hooks(hooks, stop_after) if stop_after else hooks
        if plain_layer(layer):  # functions with the hooks called directly (fused elementwise kernels on CUDA)
            run, ctx = (lambda x: hooked_layer_forward(layer, x, *pe, *self._dims, hooks)), contextlib.nullcontext()
        else:  # wrapped linears (LoRA, NF4): the modules' own forward, hooks on the modules
            run = lambda x: _layer_output(layer(x, attention_mask=None, position_embeddings=pe))  # noqa: E731
            ctx = linear_hooks(layer, hooks)
        with ctx:
            for s in range(0, acts.shape[0], self.batch_size):
                try:
                    y = run(acts[s:s + self.batch_size])
                except PassDone:  # the statistics wanted from this batch are in (stop_after)
                    continue
                finite &= torch.isfinite(y).all()
                if keep_output:
                    out[s:s + self.batch_size] = y
        if not bool(finite):
            raise CalibrationOverflow(self._locate_overflow(layer, acts, pe, index if index is not None
                                                            else getattr(self, "current_index", None)))
        return out

    def _locate_overflow(self, layer, acts, pe, index) -> str:
        where = []

        def check(name, t):
            if not where and not bool(torch.isfinite(t).all()):
                where.append(name)
            return t

        with linear_hooks(layer, llama.LinearHooks(on_input=lambda n, x: check(n + " input", x),
                                                   on_output=lambda n, y: check(n + " output", y))):
            for s in range(0, acts.shape[0], self.batch_size):
                layer(acts[s:s + self.batch_size], attention_mask=None, position_embeddings=pe)
                if where:
                    break
        layer_name = f"model.layers.{index}" if index is not None else "a decoder layer"
        return (f"non-finite activations in {layer_name} at {where[0] if where else 'its output'} "
                f"(dtype {acts.dtype}); fp16 overflows above 65504 -- run in bfloat16 or float32 (--dtype) "
                "or check the weights for NaN/Inf.")

    @torch.no_grad()
    def block(self, layer, kind: str, x, weights: dict):
        """AWQ's compared module with ``weights`` substituted: attention (q/k/v), MLP (gate/up) or a linear."""
        with substituted(layer, weights):
            if kind == "attn":
                pe = self.position_embeddings(x.shape[1])
                _, n_heads, n_kv, head_dim = self._dims
                if plain_layer(layer):
                    run = lambda xb: hooked_attention(layer, xb, *pe, n_heads, n_kv, head_dim, llama.NO_HOOKS)  # noqa: E731
                else:
                    run = lambda xb: layer.self_attn(hidden_states=xb, position_embeddings=pe, attention_mask=None)[0]  # noqa: E731
            elif kind == "mlp":
                run = (lambda xb: hooked_mlp(layer, xb, llama.NO_HOOKS)) if plain_layer(layer) else layer.mlp
            else:
                return module(layer, kind)(x)
            outs = [run(x[s:s + self.batch_size]) for s in range(0, x.shape[0], self.batch_size)]
            return outs[0] if len(outs) == 1 else torch.cat(outs)  # one batch: no copy

    def get(self, layer, name: str):
        if name.endswith(".bias"):
            b = module(layer, name[:-5]).bias
            return None if b is None else b.data
        return module(layer, name).weight.data

    def set(self, layer, name: str, value) -> None:
        if name.endswith(".bias"):
            lin = module(layer, name[:-5])
            value = torch.as_tensor(value).to(device=lin.weight.device, dtype=lin.weight.dtype)
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(value.clone(), requires_grad=False)
            else:
                lin.bias.data.copy_(value)
            return
        p = module(layer, name).weight
        value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{name}: new value has shape {tuple(value.shape)}, the layer has {tuple(p.shape)}.")
        p.data.copy_(value.to(device=p.device, dtype=p.dtype))

    def saved_hooks(self, i: int):
        return act_quant_hooks(self.saved_act_quant.get(i, {}), self.ops)


def module(layer, name: str):
    """The submodule of a decoder layer by its HF name (``self_attn.q_proj``, ``input_layernorm``)."""
    m = layer
    for part in name.split("."):
        m = getattr(m, part)
    return m


@contextlib.contextmanager
def linear_hooks(layer, hooks: llama.LinearHooks | None):
    """Register ``hooks`` on the seven linears of ``layer`` for the duration of the block."""
    handles = []
    if hooks is not None:
        for name in llama.LINEARS:
            lin = module(layer, name)
            if hooks.on_input is not None:
                handles.append(lin.register_forward_pre_hook(
                    lambda mod, args, n=name: (hooks.on_input(n, args[0]),) + tuple(args[1:])))
            if hooks.on_output is not None:
                handles.append(lin.register_forward_hook(lambda mod, args, out, n=name: hooks.on_output(n, out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def substituted(layer, weights: dict):
    """Temporarily replace linear weights of ``layer`` (restored afterwards, bit for bit)."""
    saved = {}
    try:
        for name, W in weights.items():
            p = module(layer, name).weight
            saved[name] = p.data
            p.data = torch.as_tensor(W).to(device=p.device, dtype=p.dtype)
        yield
    finally:
        for name, data in saved.items():
            module(layer, name).weight.data = data


@contextlib.contextmanager
def act_quant_applied(model, recipe: dict, ops=None):
    """Apply an activation-quantization recipe ``{layer: {linear: ActQuant}}`` with hooks."""
    ops = ops or backends.get_backend("torch")
    stack = contextlib.ExitStack()
    with stack:
        for i, aq in recipe.items():
            stack.enter_context(linear_hooks(model.model.layers[int(i)], act_quant_hooks(aq, ops)))
        yield


def plain_layer(layer) -> bool:
    """Whether :func:`hooked_layer_forward` can run ``layer``: plain ``nn.Linear`` modules (a LoRA
    wrapper or an NF4 base runs its own forward) with SiLU, and no module hooks of anyone else."""
    mods = [module(layer, n) for n in llama.LINEARS]
    if not all(type(m) is torch.nn.Linear for m in mods):
        return False
    act = getattr(getattr(layer.mlp, "config", None), "hidden_act", None)
    if act is None:
        act = {"SiLU": "silu", "SiLUActivation": "silu"}.get(type(getattr(layer.mlp, "act_fn", None)).__name__)
    if act != "silu":
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in [layer, layer.self_attn, layer.mlp, *mods])


def _linear(layer, name: str, x, hooks: llama.LinearHooks):
    """``nn.Linear`` ``name`` of ``layer`` with refquant's hooks around it (as :func:`refquant.llama.linear`)."""
    if hooks.on_input is not None:
        x = hooks.on_input(name, x)
    lin = module(layer, name)
    y = torch.nn.functional.linear(x, lin.weight, lin.bias)
    if hooks.on_output is not None:
        y = hooks.on_output(name, y)
    return y


def hooked_attention(layer, h, cos, sin, n_heads: int, n_kv: int, head_dim: int, hooks: llama.LinearHooks):
    """transformers' ``LlamaAttention`` with SDPA (causal, no mask, native GQA) on the normed input ``h``."""
    B, T, _ = h.shape
    q = eval_kernels.rope(_linear(layer, llama.Q, h, hooks), cos, sin, n_heads, head_dim)
    k = eval_kernels.rope(_linear(layer, llama.K, h, hooks), cos, sin, n_kv, head_dim)
    v = _linear(layer, llama.V, h, hooks).view(B, T, n_kv, head_dim).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim ** -0.5,
                                                         enable_gqa=n_kv != n_heads)
    return _linear(layer, llama.O, o.transpose(1, 2).reshape(B, T, n_heads * head_dim), hooks)


def hooked_mlp(layer, h, hooks: llama.LinearHooks):
    """transformers' ``LlamaMLP`` (SiLU) on the normed input ``h``."""
    return _linear(layer, llama.DOWN, eval_kernels.silu_mul(_linear(layer, llama.GATE, h, hooks),
                                                            _linear(layer, llama.UP, h, hooks)), hooks)


def hooked_layer_forward(layer, x, cos, sin, eps: float, n_heads: int, n_kv: int, head_dim: int,
                         hooks: llama.LinearHooks | None = None):
    """One LLaMA decoder layer as functions, refquant's linear hooks called in place of module hooks.

    The arithmetic of transformers' ``LlamaDecoderLayer`` with SDPA, op for op (q, k, v as three GEMMs,
    as the module does); RMSNorm, RoPE and ``silu(gate) * up`` go through
    :mod:`refquant.backends.eval_kernels`: on CUDA one fused Triton kernel each instead of ~15
    elementwise passes (RoPE and SwiGLU bit for bit the torch ops; RMSNorm differs from them in a rare
    last bf16 bit), elsewhere the same torch ops as the module (bit for bit its output). Used by
    :meth:`HFRunner.forward` and :meth:`HFRunner.block` for :func:`plain_layer` layers.
    """
    hooks = hooks or llama.NO_HOOKS
    x = x + hooked_attention(layer, eval_kernels.rms_norm(x, layer.input_layernorm.weight, eps), cos, sin,
                             n_heads, n_kv, head_dim, hooks)
    return x + hooked_mlp(layer, eval_kernels.rms_norm(x, layer.post_attention_layernorm.weight, eps), hooks)


def fused_layer_forward(layer, x, cos, sin, eps: float, n_heads: int, n_kv: int, head_dim: int, W_qkv=None):
    """One LLaMA decoder layer with q/k/v as a single GEMM (``W_qkv``, :func:`fuse_layer`).

    The same arithmetic as transformers' ``LlamaDecoderLayer`` with SDPA (causal, native GQA), for
    models without biases or activation quantizers (:func:`window_losses` checks); fewer GEMMs and
    no per-module overhead make full-model perplexity faster. ``cos``/``sin``: (1 or B, T, head_dim).
    RMSNorm, RoPE and ``silu(gate) * up`` are the evaluator's fused kernels on CUDA
    (:mod:`refquant.backends.eval_kernels`: one kernel each instead of ~6 elementwise passes, equal to
    the torch ops up to a rare bf16 ulp; torch ops elsewhere or with ``REFQUANT_EVAL_TRITON=0``).
    gate and up stay two GEMMs, so their outputs are contiguous.
    """
    attn, mlp = layer.self_attn, layer.mlp
    W_qkv = W_qkv if W_qkv is not None else fuse_layer(layer)
    B, T, _ = x.shape
    qkv = torch.nn.functional.linear(eval_kernels.rms_norm(x, layer.input_layernorm.weight, eps), W_qkv)
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = eval_kernels.rope(q, cos, sin, n_heads, head_dim)
    k = eval_kernels.rope(k, cos, sin, n_kv, head_dim)
    v = v.view(B, T, n_kv, head_dim).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim ** -0.5,
                                                         enable_gqa=n_kv != n_heads)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, n_heads * head_dim))
    h = eval_kernels.rms_norm(x, layer.post_attention_layernorm.weight, eps)
    return x + mlp.down_proj(eval_kernels.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))


def fuse_layer(layer):
    """``W_qkv``: the concatenated q/k/v weights of a decoder layer."""
    a = layer.self_attn
    return torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])


def _fusable(model) -> bool:
    layer = model.model.layers[0]
    # plain nn.Linear only: a wrapped or quantized linear (LoRA adapters, an NF4 base) runs its own forward
    return all(isinstance(module(layer, n), torch.nn.Linear) and module(layer, n).bias is None for n in llama.LINEARS) \
        and getattr(model.config, "hidden_act", "silu") == "silu"


@torch.no_grad()
def window_losses(model, tokens: np.ndarray, seqlen: int = 2048, device="cpu", batch_size: int = 4,
                  max_windows: int | None = None, stream: bool = False, desc: str = "ppl",
                  engine: str = "auto") -> list[float]:
    """Mean cross-entropy of every non-overlapping ``seqlen`` window (float32 logits/loss).

    Engines: ``"hf"`` -- transformers' modules (``stream=False``: the whole model on ``device``;
    ``stream=True``: the original ``llama_eval`` order, all windows through layer 0, then layer 1,
    ..., one layer on the device at a time); ``"fused"`` -- :func:`fused_layer_forward` in the
    layer-major order (one layer's fused weights at a time); ``"auto"``: fused where the model
    allows it (no biases, no activation quantizer hooks), else hf.
    """
    if engine == "auto":
        engine = "fused" if _fusable(model) else "hf"
    if engine == "fused":
        return _window_losses_fused(model, tokens, seqlen, device, batch_size, max_windows, desc)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.size // seqlen
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n == 0:
        raise ValueError(f"{tokens.size} tokens make no window of {seqlen}.")
    ids = torch.from_numpy(tokens[: n * seqlen].reshape(n, seqlen))
    device = torch.device(device)
    if stream:
        runner = HFRunner(model, device=device, batch_size=batch_size, keep_layers=True)
        h = runner.embed(ids.numpy())
        for i in progress(range(runner.config.num_hidden_layers), desc=f"{desc} layers"):
            layer = runner.load_layer(i)
            h = runner.forward(layer, h, index=i)
            runner.finish_layer(i, layer)
        norm = model.model.norm.to(device)

        def final(s):  # the final RMSNorm's output
            return norm(h[s:s + batch_size])
    else:
        model.to(device)

        def final(s):  # LlamaModel's last_hidden_state is after the final RMSNorm
            return model.model(ids[s:s + batch_size].to(device), use_cache=False).last_hidden_state
    head = model.lm_head.to(device)
    labels_all = ids[:, 1:].to(device)
    losses = torch.empty(n, dtype=torch.float64, device=device)
    for s in progress(range(0, n, batch_size), total=(n + batch_size - 1) // batch_size, desc=desc):
        hidden = final(s)
        for b in range(hidden.shape[0]):
            losses[s + b] = _window_loss(head, hidden[b, :-1], labels_all[s + b])
    losses = losses.tolist()  # one device sync for the whole evaluation
    bad = [i for i, v in enumerate(losses) if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite loss in window(s) {bad[:5]}: {[losses[i] for i in bad[:5]]}")
    return losses


@torch.no_grad()
def _window_losses_fused(model, tokens, seqlen, device, batch_size, max_windows, desc):
    cfg = llama.LlamaConfig.from_dict(model.config.to_dict())
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.size // seqlen if max_windows is None else min(tokens.size // seqlen, int(max_windows))
    if n == 0:
        raise ValueError(f"{tokens.size} tokens make no window of {seqlen}.")
    ids = torch.from_numpy(tokens[: n * seqlen].reshape(n, seqlen))
    runner = HFRunner(model, device=device, batch_size=batch_size, keep_layers=True)
    h = runner.embed(ids.numpy())
    cos, sin = runner.position_embeddings(seqlen)  # (1, T, d): broadcast over the batch
    for i in progress(range(cfg.num_hidden_layers), desc=f"{desc} layers"):
        layer = runner.load_layer(i)
        fused = fuse_layer(layer)
        for s in range(0, n, batch_size):
            h[s:s + batch_size] = fused_layer_forward(layer, h[s:s + batch_size], cos, sin, cfg.rms_norm_eps,
                                                      cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                                      fused)
        del fused
        runner.finish_layer(i, layer)
    norm, head = model.model.norm.to(device), model.lm_head.to(device)
    labels_all = ids[:, 1:].to(device)
    losses = torch.empty(n, dtype=torch.float64, device=device)
    for s in range(0, n, batch_size):
        hidden = norm(h[s:s + batch_size])
        for b in range(hidden.shape[0]):
            losses[s + b] = _window_loss(head, hidden[b, :-1], labels_all[s + b])
    losses = losses.tolist()
    bad = [i for i, v in enumerate(losses) if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite loss in window(s) {bad[:5]}: {[losses[i] for i in bad[:5]]}")
    return losses


def _window_loss(head, hidden, labels, chunk: int = 512):
    """Mean cross-entropy of one window, float32 logits computed ``chunk`` positions at a time."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for p in range(0, hidden.shape[0], chunk):
        logits = head(hidden[p:p + chunk]).float()
        total += torch.nn.functional.cross_entropy(logits, labels[p:p + chunk], reduction="sum").double()
    return total / hidden.shape[0]


def perplexity(model, tokens: np.ndarray, seqlen: int = 2048, device="cpu", batch_size: int = 4,
               max_windows: int | None = None, stream: bool = False, act_quant: dict | None = None,
               desc: str = "ppl", engine: str = "auto") -> PerplexityResult:
    """Perplexity with the GPTQ-lineage protocol (:func:`refquant.perplexity.perplexity_from_losses`)."""
    ctx = act_quant_applied(model, act_quant) if act_quant else contextlib.nullcontext()
    with ctx:
        losses = window_losses(model, tokens, seqlen, device, batch_size, max_windows, stream, desc,
                               engine="hf" if act_quant else engine)
    return PerplexityResult(ppl=perplexity_from_losses(losses, seqlen), n_windows=len(losses), seqlen=seqlen,
                            window_losses=losses)

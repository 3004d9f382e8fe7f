"""The runner's functional decoder layer (hooks called directly) is transformers' module forward, op for op.

``HFRunner.forward`` and ``HFRunner.block`` run plain layers through
:func:`refquant.torch_pipeline.hooked_layer_forward` (fused elementwise kernels on CUDA); on the CPU the
torch ops are the module's, so outputs, hook calls and the inputs the hooks see are identical bit for bit.
Statistics passes may end at the last input they need (``stop_after``).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding  # noqa: E402

from refquant import llama, pipeline  # noqa: E402
from refquant import torch_pipeline as tp  # noqa: E402


def _layer(dtype, seed=0, bias=False):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, num_hidden_layers=1, vocab_size=64,
                                   attention_bias=bias, mlp_bias=bias)
    cfg._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(seed)
    layer = LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim > 1 else 1.0) + (1.0 if p.ndim == 1 else 0))
    return cfg, layer.to(dtype)


def _recording_hooks(log):
    """Hooks that record what they see and change it (so skipping or reordering a call shows)."""

    def on_input(name, x):
        log.append(("in", name, x.clone()))
        return x * 0.5 if name == llama.O else x

    def on_output(name, y):
        log.append(("out", name, y.clone()))
        return y + 1 if name == llama.K else y

    return llama.LinearHooks(on_input=on_input, on_output=on_output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_hooked_forward_is_the_module_forward_with_module_hooks(dtype, bias):
    cfg, layer = _layer(dtype, bias=bias)
    assert tp.plain_layer(layer)
    x = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(24)[None])
    want_log, got_log = [], []
    with torch.no_grad():
        with tp.linear_hooks(layer, _recording_hooks(want_log)):
            want = layer(x, attention_mask=None, position_embeddings=(cos, sin))
        want = want[0] if isinstance(want, tuple) else want
        got = tp.hooked_layer_forward(layer, x, cos, sin, cfg.rms_norm_eps, 4, 2, 32, _recording_hooks(got_log))
    assert torch.equal(got, want)
    assert [(k, n) for k, n, _ in got_log] == [(k, n) for k, n, _ in want_log]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(got_log, want_log))


class _Wrapped(torch.nn.Linear):
    """A linear subclass (like a LoRA or NF4 wrapper): the runner must use the modules' own forward."""


def test_plain_layer_refuses_wrapped_linears_and_foreign_hooks():
    _, layer = _layer(torch.float32)
    assert tp.plain_layer(layer)
    handle = layer.mlp.up_proj.register_forward_hook(lambda *a: None)
    assert not tp.plain_layer(layer)
    handle.remove()
    w = layer.mlp.down_proj
    layer.mlp.down_proj = _Wrapped(w.in_features, w.out_features, bias=False)
    assert not tp.plain_layer(layer)


class _Model:
    """The parts of a LlamaForCausalLM that HFRunner reads, around one decoder layer."""

    def __init__(self, cfg, layer):
        self.config = cfg
        self.model = torch.nn.Module()
        self.model.norm = torch.nn.LayerNorm(cfg.hidden_size).to(layer.input_layernorm.weight.dtype)
        self.model.rotary_emb = LlamaRotaryEmbedding(cfg)
        self.model.layers = torch.nn.ModuleList([layer])


@pytest.mark.parametrize("stop", [None, llama.Q, llama.O, llama.GATE, llama.DOWN])
def test_runner_forward_plain_and_module_paths_agree_and_stop_early(stop):
    cfg, layer = _layer(torch.float32, seed=3)
    runner = tp.HFRunner(_Model(cfg, layer), batch_size=2)
    acts = torch.randn(5, 16, 128, generator=torch.Generator().manual_seed(4))
    logs = {}
    for path in ("plain", "module"):
        if path == "module":  # a foreign (no-op) hook sends the runner through the modules
            handle = layer.register_forward_hook(lambda *a: None)
        log = logs[path] = []
        out = runner.forward(layer, acts, _recording_hooks(log), keep_output=stop is None, stop_after=stop)
        if path == "module":
            handle.remove()
        if stop is None:
            logs[path + "_out"] = out
        else:
            assert out is None
    names = [(k, n) for k, n, _ in logs["plain"]]
    assert names == [(k, n) for k, n, _ in logs["module"]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(logs["plain"], logs["module"]))
    per_batch = [n for k, n in names if k == "in"][: len(llama.LINEARS)]
    if stop is None:
        assert torch.equal(logs["plain_out"], logs["module_out"])
        assert per_batch == list(llama.LINEARS)
    else:  # every batch (3 of them) ends right after stop's input hook
        last = llama.LINEARS.index(stop)
        assert [n for k, n in names if k == "in"] == list(llama.LINEARS[: last + 1]) * 3


def test_block_plain_and_module_paths_agree_with_substituted_weights():
    cfg, layer = _layer(torch.float32, seed=5)
    runner = tp.HFRunner(_Model(cfg, layer), batch_size=2)
    x = torch.randn(3, 16, 128, generator=torch.Generator().manual_seed(6))
    new = {n: tp.module(layer, n).weight * 0.9 for n in (llama.Q, llama.K, llama.V, llama.O, llama.GATE, llama.UP)}
    before = {n: tp.module(layer, n).weight.clone() for n in new}
    for kind, names in (("attn", (llama.Q, llama.K, llama.V, llama.O)), ("mlp", (llama.GATE, llama.UP))):
        weights = {n: new[n] for n in names}
        plain = runner.block(layer, kind, x, weights)
        handle = layer.register_forward_hook(lambda *a: None)
        module = runner.block(layer, kind, x, weights)
        handle.remove()
        assert torch.equal(plain, module), kind
    assert all(torch.equal(tp.module(layer, n).weight, w) for n, w in before.items())  # restored


def test_stopping_hooks_validate_the_name():
    with pytest.raises(ValueError, match="stop_after"):
        pipeline.stopping_hooks(None, "mlp.nope")
    assert pipeline.stopping_hooks(None, None) is llama.NO_HOOKS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hooked_forward_on_cuda_is_the_module_forward_up_to_rare_bf16_ulps():
    """On CUDA the fused RMSNorm kernel may round its bf16 intermediate one ulp apart from the torch ops
    (RoPE and SwiGLU are bit for bit): the layer outputs agree to bf16 rounding, nearly all exactly."""
    cfg, layer = _layer(torch.bfloat16, seed=7)
    layer = layer.cuda()
    x = torch.randn(4, 256, 128, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16).cuda()
    cos, sin = LlamaRotaryEmbedding(cfg).cuda()(x, torch.arange(256, device="cuda")[None])
    with torch.no_grad():
        want = layer(x, attention_mask=None, position_embeddings=(cos, sin))
        want = (want[0] if isinstance(want, tuple) else want).float()
        got = tp.hooked_layer_forward(layer, x, cos, sin, cfg.rms_norm_eps, 4, 2, 32).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    differ = (got != want).float().mean().item()
    print(f"\nhooked vs module forward on CUDA (bf16): {differ:.2%} of outputs differ, "
          f"max |diff| {(got - want).abs().max().item():.3g}")
    assert differ <= 0.05

"""The NumPy LLaMA reference computes transformers' LlamaForCausalLM, logits to 1e-9 relative."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refquant.spec import llama, safetensors_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = Path(__file__).resolve().parent.parent / "golden" / "models" / "tiny-llama3"


def float64_islands_lifted(model):
    """transformers computes RMSNorm and the RoPE tables in float32 even in a float64 model.

    For a 1e-9 comparison of the math, this test (only) lifts those two islands to float64:
    RMSNorm without the float32 cast, RoPE cos/sin from float64 inverse frequencies. Everything else
    (projections, GQA, SDPA attention, SwiGLU, the LM head) is transformers' own code.
    """
    from transformers.models.llama import modeling_llama as ml

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    inv_freq = torch.from_numpy(llama.rope_inv_freq(llama.LlamaConfig.from_dict(model.config.to_dict())))

    def rope_forward(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for m in model.modules():
        if isinstance(m, ml.LlamaRMSNorm):
            m.forward = rms_forward.__get__(m)
        if isinstance(m, ml.LlamaRotaryEmbedding):
            m.forward = rope_forward.__get__(m)
    return model


def random_hf_model(tmp_path, **overrides):
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)  # test process only
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(torch.float64)
    with torch.no_grad():  # non-trivial norms so that gamma is exercised
        for m in model.modules():
            if isinstance(m, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                m.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def hf_logits(model, ids):
    model = model.to(torch.float64).eval()
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_random_llama_matches_transformers_to_1e9(tmp_path):
    hf = random_hf_model(tmp_path)
    ref = llama.load(tmp_path)
    ids = np.random.default_rng(1).integers(0, 97, size=(2, 40))
    got = llama.forward(ref, ids)
    want = hf_logits(float64_islands_lifted(hf), ids)
    assert got.shape == want.shape == (2, 40, 97)
    assert rel_err(got, want) < 1e-9


def test_agreement_without_lifting_the_float32_islands(tmp_path):
    """Stock transformers (float32 RMSNorm/RoPE inside a float64 model) agrees to float32 rounding."""
    hf = random_hf_model(tmp_path)
    ids = np.random.default_rng(2).integers(0, 97, size=(1, 33))
    err = rel_err(llama.forward(llama.load(tmp_path), ids), hf_logits(hf, ids))
    assert 1e-12 < err < 1e-5  # the islands are real (err > 0) and small


def test_llama31_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    hf = random_hf_model(tmp_path, rope_scaling=scaling)
    cfg = llama.LlamaConfig.from_dict(hf.config.to_dict())
    hf_inv = hf.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(llama.rope_inv_freq(cfg), hf_inv, rtol=1e-6)  # HF keeps inv_freq in float32


@pytest.mark.skipif(not (TINY / "model.safetensors").exists(), reason="tiny model weights not committed yet")
def test_tiny_model_matches_transformers_to_1e9():
    hf = transformers.LlamaForCausalLM.from_pretrained(TINY, torch_dtype=torch.float64)
    ref = llama.load(TINY)
    ids = np.random.default_rng(3).integers(0, ref.config.vocab_size, size=(1, 256))
    assert rel_err(llama.forward(ref, ids), hf_logits(float64_islands_lifted(hf), ids)) < 1e-9


def test_hooks_see_every_linear_input_and_can_transform_it(tmp_path):
    random_hf_model(tmp_path)
    ref = llama.load(tmp_path)
    ids = np.arange(12)[None, :]
    seen = []
    base = llama.forward(ref, ids)
    hooks = llama.LinearHooks(on_input=lambda name, x: seen.append((name, x.shape)) or x)
    np.testing.assert_array_equal(llama.forward(ref, ids, hooks), base)
    assert sorted(n for n, _ in seen) == sorted(llama.LINEARS * 2)  # every linear of both layers, once
    assert dict(seen)["mlp.down_proj"] == (1, 12, 224)
    zeroed = llama.forward(ref, ids, llama.LinearHooks(on_input=lambda n, x: 0 * x if n == "mlp.down_proj" else x))
    assert not np.allclose(zeroed, base)


def test_save_roundtrip_with_bias_loads_in_transformers(tmp_path):
    random_hf_model(tmp_path / "src")
    ref = llama.load(tmp_path / "src")
    ref.layers[0]["self_attn.q_proj.bias"] = np.linspace(-1, 1, ref.layers[0]["self_attn.q_proj"].shape[0])
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    llama.save(ref, tmp_path / "dst", cfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dst", torch_dtype=torch.float64)
    ids = np.arange(10)[None, :] % 97
    want = llama.forward(ref, ids)
    assert rel_err(hf_logits(float64_islands_lifted(hf), ids), want) < 1e-6  # saved as float32


def test_bad_ids_are_rejected(tmp_path):
    random_hf_model(tmp_path)
    ref = llama.load(tmp_path)
    with pytest.raises(ValueError, match="lie in"):
        llama.forward(ref, np.array([[0, 97]]))
    with pytest.raises(ValueError, match="batch, tokens"):
        llama.forward(ref, np.array([1, 2, 3]))


def test_safetensors_bf16_roundtrip(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 7))
    safetensors_io.write(tmp_path / "a.safetensors", {"x": x, "i": np.arange(3)}, bf16=("x",))
    back = safetensors_io.read(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(back["x"], safetensors_io.bf16_round(x).astype(np.float32))
    np.testing.assert_array_equal(back["i"], np.arange(3))
    assert np.max(np.abs(back["x"] - x) / np.abs(x)) <= 2 ** -8

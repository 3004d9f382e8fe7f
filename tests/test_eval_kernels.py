"""The evaluator's fused elementwise Triton kernels (refquant/backends/eval_kernels.py).

CPU: the kernels in Triton's interpreter against the torch reference ops (float32: within float32
rounding of the exp/rsqrt; bfloat16: bit for bit, the kernels round every intermediate as torch does),
the whole fast path with and without them (``slow``), and an ahead-of-time compile for sm_90 (FMA
contraction off, IEEE division). ``-m gpu``: the same comparison on CUDA, where Triton's approximate
``exp``/``rsqrt`` may move a bf16 result by one unit in the last place, rarely.
"""
from __future__ import annotations


import pytest
from triton_checks import interpreter_run, sm90_ptx

torch = pytest.importorskip("torch")

from refquant.backends import eval_kernels as K  # noqa: E402


_INTERP = r"""
import os, json, torch
os.environ["TRITON_INTERPRET"] = "1"
from refquant.backends import eval_kernels as K
assert K.usable(torch.device("cpu")), K._BROKEN
g = torch.Generator().manual_seed(0)
res = {}
for dt in (torch.float32, torch.bfloat16):
    x = (torch.randn(9, 96, generator=g) * 3).to(dt)         # hidden 96: a padded block of 128
    w = (torch.rand(96, generator=g) + 0.5).to(dt)
    a, b = K.rms_norm_triton(x, w, 1e-5), K.rms_norm_torch(x, w, 1e-5)
    res[f"rms {dt}"] = [(a.float() - b.float()).abs().max().item(), (a != b).float().mean().item()]
    B, T, H, D = 2, 5, 3, 32                                 # 3 heads: a padded block of 4
    xl = (torch.randn(B, T, H * D, generator=g) * 2).to(dt)
    ang = torch.rand(B, T, D // 2, generator=g) * 6
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    a, b = K.rope_triton(xl, cos, sin, H, D), K.rope_torch(xl, cos, sin, H, D)
    res[f"rope {dt}"] = [(a.float() - b.float()).abs().max().item(), (a != b).float().mean().item(),
                         list(a.shape) == list(b.shape)]
    gg = (torch.randn(3, 700, generator=g) * 4).to(dt)       # 2100 elements: 3 programs, the last partial
    uu = torch.randn(3, 700, generator=g).to(dt)
    a, b = K.silu_mul_triton(gg, uu), K.silu_mul_torch(gg, uu)
    res[f"silu {dt}"] = [(a.float() - b.float()).abs().max().item(), (a != b).float().mean().item()]
    ea, eb = K.sq_err_sum_triton(gg, uu), K.sq_err_sum_torch(gg, uu)  # 2100 elements: a partial block
    res[f"sq_err {dt}"] = [abs(ea.item() - eb.item()) / eb.item() * 1e-9, 0.0, ea.dtype == torch.float64]
print(json.dumps(res))
"""


def test_kernels_in_interpreter_equal_torch():
    out = interpreter_run(_INTERP)
    for name, (max_abs, frac, *rest) in out.items():
        if name.startswith("sq_err"):  # the relative difference (x 1e-9): float64 sums in another order
            assert max_abs <= 1e-9 * 1e-12, (name, max_abs)
        elif "bfloat16" in name:
            assert max_abs == 0.0 and frac == 0.0, (name, max_abs, frac)   # bit for bit
        else:
            assert max_abs <= 2e-6, (name, max_abs)                         # float32 exp/rsqrt rounding
        assert all(rest), name


_INTERP_FORWARD = r"""
import os, json
os.environ["TRITON_INTERPRET"] = "1"
os.environ["REFQUANT_PROGRESS"] = "0"
import numpy as np, torch
from refquant import evaluate as ev, torch_pipeline
from refquant.backends import eval_kernels as K
rng = np.random.default_rng(0)
m = torch_pipeline.load_model("golden/models/tiny-llama3", dtype=torch.bfloat16, device="cpu")
reqs = [ev.TokenRequest(rng.integers(0, 4096, 6).tolist(), 2), ev.TokenRequest(rng.integers(0, 4096, 4).tolist(), 1)]
items = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10])]
out = []
for enabled in (True, False):
    K.CONFIG["enabled"] = enabled
    out.append((ev.score_fast(m, reqs, [[0], [1]]), ev.prefix_logprobs_fast(m, items, [1, 2], pack_width=8).tolist()))
print(json.dumps({"same": out[0] == out[1], "broken": K._BROKEN, "values": out[0][0]}))
"""


@pytest.mark.slow
def test_fast_path_with_kernels_in_interpreter_equals_torch_ops_bf16():
    out = interpreter_run(_INTERP_FORWARD)
    assert out["same"] and not out["broken"], out


def test_dispatch_without_triton_device_uses_torch():
    # a CPU tensor without interpreter mode (or with the kernels disabled) runs the torch ops
    if K.interpreting():
        pytest.skip("interpreter mode")
    assert not K.usable(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 16, generator=g), torch.rand(16, generator=g)
    assert torch.equal(K.rms_norm(x, w, 1e-6), K.rms_norm_torch(x, w, 1e-6))
    a, b = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    assert torch.equal(K.silu_mul(a, b), torch.nn.functional.silu(a) * b)
    assert K.rope_supported(128) and K.rope_supported(32) and not K.rope_supported(96) and not K.rope_supported(7)
    assert torch.equal(K.sq_err_sum(a, b), ((a - b) * (a - b)).sum(dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        K.sq_err_sum(a, b[:2])


def test_kernels_compile_for_sm90_without_fma_and_with_ieee_division():
    """Ahead-of-time compile for an H200 (no GPU needed), bf16 activations as the 8B benchmark runs them."""
    pytest.importorskip("triton")  # before the kernel objects, which exist only with Triton
    cases = [
        (K._rms_norm_kernel, {"X": "*bf16", "W": "*bf16", "OUT": "*bf16", "stride_x": "i32", "stride_o": "i32",
                              "n_cols": "i32", "inv_n": "fp32", "eps": "fp32"}, {"BLOCK": 4096}, 8, True),
        (K._rope_kernel, {"X": "*bf16", "COS": "*bf16", "SIN": "*bf16", "OUT": "*bf16", "stride_x": "i32",
                          "stride_c": "i32", "n_heads": "i32"}, {"HALF": 64, "BLOCK_H": 32}, 8, False),
        (K._silu_mul_kernel, {"G": "*bf16", "U": "*bf16", "OUT": "*bf16", "n": "i32"}, {"BLOCK": 1024}, 4, True),
        (K._sq_err_kernel, {"A": "*bf16", "B": "*bf16", "OUT": "*fp64", "n": "i32"}, {"BLOCK": 4096}, 8, False),
    ]
    for fn, sig, constexprs, warps, divides in cases:
        ptx = sm90_ptx(fn, {n: sig.get(n, "constexpr") for n in fn.arg_names}, constexprs, warps)
        assert "fma.rn.f32" not in ptx, fn.__name__
        if divides:
            assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx, fn.__name__


@pytest.mark.gpu
def test_kernels_on_cuda_match_torch_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not K.usable(torch.device("cuda")):
        pytest.skip(f"Triton unusable on this machine: {K._BROKEN or 'not installed'}")
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    x = (torch.randn(4096, 4096, generator=g, device="cuda") * 3).to(dt)
    w = (torch.rand(4096, generator=g, device="cuda") + 0.5).to(dt)
    gg = (torch.randn(2048, 14336, generator=g, device="cuda") * 4).to(dt)
    uu = torch.randn(2048, 14336, generator=g, device="cuda").to(dt)
    xl = torch.randn(8, 512, 32 * 128, generator=g, device="cuda").to(dt)
    ang = torch.rand(8, 512, 64, generator=g, device="cuda") * 6
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    pairs = {"rms": (K.rms_norm_triton(x, w, 1e-5), K.rms_norm_torch(x, w, 1e-5)),
             "rope": (K.rope_triton(xl, cos, sin, 32, 128), K.rope_torch(xl, cos, sin, 32, 128)),
             "silu": (K.silu_mul_triton(gg, uu), K.silu_mul_torch(gg, uu))}
    e_fused, e_torch = K.sq_err_sum_triton(gg, uu), K.sq_err_sum_torch(gg, uu)
    print(f"sq_err_sum: relative difference {abs(e_fused.item() / e_torch.item() - 1):.2e}")
    assert abs(e_fused.item() / e_torch.item() - 1) <= 1e-12  # the same fp32 squares, summed in float64
    for name, (a, b) in pairs.items():
        frac = (a != b).float().mean().item()
        rel = ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-30)).max().item()
        print(f"{name}: {frac:.2e} of the bf16 values differ, max relative difference {rel:.2e}")
        # one bf16 ulp, rarely (Triton's approximate exp/rsqrt move a float32 intermediate across a rounding
        # boundary); RMSNorm rounds twice, as LlamaRMSNorm does (the normed row to bf16, then weight * normed to
        # bf16), so one ulp in the first rounding can become two in the output (H200: 5e-6 of the values, 1.02e-2)
        assert frac <= 1e-2 and rel <= (2 ** -6 if name == "rms" else 2 ** -7), name
    assert not K._BROKEN


@pytest.mark.gpu
def test_fused_perplexity_engine_with_the_kernels_equals_torch_ops_on_cuda(monkeypatch):
    """refquant.torch_pipeline's fused perplexity engine uses the same kernels: on the tiny model in bf16 its
    window losses with and without them agree to bf16 noise, and no kernel fell back."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not K.usable(torch.device("cuda")):
        pytest.skip(f"Triton unusable on this machine: {K._BROKEN or 'not installed'}")
    import numpy as np

    from refquant import runs
    from refquant import torch_pipeline as tp

    tokens = np.random.default_rng(0).integers(0, 1000, size=8 * 512)
    losses = {}
    for on in (True, False):
        monkeypatch.setitem(K.CONFIG, "enabled", on)
        hf = runs.load(runs.DEFAULT_MODEL, "torch", "cuda", "bfloat16").model
        losses[on] = np.array(tp.perplexity(hf, tokens, 512, device="cuda", batch_size=4, engine="fused").window_losses)
    rel = np.abs(losses[True] - losses[False]) / losses[False]
    print(f"fused perplexity engine, kernels vs torch ops (bf16, 8 windows): max relative loss difference {rel.max():.2e}")
    assert rel.max() <= 2e-3 and not K._BROKEN

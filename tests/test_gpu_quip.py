"""QuIP on the GPU (``pytest -m gpu``): the torch twin against the golden suite ``quip`` on CUDA, the
tiny model quantized on the GPU against the NumPy reference, and the LLaMA3-8B-shaped timing target.

Skipped without CUDA. Run on the GPU machine with
``PYTHONPATH=. python -m pytest -m gpu tests/test_gpu_quip.py -s``.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from refquant import backends, golden, pipeline, runs  # noqa: E402
from refquant.methods.quip import linear_seed  # noqa: E402

needs_data = pytest.mark.skipif(not os.environ.get("REFQUANT_DATA_DIR"), reason="REFQUANT_DATA_DIR not set")

#: LLaMA3-8B linears (out_features, in_features) of one decoder layer, in llama.LINEARS order.
LLAMA3_8B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
             "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
             "mlp.down_proj": (4096, 14336)}

#: End-to-end target: within 2x of GPTQ's 36.6 s on LLaMA3-8B (issue 11), i.e. 73.2 s for 32 layers. The
#: per-layer budget of the algorithm alone leaves 15 s to loading, calibration forwards and propagation
#: (an assumption; ``tools/bench.py --methods quip`` measures the real end-to-end time).
PER_LAYER_BUDGET_S = (73.2 - 15.0) / 32


def test_torch_quip_passes_every_golden_case_on_cuda():
    be = backends.get_backend("torch")
    reports = golden.parity_check(be, methods=["quip"], to_device=lambda a: torch.as_tensor(a).cuda(),
                                  to_numpy=be.to_numpy, include_slow=True)
    bad = [r for r in reports if not r["ok"]]
    assert reports and not bad, bad[:5]
    print(f"\nquip torch/cuda: {len(reports)} golden cases; min identical codes "
          f"{min(r['codes_identical_fraction'] for r in reports):.5f}, max proxy-loss rel diff "
          f"{max(r['proxy_loss_rel_diff'] for r in reports):.2e}")


def test_one_llama3_8b_layer_runs_and_reports_its_time():
    """quip_many on one LLaMA3-8B layer's seven linears (random bf16-like weights, a Gram H per input):
    the algorithm's time per layer, x32 for the model."""
    be = backends.get_backend("torch")
    g = torch.Generator(device="cuda").manual_seed(0)
    Ws = [0.02 * torch.randn(shape, device="cuda", generator=g) for shape in LLAMA3_8B.values()]
    Hs = {}
    for cols in (4096, 14336):
        X = torch.randn((8192, cols), device="cuda", generator=g)
        X[:, :8] *= 20
        Hs[cols] = X.T @ X / 8192
    H_of = [Hs[w.shape[1]] for w in Ws]
    seeds = [linear_seed(0, 0, n) for n in LLAMA3_8B]
    be.quip_many(Ws[:1], H_of[:1], seeds[:1], bits=2)  # warm-up (cuBLAS/cuSOLVER handles)
    torch.cuda.synchronize()
    t = time.perf_counter()
    qws = be.quip_many(Ws, H_of, seeds, bits=2)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    print(f"\nquip 2-bit, one LLaMA3-8B layer: {seconds:.2f} s  (x32 = {32 * seconds:.1f} s; budget per layer "
          f"{PER_LAYER_BUDGET_S:.2f} s); losses " + ", ".join(f"{q.info['loss']:.3g}" for q in qws))
    assert all(np.isfinite(q.info["loss"]) for q in qws)  # the time is a benchmark figure (tools/bench.py), not asserted


def test_quip_many_on_cuda_matches_the_reference_on_a_small_layer():
    """float64 on CUDA: the reference's codes (the same seeded rotations, LDLQ in another summation order)."""
    import refquant as rq

    be = backends.get_backend("torch")
    rng = np.random.default_rng(0)
    shapes = [(64, 256), (16, 256), (256, 256), (64, 512)]
    Ws = [rng.standard_normal(s) * 0.02 for s in shapes]
    Hs = []
    for _, c in shapes:
        X = rng.standard_normal((3 * c, c))
        Hs.append(X.T @ X)
    ref = [rq.quip(W, H, bits=3, seed=k) for k, (W, H) in enumerate(zip(Ws, Hs))]
    got = be.quip_many([torch.as_tensor(W).cuda() for W in Ws], [torch.as_tensor(H).cuda() for H in Hs],
                       list(range(len(Ws))), bits=3, dtype=torch.float64)
    for r, q in zip(ref, got):
        assert (q.codes.cpu().numpy() == r.codes).mean() >= 0.999


@needs_data
def test_tiny_model_quip_on_the_gpu_matches_the_cpu_reference():
    """Perplexity of the tiny model QuIP-quantized on the GPU (torch, fp32) vs the NumPy reference (fp64)."""
    from refquant import data

    ref = runs.load(runs.DEFAULT_MODEL, "numpy")
    ids, _ = data.get_calibration("wikitext2", ref.encode, nsamples=16, seqlen=2048, seed=0)
    cfg = pipeline.QuantConfig.of("quip", wbits=3, group_size=None)
    runs.quantize(ref, cfg, ids)
    gpu = runs.load(runs.DEFAULT_MODEL, "torch", "cuda", "float32")
    runs.quantize(gpu, cfg, ids)
    cache: dict = {}
    a = runs.evaluate_ppl(ref, ["wikitext2"], max_windows=4, token_cache=cache)["wikitext2"]["ppl"]
    b = runs.evaluate_ppl(gpu, ["wikitext2"], max_windows=4, token_cache=cache)["wikitext2"]["ppl"]
    print(f"\nquip w3: numpy {a:.6f}  cuda {b:.6f}  rel {abs(a - b) / a:.2e}")
    assert abs(a - b) / a < 1e-2

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
from refquant.backends import quip_kernels as QK  # noqa: E402
from refquant.backends.torch_quip import ldlq_batched  # noqa: E402
from refquant.methods.quip import linear_seed  # noqa: E402
from refquant.spec.quip import draw_rotations  # noqa: E402

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
    be.quip_many(Ws[:1], H_of[:1], seeds[:1], bits=2)  # warm-up (cuBLAS/cuSOLVER handles, Triton compile)
    be.quip_many(Ws[-1:], H_of[-1:], seeds[-1:], bits=2)
    torch.cuda.synchronize()
    t = time.perf_counter()
    qws = be.quip_many(Ws, H_of, seeds, bits=2)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    for (rows, cols), s in zip(LLAMA3_8B.values(), seeds):  # the host's share: the seeded rotation draws, serially
        draw_rotations(rows, cols, s, "blocked")
    draws = time.perf_counter() - t
    print(f"\nquip 2-bit, one LLaMA3-8B layer: {seconds:.2f} s  (x32 = {32 * seconds:.1f} s; budget per layer "
          f"{PER_LAYER_BUDGET_S:.2f} s; the 7 rotation draws alone take {draws:.2f} s serially on this host, "
          f"{os.cpu_count()} CPUs, drawn in threads); losses " + ", ".join(f"{q.info['loss']:.3g}" for q in qws))
    assert all(np.isfinite(q.info["loss"]) for q in qws)  # the time is a benchmark figure (tools/bench.py), not asserted


def _ldl(d, n, g, dtype):
    X = torch.randn((n, 2 * d, d), device="cuda", generator=g, dtype=torch.float64)
    X[:, :, :4] *= 20
    C = torch.linalg.cholesky(X.transpose(1, 2) @ X / (2 * d) + 0.01 * torch.eye(d, device="cuda", dtype=torch.float64))
    return (C * (1 / torch.diagonal(C, dim1=1, dim2=2))[:, None, :]
            - torch.eye(d, device="cuda", dtype=torch.float64)).to(dtype)


def test_ldlq_kernel_equals_torch_ops_on_cuda():
    """The Triton block kernel and the torch ops give the same codes bit for bit on the GPU (same arithmetic: no
    FMA contraction, no division), float32 and float64, ragged last blocks, padded batches, both grid ends."""
    assert QK.triton_usable(torch.device("cuda")), "Triton cannot launch on this CUDA device"
    g = torch.Generator(device="cuda").manual_seed(1)
    for n, rows, d, maxq, bs, valid in [(2, 1000, 300, 3, 128, None), (3, 37, 77, 1, 32, [37, 5, 0]),
                                        (4, 700, 256, 15, 256, [700, 64, 3, 600]), (1, 4096, 200, 7, 128, None)]:
        for dtype in (torch.float32, torch.float64):
            L = _ldl(d, n, g, dtype)
            w = (torch.rand((n, rows, d), device="cuda", generator=g, dtype=torch.float64) * (maxq + 1.5) - 0.75)
            w = w.clamp(0, maxq).to(dtype)
            if valid is not None:
                for j, r in enumerate(valid):
                    w[j, r:] = 0
            a = ldlq_batched(w, L, maxq, bs, rows=valid, use_triton=True)
            b = ldlq_batched(w, L, maxq, bs, rows=valid, use_triton=False)
            assert torch.equal(a, b), (n, rows, d, maxq, bs, valid, dtype, int((a != b).sum()))
            assert int(a.min()) == 0 and int(a.max()) == maxq
    be = backends.get_backend("torch")
    rng = np.random.default_rng(2)
    Ws = [torch.as_tensor(rng.standard_normal(s) * 0.02).cuda() for s in ((256, 512), (64, 512), (512, 384))]
    Hs = []
    for W in Ws:
        X = torch.as_tensor(rng.standard_normal((3 * W.shape[1], W.shape[1]))).cuda()
        Hs.append(X.T @ X)
    a = be.quip_many(Ws, Hs, [5, 6, 7], bits=2, use_triton=True)
    b = be.quip_many(Ws, Hs, [5, 6, 7], bits=2, use_triton=False)
    for x, y in zip(a, b):
        assert torch.equal(x.codes, y.codes) and x.info["loss"] == y.info["loss"]


def test_ldlq_at_llama3_8b_shapes_kernel_vs_torch_ops():
    """LDLQ alone on one LLaMA3-8B layer's two batches (q/k/v/o/gate/up: 4096 columns, rows 1024..14336 padded to
    14336; down: 14336 columns): the kernel's time vs the torch ops' (~5 launches per column), equal codes."""
    g = torch.Generator(device="cuda").manual_seed(3)
    groups = [([4096, 1024, 1024, 4096, 14336, 14336], 4096), ([4096], 14336)]
    data = []
    for rows, d in groups:
        L = _ldl(d, 1, g, torch.float32).expand(len(rows), d, d).contiguous()
        w = (torch.rand((len(rows), max(rows), d), device="cuda", generator=g) * 4.5 - 0.75).clamp(0, 3)
        for j, r in enumerate(rows):
            w[j, r:] = 0
        data.append((w, L, rows))
    times = {}
    for use in (True, False):
        w0, L0, rows0 = data[0]
        ldlq_batched(w0[:, :64, :256], L0[:, :256, :256], 3, rows=[64] * len(rows0), use_triton=use)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = [ldlq_batched(w, L, 3, rows=rows, use_triton=use) for w, L, rows in data]
        torch.cuda.synchronize()
        times[use] = (time.perf_counter() - t, outs)
    for a, b in zip(times[True][1], times[False][1]):
        assert torch.equal(a, b)
    print(f"\nLDLQ of one LLaMA3-8B layer: Triton block kernel {times[True][0]:.3f} s, "
          f"torch ops {times[False][0]:.3f} s")


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

"""GPU validation (``pytest -m gpu``): backends against the golden outputs, then whole models.

Skipped without CUDA. Run on the GPU machine with ``PYTHONPATH=. python -m pytest -m gpu``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from refquant import backends  # noqa: E402
from refquant import golden, pipeline, runs  # noqa: E402

needs_data = pytest.mark.skipif(not os.environ.get("REFQUANT_DATA_DIR"), reason="REFQUANT_DATA_DIR not set")


def _methods(manifest):
    return sorted({c.method for c in golden.cases(manifest=manifest)})


@pytest.mark.parametrize("include_slow", [True])
def test_torch_backend_passes_every_golden_case(include_slow):
    be = backends.get_backend("torch")
    reports = golden.parity_check(be, to_device=lambda a: torch.as_tensor(a).cuda(), to_numpy=be.to_numpy,
                                  include_slow=include_slow)
    bad = [r for r in reports if not r["ok"]]
    assert reports and not bad, bad[:5]
    gptq = [r for r in reports if r["method"] == "gptq"]
    print(f"\ntorch/cuda: {len(reports)} golden cases; GPTQ min identical codes "
          f"{min(r['codes_identical_fraction'] for r in gptq):.5f}, max proxy-loss rel diff "
          f"{max(r['proxy_loss_rel_diff'] for r in gptq):.2e}")


def test_cupy_backend_passes_every_golden_case():
    cupy = pytest.importorskip("cupy")
    be = backends.get_backend("cupy")
    manifest = golden.load_manifest()
    reports = golden.parity_check(be, methods=[m for m in ("rtn", "gptq", "hessian") if m in _methods(manifest)],
                                  to_device=cupy.asarray, to_numpy=lambda a: a.get() if hasattr(a, "get") else np.asarray(a),
                                  include_slow=False)
    bad = [r for r in reports if not r["ok"]]
    assert reports and not bad, bad[:5]


def test_preflight_passes_on_the_gpu():
    from refquant.cli import main

    assert main(["preflight", "--backend", "torch", "--device", "cuda", "--methods", "rtn,gptq"]) == 0


@needs_data
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tiny_model_quantized_on_the_gpu_matches_the_cpu_reference(method):
    """Perplexity of the tiny model quantized on the GPU (torch, fp32) vs the NumPy reference (fp64)."""
    from refquant import data

    ref = runs.load(runs.DEFAULT_MODEL, "numpy")
    ids, _ = data.get_calibration("wikitext2", ref.encode, nsamples=16, seqlen=2048, seed=0)
    cfg = pipeline.QuantConfig.of(method=method, wbits=4, group_size=128)
    runs.quantize(ref, cfg, ids)
    gpu = runs.load(runs.DEFAULT_MODEL, "torch", "cuda", "float32")
    runs.quantize(gpu, cfg, ids)
    cache: dict = {}
    a = runs.evaluate_ppl(ref, ["wikitext2"], max_windows=4, token_cache=cache)["wikitext2"]["ppl"]
    b = runs.evaluate_ppl(gpu, ["wikitext2"], max_windows=4, token_cache=cache)["wikitext2"]["ppl"]
    print(f"\n{method}: numpy {a:.6f}  cuda {b:.6f}  rel {abs(a - b) / a:.2e}")
    assert abs(a - b) / a < 1e-3


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "bench.py"
    import sys

    if "refquant_bench" not in sys.modules:  # dataclasses need the module registered while executing
        spec = importlib.util.spec_from_file_location("refquant_bench", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["refquant_bench"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["refquant_bench"]


def test_llama3_8b_shaped_model_quantize_and_perplexity_end_to_end():
    """Random bf16 LLaMA3-8B-shaped weights built on the device: GPTQ w4 g128 through all 32 layers,
    then perplexity of the quantized model: finite and within 10% of the FP model's on the same
    tokens (random weights: both are of the order of the vocabulary size, not a language model's)."""
    from refquant.torch_pipeline import HFRunner, perplexity

    bench = _bench_module()
    cfg = bench.hf_config(bench.SHAPES["llama3-8b"])
    model = bench.make_skeleton(cfg, "cuda")
    factory = bench.LayerFactory(cfg, "cuda")
    for i in range(cfg.num_hidden_layers):
        model.model.layers[i] = factory(i)
    bench.materialize_lm_head(model, "cuda")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=4 * 2048)
    fp = perplexity(model, tokens, 2048, device="cuda", batch_size=2).ppl
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 2048))
    runner = HFRunner(model, device="cuda", act_dtype=torch.bfloat16, batch_size=4)
    res = pipeline.quantize_model(runner, pipeline.QuantConfig.of(method="gptq", wbits=4, group_size=128), ids,
                                  keep_quantized=False)
    assert len(res.layers) == 32 and all(r.info["gptq_loss"] for r in res.layers)
    ppl = perplexity(model, tokens, 2048, device="cuda", batch_size=2).ppl
    assert np.isfinite(fp) and np.isfinite(ppl) and abs(np.log(ppl / fp)) < 0.1, (fp, ppl)
    assert 0.2 * cfg.vocab_size < fp < 5 * cfg.vocab_size, fp
    print(f"\n8B-shaped GPTQ w4: {res.timings['total']:.1f} s for 32 layers (8 x 2048 calibration), ppl {ppl:.0f} "
          f"(FP {fp:.0f})")

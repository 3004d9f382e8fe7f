"""GPU (``pytest -m gpu``): a quantized run exported and loaded back gives our WikiText-2 perplexity.

Skipped without CUDA and without ``REFQUANT_DATA_DIR``. On the GPU machine (torch, transformers; no
gptqmodel, vLLM, bitsandbytes or compressed-tensors) the exports are read back with refquant's
readers that follow each library's code (``export.load_model``: GPTQModel's unpacking,
bitsandbytes' ``dequantize_4bit``, ``load_refquant``); compressed-tensors runs where the library is
installed. ``export_ppl_roundtrip`` is device-generic (tests/test_export.py does not call it; the lead
can run it on the CPU with a few windows).
"""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not os.environ.get("REFQUANT_DATA_DIR"), reason="REFQUANT_DATA_DIR not set")]

from refquant import data, export, pipeline, runs  # noqa: E402

CASES = {  # name: (QuantConfig kwargs, export format, extra export kwargs, exact?)
    "gptq4_g128_actorder": (dict(method="gptq", wbits=4, group_size=128, act_order=True), "gptq",
                            dict(checkpoint_format="gptq_v2"), False),
    "gptq4_g128_refquant": (dict(method="gptq", wbits=4, group_size=128), "refquant", {}, True),
    "rtn8_perchannel_gptq": (dict(method="rtn", wbits=8, group_size=None, sym=True), "gptq", {}, False),
    "rtn4_g128_ct": (dict(method="rtn", wbits=4, group_size=128), "compressed-tensors", dict(scale_dtype="float32"), True),
    "nf4_dq": (dict(method="nf4", wbits=4), "nf4", {}, True),
    "billm_refquant": (dict(method="billm", wbits=1), "refquant", {}, True),
}


def export_ppl_roundtrip(case: str, tmp, device: str = "cuda", max_windows: int | None = None) -> tuple[float, float]:
    """(our perplexity, the export's perplexity) on WikiText-2 for ``CASES[case]`` (float32 model)."""
    kwargs, fmt, extra, _ = CASES[case]
    loaded = runs.load(runs.DEFAULT_MODEL, "torch", device, "float32")
    cfg = pipeline.QuantConfig.of(**kwargs)
    ids = None
    if pipeline.METHODS[cfg.method].needs_calibration:
        ids, _ = data.get_calibration("wikitext2", loaded.encode, nsamples=16, seqlen=2048, seed=0)
    run_dir, out = tmp / "run", tmp / "export"
    runs.quantize(loaded, cfg, ids, out_dir=run_dir, run_info={"ids": case})
    runs.save_model(loaded, run_dir, {"config": cfg.to_dict(), "act_quant": {}, "source_model": "tiny"})
    cache: dict = {}
    ours = runs.evaluate_ppl(loaded, ["wikitext2"], max_windows=max_windows, token_cache=cache)["wikitext2"]["ppl"]
    export.export(run_dir, fmt, out, **extra)
    model = export.load_model(out, torch.float32)
    back = runs.LoadedModel("torch", model, loaded.encode, str(out), device, "float32")
    theirs = runs.evaluate_ppl(back, ["wikitext2"], max_windows=max_windows, token_cache=cache)["wikitext2"]["ppl"]
    return ours, theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_model_perplexity_equals_ours(case, tmp_path):
    if CASES[case][1] == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    ours, theirs = export_ppl_roundtrip(case, tmp_path)
    rel = abs(ours - theirs) / ours
    print(f"\n{case}: ours {ours:.6f}  export {theirs:.6f}  rel {rel:.2e}")
    if CASES[case][3]:  # the same float32 weights: the same perplexity
        assert rel < 1e-6
    else:  # GPTQ stores float16 scales (and its reader computes in float16): the weights move by < 1 fp16 ulp
        assert rel < 2e-3

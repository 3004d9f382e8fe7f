"""QLoRA / IR-QLoRA on CUDA: the NF4 layer's parity with the CPU, tiny-model finetuning steps with the
originals' settings, resume on the GPU, and the LoRA training throughput row (``pytest -m gpu``)."""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from refquant import data, runs  # noqa: E402
from refquant import finetune as ft  # noqa: E402
from refquant.backends.nf4_linear import NF4Linear  # noqa: E402

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.mark.parametrize("icq", [False, True])
def test_nf4_linear_on_cuda_matches_the_cpu(icq):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4096, 1024, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 4096, generator=g) * 0.02)
    cpu = NF4Linear.from_linear(lin, icq=icq)
    gpu = NF4Linear.from_linear(lin.cuda(), icq=icq)
    assert torch.equal(cpu.codes, gpu.codes.cpu())  # the quantizer's codes are bit-identical on both devices
    assert torch.equal(cpu.dequantize(torch.float32), gpu.dequantize(torch.float32).cpu())
    x = torch.randn(8, 4096, generator=g)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-3, atol=1e-3)


def _stand_in_or_skip(n: int):
    if data.resolve_data_dir() is None:
        pytest.skip("REFQUANT_DATA_DIR not set (the stand-in data is built from its WikiText-2 train)")
    return data.load_alpaca(data.ALPACA_STANDIN, max_examples=n)[0]


@pytest.mark.parametrize("method", ["qlora", "irqlora"])
def test_tiny_model_finetuning_steps_and_resume_on_cuda(method, tmp_path):
    """The originals' settings (batch 16, 384/128 tokens, r 64, float32 compute, gradient checkpointing),
    4 steps on the tiny model; a run stopped after 2 steps and resumed ends where the uninterrupted one does."""
    from transformers import AutoTokenizer

    records = _stand_in_or_skip(96)
    tok = AutoTokenizer.from_pretrained(str(runs.DEFAULT_MODEL))
    cfg = ft.FinetuneConfig.for_method(method, steps=4, save_steps=2)
    ex = ft.tokenize_examples(records, tok, cfg)
    base = runs.load(runs.DEFAULT_MODEL, "torch", "cpu", "float32").model.cuda()
    ft.quantize_to_nf4(base, cfg)

    def fresh():
        m = copy.deepcopy(base)
        ft.add_adapters(m, cfg)
        return m.cuda()

    a = fresh()
    sa, info = ft.train(a, ex, cfg, tmp_path / "a", tok.eos_token_id, device="cuda")
    assert sa.step == 4 and all(h["loss"] == h["loss"] for h in sa.history)
    b = fresh()
    ft.train(b, ex, cfg, tmp_path / "b", tok.eos_token_id, device="cuda", stop_after=2)
    c = fresh()
    sc, _ = ft.train(c, ex, cfg, tmp_path / "b", tok.eos_token_id, device="cuda", resume=True)
    la, lc = [h["loss"] for h in sa.history], [h["loss"] for h in sc.history]
    assert la[:2] == lc[:2]  # the first two steps are the saved history
    assert lc[2:] == pytest.approx(la[2:], rel=1e-4)  # CUDA reductions need not be bitwise reproducible
    for (n, p), (_, q) in zip(ft.adapter_state(a).items(), ft.adapter_state(c).items()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-6, msg=n)
    print(json.dumps({"method": method, "losses": la, "optimizer": info["optimizer"],
                      "tokens_per_s": sum(h["tokens"] for h in sa.history[1:]) / sum(h["seconds"] for h in sa.history[1:])}))


def test_lora_training_throughput_row():
    sys.path.insert(0, str(TOOLS))
    import bench_finetune

    row = bench_finetune.bench(shape=os.environ.get("REFQUANT_BENCH_FT_SHAPE", "tiny"), steps=3)
    print(json.dumps(row))
    assert row["tokens_per_s"] > 0 and row["device"].startswith("cuda")

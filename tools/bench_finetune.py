"""LoRA training throughput (tokens/s) of QLoRA / IR-QLoRA on an NF4 base, random-weight LLaMA shapes.

    python tools/bench_finetune.py --shape tiny                      # the embedded tiny model's shape
    python tools/bench_finetune.py --shape llama3-8b --layers 32     # LLaMA3-8B (GPU)
    python tools/bench_finetune.py --shape llama3-8b --method irqlora --tau-n 100 --json out.json

A model of the shape is built with random weights (seeded), every decoder linear becomes an NF4
base (double quantization; ``--method irqlora``: ICQ, and IEC adapters), r 64 / alpha 16 adapters
are added, and ``--steps`` optimizer steps run through :func:`refquant.finetune.train` on random
token sequences of ``--source-len`` + ``--target-len`` tokens (the loss on the target part), batch
``--batch`` (micro-batch ``--micro-batch``), gradient checkpointing on, compute dtype
``--compute-dtype`` (the originals' Alpaca scripts: float32; Guanaco scripts: bfloat16). The first
step is a warm-up and is not timed. Prints one JSON row: tokens/s (all tokens of the batch, padding
excluded), target tokens/s, seconds per step, the NF4 quantization time, peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from refquant import finetune as ft  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}


def build_model(shape: str, layers: int | None, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # as a bf16 checkpoint is loaded
    return model


def bench(shape: str = "tiny", method: str = "qlora", layers: int | None = None, steps: int = 4, batch: int = 16,
          micro_batch: int = 16, source_len: int = 384, target_len: int = 128, compute_dtype: str = "float32",
          device: str | None = None, tau_n: int = 100) -> dict:
    """One throughput row (see the module docstring)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ft.FinetuneConfig.for_method(method, steps=steps + 1, batch_size=batch, micro_batch_size=micro_batch,
                                       source_max_len=source_len, target_max_len=target_len,
                                       compute_dtype=compute_dtype, tau_n=tau_n, save_steps=10 ** 9)
    model = build_model(shape, layers, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    ft.quantize_to_nf4(model, cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_quant = time.perf_counter() - t
    ft.add_adapters(model, cfg)
    model.to(device)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    n = max(batch * 2, 32)
    ex = ft.Examples(sources=[[int(v) for v in torch.randint(0, vocab, (source_len,), generator=g)] for _ in range(n)],
                     targets=[[int(v) for v in torch.randint(0, vocab, (target_len,), generator=g)] for _ in range(n)],
                     lengths=[source_len + target_len] * n)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    state, info = ft.train(model, ex, cfg, None, pad_id=0, device=device)
    timed = state.history[1:]  # the first step warms up
    secs = sum(h["seconds"] for h in timed)
    row = {"shape": shape, "layers": model.config.num_hidden_layers, "method": method, "device": device,
           "compute_dtype": compute_dtype, "batch": batch, "micro_batch": micro_batch,
           "seq_len": source_len + target_len, "steps_timed": len(timed),
           "tokens_per_s": sum(h["tokens"] for h in timed) / secs,
           "target_tokens_per_s": len(timed) * batch * target_len / secs, "s_per_step": secs / len(timed),
           "nf4_quantize_s": t_quant, "optimizer": info["optimizer"], "loss_last": timed[-1]["loss"]}
    if device.startswith("cuda"):
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        row["gpu"] = torch.cuda.get_device_name()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--method", default="qlora", choices=ft.METHODS)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (one more warms up)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--source-len", type=int, default=384)
    ap.add_argument("--target-len", type=int, default=128)
    ap.add_argument("--compute-dtype", default="float32", choices=sorted(ft.DTYPES))
    ap.add_argument("--tau-n", type=int, default=100, help="ICQ search points per side (irqlora)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="also write the row to this file")
    a = ap.parse_args(argv)
    row = bench(a.shape, a.method, a.layers, a.steps, a.batch, a.micro_batch, a.source_len, a.target_len,
                a.compute_dtype, a.device, a.tau_n)
    print(json.dumps(row, default=str))
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark of the torch backend's GPTQ (for tools/bench.py's ``micro_gptq``; not a test).

    from tools.bench_gptq import benchmark_gptq
    seconds = benchmark_gptq(rows=14336, cols=4096, group_size=128, device="cuda")  # median of 3 after a warm-up

It lives in ``tools/`` (not in the library) and times the library's own internals: the whole
``TorchBackend.gptq`` call, and with ``detail=True`` the H preparation (``torch_quant._prepare``:
damping, U) and the block loop (``torch_quant._gptq_rows``) separately.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python tools/bench_gptq.py` finds refquant
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from refquant.backends.torch_backend import TorchBackend  # noqa: E402
from refquant.backends.torch_quant import _gptq_rows, _prepare, ieee_fp32, work_dtype  # noqa: E402
from refquant.spec.quantizer import QuantSpec  # noqa: E402

__all__ = ["benchmark_gptq"]


def benchmark_gptq(rows: int, cols: int, group_size: int | None = 128, device="cuda", *, bits: int = 4,
                   act_order: bool = False, blocksize: int = 128, repeats: int = 3, use_triton: bool | None = None,
                   seed: int = 0, detail: bool = False):
    """Median wall time in seconds of one ``TorchBackend().gptq`` call on a (rows, cols) layer.

    W ~ N(0, 0.02^2); H = B B^T / r + diag, a rank-r factor model with lognormal channel scales
    (cheap to build at 28672 columns; dense, correlated, positive definite). One warm-up call
    (Triton compilation) is not timed. Uses a private generator: the global RNG is untouched.
    ``detail=True`` returns ``{"total", "factor", "blocks"}`` (medians): the whole call, the H
    preparation (damping, U) and the block loop (kernel + lazy updates) timed separately.
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = min(256, cols)
    with torch.no_grad():
        W = (torch.randn(rows, cols, generator=gen) * 0.02).to(device)
        B = torch.randn(cols, r, generator=gen).to(device)
        scales = torch.exp(torch.randn(cols, generator=gen) * 0.5).to(device)
        with ieee_fp32():
            H = (B @ B.t()) / r
        H.diagonal().add_(0.1)
        H = scales[:, None] * H * scales[None, :]
    spec = QuantSpec(bits=bits, group_size=group_size)
    be = TorchBackend()

    def once():
        be.gptq(W, H, spec, blocksize=blocksize, act_order=act_order, use_triton=use_triton)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    times, factor, blocks = [], [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
        if detail:
            with torch.no_grad(), ieee_fp32():
                t0 = time.perf_counter()
                prep = _prepare(H, cols, device, 0.01, act_order, None, 0.01, f"{rows}x{cols}")
                sync()
                t1 = time.perf_counter()
                _gptq_rows(W.to(work_dtype(cols), copy=True), prep, spec, blocksize, False, use_triton)
                sync()
                factor.append(t1 - t0)
                blocks.append(time.perf_counter() - t1)
    if detail:
        return {"total": statistics.median(times), "factor": statistics.median(factor),
                "blocks": statistics.median(blocks)}
    return statistics.median(times)

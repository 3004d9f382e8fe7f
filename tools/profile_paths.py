#!/usr/bin/env python3
"""Where the time of a full-model path goes: torch.profiler breakdowns for docs/performance.md.

    PYTHONPATH=. python3 tools/profile_paths.py --shape llama3-8b --paths gemm,gptq,awq,ppl --out prof.json
    PYTHONPATH=. python3 tools/profile_paths.py --shape tiny-test --device cpu --paths gptq,ppl   # smoke run

The models are ``tools/bench.py``'s (LLaMA3-shaped, random bf16 weights generated on the device), so
the numbers are comparable with the benchmark JSONs. Paths:

* ``gemm``: the achieved TFLOP/s of plain bf16 GEMMs of the shapes the pipeline runs (calibration
  forward, Hessians, perplexity batches), timed with CUDA events after a warm-up: the realistic
  floor of every GEMM-bound phase (FLOPs / this rate), rather than the data-sheet peak;
* ``<method>`` (``gptq``, ``awq``, any registered method): ``quantize_model`` on the first
  ``--layers`` layers; layer ``--profile-layer`` (default 1: layer 0 also compiles the Triton
  kernels) runs under the profiler. Per pipeline stage (``StageTimer`` stages, synchronized at
  their edges): wall seconds, GPU-busy seconds (kernel time inside the stage) and the top kernels;
* ``ppl``: the perplexity evaluator on the resident model over ``--ppl-windows`` windows: wall,
  GPU-busy, kernel time by category (GEMM, attention, Triton, other elementwise/reductions, copies)
  and the top kernels.

The profiler adds overhead on the host side: wall times here are upper bounds; the benchmark's
numbers (``tools/bench.py``, no profiler) are the measurements. Kernel times are the GPU's own.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from refquant import pipeline  # noqa: E402
from refquant.provenance import provenance, write_json_atomic  # noqa: E402
from tools import bench  # noqa: E402

TOP = 12


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AnnotatedTimer(pipeline.StageTimer):
    """The pipeline's StageTimer with every stage also a ``torch.profiler`` range named ``stage/<name>``."""

    def stage(self, name: str):
        timed = super().stage(name)

        @contextlib.contextmanager
        def both():
            with timed, torch.profiler.record_function(f"stage/{name}"):
                yield

        return both()


def _device_events(prof, skip_names=()):
    """(name, start_us, end_us) of every device-side event (kernels, copies), each once.

    Profiler ranges also appear on the device timeline (``gpu_user_annotation``); ``skip_names``
    (and names starting with ``stage/``) drop them."""
    seen = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        if e.name.startswith("stage/") or e.name in skip_names:
            continue
        seen[(e.name, e.time_range.start)] = (e.name, e.time_range.start, e.time_range.end)
    return sorted(seen.values(), key=lambda k: k[1])


def _host_events(prof):
    """(name, start_us, end_us, self_cpu_us) of every host-side event (ops, runtime calls, ranges)."""
    return [(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total) for e in prof.events()
            if getattr(e, "device_type", None) == DeviceType.CPU]


def _innermost(ranges, t: float):
    """The index of the innermost (latest-starting) range ``(name, start, end)`` that contains time ``t``."""
    best = None
    for i, (_, a, b) in enumerate(ranges):
        if a <= t <= b and (best is None or a >= ranges[best][1]):
            best = i
    return best


def category(kernel: str) -> str:
    """A coarse class of a CUDA kernel by its name (cuBLAS/CUTLASS GEMMs, attention, Triton, solver, ...)."""
    k = kernel.lower()
    if any(t in k for t in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(t in k for t in ("potrf", "trsm", "cusolver", "syrk", "getrf", "trsv")):
        return "solver"
    if any(t in k for t in ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "gemv", "splitk")):
        return "gemm"
    if k.startswith("triton") or "_kernel" in k and "at::" not in k and "void" not in k:
        return "triton"
    if "memcpy" in k or "memset" in k or "copy" in k:
        return "copy"
    if "reduce" in k:
        return "reduction"
    return "elementwise/other"


def _summary(kernels, wall_s: float | None = None, host=None) -> dict:
    """Kernel time by category and the top kernels of ``kernels`` [(name, us)]; with ``host``
    [(name, self_us)] also the top host-side operations (where a GPU-idle stage spends its time)."""
    by_name, by_cat = defaultdict(lambda: [0.0, 0]), defaultdict(float)
    for name, us in kernels:
        by_name[name][0] += us
        by_name[name][1] += 1
        by_cat[category(name)] += us
    busy = sum(by_cat.values()) / 1e6
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP]
    out = {"gpu_busy_s": round(busy, 4),
           "by_category_s": {c: round(us / 1e6, 4) for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1])},
           "top_kernels": [{"name": n[:160], "s": round(us / 1e6, 4), "calls": c} for n, (us, c) in top]}
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 4)
        out["gpu_busy_fraction"] = round(busy / wall_s, 3) if wall_s > 0 else None
    if host is not None:
        h = defaultdict(lambda: [0.0, 0])
        for name, us in host:
            h[name][0] += us
            h[name][1] += 1
        out["top_host_ops"] = [{"name": n[:100], "self_s": round(us / 1e6, 4), "calls": c}
                               for n, (us, c) in sorted(h.items(), key=lambda kv: -kv[1][0])[:TOP]]
        out["host_syncs"] = sum(c for n, (_, c) in h.items()
                                if n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))
    return out


def _profiler(device):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts)


# ---------------------------------------------------------------------------------------------- paths


def gemm_rates(device, cfg, tokens: int = 16384, repeats: int = 10) -> dict:
    """Achieved TFLOP/s of the pipeline's GEMM shapes (bf16 in; bf16 out, or fp32 out for Hessians)."""
    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    H, I = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    shapes = {  # name: (M, K, N, out fp32?)
        "qkv (tokens x H -> H + 2 kv)": (tokens, H, H + 2 * kv, False),
        "o_proj": (tokens, H, H, False),
        "gate or up": (tokens, H, I, False),
        "down_proj": (tokens, I, H, False),
        "Hessian X^T X, H wide (fp32 out)": (H, tokens, H, True),
        "Hessian X^T X, I wide (fp32 out)": (I, tokens, I, True),
        "Hessian block 2048 (fp32 out)": (2048, tokens, 2048, True),
        "Hessian block 3584 (fp32 out)": (3584, tokens, 3584, True),
        "ppl gate or up (8192 tokens)": (8192, H, I, False),
        "lm_head chunk (512 x vocab)": (512, H, cfg.vocab_size, False),
    }
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, (M, K, N, fp32) in shapes.items():
        A = torch.randn(M, K, generator=gen, device=device, dtype=torch.bfloat16)
        B = torch.randn(K, N, generator=gen, device=device, dtype=torch.bfloat16)

        def op():
            return torch.mm(A, B, out_dtype=torch.float32) if fp32 else torch.mm(A, B)

        try:
            op()
        except TypeError:  # torch without out_dtype
            continue
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            op()
        end.record()
        _sync(device)
        s = start.elapsed_time(end) / 1e3 / repeats
        out[name] = {"M": M, "K": K, "N": N, "s": round(s, 6), "tflops": round(2 * M * K * N / s / 1e12, 1)}
        del A, B
    return out


def profile_method(args, device, method: str) -> dict:
    """``quantize_model`` on the first ``args.layers`` layers; layer ``args.profile_layer`` under the profiler."""
    from refquant.torch_pipeline import HFRunner

    shape = bench.SHAPES[args.shape]
    cfg = bench.hf_config(shape, args.layers)
    model = bench.make_skeleton(cfg, device, args.seed)
    factory = bench.LayerFactory(cfg, device, args.seed)
    calib = np.random.default_rng([args.seed, 0]).integers(0, cfg.vocab_size, size=(args.nsamples, args.seqlen),
                                                           dtype=np.int64)
    qcfg = pipeline.QuantConfig.of(method, **bench.preset_of(method))
    runner = HFRunner(model, device=device, act_dtype=torch.bfloat16, batch_size=args.batch_size,
                      layer_source=factory, keep_layers=False)
    timer = AnnotatedTimer(runner.sync, runner.timing_event)
    prof = _profiler(device)
    state = {"on": False, "t": 0.0, "marks": {}}
    target = args.profile_layer

    def on_layer(record, layer):
        record.quantized.clear()  # codes are not the subject here
        if record.index == target and state["on"]:
            _sync(device)
            prof.stop()
            state["on"] = False
            state["wall"] = time.perf_counter() - state["t"]
            state["stages"] = {k: v - state["marks"].get(k, 0.0) for k, v in timer.seconds.items()}
        elif record.index == target - 1:
            _sync(device)
            state["marks"] = dict(timer.seconds)
            prof.start()
            state["on"] = True
            state["t"] = time.perf_counter()

    if target == 0:  # profile from the start (includes kernel compilation)
        prof.start()
        state["on"], state["t"] = True, time.perf_counter()
    pipeline.quantize_model(runner, qcfg, calib, on_layer=on_layer, timer=timer, keep_quantized=False)
    if state["on"]:
        prof.stop()
        state["wall"] = time.perf_counter() - state["t"]
        state["stages"] = dict(timer.seconds)
    ranges = [(e[0][len("stage/"):], e[1], e[2]) for e in _host_events(prof) if e[0].startswith("stage/")]
    kernels, host = defaultdict(list), defaultdict(list)
    for name, a, b in _device_events(prof):
        i = _innermost(ranges, a)
        if i is not None:
            kernels[ranges[i][0]].append((name, b - a))
    for name, a, b, self_us in _host_events(prof):
        if name.startswith("stage/"):
            continue
        i = _innermost(ranges, a)
        if i is not None:
            host[ranges[i][0]].append((name, self_us))
    stage_wall = state.get("stages", {})
    out = {"method": method, "config": qcfg.to_dict(), "layers_run": args.layers,
           "layer_wall_s_profiled": round(state.get("wall", float("nan")), 4),
           "stage_wall_s_profiled": {k: round(v, 4) for k, v in stage_wall.items() if v > 0},
           "stages": {name: _summary(kernels[name], stage_wall.get(name), host[name])
                      for name in sorted({r[0] for r in ranges})},
           "note": "kernels and host ops are attributed to the innermost stage range they start in; stage wall "
                   "times are the StageTimer's (statistics time is inside calibration_forward's range)"}
    out["layer"] = {"index": target, **_summary([k for ks in kernels.values() for k in ks], state.get("wall"))}
    del runner, model, factory
    return out


def profile_ppl(args, device) -> dict:
    from refquant.torch_pipeline import perplexity

    shape = bench.SHAPES[args.shape]
    cfg = bench.hf_config(shape, args.layers if args.ppl_layers_partial else None)
    model = bench.make_skeleton(cfg, device, args.seed)
    factory = bench.LayerFactory(cfg, device, args.seed)
    for i in range(cfg.num_hidden_layers):
        model.model.layers[i] = factory(i)
    bench.materialize_lm_head(model, device, args.seed)
    n = args.ppl_windows * args.seqlen
    tokens = np.random.default_rng([args.seed, 1]).integers(0, cfg.vocab_size, size=n, dtype=np.int64)
    perplexity(model, tokens[: 2 * args.ppl_batch_size * args.seqlen], args.seqlen, device,
               batch_size=args.ppl_batch_size)  # warm-up
    _sync(device)
    prof = _profiler(device)
    with prof:
        t = time.perf_counter()
        with torch.profiler.record_function("ppl"):
            perplexity(model, tokens, args.seqlen, device, batch_size=args.ppl_batch_size)
        _sync(device)
        wall = time.perf_counter() - t
    t = time.perf_counter()
    perplexity(model, tokens, args.seqlen, device, batch_size=args.ppl_batch_size)
    _sync(device)
    plain = time.perf_counter() - t
    kernels = [(name, b - a) for name, a, b in _device_events(prof, skip_names=("ppl",))]
    host = [(name, self_us) for name, _, _, self_us in _host_events(prof) if name != "ppl"]
    out = {"windows": args.ppl_windows, "seqlen": args.seqlen, "batch_size": args.ppl_batch_size,
           "layers": cfg.num_hidden_layers, "wall_s_unprofiled": round(plain, 4), **_summary(kernels, wall, host)}
    del model, factory
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(bench.SHAPES), default="llama3-8b")
    ap.add_argument("--paths", default="gemm,gptq,ppl", help="comma-separated: gemm, ppl, or method names")
    ap.add_argument("--layers", type=int, default=2, help="layers of the quantization runs (default 2)")
    ap.add_argument("--profile-layer", type=int, default=1, help="the layer profiled (0 includes compilation)")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ppl-windows", type=int, default=None)
    ap.add_argument("--ppl-batch-size", type=int, default=4)
    ap.add_argument("--ppl-layers-partial", action="store_true", help="perplexity on --layers layers only")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="profile.json")
    a = ap.parse_args(argv)
    shape = bench.SHAPES[a.shape]
    a.nsamples = a.nsamples or shape.nsamples
    a.seqlen = a.seqlen or shape.seqlen
    a.ppl_windows = a.ppl_windows or shape.ppl_windows
    if a.profile_layer >= a.layers:
        ap.error(f"--profile-layer {a.profile_layer} needs --layers > {a.profile_layer}")
    return a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    doc = {"tool": "tools/profile_paths.py", "argv": argv, "provenance": provenance(str(device)),
           "environment": bench.environment(device), "shape": a.shape, "results": {}}
    out = Path(a.out)
    for path in [p.strip() for p in a.paths.split(",") if p.strip()]:
        t = time.perf_counter()
        print(f"[profile] {path} ...", flush=True)
        if path == "gemm":
            res = gemm_rates(device, bench.hf_config(bench.SHAPES[a.shape]))
        elif path == "ppl":
            res = profile_ppl(a, device)
        elif path in pipeline.METHODS:
            res = profile_method(a, device, path)
        else:
            raise SystemExit(f"unknown path {path!r}: gemm, ppl or one of {', '.join(sorted(pipeline.METHODS))}")
        res["tool_s"] = round(time.perf_counter() - t, 2)
        doc["results"][path] = res
        write_json_atomic(out, doc)
        print(json.dumps(res, indent=1)[:4000], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PB-LLM's block kernel (refquant/backends/pbllm_kernels.py) and the torch twin's column loop around it.

* CPU (default suite): the torch fallback reproduces the reference's per-column arithmetic (the twin
  equals :func:`refquant.pbllm` to float64 rounding, see tests/test_gpu_binarization.py); the batched
  masks equal a group-at-a-time computation bit for bit; the twin never modifies the caller's H;
  argument errors.
* With Triton installed (``PYTHONPATH=/tmp/tritonlib`` here): the kernel in Triton's interpreter equals
  the torch fallback bit for bit (fp32 and fp64 tiles, ragged blocks, dead columns, sign(0) cases),
  end to end as well; the kernel compiles for sm_90 with IEEE arithmetic and no shared memory.
* GPU (``pytest -m gpu``): kernel == fallback on CUDA on LLaMA-sized blocks, end to end.
"""
from __future__ import annotations


import numpy as np
import pytest
from strategies import make_hessian, make_weight
from triton_checks import interpreter_run, sm90_ptx

torch = pytest.importorskip("torch")

import refquant as rq  # noqa: E402
from refquant import backends  # noqa: E402
from refquant.backends import gptq_kernels as GK  # noqa: E402
from refquant.backends import pbllm_kernels as PK  # noqa: E402
from refquant.backends import torch_binarization as TBIN  # noqa: E402

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _block_problem(rows, n, G, dtype, seed, device="cpu", dead=(3,)):
    """A block with the kernel's inputs: U from an H with dead inputs (so the dead columns see no
    updates and stay exactly 0), row 0 with mean 0 (sign(0 - 0) = 0 there), a small scale (clipping)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 8, n, generator=g, dtype=torch.float64)
    H = X.T @ X + 0.1 * torch.eye(n, dtype=torch.float64)
    for d in dead:
        if d < n:
            H[d, :] = 0
            H[:, d] = 0
            H[d, d] = 1
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).triu()
    Wb = (torch.randn(rows, n + 5, generator=g, dtype=torch.float64) * 0.1)[:, :n]  # a strided view
    for d in dead:
        if d < n:
            Wb[:, d] = 0
    s = torch.rand(rows, generator=g, dtype=torch.float64) * 0.002 + 0.0004
    z = torch.randint(0, 256, (rows,), generator=g).double()
    mean = torch.randn(rows, G, generator=g, dtype=torch.float64) * 0.01
    mean[0] = 0
    alpha = torch.rand(rows, G, generator=g, dtype=torch.float64) * 0.1
    gidx = torch.randint(0, G, (n,), generator=g).sort().values
    low = torch.rand(rows, n, generator=g) < 0.9
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(Wb), cast(U), cast(s), cast(z), cast(mean), cast(alpha), gidx.to(device), low.to(device))


def _run_block(fn, args, maxq=255):
    Wb = args[0]
    rows, n = Wb.shape
    codes = torch.full((rows, n + 7), 9, dtype=torch.uint8, device=Wb.device)[:, :n]  # a strided output view
    signs = torch.full((rows, n), 9, dtype=torch.int8, device=Wb.device)
    err = torch.full((rows, n), float("nan"), dtype=Wb.dtype, device=Wb.device)
    fn(*args, maxq, codes, signs, err)
    return codes, signs, err


# ------------------------------------------------------------------------------------------ CPU


def test_torch_fallback_is_the_reference_column_step():
    """One column by hand: the salient weight on the grid, the binarized one alpha sign0(w - mean) + mean,
    sign(0) = 0 on the dead column of the zero-mean row, err = (w - q) / U_jj."""
    args = _block_problem(4, 6, 2, torch.float64, seed=1)
    Wb, U, s, z, mean, alpha, gidx, low = args
    codes, signs, err = _run_block(PK.block_update_torch, args)
    w = Wb[:, 0]
    g = int(gidx[0])
    code = torch.clamp(torch.round(w / s) + z, 0, 255)
    q = torch.where(low[:, 0], torch.sign(w - mean[:, g]) * alpha[:, g] + mean[:, g], s * (code - z))
    assert torch.equal(err[:, 0], (w - q) / U[0, 0])
    assert torch.equal(codes[:, 0], torch.where(low[:, 0], 0, code).to(torch.uint8))
    assert torch.equal(signs[:, 0], torch.where(low[:, 0], torch.sign(w - mean[:, g]), 0).to(torch.int8))
    assert not torch.isnan(err).any() and set(signs.unique().tolist()) <= {-1, 0, 1}
    assert int(codes[~low].max()) > 0 and bool((codes[low] == 0).all()) and bool((signs[~low] == 0).all())
    if low[0, 3]:  # dead column, mean 0: the weight stays exactly 0, its sign is 0
        assert signs[0, 3] == 0


@pytest.mark.parametrize("kw", [{"group_size": 16}, {"group_size": 7, "binarizer_stats": "binarized"},
                                {"salient_metric": "magnitude"}, {"group_size": 128}])
def test_batched_masks_equal_one_group_at_a_time(kw, monkeypatch):
    """The chunked, batched thresholds and statistics equal the group-at-a-time computation bit for bit
    (chunks of 2 groups force several chunks and a ragged last group)."""
    W = torch.as_tensor(make_weight("outlier_channel", 9, 60, seed=4))
    W[:, 5] = 0
    Ud = torch.rand(60, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1
    gs = kw.get("group_size", 60)
    metric, stats = kw.get("salient_metric", "hessian"), kw.get("binarizer_stats", "code")
    monkeypatch.setattr(TBIN, "MASK_CHUNK_ELEMS", 2 * 9 * gs)
    got = TBIN._pbllm_masks(W, Ud, 0.9, metric, gs, stats)
    masks, means, alphas = [], [], []
    for g0 in range(0, 60, gs):
        Wg = W[:, g0:g0 + gs]
        score = Wg.abs() if metric == "magnitude" else Wg ** 2 / Ud[g0:g0 + gs][None, :] ** 2
        thresh = torch.sort(score.flatten()).values[int(score.numel() * 0.9)]
        m = score <= thresh
        if stats == "code":
            x = torch.where(m, Wg, torch.zeros_like(Wg))
            mu = x.mean(dim=1)
            al = (x - mu[:, None]).abs().mean(dim=1)
        else:
            _, _, a, mm = TBIN.residual_batched(Wg, m, 1)
            mu, al = mm[0], a[0]
        masks.append(m)
        means.append(mu)
        alphas.append(al)
    assert torch.equal(got[0], torch.cat(masks, dim=1))
    assert torch.equal(got[1], torch.stack(means, dim=1)) and torch.equal(got[2], torch.stack(alphas, dim=1))


def test_twin_leaves_the_callers_hessian_alone():
    """A float64 H with dead inputs: the twin must not write the dead diagonal (a second call with the
    same H must still see the dead inputs and give the same result)."""
    be = backends.get_backend("torch")
    W = torch.as_tensor(make_weight("normal", 6, 40, seed=2))
    H = torch.as_tensor(make_hessian("dead_columns", 40, seed=2))
    H0 = H.clone()
    a = be.pbllm(W, H, group_size=16)
    assert torch.equal(H, H0)
    b = be.pbllm(W, H, group_size=16)
    assert torch.equal(a.dequantize(), b.dequantize()) and a.info["loss"] == b.info["loss"]


def test_block_update_refuses_mismatched_buffers():
    args = _block_problem(4, 8, 2, torch.float64, seed=0)
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    signs = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="err_out"):
        PK.block_update(*args, 255, codes, signs, torch.zeros(4, 7, dtype=torch.float64), use_triton=False)
    with pytest.raises(ValueError, match="outputs must be"):
        PK.block_update(*args, 255, codes, signs, torch.zeros(4, 8, dtype=torch.float32), use_triton=False)
    Wb, U, s, z, mean, alpha, gidx, low = args
    with pytest.raises(ValueError, match="same strides"):
        PK.block_update(Wb, U, s, z, mean, alpha.T.contiguous().T, gidx, low, 255, codes, signs,
                        torch.zeros(4, 8, dtype=torch.float64), use_triton=False)


def test_dispatch_without_triton_device_uses_torch():
    assert not PK.triton_usable(torch.device("cpu")) or PK.interpreting()
    be = backends.get_backend("torch")
    W = torch.as_tensor(make_weight("normal", 5, 48, seed=6))
    H = torch.as_tensor(make_hessian("well", 48, seed=6))
    a = be.pbllm(W, H, group_size=16, blocksize=32, use_triton=False)
    b = be.pbllm(W, H, group_size=16, blocksize=32)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.signs, b.signs) and a.info["loss"] == b.info["loss"]


# ------------------------------------------------------------------------------------------ Triton (interpreter)

_INTERP_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import json, sys, torch
sys.path.insert(0, "tests")
from test_pbllm_kernels import _block_problem, _run_block
from strategies import make_hessian, make_weight
from refquant.backends import gptq_kernels as GK, pbllm_kernels as PK
from refquant.backends.torch_backend import TorchBackend
assert PK.interpreting() and PK.triton_usable(torch.device("cpu"))
GK.CONFIG["block_r"] = 8
res = {}
# 10 rows: two programs, the last partial; 77 columns: a ragged block padded to 128; 20: padded to 32
for rows, n, G, dtype in [(10, 77, 3, torch.float32), (10, 77, 3, torch.float64), (13, 128, 1, torch.float64),
                          (5, 20, 2, torch.float32)]:
    args = _block_problem(rows, n, G, dtype, seed=rows + n)
    a = _run_block(PK.block_update_triton, args)
    b = _run_block(PK.block_update_torch, args)
    res[f"{rows}x{n}_G{G}_{str(dtype)[6:]}"] = all(torch.equal(x, y) for x, y in zip(a, b))
# end to end: q/k/v-like matrices sharing H (dead inputs), groups straddling blocks, a short last block
be = TorchBackend()
H = torch.as_tensor(make_hessian("dead_columns", 72, seed=3))
Ws = [torch.as_tensor(make_weight(k, r, 72, seed=r)) for k, r in (("outlier_channel", 6), ("zero_rows", 3))]
for name, kw in [("g24-b32", dict(group_size=24, blocksize=32)),
                 ("paperstats-b64", dict(binarizer_stats="binarized", low_frac=0.5, high_bits=4, blocksize=64))]:
    A = be.pbllm_shared(Ws, H, use_triton=True, **kw)
    B = be.pbllm_shared(Ws, H, use_triton=False, **kw)
    res[name] = all(torch.equal(x.codes, y.codes) and torch.equal(x.signs, y.signs)
                    and torch.equal(x.salient_mask, y.salient_mask) and x.info["loss"] == y.info["loss"]
                    for x, y in zip(A, B))
print(json.dumps(res))
"""


def test_triton_kernel_in_interpreter_equals_torch_fallback():
    out = interpreter_run(_INTERP_SCRIPT, timeout=300)
    assert len(out) == 6 and all(out.values()), out


def test_triton_kernel_compiles_for_sm90_with_ieee_arithmetic():
    """Ahead-of-time compile (no GPU needed): no FMA contraction, IEEE division, and at the default
    launch config no barriers / shared memory (one warp per program), fp32 and fp64 tiles."""
    pytest.importorskip("triton")  # before the kernel objects, which exist only with Triton
    fn = PK._pbllm_block_kernel
    ones = {"stride_wc", "stride_uc", "stride_s", "stride_mg", "stride_bc", "stride_qc", "stride_gc", "stride_ec"}
    special = {"G_ptr": "*i64", "B_ptr": "*u8", "Q_ptr": "*u8", "SG_ptr": "*i8"}

    def kind(n, ft):
        if n.endswith("_ptr"):
            return special.get(n, f"*{ft}")
        return "fp32" if n == "maxq" else "i32"

    for fp64, rows, block_c in [(True, 6144, 128), (True, 28672, 128), (False, 4096, 128), (True, 4096, 256)]:
        ft = "fp64" if fp64 else "fp32"
        sig = {n: "constexpr" if n.startswith("BLOCK") or n in ones or n == "FP64" else kind(n, ft)
               for n in fn.arg_names}
        block_r, num_warps = GK.launch_config(rows, block_c)
        ptx = sm90_ptx(fn, sig, {"BLOCK_R": block_r, "BLOCK_C": block_c, "FP64": fp64, **{n: 1 for n in ones}}, num_warps)
        f = ft[2:]
        assert f"fma.rn.f{f}" not in ptx and "div.full" not in ptx and "div.approx" not in ptx, (fp64, rows)
        assert f"div.rn.f{f}" in ptx and f"mul.rn.f{f}" in ptx, (fp64, rows)
        assert "bar.sync" not in ptx and "st.shared" not in ptx, (rows, block_c, block_r, num_warps)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pbllm_kernel_equals_torch_fallback():
    pytest.importorskip("triton")
    assert PK.triton_usable(torch.device("cuda"))
    for rows, n, G, dtype in [(6144, 128, 1, torch.float64), (1000, 77, 3, torch.float64), (37, 128, 2, torch.float32),
                              (28672, 128, 1, torch.float64), (5, 256, 4, torch.float64)]:
        args = _block_problem(rows, n, G, dtype, seed=rows, device="cuda")
        a = _run_block(PK.block_update_triton, args)
        b = _run_block(PK.block_update_torch, args)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (rows, n, G, dtype)
    be = backends.get_backend("torch")
    rng = np.random.default_rng(0)
    cols = 1000
    X = rng.standard_normal((4, 300, cols))
    X[..., 7] = 0  # a dead input
    H = torch.as_tensor(rq.hessian(X)).cuda()
    Ws = [torch.as_tensor(0.02 * rng.standard_normal((r, cols))).cuda().float() for r in (256, 64)]
    for kw in ({"group_size": 128}, {}, {"binarizer_stats": "binarized", "group_size": 96}):
        A = be.pbllm_shared(Ws, H, use_triton=True, **kw)
        B = be.pbllm_shared(Ws, H, use_triton=False, **kw)
        for x, y in zip(A, B):
            assert torch.equal(x.codes, y.codes) and torch.equal(x.signs, y.signs), kw
            assert torch.equal(x.salient_mask, y.salient_mask) and x.info["loss"] == y.info["loss"], kw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pbllm_kernel_time_per_block_vs_gptq():
    """Information for tuning (printed), with a loose sanity bound: one 128-column float64 block of the
    LLaMA3-8B gate/up rows (28672) and q/k/v rows (6144), PB-LLM's kernel against GPTQ's on the same block."""
    pytest.importorskip("triton")
    import time

    def timed(fn, reps=5):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    for rows in (28672, 6144):
        args = _block_problem(rows, 128, 1, torch.float64, seed=1, device="cuda")
        Wb, U, s, z = args[:4]
        codes = torch.empty(rows, 128, dtype=torch.uint8, device="cuda")
        signs = torch.empty(rows, 128, dtype=torch.int8, device="cuda")
        err = torch.empty(rows, 128, dtype=torch.float64, device="cuda")
        gidx = torch.zeros(128, dtype=torch.int64, device="cuda")
        t_gptq = timed(lambda: GK.block_update_triton(Wb, U, s[:, None].contiguous(), z[:, None].contiguous(), gidx,
                                                      255, codes, err))
        times = {}
        for br in (None, 2, 8):  # auto is 4 at these row counts
            PK.CONFIG["block_r"] = br
            try:
                times[br] = timed(lambda: PK.block_update_triton(*args, 255, codes, signs, err))
            finally:
                PK.CONFIG["block_r"] = None
        print(f"\nrows {rows}: GPTQ block {t_gptq * 1e3:.3f} ms; PB-LLM block "
              + ", ".join(f"block_r={k or 'auto'} {v * 1e3:.3f} ms" for k, v in times.items()))
        assert times[None] <= 4 * t_gptq + 1e-3, (times, t_gptq)


def test_threshold_by_sort_equals_kthvalue():
    """Both selections give sorted(row)[k - 1] exactly, ties included (the CUDA path picks one by group count)."""
    g = torch.Generator().manual_seed(5)
    flat = torch.randint(0, 50, (3, 1000), generator=g).double() / 7  # many ties
    for k in (1, 17, 901, 1000):
        a = TBIN._kth_smallest(flat, k, use_sort=True)
        b = TBIN._kth_smallest(flat, k, use_sort=False)
        assert torch.equal(a, b) and torch.equal(a, torch.sort(flat, dim=1).values[:, k - 1])

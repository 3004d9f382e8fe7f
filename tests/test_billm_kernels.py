"""BiLLM's search kernels (refquant/backends/billm_kernels.py) and the sync-free block loop of the torch twin.

* CPU (default suite): the column-by-column torch searches (the kernels' oracle) compute the reference's
  objectives (`refquant.spec.binarize.salient_column_errors` / `split_errors`) and pick the same
  candidates as the vectorised torch searches; the block loop of ``billm`` has no host sync per block.
* Triton interpreter (``PYTHONPATH=/tmp/tritonlib TRITON_INTERPRET=1``; skipped without Triton): the
  kernels are bitwise equal to the torch oracle (float32 and float64, ragged row tiles, one-column
  blocks), and ``billm(use_triton=True)`` equals ``billm(use_triton=False)``.
* Ahead-of-time sm_90 compile (Triton installed, not interpreting): IEEE division, no FMA contraction.
* GPU (``pytest -m gpu``): kernels == oracle on CUDA, bitwise; kernel path vs the vectorised torch path
  vs the reference on a LLaMA-like layer (the wiring unit's parity rule); one LLaMA3-8B layer timed.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from strategies import make_hessian, make_weight
from triton_checks import interpreter_run, sm90_ptx

torch = pytest.importorskip("torch")

import refquant as rq  # noqa: E402
from refquant import backends, golden  # noqa: E402
from refquant.backends import billm_kernels as BK  # noqa: E402
from refquant.backends.torch_binarization import _column_errors, _split_errors, residual_batched  # noqa: E402
from refquant.spec import binarize as B  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def _block(rows, n, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(rows, n, generator=g, dtype=torch.float64)
    S[:, 0] *= 8  # an outlier column
    S[0, 1:3] = 0  # exact zeros
    pos = torch.randperm(n, generator=g)
    return S.to(dtype).to(device), pos.to(device)


def _split_inputs(S, pos, k, levels=None):
    sal = pos < k
    M = sal[None, :].expand_as(S)
    g3 = residual_batched(S, M, 2)[0]
    lv = torch.as_tensor(B.split_levels() if levels is None else levels, dtype=S.dtype, device=S.device)
    ps = torch.quantile(torch.where(M, torch.zeros_like(S), S).abs().flatten(), lv)
    return sal, M, g3, ps


@pytest.mark.parametrize("rows, n", [(7, 40), (3, 1), (5, 128)])
def test_torch_oracle_computes_the_reference_objectives(rows, n):
    """float64: the column-by-column searches' errors / (rows n) are the reference's objectives (up to
    summation order) and choose the same candidates as the reference and the vectorised torch searches."""
    S, pos = _block(rows, n, seed=n)
    K = len(B.salient_candidates(n))
    ST = S.t().contiguous()
    col = BK.column_row_errors_torch(ST, pos, K).sum(dim=1) / (rows * n)
    ranking = torch.argsort(pos)
    ref = B.salient_column_errors(S.numpy(), ranking.numpy(), B.salient_candidates(n))
    np.testing.assert_allclose(col.numpy(), ref, rtol=1e-12, atol=1e-300)
    vec = _column_errors(S, ranking, B.salient_candidates(n), 2 << 30)
    assert int(torch.argmin(col)) == int(np.argmin(ref)) == int(torch.argmin(vec))
    k = int(torch.argmin(col)) + 1
    sal, M, g3, ps = _split_inputs(S, pos, k)
    split = BK.split_row_errors_torch(ST, g3.t().contiguous(), sal, ps).sum(dim=1) / (rows * n)
    sref = B.split_errors(S.numpy(), M.numpy(), ps.numpy())
    np.testing.assert_allclose(split.numpy(), sref, rtol=1e-12, atol=1e-300)
    assert int(torch.argmin(split)) == int(np.argmin(sref)) == int(torch.argmin(_split_errors(S, M, ps, g3, 2 << 30)))


def test_oracle_rejects_a_non_transposed_block():
    S, pos = _block(4, 8, seed=0)
    with pytest.raises(ValueError, match="contiguous rows"):
        BK.column_row_errors_torch(S.t(), pos, 7)
    with pytest.raises(ValueError, match="float32 or float64"):
        BK.column_row_errors_torch(S.t().contiguous().half(), pos, 7)


def _syncs_outside_quantile(fn):
    """Host syncs (``aten::_local_scalar_dense``) during ``fn()``, except those inside ``torch.quantile``
    (its q-range check runs only for CPU tensors; on CUDA it is skipped)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for e in prof.events():
        if e.name != "aten::_local_scalar_dense":
            continue
        p = e.cpu_parent
        while p is not None and p.name != "aten::quantile":
            p = p.cpu_parent
        n += p is None
    return n


def test_billm_block_loop_has_no_host_sync_per_block():
    """The chosen k and p stay on the device: 2 and 6 blocks cost the same number of host syncs."""
    be = backends.get_backend("torch")
    W = torch.from_numpy(make_weight("normal", 4, 96, seed=0))
    H = torch.from_numpy(make_hessian("well", 96, seed=0))
    few = _syncs_outside_quantile(lambda: be.billm(W, H, blocksize=48))
    many = _syncs_outside_quantile(lambda: be.billm(W, H, blocksize=16))
    assert few == many, (few, many)


def test_auto_dispatch_on_cpu_is_the_vectorised_search():
    """Without CUDA (and outside the interpreter) ``use_triton=None`` runs the vectorised torch searches;
    ``use_triton=False`` forces them anywhere."""
    if BK.interpreting():
        pytest.skip("interpreter mode: the kernels are usable on CPU")
    assert not BK.search_kernels_usable(torch.device("cpu"), 128)
    be = backends.get_backend("torch")
    W = torch.from_numpy(make_weight("normal", 3, 60, seed=1))
    H = torch.from_numpy(make_hessian("well", 60, seed=1))
    a, b = be.billm(W, H), be.billm(W, H, use_triton=False)
    assert torch.equal(a.dequantize(), b.dequantize())
    assert BK.run_search("x", None, torch.device("cpu"), 8, lambda: 1, lambda: 2) == 2
    with pytest.raises(RuntimeError, match="boom"):
        BK.run_search("x", True, torch.device("cpu"), 8, lambda: (_ for _ in ()).throw(RuntimeError("boom")),
                      lambda: 2)


_INTERP_SCRIPT = r"""
import json, torch
from refquant import backends
from refquant.backends import billm_kernels as BK
from refquant.backends.torch_binarization import residual_batched
assert BK.interpreting() and BK.search_kernels_usable(torch.device("cpu"), 8)
BK.CONFIG["block_r"] = 4
g = torch.Generator().manual_seed(0)
res = {}
# 6 rows = 2 programs (the last ragged); float32 and float64; a one-column block (K = 1, empty complement)
for rows, n, dt in [(6, 9, torch.float32), (3, 7, torch.float64), (2, 1, torch.float32)]:
    S = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dt)
    S[0, :2] = 0
    ST = S.t().contiguous()
    pos = torch.randperm(n, generator=g)
    K = max(1, n - 1)
    res[f"column_{rows}x{n}_{dt}"] = torch.equal(BK.column_row_errors_triton(ST, pos, K),
                                                 BK.column_row_errors_torch(ST, pos, K))
    sal = pos < min(2, n)
    M = sal[None, :].expand(rows, n)
    g3 = residual_batched(S, M, 2)[0].t().contiguous()
    ps = torch.quantile(torch.where(M, torch.zeros_like(S), S).abs().flatten(), torch.linspace(0.1, 0.9, 5, dtype=dt))
    res[f"split_{rows}x{n}_{dt}"] = torch.equal(BK.split_row_errors_triton(ST, g3, sal, ps),
                                                BK.split_row_errors_torch(ST, g3, sal, ps))
# the whole method, one block of 6 columns: the kernel path makes the torch path's decisions
be = backends.get_backend("torch")
W = torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.02
X = torch.randn(30, 6, generator=g, dtype=torch.float64)
a = be.billm(W, X.T @ X, use_triton=True, search_dtype=torch.float32)
b = be.billm(W, X.T @ X, use_triton=False, search_dtype=torch.float32)
res["billm_kernel_path_equals_torch_path"] = bool(torch.equal(a.salient_columns, b.salient_columns)
    and torch.equal(a.split, b.split) and torch.equal(a.dequantize(), b.dequantize()))
print(json.dumps(res))
"""


def test_search_kernels_in_interpreter_equal_torch_oracle():
    out = interpreter_run(_INTERP_SCRIPT, timeout=600)
    assert len(out) == 7 and all(out.values()), out


def test_search_kernels_compile_for_sm90_with_ieee_arithmetic():
    """Ahead-of-time compile (no GPU needed): IEEE division, separately rounded products (no FMA), and no
    barriers or shared memory (every program's sums are per thread)."""
    pytest.importorskip("triton")  # before the kernel objects, which exist only with Triton
    types = {"pos_ptr": "*i64", "sal_ptr": "*i8"}
    for fn in (BK._billm_column_kernel, BK._billm_split_kernel):
        for fp64 in (False, True):
            ft = "fp64" if fp64 else "fp32"
            sig = {a: ("constexpr" if a.isupper() or a.startswith(("BLOCK", "NCOLS", "FP64"))
                       else types.get(a, f"*{ft}") if a.endswith("_ptr") else "i32") for a in fn.arg_names}
            ptx = sm90_ptx(fn, sig, {"NCOLS": 128, "BLOCK_R": BK.CONFIG["block_r"], "FP64": fp64}, BK.CONFIG["num_warps"])
            b = ft[2:]
            assert f"fma.rn.f{b}" not in ptx and "div.full" not in ptx and "div.approx" not in ptx, fn.__name__
            assert f"div.rn.f{b}" in ptx and f"mul.rn.f{b}" in ptx, fn.__name__
            assert "bar.sync" not in ptx and "st.shared" not in ptx, fn.__name__


# --------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
def test_gpu_search_kernels_equal_torch_oracle():
    pytest.importorskip("triton")
    assert BK.search_kernels_usable(torch.device("cuda"), 128)
    for rows, n, dt in [(1000, 128, torch.float32), (37, 77, torch.float32), (300, 128, torch.float64),
                        (5, 1, torch.float32)]:
        S, pos = _block(rows, n, seed=rows, dtype=dt, device="cuda")
        K = len(B.salient_candidates(n))
        ST = S.t().contiguous()
        assert torch.equal(BK.column_row_errors_triton(ST, pos, K), BK.column_row_errors_torch(ST, pos, K)), \
            (rows, n, dt)
        sal, M, g3, ps = _split_inputs(S, pos, min(5, n))
        G3T = g3.t().contiguous()
        assert torch.equal(BK.split_row_errors_triton(ST, G3T, sal, ps), BK.split_row_errors_torch(ST, G3T, sal, ps)), \
            (rows, n, dt)


@gpu
@needs_cuda
def test_gpu_billm_kernel_path_vs_torch_path_and_reference():
    """q/k/v-like matrices sharing a Hessian with outlier inputs: the kernel searches against the vectorised
    torch searches (same float32 search dtype; only summation orders differ) and against the fp64 reference
    under the wiring unit's parity rule."""
    pytest.importorskip("triton")
    from refquant.methods.billm import PARITY_RULE
    be = backends.get_backend("torch")
    rng = np.random.default_rng(0)
    cols = 512
    X = rng.standard_normal((8, 256, cols))
    X[..., rng.choice(cols, 4, replace=False)] *= 20
    H = rq.hessian(X)
    Ws = [0.02 * rng.standard_normal((r, cols)) for r in (512, 128)]
    Hc = torch.as_tensor(H, device="cuda")
    fast = be.billm_shared([torch.as_tensor(W, device="cuda") for W in Ws], Hc, use_triton=True)
    slow = be.billm_shared([torch.as_tensor(W, device="cuda") for W in Ws], Hc, use_triton=False)
    for W, f, s in zip(Ws, fast, slow):
        ref = rq.billm(W, H)
        same_cols = (f.salient_columns == s.salient_columns).float().mean().item()
        same_split = (f.split == s.split).float().mean().item()
        le = golden.proxy_loss(W, ref.dequantize(), H)
        lf = golden.proxy_loss(W, be.to_numpy(f.dequantize()), H)
        print(f"\n{W.shape}: kernel vs torch path: columns {same_cols:.4f}, split {same_split:.4f}; "
              f"proxy loss rel diff vs reference {abs(lf - le) / le:.2e}")
        assert same_cols >= PARITY_RULE["min_salient_columns_identical"]
        assert same_split >= PARITY_RULE["min_split_identical"]
        cols_ok = (be.to_numpy(f.salient_columns) == ref.salient_columns).mean()
        assert cols_ok >= PARITY_RULE["min_salient_columns_identical"]
        assert (be.to_numpy(f.split) == ref.split).mean() >= PARITY_RULE["min_split_identical"]
        assert abs(lf - le) <= PARITY_RULE["proxy_loss_rtol"] * le


@gpu
@needs_cuda
def test_gpu_billm_llama3_8b_layer_time():
    """One LLaMA3-8B decoder layer's BiLLM (q/k/v and gate/up sharing a Hessian, o, down) with random
    weights and Hessians: prints the seconds (a measurement, not a target; tools/bench.py is the benchmark)."""
    be = backends.get_backend("torch")
    g = torch.Generator(device="cuda").manual_seed(0)

    def hess(n):
        X = torch.randn(2 * n, n, generator=g, device="cuda", dtype=torch.float32)
        return (X.T @ X).double()

    def w(r, c):
        return 0.02 * torch.randn(r, c, generator=g, device="cuda", dtype=torch.float32)

    groups = [([(4096, 4096), (1024, 4096), (1024, 4096)], 4096), ([(4096, 4096)], 4096),
              ([(14336, 4096), (14336, 4096)], 4096), ([(4096, 14336)], 14336)]
    inputs = [([w(r, c) for r, c in shapes], hess(n)) for shapes, n in groups]
    be.billm_shared([w(256, 256)], hess(256))  # compile the kernels once (Triton caches them on disk)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for Ws, H in inputs:
        out = be.billm_shared(Ws, H)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"\nBiLLM, one LLaMA3-8B layer (7 linears, Hessians given): {dt:.2f} s")
    assert all(torch.isfinite(o.dequantize()).all() for o in out)

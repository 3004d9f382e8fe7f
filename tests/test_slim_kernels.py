"""SliM-LLM's search kernels (refquant/backends/slim_kernels.py) and the batched search of the torch twin.

The Triton tests run the kernel in Triton's interpreter on the CPU (a subprocess with
``TRITON_INTERPRET=1``; skipped without Triton). Here: ``PYTHONPATH=/tmp/tritonlib python -m pytest
tests/test_slim_kernels.py``; the CUDA twin of the check is in ``tests/test_gpu_slim.py``.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
from triton_checks import interpreter_run, sm90_ptx

torch = pytest.importorskip("torch")

import refquant as rq  # noqa: E402
from refquant import backends  # noqa: E402
from refquant.backends import slim_kernels as SK  # noqa: E402
from refquant.backends import torch_slim  # noqa: E402
from refquant.spec import slim  # noqa: E402



def _rows(seed=0, M=12, R=300, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(M, R, generator=g, dtype=torch.float64) * spread
    Zq = Z + 0.05 * torch.randn(M, R, generator=g, dtype=torch.float64)
    return Z, Zq


def test_torch_rows_equal_the_reference_kl():
    Z, Zq = _rows()
    logp = SK.log_p_torch(Z.float())
    got = SK.kl_rows_torch(Zq.float(), logp).double().sum().item()
    want = slim.kl_error(Zq.numpy(), Z.numpy())
    assert got == pytest.approx(want, rel=2e-3)
    # float64 in: the formula max(y - lse, log c) is the reference's log(max(softmax, c)) to rounding
    lp64 = SK.log_p_torch(Z)
    assert SK.kl_rows_torch(Zq, lp64).sum().item() == pytest.approx(want, rel=1e-9)
    assert torch.all(SK.kl_rows_torch(Z.float(), logp) == 0)  # the same row scores exactly 0


def test_clamp_acts_in_log_space():
    Y = torch.tensor([[0.0, -40.0, 5.0, 1.0]], dtype=torch.float64)
    lp = SK.log_p_torch(Y)
    p = torch.softmax(Y, dim=-1)
    assert torch.allclose(lp, torch.log(torch.clamp(p, min=slim.KL_CLAMP)), rtol=1e-12, atol=0)
    assert lp[0, 1].item() == SK.LOG_CLAMP


def test_kernel_dispatch_refuses_bad_layouts_and_falls_back_on_cpu():
    Z, Zq = _rows(1, M=4, R=40)
    with pytest.raises(ValueError, match="row-contiguous"):
        SK.kl_rows(Zq.float().t(), SK.log_p(Z.float().t().contiguous()))
    with pytest.raises(ValueError, match="float32"):
        SK.log_p(Z)
    if not SK.triton_usable(torch.device("cpu")):
        a = SK.kl_rows(Zq.float(), SK.log_p(Z.float()))
        assert torch.equal(a, SK.kl_rows_torch(Zq.float(), SK.log_p_torch(Z.float())))


def test_batched_search_is_chunk_invariant_and_matches_the_reference():
    be = backends.get_backend("torch")
    rng = np.random.default_rng(3)
    W = rng.normal(size=(24, 80)) * rng.uniform(0.5, 2.0, size=(1, 80))
    X = rng.normal(size=(5, 30, 80)) * rng.uniform(0.2, 3.0, size=(1, 1, 80))
    H = rq.hessian(X)
    S = slim.group_salience(W, slim._upper(slim.salience_hessian(H), W.shape), 8)
    order = slim.salience_order(S)
    ref = slim.trial_errors(W, X, order, 3, 8)
    Wt, Xt = torch.as_tensor(W), torch.as_tensor(X)
    for chunk in (1, 2, 5):
        got = torch_slim.search_errors(Wt, Xt, order, 3, 8, chunk=chunk)
        assert got.shape == ref.shape
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref)), chunk
    r = be.slim_search(Wt, torch.as_tensor(H), Xt, bits=3, group_size=8)
    assert r.k == int(np.argmin(ref.mean(axis=0))) + 1


def test_h_factors_are_reused_for_the_same_hessian_and_dropped_with_it():
    be = backends.get_backend("torch")
    rng = np.random.default_rng(4)
    W = torch.as_tensor(rng.normal(size=(8, 64)))
    X = torch.as_tensor(rng.normal(size=(2, 20, 64)))
    H = torch.as_tensor(rq.hessian(X.numpy()))
    calls = []
    real = torch_slim._prepare

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    torch_slim._prepare = counting
    try:
        found = be.slim_search(W, H, X, bits=3, group_size=8)
        a = be.slim_llm(W, H, bits=3, group_bits=found.group_bits, group_size=8)
        assert len(calls) == 1  # slim_llm reused slim_search's factor
        b = be.slim_llm(W, H.clone(), bits=3, group_bits=found.group_bits, group_size=8)
        assert len(calls) == 2  # another tensor: computed again, same result
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        H.add_(0.0)  # an in-place change (version bump) misses the cache
        be.slim_llm(W, H, bits=3, group_bits=found.group_bits, group_size=8)
        assert len(calls) == 3
    finally:
        torch_slim._prepare = real
    del H
    gc.collect()
    assert not be.__dict__.get("_slim_h_cache")


def test_salient_mask_without_sync_equals_the_reference():
    rng = np.random.default_rng(0)
    for F in (rng.exponential(size=(16, 16)), np.ones((4, 8)), np.array([[1.0, 2.0]]), rng.normal(size=(3, 5)) ** 2):
        assert np.array_equal(torch_slim._salient_mask(torch.as_tensor(F)).numpy(), slim.salient_mask(F))


_INTERP_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import json, torch
from refquant.backends import slim_kernels as SK
assert SK.triton_usable(torch.device("cpu"))
SK.CONFIG["block"] = 64   # several lane blocks per row, the last one partial
SK.SQC_CONFIG["block_r"] = 16  # one program per block (the interpreter is slow per program)
SK.BINARY_CONFIG["block_r"] = 16
from refquant.backends import gptq_kernels as GK
GK.CONFIG["block_r"] = 16
g = torch.Generator().manual_seed(0)
res = {}
for M, R in ((5, 150), (3, 64), (2, 7)):
    Z = torch.randn(M, R, generator=g) * 4
    Zq = Z + 0.05 * torch.randn(M, R, generator=g)
    Zq[0, :3] = -60.0                       # clamped entries
    lp_t = SK.log_p(Z.clone(), use_triton=True)
    lp_r = SK.log_p_torch(Z.clone())
    kl_t = SK.kl_rows(Zq, lp_r, use_triton=True)
    kl_r = SK.kl_rows_torch(Zq, lp_r)
    inplace = Z.clone(); SK.log_p(inplace, out=inplace, use_triton=True)
    res[f"logp_{M}x{R}"] = bool(torch.allclose(lp_t, lp_r, rtol=1e-6, atol=1e-5)) and bool(torch.equal(inplace, lp_t))
    res[f"kl_{M}x{R}"] = bool(torch.allclose(kl_t, kl_r, rtol=1e-4, atol=1e-6 * float(kl_r.abs().max())))
    res[f"zero_{M}x{R}"] = bool(torch.all(SK.kl_rows(Z, lp_t, use_triton=True).abs() <= 1e-6))
# SQC's factor search: the kernel vs the torch ops on the same blocks (asymmetric, sym quirk, lambda, dead row)
from refquant.backends import torch_slim as TS
for name, (rows, n, b, sym, lam) in {"asym": (9, 128, 3, False, 1.0), "sym": (5, 100, 2, True, 1.0),
                                      "lam": (7, 64, 4, False, 3.0)}.items():
    w = torch.randn(rows, 130, generator=g, dtype=torch.float64)[:, :n] * 0.02   # strided view
    w[1] = 0.0
    w[2, 5] = 0.3                                                               # a salient element
    d = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    s_t, z_t = TS._sqc_params(w, d, b, sym, lam, use_triton=True)
    s_r, z_r = TS._sqc_params(w, d, b, sym, lam, use_triton=False)
    res["sqc_" + name] = bool(torch.equal(s_t, s_r) and torch.equal(z_t, z_r))
# 1-bit groups: the binarizer block kernel vs the torch column loop, bit for bit (fp32 and fp64)
n = 77
A = torch.randn(n, n, generator=g, dtype=torch.float64)
U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A @ A.T + n * torch.eye(n, dtype=torch.float64))), upper=True)
for dt in (torch.float32, torch.float64):
    W1 = (torch.randn(10, 90, generator=g, dtype=torch.float64)[:, :n] * 0.02).to(dt)
    W1[3, :] = W1[3, 0]  # a constant row: sign(0) = 0 on the first column
    outs = []
    for ut in (True, False):
        c = torch.zeros(10, 128, dtype=torch.uint8)[:, :n]; e = torch.zeros(10, n, dtype=dt)
        TS._binary_block(W1, U.to(dt), W1.abs().mean(dim=1), W1.mean(dim=1), c, e, use_triton=ut)
        outs.append((c.clone(), e.clone()))
    res[f"binary_{dt}"] = bool(torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]))
# the whole quantizer: SQC + GPTQ + binarizer kernels vs torch ops
import numpy as np
from refquant.backends.torch_backend import TorchBackend
W = torch.randn(12, 96, generator=g, dtype=torch.float64) * 0.02
X = torch.randn(300, 96, generator=g, dtype=torch.float64)
H = X.T @ X / 150
be = TorchBackend()
gb = np.array([2, 3, 4, 1, 3, 3])
a = be.slim_llm(W, H, bits=3, group_bits=gb, group_size=16, use_triton=True)
r = be.slim_llm(W, H, bits=3, group_bits=gb, group_size=16, use_triton=False)
res["slim_llm_codes"] = bool(torch.equal(a.codes, r.codes) and torch.equal(a.scale, r.scale)
                             and a.info["loss"] == r.info["loss"])
print(json.dumps(res))
"""


def test_triton_kernels_in_interpreter_equal_torch_ops():
    out = interpreter_run(_INTERP_SCRIPT, timeout=300)
    assert out and all(out.values()), out


def test_triton_kernels_compile_for_sm90():
    """Ahead-of-time compile for an H200 (no GPU needed) at the shapes of LLaMA3-8B's linears."""
    triton = pytest.importorskip("triton")
    fn = SK._kl_rows_kernel
    for R, write in ((1024, False), (4096, False), (14336, False), (4096, True)):
        block = min(SK.CONFIG["block"], triton.next_power_of_2(R))
        sig = {n: ("*fp32" if n.endswith("_ptr") else "fp32" if n == "log_clamp" else
                   "constexpr" if n in ("BLOCK", "NB", "WRITE_LOGP") else "i32") for n in fn.arg_names}
        ptx = sm90_ptx(fn, sig, {"BLOCK": block, "NB": triton.cdiv(R, block), "WRITE_LOGP": write}, SK.CONFIG["num_warps"],
                       enable_fp_fusion=None)
        assert "ld.global" in ptx
    fn = SK._sqc_kernel
    ones = {"stride_wc": 1, "stride_mc": 1}

    def kind(n):
        if n in ("NP", "SYM", "BLOCK_R", "BLOCK_C") or n in ones:
            return "constexpr"
        if n.endswith("_ptr"):
            return "*u8" if n == "M_ptr" else "*fp64"
        return "fp64" if n in ("maxq", "zero_sym", "lam", "norm") else "i32"

    for sym in (False, True):
        ptx = sm90_ptx(fn, {n: kind(n) for n in fn.arg_names},
                       {"NP": 101, "SYM": sym, "BLOCK_R": SK.SQC_CONFIG["block_r"], "BLOCK_C": 128, **ones},
                       SK.SQC_CONFIG["num_warps"])
        # IEEE fp64 division; the 2.4-norm through libdevice's accurate exp2/log2 (their own FMAs are inlined,
        # so the PTX has fma.rn.f64; the kernel's arithmetic itself is compiled without contraction)
        assert "div.rn.f64" in ptx and "__nv_log2" in ptx and "__nv_exp2" in ptx
    fn = SK._binary_block_kernel
    ones = {"stride_wc": 1, "stride_uc": 1, "stride_qc": 1, "stride_ec": 1}
    for fp64 in (False, True):
        ft = "fp64" if fp64 else "fp32"
        sig = {n: ("constexpr" if n.startswith("BLOCK") or n == "FP64" or n in ones else
                   ("*u8" if n == "Q_ptr" else "*" + ft) if n.endswith("_ptr") else "i32") for n in fn.arg_names}
        ptx = sm90_ptx(fn, sig, {"BLOCK_R": SK.BINARY_CONFIG["block_r"], "BLOCK_C": 128, "FP64": fp64, **ones},
                       SK.BINARY_CONFIG["num_warps"])
        assert f"div.rn.f{ft[2:]}" in ptx and f"fma.rn.f{ft[2:]}" not in ptx and "bar.sync" not in ptx


def test_take_inputs_hands_over_the_kept_inputs_once():
    from refquant.spec.stats import ChannelStats

    be = backends.get_backend("torch")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(b, 6, 10, generator=g) for b in (3, 1, 2)]
    st = be.channel_stats(("H", "inputs"), 10)
    ref = ChannelStats(("inputs",), 10)
    for x in xs:
        st.add(x)
        ref.add(x.numpy())
    want = torch.cat(xs)
    assert torch.equal(st.inputs, want)
    got = st.take_inputs()
    assert torch.equal(got, want) and st._inputs == [] and st.H is not None
    assert np.array_equal(ref.take_inputs(), want.numpy()) and ref._inputs == []
    one = be.channel_stats(("inputs",), 10)
    one.add(xs[0])
    assert one.take_inputs() is not None and one._inputs == []

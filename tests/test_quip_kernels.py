"""QuIP's LDLQ block kernel (refquant/backends/quip_kernels.py): the Triton kernel in interpreter mode equals the
torch fallback bit for bit (subprocess, when Triton is installed), the kernel compiles for sm_90 without FMA
contraction or cross-warp traffic, the fallback is the per-column LDLQ, and the dispatch."""
from __future__ import annotations


import numpy as np
import pytest
from triton_checks import interpreter_run, sm90_asm

torch = pytest.importorskip("torch")

from refquant.backends import quip_kernels as QK  # noqa: E402
from refquant.backends.torch_quip import ldlq_batched  # noqa: E402
from refquant.spec import quip as Q  # noqa: E402



def ldl_problem(n, rows, d, maxq, seed, dtype=torch.float64):
    """``n`` LDL factors of Gram matrices with an outlier channel and coordinates that clamp at both ends."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * d + 3, d, generator=g, dtype=torch.float64)
    X[:, :, 1] *= 20
    H = X.transpose(1, 2) @ X + 0.05 * torch.eye(d, dtype=torch.float64)
    C = torch.linalg.cholesky(H)
    L = C * (1 / torch.diagonal(C, dim1=1, dim2=2))[:, None, :] - torch.eye(d, dtype=torch.float64)
    w = (torch.rand(n, rows, d, generator=g, dtype=torch.float64) * (maxq + 1.5) - 0.75).clamp(0, maxq)
    return w.to(dtype), L.to(dtype)


def column_loop(w, L, maxq):
    """LDLQ as the block fallback's arithmetic, unblocked: one column at a time, the feedback applied
    immediately (the product rounded, then the sum), in w's dtype."""
    A = w.clone()
    codes = torch.empty_like(w)
    for k in range(w.shape[-1] - 1, -1, -1):
        c = torch.clamp(torch.floor(A[..., k] + 0.5), 0, maxq)
        codes[..., k] = c
        e = w[..., k] - c
        A[..., :k] += e[..., None] * L[:, k, :k][:, None, :]
    return codes


def test_fallback_equals_the_column_loop_and_the_reference():
    """Blocks of any size give the unblocked loop's codes in float64 (the feedback of a block is a matmul: another
    summation order, exact enough here), and the spec's LDLQ codes."""
    w, L = ldl_problem(2, 9, 70, 3, 0)
    ref = column_loop(w, L, 3)
    for bs in (1, 16, 32, 70, 128):
        assert torch.equal(ldlq_batched(w, L, 3, bs, use_triton=False), ref), bs
    H = (L[0] + torch.eye(70, dtype=torch.float64))  # H = (L + I) D (L + I)^T with D = I
    assert np.array_equal(Q.ldlq(w[0].numpy(), (H @ H.T).numpy(), 3), ref[0].numpy())


def test_fallback_clamps_at_both_ends_and_pads_with_zero_rows():
    w, L = ldl_problem(3, 11, 40, 1, 1, torch.float32)
    full = ldlq_batched(w, L, 1, 16, use_triton=False)
    assert full.min() == 0 and full.max() == 1 and torch.equal(full, full.round())
    rows = [11, 4, 0]
    wp = w.clone()
    for j, r in enumerate(rows):
        wp[j, r:] = 0
    part = ldlq_batched(wp, L, 1, 16, rows=rows, use_triton=False)
    for j, r in enumerate(rows):
        assert torch.equal(part[j, :r], full[j, :r])
    with pytest.raises(ValueError, match="valid rows"):
        ldlq_batched(w, L, 1, 16, rows=[11, 12, 0])


def test_dispatch():
    """Auto mode launches the kernel on CUDA (and on the CPU only in the interpreter); False forces torch ops."""
    cpu = torch.device("cpu")
    assert QK.use_kernel(cpu, 128, None) == (QK.triton_usable(cpu) and not QK._TRITON_BROKEN)
    assert not QK.use_kernel(cpu, 128, False)
    assert not QK.use_kernel(torch.device("cuda"), 512, None)  # wider than MAX_BLOCK_C: torch ops
    if not QK.HAVE_TRITON:
        with pytest.raises(RuntimeError, match="Triton is not installed"):
            QK.use_kernel(cpu, 128, True)


def test_prefetched_rotations_are_taken_and_give_the_same_weights():
    """quip_prefetch draws ahead (background threads); quip_many takes the draw (same factors, same codes)."""
    from refquant import backends
    from refquant.backends import torch_quip as TQ

    be = backends.get_backend("torch")
    g = torch.Generator().manual_seed(7)
    Ws = [torch.randn(r, 24, generator=g, dtype=torch.float64) * 0.02 for r in (12, 6)]
    X = torch.randn(60, 24, generator=g, dtype=torch.float64)
    H = X.T @ X
    plain = be.quip_many(Ws, [H, H], [11, 12], bits=2)
    be.quip_prefetch([(12, 24), (6, 24)], [11, 12], incoherence=True)
    assert {(12, 24, 11, "blocked"), (6, 24, 12, "blocked")} <= set(TQ._PREFETCHED)
    taken = be.quip_many(Ws, [H, H], [11, 12], bits=2)
    assert not {(12, 24, 11, "blocked"), (6, 24, 12, "blocked")} & set(TQ._PREFETCHED)
    for a, b in zip(plain, taken):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.V_R1, b.V_R1) and a.info["loss"] == b.info["loss"]
    be.quip_prefetch([(12, 24)], [11], incoherence=False)  # nothing to draw
    assert (12, 24, 11, "blocked") not in TQ._PREFETCHED
    with pytest.raises(ValueError, match="one seed per shape"):
        be.quip_prefetch([(12, 24)], [1, 2])
    with pytest.raises(ValueError, match="seed"):
        be.quip_prefetch([(12, 24)], [-1])


_INTERP_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import json, sys, torch
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from refquant.backends import quip_kernels as QK
from refquant.backends.torch_quip import ldlq_batched
from refquant.backends.torch_backend import TorchBackend
from test_quip_kernels import ldl_problem
assert QK.interpreting() and QK.triton_usable(torch.device("cpu"))
QK.CONFIG["block_r"] = 8
res = {}
# (n, rows, d, maxq, blocksize, valid rows): ragged last block, one-column block, rows not a multiple of
# BLOCK_R, padded rows in a batch (one matrix empty), 1-bit grid (clamping at both ends everywhere)
cases = [(2, 11, 77, 3, 32, None), (3, 13, 40, 1, 16, [13, 5, 0]), (1, 9, 33, 7, 16, None),
         (2, 16, 48, 15, 48, [3, 16])]
for n, rows, d, maxq, bs, valid in cases:
    for dt in (torch.float32, torch.float64):
        w, L = ldl_problem(n, rows, d, maxq, d, dt)
        if valid is not None:
            for j, r in enumerate(valid):
                w[j, r:] = 0
        a = ldlq_batched(w, L, maxq, bs, rows=valid, use_triton=True)
        b = ldlq_batched(w, L, maxq, bs, rows=valid, use_triton=False)
        res[f"{n}x{rows}x{d}/q{maxq}/bs{bs}/{valid}/{dt}"] = torch.equal(a, b)
        res[f"clamped {d}/{dt}"] = bool(a.min() == 0 and a.max() == maxq)
# a single block through ldlq_block: the error outputs too (strided views as ldlq_batched passes them)
w, L = ldl_problem(2, 10, 24, 3, 5, torch.float32)
wT = w.transpose(1, 2).contiguous()
outs = []
plan = QK.launch_plan([10, 10], 24, torch.device("cpu"))
for use in (True, False):
    A, c, e = wT.clone(), torch.zeros_like(wT), torch.zeros_like(wT)
    ran = QK.ldlq_block(A[:, 4:, :], wT[:, 4:, :], L[:, 4:, 4:], 3, c[:, 4:, :], e[:, 4:, :],
                        plan if use else None, use)
    outs.append((ran, c, e))
res["block_kernel_ran"] = outs[0][0] and not outs[1][0]
res["block_codes_equal"] = torch.equal(outs[0][1], outs[1][1])
res["block_err_equal"] = torch.equal(outs[0][2], outs[1][2])
# the whole twin: quip_many with the kernel and without it (different widths and row counts)
g = torch.Generator().manual_seed(3)
Ws = [torch.randn(r, c, generator=g, dtype=torch.float64) * 0.02 for r, c in ((12, 32), (5, 32), (7, 20))]
Hs = []
for W in Ws:
    X = torch.randn(3 * W.shape[1], W.shape[1], generator=g, dtype=torch.float64)
    Hs.append(X.T @ X)
be = TorchBackend()
a = be.quip_many(Ws, Hs, [1, 2, 3], bits=2, blocksize=16, use_triton=True)
b = be.quip_many(Ws, Hs, [1, 2, 3], bits=2, blocksize=16, use_triton=False)
res["quip_many_codes_equal"] = all(torch.equal(x.codes, y.codes) for x, y in zip(a, b))
res["quip_many_loss_equal"] = all(x.info["loss"] == y.info["loss"] for x, y in zip(a, b))
print(json.dumps(res))
"""


def test_triton_kernel_in_interpreter_equals_torch_fallback():
    out = interpreter_run(_INTERP_SCRIPT, timeout=600)
    assert out and all(out.values()), out


def test_triton_kernel_compiles_for_sm90_with_ieee_arithmetic():
    """Ahead-of-time compile (no GPU needed): no FMA contraction (``A + L * err`` rounds the product, as the torch
    fallback's two ops do), no division, and at the default launch configs no shared memory / barrier inside the
    column loop (one warp per program: the column extraction is warp shuffles only)."""
    pytest.importorskip("triton")  # before the kernel objects, which exist only with Triton
    fn = QK._ldlq_block_kernel
    ones = {"stride_ar": 1, "stride_wr": 1, "stride_lj": 1, "stride_qr": 1, "stride_er": 1}  # as launched

    def kind(n, ft):
        if n.startswith("BLOCK") or n in ones:
            return "constexpr"
        if n.endswith("_ptr"):
            return "*i32" if n in ("TB_ptr", "TR_ptr", "NR_ptr") else f"*{ft}"
        return "fp32" if n == "maxq" else "i32"

    for fp64, rows_total, block_c in [(False, 38912, 128), (False, 4096, 128), (False, 300, 128), (False, 4096, 256),
                                      (True, 4096, 128)]:
        ft = "fp64" if fp64 else "fp32"
        sig = {n: kind(n, ft) for n in fn.arg_names}
        block_r, num_warps = QK.launch_config(rows_total, block_c)
        asm = sm90_asm(fn, sig, {"BLOCK_R": block_r, "BLOCK_C": block_c, **ones}, num_warps)
        ptx = asm["ptx"]
        f = "f" + ft[2:]
        assert f"fma.rn.{f}" not in ptx and f"mul.rn.{f}" in ptx and f"add.rn.{f}" in ptx, (fp64, block_c)
        assert "div." not in ptx.replace("div.s32", "").replace("div.u32", "")  # no division at all
        # the column loop runs in registers: no layout conversion (shared memory + barrier) inside it; the tile is
        # converted once on the way in and once on the way out (rows are contiguous in memory, the loop works
        # along the columns)
        ttgir = asm["ttgir"]
        body = ttgir[ttgir.index("scf.for"):ttgir.index("scf.yield")]
        assert ttgir.count("scf.for") == 1 and "convert_layout" not in body and "local_" not in body, \
            (rows_total, block_c, block_r, num_warps)
        assert ptx.count("bar.sync") <= 2, (rows_total, block_c, block_r, num_warps)

"""BiLLM's two per-block searches as one Triton launch each, and the same arithmetic in torch ops.

Per block of ``n`` columns, BiLLM (:mod:`refquant.spec.billm`, steps 3 and 4) evaluates

* the salient-column search: for every ``k = 1..K`` (``K = len(salient_candidates(n))``) the error
  ``sum((S - R2(S, M_k) - R2(S, ~M_k))^2)`` with ``M_k`` the columns of rank ``< k``;
* the split search: for each of the 81 break points ``p`` the error
  ``sum((S - R1(S, G1) - R1(S, G2) - g3)^2)`` with ``G1 = |S| < p``, ``G2 = |S| >= p`` on the
  non-salient columns and ``g3`` the (fixed) order-2 approximation of the salient columns.

The torch twin used to materialise every candidate as a (K, rows, n) tensor (~50 of them per search,
gigabytes per block at 14336 rows) and to read the chosen candidate back to the host. Here one
program owns ``BLOCK_R`` rows and one candidate: it streams the block's columns (``S`` transposed to
(n, rows), so a column is a contiguous, coalesced load that the candidates share through L2) several
times -- five passes for the order-2 column search (mean, alpha, order-2 mean, order-2 alpha, error),
three for the split (mean, alpha, error) -- keeping only per-row sums in registers, and writes
each row's error: a (candidates, rows) array. Nothing is materialised per candidate and nothing is
read back; the caller sums the rows and takes ``argmin`` on the device.

Arithmetic (the kernels and :func:`column_row_errors_torch` / :func:`split_row_errors_torch` are bitwise
equal on the same device, ``tests/test_billm_kernels.py``): every row sum runs over the columns
``j = 0..n-1`` in order, one IEEE addition per column (an unselected column adds ``+0.0``);
``mean = sum / count`` and ``alpha = sum|c| / count`` with IEEE division (``div_rn``), ``count``
clamped to >= 1 as the torch twin does; ``sign(0) = 0``; no FMA contraction (``enable_fp_fusion=False``),
so ``s*alpha + mean`` and ``e*e + err`` round after each product as torch does. The per-element
formulas are those of :func:`refquant.backends.torch_binarization.residual_batched` (and of the
reference's :func:`refquant.spec.binarize.residual_binarize`); only the order of the row sums differs
from the vectorised torch path (sequential here), so a decision can differ from it only where two
candidates' errors lie within float rounding of each other (the parity rule of
``refquant/methods/billm.py`` admits exactly that).
"""
from __future__ import annotations

import logging

import torch

from .gptq_kernels import HAVE_TRITON, interpreting, triton_usable

log = logging.getLogger("refquant")

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gptq_kernels import _div_rn
else:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["CONFIG", "column_row_errors_torch", "column_row_errors_triton", "run_search", "search_kernels_usable",
           "split_row_errors_torch", "split_row_errors_triton", "interpreting"]

#: Launch configuration: rows per program and warps (one row per thread at the defaults).
CONFIG = {"block_r": 128, "num_warps": 4}

#: Widest block the kernels take (each width is its own compile: the column loops run over the constexpr ``NCOLS``).
MAX_BLOCK_COLS = 1024


def search_kernels_usable(device: torch.device, n_cols: int) -> bool:
    """Whether the Triton searches can run for a block of ``n_cols`` columns on ``device``."""
    return triton_usable(device) and 1 <= n_cols <= MAX_BLOCK_COLS


if HAVE_TRITON:

    @triton.jit
    def _sgn(x):
        # torch.sign of a finite value: -1, 0, +1 in x's dtype
        one = tl.full(x.shape, 1.0, x.dtype)
        zero = tl.zeros(x.shape, x.dtype)
        return tl.where(x > 0, one, tl.where(x < 0, -one, zero))

    @triton.jit
    def _billm_column_kernel(
        ST_ptr, stride_sc,      # S transposed, (n, rows), rows contiguous
        pos_ptr,                # rank of each column, int64 (n,)
        out_ptr, stride_ok,     # per-row errors out, (K, rows)
        rows,
        NCOLS: tl.constexpr, BLOCK_R: tl.constexpr, FP64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kc = tl.program_id(1)
        k = kc + 1  # candidate kc is k = kc + 1 salient columns (salient_candidates: 1..K)
        offs = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = offs < rows
        base = ST_ptr + offs
        zero = tl.zeros((BLOCK_R,), dtype=ST_ptr.dtype.element_ty)
        cnt_a = zero + k.to(ST_ptr.dtype.element_ty)
        cnt_b = zero + tl.maximum(NCOLS - k, 1).to(ST_ptr.dtype.element_ty)
        # pass 1: order-1 means of both groups
        sa = zero
        sb = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            ina = tl.load(pos_ptr + j) < k
            sa = sa + tl.where(ina, x, zero)
            sb = sb + tl.where(ina, zero, x)
        ma = _div_rn(sa, cnt_a, FP64)
        mb = _div_rn(sb, cnt_b, FP64)
        # pass 2: order-1 alphas
        sa = zero
        sb = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            ina = tl.load(pos_ptr + j) < k
            c = tl.abs(x - tl.where(ina, ma, mb))
            sa = sa + tl.where(ina, c, zero)
            sb = sb + tl.where(ina, zero, c)
        aa = _div_rn(sa, cnt_a, FP64)
        ab = _div_rn(sb, cnt_b, FP64)
        # pass 3: order-2 means (of the residual x - t1)
        sa = zero
        sb = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            ina = tl.load(pos_ptr + j) < k
            m = tl.where(ina, ma, mb)
            t1 = _sgn(x - m) * tl.where(ina, aa, ab) + m
            r = x - t1
            sa = sa + tl.where(ina, r, zero)
            sb = sb + tl.where(ina, zero, r)
        m2a = _div_rn(sa, cnt_a, FP64)
        m2b = _div_rn(sb, cnt_b, FP64)
        # pass 4: order-2 alphas
        sa = zero
        sb = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            ina = tl.load(pos_ptr + j) < k
            m = tl.where(ina, ma, mb)
            t1 = _sgn(x - m) * tl.where(ina, aa, ab) + m
            c = tl.abs((x - t1) - tl.where(ina, m2a, m2b))
            sa = sa + tl.where(ina, c, zero)
            sb = sb + tl.where(ina, zero, c)
        a2a = _div_rn(sa, cnt_a, FP64)
        a2b = _div_rn(sb, cnt_b, FP64)
        # pass 5: squared error of the order-2 approximation
        err = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            ina = tl.load(pos_ptr + j) < k
            m = tl.where(ina, ma, mb)
            t1 = _sgn(x - m) * tl.where(ina, aa, ab) + m
            m2 = tl.where(ina, m2a, m2b)
            t2 = t1 + (_sgn((x - t1) - m2) * tl.where(ina, a2a, a2b) + m2)
            e = x - t2
            err = err + e * e
        tl.store(out_ptr + kc * stride_ok + offs, err, mask=rmask)

    @triton.jit
    def _billm_split_kernel(
        ST_ptr, stride_sc,      # S transposed, (n, rows)
        G3_ptr, stride_gc,      # g3 transposed, (n, rows): the salient columns' order-2 approximation
        sal_ptr,                # salient column flags, int8 (n,)
        ps_ptr,                 # break points (P,), S's dtype
        out_ptr, stride_ok,     # per-row errors out, (P, rows)
        rows,
        NCOLS: tl.constexpr, BLOCK_R: tl.constexpr, FP64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        c = tl.program_id(1)
        p = tl.load(ps_ptr + c)
        offs = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = offs < rows
        base = ST_ptr + offs
        zero = tl.zeros((BLOCK_R,), dtype=ST_ptr.dtype.element_ty)
        one = zero + 1.0
        # pass 1: counts and sums of both groups
        s1 = zero
        s2 = zero
        n1 = zero
        n2 = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            free = tl.load(sal_ptr + j) == 0
            a = tl.abs(x)
            in1 = (a < p) & free
            in2 = (a >= p) & free
            s1 = s1 + tl.where(in1, x, zero)
            s2 = s2 + tl.where(in2, x, zero)
            n1 = n1 + tl.where(in1, one, zero)
            n2 = n2 + tl.where(in2, one, zero)
        n1 = tl.maximum(n1, one)
        n2 = tl.maximum(n2, one)
        m1 = _div_rn(s1, n1, FP64)
        m2 = _div_rn(s2, n2, FP64)
        # pass 2: alphas
        s1 = zero
        s2 = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            free = tl.load(sal_ptr + j) == 0
            a = tl.abs(x)
            in1 = (a < p) & free
            in2 = (a >= p) & free
            d = tl.abs(x - tl.where(in1, m1, m2))
            s1 = s1 + tl.where(in1, d, zero)
            s2 = s2 + tl.where(in2, d, zero)
        a1 = _div_rn(s1, n1, FP64)
        a2 = _div_rn(s2, n2, FP64)
        # pass 3: squared error (salient entries: x - g3)
        err = zero
        for j in range(NCOLS):
            x = tl.load(base + j * stride_sc, mask=rmask, other=0.0)
            g = tl.load(G3_ptr + offs + j * stride_gc, mask=rmask, other=0.0)
            free = tl.load(sal_ptr + j) == 0
            in1 = tl.abs(x) < p
            m = tl.where(in1, m1, m2)
            b = _sgn(x - m) * tl.where(in1, a1, a2) + m
            e = x - tl.where(free, b, g)
            err = err + e * e
        tl.store(out_ptr + c * stride_ok + offs, err, mask=rmask)


def _check(ST, name="ST"):
    if ST.dim() != 2 or ST.stride(1) != 1:
        raise ValueError(f"{name} must be a (n, rows) tensor with contiguous rows; got shape {tuple(ST.shape)}, "
                         f"strides {ST.stride()}: pass S.t().contiguous().")
    if ST.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64; got {ST.dtype}.")


def column_row_errors_triton(ST, pos, K: int):
    """Per-row errors of the column search, (K, rows), in one launch (see the module docstring)."""
    _check(ST)
    n, rows = ST.shape
    out = torch.empty((K, rows), dtype=ST.dtype, device=ST.device)
    block_r = CONFIG["block_r"]
    _billm_column_kernel[(triton.cdiv(rows, block_r), K)](
        ST, ST.stride(0), pos.to(torch.int64).contiguous(), out, out.stride(0), rows,
        NCOLS=n, BLOCK_R=block_r, FP64=ST.dtype == torch.float64, num_warps=CONFIG["num_warps"],
        enable_fp_fusion=False)
    return out


def split_row_errors_triton(ST, G3T, salient, ps):
    """Per-row errors of the split search, (len(ps), rows), in one launch."""
    _check(ST)
    _check(G3T, "G3T")
    n, rows = ST.shape
    P = int(ps.shape[0])
    out = torch.empty((P, rows), dtype=ST.dtype, device=ST.device)
    block_r = CONFIG["block_r"]
    _billm_split_kernel[(triton.cdiv(rows, block_r), P)](
        ST, ST.stride(0), G3T, G3T.stride(0), salient.to(torch.int8).contiguous(), ps.to(ST.dtype).contiguous(),
        out, out.stride(0), rows,
        NCOLS=n, BLOCK_R=block_r, FP64=ST.dtype == torch.float64, num_warps=CONFIG["num_warps"],
        enable_fp_fusion=False)
    return out


def column_row_errors_torch(ST, pos, K: int):
    """:func:`column_row_errors_triton` in torch ops, the same arithmetic column by column (all
    candidates at once as (K, rows) tensors). Slow (~40 ops per column); the kernels' oracle."""
    _check(ST)
    n, rows = ST.shape
    ks = torch.arange(1, K + 1, device=ST.device)[:, None]
    A = pos.to(torch.int64)[None, :] < ks  # (K, n): column j salient for candidate k
    zero = torch.zeros((K, rows), dtype=ST.dtype, device=ST.device)
    cnt_a = ks.to(ST.dtype).expand(K, rows)
    cnt_b = (n - ks).clamp_min(1).to(ST.dtype).expand(K, rows)
    cols = [(ST[j][None, :], A[:, j:j + 1]) for j in range(n)]

    def row_sums(value):
        sa, sb = zero, zero
        for x, a in cols:
            v = value(x, a)
            sa = sa + torch.where(a, v, zero)
            sb = sb + torch.where(a, zero, v)
        return sa, sb

    sa, sb = row_sums(lambda x, a: x)
    ma, mb = sa / cnt_a, sb / cnt_b
    sa, sb = row_sums(lambda x, a: (x - torch.where(a, ma, mb)).abs())
    aa, ab = sa / cnt_a, sb / cnt_b

    def t1(x, a):
        m = torch.where(a, ma, mb)
        return torch.sign(x - m) * torch.where(a, aa, ab) + m

    sa, sb = row_sums(lambda x, a: x - t1(x, a))
    m2a, m2b = sa / cnt_a, sb / cnt_b
    sa, sb = row_sums(lambda x, a: ((x - t1(x, a)) - torch.where(a, m2a, m2b)).abs())
    a2a, a2b = sa / cnt_a, sb / cnt_b
    err = zero
    for x, a in cols:
        t = t1(x, a)
        m2 = torch.where(a, m2a, m2b)
        e = x - (t + (torch.sign((x - t) - m2) * torch.where(a, a2a, a2b) + m2))
        err = err + e * e
    return err


def split_row_errors_torch(ST, G3T, salient, ps):
    """:func:`split_row_errors_triton` in torch ops, column by column (all break points at once)."""
    _check(ST)
    n, rows = ST.shape
    P = int(ps.shape[0])
    p = ps.to(ST.dtype)[:, None]
    zero = torch.zeros((P, rows), dtype=ST.dtype, device=ST.device)
    one = zero + 1
    free = [not bool(s) for s in salient.tolist()]
    s1, s2, n1, n2 = zero, zero, zero, zero
    for j in range(n):
        x = ST[j][None, :]
        in1 = (x.abs() < p) & free[j]
        in2 = (x.abs() >= p) & free[j]
        s1 = s1 + torch.where(in1, x, zero)
        s2 = s2 + torch.where(in2, x, zero)
        n1 = n1 + torch.where(in1, one, zero)
        n2 = n2 + torch.where(in2, one, zero)
    n1, n2 = n1.clamp_min(1), n2.clamp_min(1)
    m1, m2 = s1 / n1, s2 / n2
    s1, s2 = zero, zero
    for j in range(n):
        x = ST[j][None, :]
        in1 = (x.abs() < p) & free[j]
        in2 = (x.abs() >= p) & free[j]
        d = (x - torch.where(in1, m1, m2)).abs()
        s1 = s1 + torch.where(in1, d, zero)
        s2 = s2 + torch.where(in2, d, zero)
    a1, a2 = s1 / n1, s2 / n2
    err = zero
    for j in range(n):
        x = ST[j][None, :]
        in1 = x.abs() < p
        m = torch.where(in1, m1, m2)
        b = torch.sign(x - m) * torch.where(in1, a1, a2) + m
        e = x - (b if free[j] else G3T[j][None, :])
        err = err + e * e
    return err


_TRITON_BROKEN = False


def run_search(name: str, use_triton: bool | None, device: torch.device, n_cols: int, kernel, fallback):
    """``kernel()`` when the Triton searches are wanted (``use_triton`` None: when usable, see
    :func:`search_kernels_usable`), else ``fallback()`` (the caller's vectorised torch search). In auto
    mode a kernel failure is logged once and the fallback is used from then on; ``use_triton=True`` raises it."""
    global _TRITON_BROKEN
    want = search_kernels_usable(device, n_cols) if use_triton is None else bool(use_triton)
    if want and not (use_triton is None and _TRITON_BROKEN):
        try:
            return kernel()
        except Exception:
            if use_triton:
                raise
            _TRITON_BROKEN = True
            log.warning("Triton BiLLM %s kernel failed; using the torch search from now on", name, exc_info=True)
    return fallback()

"""SliM-LLM's allocation search on the GPU: the clamped-softmax KL of every token row in one Triton launch.

The search (:func:`refquant.spec.slim.trial_errors`, the code's ``reconstruct.kl_div``) scores every
trial by ``sum_tokens sum_out p_hat (log p_hat - log p)`` with ``p_hat = max(softmax(y_hat), 1e-6)``
and ``p = max(softmax(y), 1e-6)`` over the output features. With ``lse = log sum exp(y)`` of a row::

    log max(softmax(y), c) = max(y - lse, log c)        (log is monotone)

so a row needs its log-sum-exp and then one elementwise pass. :func:`kl_rows` computes, per row of
the (tokens, out) fp32 output ``Y`` of a trial and the stored ``logP`` of the FP output::

    lp  = max(Y[r] - lse(Y[r]), log 1e-6)
    kl[r] = sum_j exp(lp_j) * (lp_j - logP[r, j])

and :func:`log_p` writes ``logP = max(Y - lse(Y), log 1e-6)`` (in place allowed). On CUDA each is
ONE Triton launch (a program per row: an online max / sum-exp pass over the row in ``BLOCK``-wide
lanes, then the elementwise pass, which re-reads the row from L2): 8 bytes of HBM traffic per
output element (the row and ``logP``) instead of the ~60 of the torch ops (softmax, clamp, log,
exp, subtract, multiply, sum, each a full fp32 pass with its own temporary). Elsewhere (CPU, no
Triton) the same formula in torch ops (:func:`kl_rows_torch`, :func:`log_p_torch`).

The Triton path and the torch ops agree to float32 rounding (the exponentials, the order of the
row sums), not bit for bit; ``tests/test_slim_kernels.py`` checks them against each other in
Triton's interpreter.
"""
from __future__ import annotations

import logging
import math

import torch

from ..spec.slim import KL_CLAMP
from .gptq_kernels import HAVE_TRITON, interpreting, tl, triton

if HAVE_TRITON:
    from .gptq_kernels import _div_rn, _round_half_even

log = logging.getLogger("refquant")

#: ``log(1e-6)``, the clamp of ``reconstruct.kl_div`` in log space.
LOG_CLAMP = math.log(KL_CLAMP)
#: Lane width of a program (the row is read in ``ceil(out / BLOCK)`` steps) and its warps.
CONFIG = {"block": 2048, "num_warps": 4}


def triton_usable(device: torch.device) -> bool:
    """Whether the kernels can launch for tensors on ``device`` (CUDA, or the CPU in interpreter mode)."""
    if not HAVE_TRITON:
        return False
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"


if HAVE_TRITON:
    #: A finite "minus infinity" for masked lanes (exp of it minus any finite max is exactly 0).
    _NEG = tl.constexpr(-3.0e38)

    @triton.jit
    def _kl_rows_kernel(Y_ptr, stride_y, L_ptr, stride_l, O_ptr, R, log_clamp,
                        BLOCK: tl.constexpr, NB: tl.constexpr, WRITE_LOGP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        y_row = Y_ptr + row * stride_y
        l_row = L_ptr + row * stride_l
        # pass 1: per-lane running max and sum of exp, combined at the end (the online softmax)
        m = tl.full((BLOCK,), _NEG, tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for b in range(NB):
            c = b * BLOCK + offs
            valid = c < R
            x = tl.load(y_row + c, mask=valid, other=_NEG)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.where(valid, tl.exp(x - m_new), 0.0)
            m = m_new
        mx = tl.max(m, axis=0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
        # pass 2: the clamped log-probabilities, stored (logP) or scored against logP (the KL)
        acc = tl.zeros((BLOCK,), tl.float32)
        for b in range(NB):
            c = b * BLOCK + offs
            valid = c < R
            x = tl.load(y_row + c, mask=valid, other=0.0)
            lp = tl.maximum(x - lse, log_clamp)
            if WRITE_LOGP:
                tl.store(l_row + c, lp, mask=valid)
            else:
                lq = tl.load(l_row + c, mask=valid, other=0.0)
                acc += tl.where(valid, tl.exp(lp) * (lp - lq), 0.0)
        if not WRITE_LOGP:
            tl.store(O_ptr + row, tl.sum(acc, axis=0))


def _launch(Y, L, out, write_logp: bool) -> None:
    M, R = Y.shape
    block = min(CONFIG["block"], max(16, triton.next_power_of_2(R)))
    _kl_rows_kernel[(M,)](Y, Y.stride(0), L, L.stride(0), out, R, LOG_CLAMP,
                          BLOCK=block, NB=triton.cdiv(R, block), WRITE_LOGP=write_logp,
                          num_warps=CONFIG["num_warps"])


def _check(Y, name: str) -> None:
    if Y.ndim != 2 or Y.dtype != torch.float32 or Y.stride(1) != 1:
        raise ValueError(f"{name} must be a row-contiguous (tokens, out) float32 matrix; got {tuple(Y.shape)} "
                         f"{Y.dtype} with strides {Y.stride()}.")


def log_p_torch(Y, out=None):
    """``max(Y - lse(Y), log 1e-6)`` per row in torch ops (``out`` may be ``Y``)."""
    lse = torch.logsumexp(Y, dim=-1, keepdim=True)
    out = torch.empty_like(Y) if out is None else out
    torch.sub(Y, lse, out=out)
    return out.clamp_min_(LOG_CLAMP)


def kl_rows_torch(Y, logP):
    """Per row ``sum_j exp(lp_j) (lp_j - logP_j)``, ``lp = max(Y - lse(Y), log 1e-6)``, in torch ops (fp32)."""
    lp = log_p_torch(Y)
    return (lp.exp() * (lp - logP)).sum(dim=-1)


#: Kernels that failed once in auto mode (``use_triton=None``): their torch ops run from then on.
_BROKEN: set = set()


def mark_broken(name: str) -> None:
    """Log a kernel failure once and use the torch ops for ``name`` from now on (auto mode)."""
    if name not in _BROKEN:
        _BROKEN.add(name)
        log.warning("Triton SliM %s kernel failed; using torch ops from now on", name, exc_info=True)


def _want(device, use_triton, name: str = "kl") -> bool:
    if use_triton is None:
        return triton_usable(device) and name not in _BROKEN
    return bool(use_triton)


def log_p(Y, out=None, use_triton: bool | None = None):
    """The clamped log-softmax rows of ``Y`` (float32, (tokens, out)); ``out=Y`` overwrites ``Y``."""
    _check(Y, "Y")
    out = torch.empty_like(Y) if out is None else out
    if _want(Y.device, use_triton):
        try:
            _launch(Y, out, out, True)
            return out
        except Exception:
            if use_triton:
                raise
            mark_broken("kl")
    return log_p_torch(Y, out=out)


def kl_rows(Y, logP, use_triton: bool | None = None):
    """(tokens,) float32 KL of every row of the trial output ``Y`` against the FP ``logP`` (see the module doc)."""
    _check(Y, "Y")
    _check(logP, "logP")
    if Y.shape != logP.shape:
        raise ValueError(f"Y {tuple(Y.shape)} and logP {tuple(logP.shape)} must have the same shape.")
    if _want(Y.device, use_triton):
        try:
            out = torch.empty(Y.shape[0], dtype=torch.float32, device=Y.device)
            _launch(Y, logP, out, False)
            return out
        except Exception:
            if use_triton:
                raise
            mark_broken("kl")
    return kl_rows_torch(Y, logP)


# ------------------------------------------------------------------------------------------------ SQC

#: SQC kernel: rows per program and warps (one warp: the row sums over the 128 columns are shuffles).
SQC_CONFIG = {"block_r": 2, "num_warps": 1}
#: Widest group the SQC kernel takes (the block is held in registers).
SQC_MAX_COLS = 128

if HAVE_TRITON:

    @triton.jit
    def _sqc_kernel(W_ptr, stride_wr, stride_wc, M_ptr, stride_mr, stride_mc, XMIN_ptr, XMAX_ptr, P_ptr,
                    S_ptr, Z_ptr, rows, ncols, maxq, zero_sym, lam, norm,
                    NP: tl.constexpr, SYM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        rmask = offs_r < rows
        mask2 = rmask[:, None] & (offs_c < ncols)[None, :]
        w = tl.load(W_ptr + offs_r[:, None] * stride_wr + offs_c[None, :] * stride_wc, mask=mask2, other=0.0)
        sal = tl.load(M_ptr + offs_r[:, None] * stride_mr + offs_c[None, :] * stride_mc, mask=mask2, other=0) != 0
        xmin = tl.load(XMIN_ptr + offs_r, mask=rmask, other=-1.0)
        xmax = tl.load(XMAX_ptr + offs_r, mask=rmask, other=1.0)
        best = tl.full((BLOCK_R,), float("inf"), W_ptr.dtype.element_ty)
        best_s = tl.zeros((BLOCK_R,), W_ptr.dtype.element_ty)
        best_z = tl.zeros((BLOCK_R,), W_ptr.dtype.element_ty)
        for i in range(NP):  # the range factors in the code's order; strict improvement = the first minimum
            p = tl.load(P_ptr + i)
            xmin1 = p * xmin
            xmax1 = p * xmax
            s = (xmax1 - xmin1) / maxq  # fp64: IEEE division
            if SYM:
                z = tl.zeros((BLOCK_R,), W_ptr.dtype.element_ty) + zero_sym
            else:
                z = _round_half_even(-xmin1 / s)
            code = tl.minimum(tl.maximum(_round_half_even(w / s[:, None]) + z[:, None], 0.0), maxq)
            a = tl.abs(s[:, None] * (code - z[:, None]) - w)
            e = tl.where(mask2 & (a > 0), tl.exp2(norm * tl.log2(a)), 0.0)  # |a|^2.4 (0 stays 0)
            err = tl.sum(tl.where(sal, 0.0, e), axis=1) + lam * tl.sum(tl.where(sal, e, 0.0), axis=1)
            better = err < best
            best = tl.where(better, err, best)
            best_s = tl.where(better, s, best_s)
            best_z = tl.where(better, z, best_z)
        tl.store(S_ptr + offs_r, best_s, mask=rmask)
        tl.store(Z_ptr + offs_r, best_z, mask=rmask)


def sqc_usable(w, use_triton=None) -> bool:
    """Whether :func:`sqc_search` takes this block (float64, at most ``SQC_MAX_COLS`` columns, Triton usable)."""
    if use_triton is False or w.dtype != torch.float64 or w.shape[1] > SQC_MAX_COLS:
        return False
    return bool(use_triton) or (triton_usable(w.device) and "sqc" not in _BROKEN)


def sqc_search(w, salient, xmin, xmax, factors, maxq: int, sym: bool, lam: float, norm: float):
    """SQC's range-factor search of one block in ONE launch: per row the first factor with the smallest
    ``sum_nonsalient |Q(w) - w|^norm + lam * sum_salient |Q(w) - w|^norm``; returns ``(scale, zero)``.

    ``w`` (rows, n <= 128) float64; ``salient`` (rows, n) bool; ``xmin``/``xmax`` (rows,) the base range
    (dead rows already -1 / 1); ``factors`` (n_factors,) float64 on w's device. Float64 throughout;
    ``|a|^norm`` is ``exp2(norm log2 a)`` (the torch path: ``pow``), so the errors agree to a few ulp, not
    bit for bit: a near-tie between two factors may resolve differently.
    """
    rows, n = w.shape
    scale = torch.empty(rows, dtype=w.dtype, device=w.device)
    zero = torch.empty(rows, dtype=w.dtype, device=w.device)
    sal = salient.to(torch.uint8)
    block_r = SQC_CONFIG["block_r"]
    _sqc_kernel[(triton.cdiv(rows, block_r),)](
        w, w.stride(0), w.stride(1), sal, sal.stride(0), sal.stride(1), xmin.contiguous(), xmax.contiguous(),
        factors, scale, zero, rows, n, float(maxq), (maxq + 1) / 2, float(lam), float(norm),
        NP=int(factors.shape[0]), SYM=bool(sym), BLOCK_R=block_r, BLOCK_C=max(16, triton.next_power_of_2(n)),
        num_warps=SQC_CONFIG["num_warps"], enable_fp_fusion=False)
    return scale, zero


# ------------------------------------------------------------------------------------------------ 1-bit groups

#: Binarizer block kernel: rows per program and warps (as the GPTQ block kernel: one warp, shuffles only).
BINARY_CONFIG = {"block_r": 4, "num_warps": 1}

if HAVE_TRITON:

    @triton.jit
    def _binary_block_kernel(W_ptr, stride_wr, stride_wc, U_ptr, stride_ur, stride_uc, S_ptr, Z_ptr,
                             Q_ptr, stride_qr, stride_qc, E_ptr, stride_er, stride_ec, rows, ncols,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr):
        pid = tl.program_id(0)
        offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        rmask = offs_r < rows
        cmask = offs_c < ncols
        mask2 = rmask[:, None] & cmask[None, :]
        tile = tl.load(W_ptr + offs_r[:, None] * stride_wr + offs_c[None, :] * stride_wc, mask=mask2, other=0.0)
        scale = tl.load(S_ptr + offs_r, mask=rmask, other=0.0)
        zero = tl.load(Z_ptr + offs_r, mask=rmask, other=0.0)
        err_tile = tl.zeros((BLOCK_R, BLOCK_C), dtype=W_ptr.dtype.element_ty)
        code_tile = tl.zeros((BLOCK_R, BLOCK_C), dtype=W_ptr.dtype.element_ty)
        for i in range(BLOCK_C):
            active = i < ncols
            sel = (offs_c == i)[None, :]
            w = tl.sum(tl.where(sel, tile, 0.0), axis=1)  # exact: x + 0 + ... + 0
            x = w - zero
            sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            q = sign * scale + zero
            d = tl.load(U_ptr + i * stride_ur + i * stride_uc, mask=active, other=1.0)
            e = _div_rn(w - q, d, FP64)
            u = tl.load(U_ptr + i * stride_ur + offs_c[None, :] * stride_uc, mask=cmask[None, :] & active, other=0.0)
            tile = tile - e[:, None] * u  # U is upper triangular: columns left of i are unchanged
            err_tile = tl.where(sel, e[:, None], err_tile)
            code_tile = tl.where(sel, (sign + 1.0)[:, None], code_tile)
        tl.store(E_ptr + offs_r[:, None] * stride_er + offs_c[None, :] * stride_ec, err_tile, mask=mask2)
        tl.store(Q_ptr + offs_r[:, None] * stride_qr + offs_c[None, :] * stride_qc, code_tile.to(tl.uint8), mask=mask2)


def binary_block_usable(W1, use_triton=None) -> bool:
    """Whether :func:`binary_block_triton` takes this block (at most 128 columns, Triton usable)."""
    if use_triton is False or W1.shape[1] > SQC_MAX_COLS or W1.dtype not in (torch.float32, torch.float64):
        return False
    return bool(use_triton) or (triton_usable(W1.device) and "binary" not in _BROKEN)


def binary_block_triton(W1, U1, scale, zero, codes_out, err_out) -> None:
    """SliM-LLM's 1-bit group (``sign(w - zero) * scale + zero`` with GPTQ's error feedback inside the
    block) as ONE launch; bitwise equal to the torch column loop (IEEE division, no FMA contraction)."""
    rows, n = W1.shape
    block_r = BINARY_CONFIG["block_r"]
    scale, zero = scale.contiguous(), zero.contiguous()
    _binary_block_kernel[(triton.cdiv(rows, block_r),)](
        W1, W1.stride(0), W1.stride(1), U1, U1.stride(0), U1.stride(1), scale, zero,
        codes_out, codes_out.stride(0), codes_out.stride(1), err_out, err_out.stride(0), err_out.stride(1),
        rows, n, BLOCK_R=block_r, BLOCK_C=max(16, triton.next_power_of_2(n)), FP64=W1.dtype == torch.float64,
        num_warps=BINARY_CONFIG["num_warps"], enable_fp_fusion=False)

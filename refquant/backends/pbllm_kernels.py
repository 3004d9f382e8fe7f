"""PB-LLM's intra-block column loop: one Triton kernel launch per block, and the same math in torch ops.

PB-LLM's update (:func:`refquant.spec.pbllm.pbllm`, step 5) is GPTQ's block loop with a per-weight
choice between two quantizers fixed before the updates: the salient weights' asymmetric per-row grid
``(s, z, maxq)`` and the XNOR binarizer ``alpha_g sign0(w - mean_g) + mean_g`` with per (row, column
group) statistics. For a block of ``n <= blocksize`` columns ``[i1, i2)`` (``W1`` = the block of W,
``U1 = U[i1:i2, i1:i2]``, ``B`` = the binarized mask, ``g`` = the group of column ``i``), for
``i = 0 .. n-1``::

    code = clamp(round(W1[:, i] / s) + z, 0, maxq)        # s, z: per row
    qh   = s * (code - z)
    sg   = sign(W1[:, i] - mean[:, g])                    # -1, 0, +1
    ql   = sg * alpha[:, g] + mean[:, g]
    q    = where(B[:, i], ql, qh)
    err  = (W1[:, i] - q) / U1[i, i]
    W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
    Err1[:, i] = err;  codes[:, i] = where(B[:, i], 0, code);  signs[:, i] = where(B[:, i], sg, 0)

This is, op for op, the loop the torch twin (``refquant/backends/torch_binarization.py``) ran per
column before this kernel existed; :func:`block_update_torch` keeps it as the CPU/CI path.
:func:`block_update_triton` runs it as ONE launch per block, built like GPTQ's kernel
(:mod:`refquant.backends.gptq_kernels`, whose ``@triton.jit`` helpers it imports): one program per
tile of ``BLOCK_R`` rows holding its ``[BLOCK_R, BLOCK_C]`` block in registers (W's dtype: float64
up to 16384 columns, see :func:`~refquant.backends.torch_quant.work_dtype`), the column read with a
masked row sum, the rank-1 update applied to the whole tile (``U1`` is exactly zero below its
diagonal), IEEE division (``div_rn``), no FMA contraction (``enable_fp_fusion=False``) and
round-half-to-even from ``floor``. ``sign`` is ``(x > 0) - (x < 0)``, torch's own definition (so
``sign(-0.0) = +0``). Bitwise equal to :func:`block_update_torch` on the same device (tested in the
interpreter on the CPU and, with ``pytest -m gpu``, on CUDA): the codes and signs exactly, ``Err1``
up to the sign of zeros (``-0.0`` read out of the tile comes back ``+0.0``; equal under ``==``).

The per-row ``s, z`` are loaded once per program; ``mean, alpha`` per column from the column's group
(``gidx``); the mask column per column (a byte per row) and once more as a tile for the outputs.
The codes (uint8) and signs (int8) are written straight into the caller's matrices; the lazy update
of the later columns stays a cuBLAS matmul in the caller. Nothing in a launch reads back to the
host (no synchronization per block).
"""
from __future__ import annotations

import logging

import torch

from .gptq_kernels import HAVE_TRITON, MAX_BLOCK_C, interpreting, launch_config, triton_usable

log = logging.getLogger("refquant")

#: Overrides of the launch configuration (None: GPTQ's heuristic, :func:`~.gptq_kernels.launch_config`).
#: At BLOCK_R 4 the float64 kernel takes 234 registers per thread on sm_90 (GPTQ's: 182), no spills.
CONFIG = {"block_r": None, "num_warps": None}

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gptq_kernels import _div_rn, _round_half_even
else:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["block_update", "block_update_torch", "block_update_triton", "interpreting", "triton_usable",
           "MAX_BLOCK_C"]


if HAVE_TRITON:

    @triton.jit
    def _pbllm_block_kernel(
        W_ptr, stride_wr, stride_wc,          # block of W (rows, ncols), fp32 or fp64, read only
        U_ptr, stride_ur, stride_uc,          # U[i1:i2, i1:i2], upper triangular
        S_ptr, Z_ptr, stride_s,               # per-row grid params (rows,), W's dtype
        MU_ptr, AL_ptr, stride_mr, stride_mg, # binarizer mean / alpha (rows, n_groups), W's dtype
        G_ptr,                                # group of each block column, int64 (ncols,)
        B_ptr, stride_br, stride_bc,          # binarized mask, uint8 view (rows, ncols)
        Q_ptr, stride_qr, stride_qc,          # codes out, uint8 (rows, ncols) view
        SG_ptr, stride_gr, stride_gc,         # signs out, int8 (rows, ncols) view
        E_ptr, stride_er, stride_ec,          # Err1 out, W's dtype (rows, ncols)
        rows, ncols, maxq,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        rmask = offs_r < rows
        cmask = offs_c < ncols
        mask2 = rmask[:, None] & cmask[None, :]

        tile = tl.load(W_ptr + offs_r[:, None] * stride_wr + offs_c[None, :] * stride_wc, mask=mask2, other=0.0)
        s = tl.load(S_ptr + offs_r * stride_s, mask=rmask, other=1.0)
        z = tl.load(Z_ptr + offs_r * stride_s, mask=rmask, other=0.0)
        err_tile = tl.zeros((BLOCK_R, BLOCK_C), dtype=W_ptr.dtype.element_ty)
        out_tile = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # code (0..255) or sign (-1, 0, 1): exact
        for i in range(BLOCK_C):
            active = i < ncols
            sel = (offs_c == i)[None, :]
            w = tl.sum(tl.where(sel, tile, 0.0), axis=1)
            g = tl.load(G_ptr + i, mask=active, other=0)
            mu = tl.load(MU_ptr + offs_r * stride_mr + g * stride_mg, mask=rmask & active, other=0.0)
            al = tl.load(AL_ptr + offs_r * stride_mr + g * stride_mg, mask=rmask & active, other=0.0)
            low = tl.load(B_ptr + offs_r * stride_br + i * stride_bc, mask=rmask & active, other=0) != 0
            code = _round_half_even(_div_rn(w, s, FP64)) + z
            code = tl.minimum(tl.maximum(code, 0.0), maxq)
            qh = s * (code - z)
            x = w - mu
            sg = tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)  # torch.sign: (x > 0) - (x < 0)
            ql = sg * al + mu
            q = tl.where(low, ql, qh)
            d = tl.load(U_ptr + i * stride_ur + i * stride_uc, mask=active, other=1.0)
            e = _div_rn(w - q, d, FP64)
            u = tl.load(U_ptr + i * stride_ur + offs_c[None, :] * stride_uc, mask=cmask[None, :] & active, other=0.0)
            tile = tile - e[:, None] * u
            err_tile = tl.where(sel, e[:, None], err_tile)
            out_tile = tl.where(sel, tl.where(low, sg, code.to(tl.float32))[:, None], out_tile)

        lowt = tl.load(B_ptr + offs_r[:, None] * stride_br + offs_c[None, :] * stride_bc, mask=mask2, other=0) != 0
        tl.store(E_ptr + offs_r[:, None] * stride_er + offs_c[None, :] * stride_ec, err_tile, mask=mask2)
        tl.store(Q_ptr + offs_r[:, None] * stride_qr + offs_c[None, :] * stride_qc,
                 tl.where(lowt, 0.0, out_tile).to(tl.uint8), mask=mask2)
        tl.store(SG_ptr + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc,
                 tl.where(lowt, out_tile, 0.0).to(tl.int8), mask=mask2)


def _check(Wb, Ub, s, z, mean, alpha, gidx, low, codes_out, signs_out, err_out) -> None:
    rows, ncols = Wb.shape
    want = {"Ub": (Ub, (ncols, ncols)), "s": (s, (rows,)), "z": (z, (rows,)), "gidx": (gidx, (ncols,)),
            "low": (low, (rows, ncols)), "codes_out": (codes_out, (rows, ncols)),
            "signs_out": (signs_out, (rows, ncols)), "err_out": (err_out, (rows, ncols))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"pbllm block: {name} has shape {tuple(t.shape)}, expected {shape} for a "
                             f"{rows}x{ncols} block.")
    if mean.shape != alpha.shape or mean.ndim != 2 or mean.shape[0] != rows:
        raise ValueError(f"pbllm block: mean {tuple(mean.shape)} and alpha {tuple(alpha.shape)} must both be "
                         f"(rows={rows}, n_groups).")
    if mean.stride() != alpha.stride():
        raise ValueError(f"pbllm block: mean and alpha must have the same strides (got {mean.stride()} and "
                         f"{alpha.stride()}); pass contiguous tensors.")
    if codes_out.dtype != torch.uint8 or signs_out.dtype != torch.int8 or err_out.dtype != Wb.dtype:
        raise ValueError(f"pbllm block: outputs must be uint8 codes, int8 signs and err in W's dtype {Wb.dtype}; "
                         f"got {codes_out.dtype}, {signs_out.dtype}, {err_out.dtype}.")


def _as_bytes(low):
    return low.view(torch.uint8) if low.dtype == torch.bool else low


def block_update_triton(Wb, Ub, s, z, mean, alpha, gidx, low, maxq: int, codes_out, signs_out, err_out) -> None:
    """The block loop as one Triton launch (see module doc)."""
    _check(Wb, Ub, s, z, mean, alpha, gidx, low, codes_out, signs_out, err_out)
    rows, ncols = Wb.shape
    block_c = max(16, triton.next_power_of_2(ncols))
    block_r, num_warps = launch_config(rows, block_c)
    block_r, num_warps = CONFIG["block_r"] or block_r, CONFIG["num_warps"] or num_warps
    lb = _as_bytes(low)
    grid = (triton.cdiv(rows, block_r),)
    _pbllm_block_kernel[grid](
        Wb, Wb.stride(0), Wb.stride(1),
        Ub, Ub.stride(0), Ub.stride(1),
        s, z, s.stride(0),
        mean, alpha, mean.stride(0), mean.stride(1),
        gidx,
        lb, lb.stride(0), lb.stride(1),
        codes_out, codes_out.stride(0), codes_out.stride(1),
        signs_out, signs_out.stride(0), signs_out.stride(1),
        err_out, err_out.stride(0), err_out.stride(1),
        rows, ncols, float(maxq),
        BLOCK_R=block_r, BLOCK_C=block_c, FP64=Wb.dtype == torch.float64, num_warps=num_warps,
        enable_fp_fusion=False,
    )


def block_update_torch(Wb, Ub, s, z, mean, alpha, gidx, low, maxq: int, codes_out, signs_out, err_out) -> None:
    """The block loop in plain torch ops, W's dtype (the CPU/CI path; see the module doc).

    ``mean, alpha`` must have the same strides (the kernel reads both with one pair of strides).
    """
    _check(Wb, Ub, s, z, mean, alpha, gidx, low, codes_out, signs_out, err_out)
    rows, n = Wb.shape
    W1 = Wb.clone()
    C = torch.empty((rows, n), dtype=Wb.dtype, device=Wb.device)
    G = torch.empty((rows, n), dtype=Wb.dtype, device=Wb.device)
    groups = gidx.tolist()  # the CPU path: no device sync
    low = low if low.dtype == torch.bool else low != 0
    for i in range(n):
        g = groups[i]
        w = W1[:, i]
        code = torch.clamp(torch.round(w / s) + z, 0, maxq)
        qh = s * (code - z)
        sg = torch.sign(w - mean[:, g])
        ql = sg * alpha[:, g] + mean[:, g]
        q = torch.where(low[:, i], ql, qh)
        e = (w - q) / Ub[i, i]
        W1[:, i:] -= e[:, None] * Ub[i, i:][None, :]
        err_out[:, i] = e
        C[:, i] = code
        G[:, i] = sg
    codes_out.copy_(torch.where(low, torch.zeros_like(C), C).to(torch.uint8))
    signs_out.copy_(torch.where(low, G, torch.zeros_like(G)).to(torch.int8))


_TRITON_BROKEN = False


def block_update(Wb, Ub, s, z, mean, alpha, gidx, low, maxq: int, codes_out, signs_out, err_out,
                 use_triton: bool | None = None) -> None:
    """Quantize one PB-LLM block: Triton when usable (``use_triton=None``: auto), else torch ops.

    Args:
        Wb: (rows, ncols) view of W's block (read only), float32 or float64.
        Ub: (ncols, ncols) view of ``U[i1:i2, i1:i2]``, W's dtype, exactly zero below the diagonal.
        s, z: (rows,) the salient grid's per-row scale and zero (W's dtype).
        mean, alpha: (rows, n_groups) the binarizer's statistics (W's dtype, equal strides).
        gidx: (ncols,) int64 group of each block column (on W's device).
        low: (rows, ncols) bool (or uint8) binarized mask of the block.
        codes_out, signs_out: (rows, ncols) uint8 / int8 views to write into (0 where not used).
        err_out: (rows, ncols) buffer for ``Err1`` (W's dtype).
    In auto mode a Triton failure is logged once and the torch path is used from then on.
    """
    global _TRITON_BROKEN
    want = triton_usable(Wb.device) and Wb.shape[1] <= MAX_BLOCK_C if use_triton is None else use_triton
    if want and not (use_triton is None and _TRITON_BROKEN):
        try:
            return block_update_triton(Wb, Ub, s, z, mean, alpha, gidx, low, maxq, codes_out, signs_out, err_out)
        except Exception:
            if use_triton:
                raise
            _TRITON_BROKEN = True
            log.warning("Triton PB-LLM block kernel failed; using the torch fallback from now on", exc_info=True)
    return block_update_torch(Wb, Ub, s, z, mean, alpha, gidx, low, maxq, codes_out, signs_out, err_out)

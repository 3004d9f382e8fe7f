"""GPTQ's intra-block column loop: one Triton kernel launch per block, and the same math in torch ops.

For a block of ``n <= blocksize`` columns ``[i1, i2)`` (processing order) GPTQ does, for
``i = 0 .. n-1`` (``W1`` = the block of W, ``U1 = U[i1:i2, i1:i2]``)::

    code = clamp(round(W1[:, i] / s) + z, 0, maxq)        # s, z: params of column i's group
    q    = s * (code - z)
    err  = (W1[:, i] - q) / U1[i, i]
    W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
    Err1[:, i] = err

Rows are independent, so :func:`block_update` launches one Triton program per tile of ``BLOCK_R``
rows; the program holds its ``[BLOCK_R, BLOCK_C]`` fp32 block in registers and loops over the
columns (float32 or float64: the tiles take W's dtype). Because ``U1`` is upper triangular, ``err * U1[i, :]`` is exactly zero left of column i,
so the kernel updates the whole tile (no dynamic slicing) without changing any earlier column.
Outputs: the codes (uint8, written straight into the caller's code matrix) and ``Err1`` (fp32);
the lazy update of the later columns stays a cuBLAS matmul in the caller.

Bitwise equal to :func:`block_update_torch` (the CPU/CI path) on the same device:

* division is IEEE round-to-nearest (``tl.math.div_rn``; Triton's ``/`` is approximate);
* FMA contraction is off (``enable_fp_fusion=False``), so ``w - s*(c - z)`` and
  ``tile - err*u`` round after the product, as separate torch ops do;
* round-half-to-even is computed from ``floor`` (exact for every float32; see
  :func:`_round_half_even`), since libdevice's ``rint`` is unavailable in the interpreter;
* the column is extracted with a masked row sum (``x + 0 + ... + 0 == x`` exactly).

The kernel loops over the constexpr ``BLOCK_C`` (padded columns are masked and contribute
nothing): Triton's interpreter cannot take a runtime loop bound with NumPy >= 2.4.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("refquant")

try:  # Triton is optional: without it (or without CUDA) the torch fallback runs.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAVE_TRITON = False

#: Largest padded block width the kernel takes; wider blocks use the torch path (register budget).
MAX_BLOCK_C = 256

#: Overrides of the launch configuration (None = heuristic); the lead tunes these with
#: ``benchmark_gptq`` of ``tools/bench_gptq.py``.
CONFIG = {"block_r": None, "num_warps": None}


def interpreting() -> bool:
    """True when Triton runs kernels in interpreter mode (``TRITON_INTERPRET=1`` at import)."""
    return HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Whether :func:`block_update` can launch the Triton kernel for tensors on ``device``."""
    if not HAVE_TRITON:
        return False
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"


if HAVE_TRITON:

    @triton.jit
    def _round_half_even(x):
        # f = floor(x) and x - f are exact for every float32 x (Sterbenz for |x| >= 1; for x in
        # (-1, 0) the only rounding of x + 1 can produce 0.5 or 1.0 where the answer is still 0).
        f = tl.math.floor(x)
        frac = x - f
        odd = f - 2.0 * tl.math.floor(f * 0.5)  # 1.0 when f is odd, else 0.0
        return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + odd))

    @triton.jit
    def _div_rn(a, b, FP64: tl.constexpr):
        # IEEE round-to-nearest division: div_rn for fp32 (Triton's "/" is approximate there);
        # fp64 division is always IEEE (div.rn.f64)
        if FP64:
            return a / b
        else:
            return tl.math.div_rn(a, b)

    @triton.jit
    def _gptq_block_kernel(
        W_ptr, stride_wr, stride_wc,          # block of W, (rows, ncols) fp32 or fp64, read only
        U_ptr, stride_ur, stride_uc,          # U[i1:i2, i1:i2], upper triangular
        S_ptr, Z_ptr, stride_sr, stride_sg,   # group params (rows, n_groups), W's dtype
        G_ptr,                                # group of each block column, int64 (ncols,)
        Q_ptr, stride_qr, stride_qc,          # codes out, uint8 (rows, ncols) view
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
        err_tile = tl.zeros((BLOCK_R, BLOCK_C), dtype=W_ptr.dtype.element_ty)  # fp32 or fp64, as W
        code_tile = tl.zeros((BLOCK_R, BLOCK_C), dtype=W_ptr.dtype.element_ty)
        for i in range(BLOCK_C):
            active = i < ncols
            sel = (offs_c == i)[None, :]
            w = tl.sum(tl.where(sel, tile, 0.0), axis=1)
            g = tl.load(G_ptr + i, mask=active, other=0)
            s = tl.load(S_ptr + offs_r * stride_sr + g * stride_sg, mask=rmask & active, other=1.0)
            z = tl.load(Z_ptr + offs_r * stride_sr + g * stride_sg, mask=rmask & active, other=0.0)
            code = _round_half_even(_div_rn(w, s, FP64)) + z
            code = tl.minimum(tl.maximum(code, 0.0), maxq)
            q = s * (code - z)
            d = tl.load(U_ptr + i * stride_ur + i * stride_uc, mask=active, other=1.0)
            e = _div_rn(w - q, d, FP64)
            u = tl.load(U_ptr + i * stride_ur + offs_c[None, :] * stride_uc, mask=cmask[None, :] & active, other=0.0)
            tile = tile - e[:, None] * u  # u is [1, BLOCK_C] in the tile's layout (no conversion)
            err_tile = tl.where(sel, e[:, None], err_tile)
            code_tile = tl.where(sel, code[:, None], code_tile)

        tl.store(E_ptr + offs_r[:, None] * stride_er + offs_c[None, :] * stride_ec, err_tile, mask=mask2)
        tl.store(Q_ptr + offs_r[:, None] * stride_qr + offs_c[None, :] * stride_qc, code_tile.to(tl.uint8), mask=mask2)


def launch_config(rows: int, block_c: int) -> tuple[int, int]:
    """``(BLOCK_R, num_warps)`` of a launch.

    One warp per program: Triton lays a ``[BLOCK_R, BLOCK_C]`` tile out with the warps along the
    columns (the runtime column mask prevents vectorised loads), so with several warps every
    column's row sum would cross warps (shared memory + barriers, 128 times per block). With one
    warp the sums are shuffles only (checked in the sm_90 PTX: no bar.sync, no shared memory).
    ``BLOCK_R`` 4 (2 for blocks wider than 128 columns) keeps ~100 registers per thread (sm_90
    ptxas, no spills); it is halved while there are fewer than 264 programs (2 per H200 SM).
    """
    block_r = CONFIG["block_r"] or (4 if block_c <= 128 else 2)
    if CONFIG["block_r"] is None:
        while block_r > 1 and -(-rows // block_r) < 264:
            block_r //= 2
    num_warps = CONFIG["num_warps"] or 1
    return block_r, num_warps


def block_update_triton(Wb, Ub, S, Z, gidx, maxq: int, codes_out, err_out) -> None:
    """The block loop as one Triton launch (see module doc). ``err_out`` must be (rows, ncols) fp32."""
    rows, ncols = Wb.shape
    block_c = max(16, triton.next_power_of_2(ncols))
    block_r, num_warps = launch_config(rows, block_c)
    grid = (triton.cdiv(rows, block_r),)
    _gptq_block_kernel[grid](
        Wb, Wb.stride(0), Wb.stride(1),
        Ub, Ub.stride(0), Ub.stride(1),
        S, Z, S.stride(0), S.stride(1),
        gidx,
        codes_out, codes_out.stride(0), codes_out.stride(1),
        err_out, err_out.stride(0), err_out.stride(1),
        rows, ncols, float(maxq),
        BLOCK_R=block_r, BLOCK_C=block_c, FP64=Wb.dtype == torch.float64, num_warps=num_warps,
        enable_fp_fusion=False,
    )


def block_update_torch(Wb, Ub, S, Z, gidx, maxq: int, codes_out, err_out) -> None:
    """The block loop in plain torch ops: the reference's arithmetic in W's dtype (CPU/CI path)."""
    W1 = Wb.clone()
    groups = gidx.tolist()
    for i in range(W1.shape[1]):
        g = groups[i]
        w = W1[:, i]
        s, z = S[:, g], Z[:, g]
        code = torch.clamp(torch.round(w / s) + z, 0, maxq)
        q = s * (code - z)
        err = (w - q) / Ub[i, i]
        W1[:, i:] -= err[:, None] * Ub[i, i:][None, :]
        err_out[:, i] = err
        codes_out[:, i] = code.to(torch.uint8)


_TRITON_BROKEN = False


def block_update(Wb, Ub, S, Z, gidx, maxq: int, codes_out, err_out, use_triton: bool | None = None) -> None:
    """Quantize one block: Triton when usable (``use_triton=None``: auto), else torch ops.

    Args:
        Wb: (rows, ncols) view of W's block (read only), float32 or float64.
        Ub: (ncols, ncols) view of ``U[i1:i2, i1:i2]``, W's dtype.
        S, Z: (rows, n_groups) group parameters (W's dtype); ``gidx`` (ncols,) int64 group of each column.
        codes_out: (rows, ncols) uint8 view to write the codes into.
        err_out: (rows, ncols) buffer for ``Err1`` (W's dtype).
    In auto mode a Triton failure is logged once and the torch path is used from then on.
    """
    global _TRITON_BROKEN
    want = triton_usable(Wb.device) and Wb.shape[1] <= MAX_BLOCK_C if use_triton is None else use_triton
    if want and not (use_triton is None and _TRITON_BROKEN):
        try:
            return block_update_triton(Wb, Ub, S, Z, gidx, maxq, codes_out, err_out)
        except Exception:
            if use_triton:
                raise
            _TRITON_BROKEN = True
            log.warning("Triton GPTQ block kernel failed; using the torch fallback from now on", exc_info=True)
    return block_update_torch(Wb, Ub, S, Z, gidx, maxq, codes_out, err_out)

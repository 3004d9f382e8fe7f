"""LDLQ's intra-block column loop (QuIP): one Triton kernel launch per block, and the same math in torch ops.

LDLQ (``round_ldl`` of Cornell-RelaxML/QuIP ``vector_balance.py``; :func:`refquant.spec.quip.ldlq`) is GPTQ's
block loop with the strictly lower LDL factor ``L`` in place of GPTQ's ``U`` and QuIP's incoherent grid in
place of GPTQ's round-half-even one. :func:`refquant.backends.torch_quip.ldlq_batched` keeps, for a batch of
``n`` matrices, the accumulated coordinates ``A`` (``A_j = w_j + sum_{i>j} (w_i - w_hat_i) L_ij``) as an
``(n, d, rows)`` buffer (a column is contiguous). For a block of columns ``[i1, i2)`` (``b = i2 - i1``,
``A1 = A[:, i1:i2]``, ``W1`` the clamped grid coordinates, ``L1 = L[:, i1:i2, i1:i2]``) the block loop is,
for ``k = b-1 .. 0`` (last column first)::

    code = clamp(floor(A1[:, k] + 0.5), 0, maxq)
    err  = W1[:, k] - code
    A1[:, j] += L1[k, j] * err          for every j < k   (the product rounded, then the sum)
    Codes1[:, k] = code;  Err1[:, k] = err

and the caller feeds ``Err1`` back to the earlier columns as one matmul. Rows are independent, so
:func:`ldlq_block_triton` launches one program per tile of ``BLOCK_R`` rows of one matrix (a host-built
table maps program -> (matrix, first row), so the zero rows that pad small matrices in a batch cost
nothing); the program keeps its ``[BLOCK_R, BLOCK_C]`` tile of ``A1`` in registers and loops over the
columns. ``L1``'s strictly lower part is selected with an explicit ``j < k`` mask (``C / diag(C) - I`` need
not have an exactly zero diagonal), so a column is never touched after it is rounded and its final tile
value *is* the ``A1[:, k]`` it was rounded from: codes and errors are formed from the tile once, after the
loop (the same elementwise operations on the same values as inside it).

Bitwise equal to :func:`ldlq_block_torch` (the CPU/CI path) on the same device:

* FMA contraction is off (``enable_fp_fusion=False``): ``A + L * err`` rounds the product, then the sum, as
  the two torch ops of the fallback do. (The earlier ``addcmul_`` was contracted to an FMA by PyTorch's CPU
  kernel -- measured -- and Triton's interpreter cannot express an FMA, so both now round the product.)
* there is no division; ``floor``, ``min``/``max`` and ``+ 0.5`` are exact/IEEE everywhere;
* the column is extracted with a masked row sum (``x + 0 + ... + 0 == x``; a ``-0.0`` may come out as
  ``+0.0``, which rounds to the same code and leaves the error unchanged).

Reuses :mod:`refquant.backends.gptq_kernels`' Triton detection (``HAVE_TRITON``, ``interpreting``,
``triton_usable``). The kernel loops over the constexpr ``BLOCK_C`` (Triton's interpreter cannot take a
runtime loop bound with NumPy >= 2.4); padded columns are masked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .gptq_kernels import HAVE_TRITON, interpreting, triton_usable

log = logging.getLogger("refquant")

if HAVE_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["ldlq_block", "ldlq_block_torch", "ldlq_block_triton", "launch_plan", "LaunchPlan", "launch_config",
           "use_kernel", "interpreting", "triton_usable", "MAX_BLOCK_C", "CONFIG"]

#: Largest padded block width the kernel takes; wider blocks use the torch path (register budget).
MAX_BLOCK_C = 256

#: Overrides of the launch configuration (None = heuristic).
CONFIG = {"block_r": None, "num_warps": None}


if HAVE_TRITON:

    @triton.jit
    def _ldlq_block_kernel(
        A_ptr, stride_ab, stride_ac, stride_ar,   # A1 (n, ncols, rows): accumulated coordinates, read only
        W_ptr, stride_wb, stride_wc, stride_wr,   # W1 (n, ncols, rows): clamped grid coordinates
        L_ptr, stride_lb, stride_lk, stride_lj,   # L1 (n, ncols, ncols): strictly lower LDL factor block
        Q_ptr, stride_qb, stride_qc, stride_qr,   # codes out (n, ncols, rows), A's dtype
        E_ptr, stride_eb, stride_ec, stride_er,   # Err1 out (n, ncols, rows), A's dtype
        TB_ptr, TR_ptr, NR_ptr,                   # per program: matrix, first row (int32); rows per matrix (int32)
        ncols, maxq,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        mat = tl.load(TB_ptr + pid).to(tl.int64)
        row0 = tl.load(TR_ptr + pid).to(tl.int64)
        nrows = tl.load(NR_ptr + mat)
        offs_r = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        rmask = offs_r < nrows
        cmask = offs_c < ncols
        mask2 = rmask[:, None] & cmask[None, :]

        tile = tl.load(A_ptr + mat * stride_ab + offs_c[None, :] * stride_ac + offs_r[:, None] * stride_ar,
                       mask=mask2, other=0.0)
        w_base = W_ptr + mat * stride_wb + offs_r * stride_wr
        l_base = L_ptr + mat * stride_lb
        for i in range(BLOCK_C):
            k = ncols - 1 - i                      # the column rounded now: last first
            active = k >= 0
            a = tl.sum(tl.where((offs_c == k)[None, :], tile, 0.0), axis=1)
            code = tl.minimum(tl.maximum(tl.math.floor(a + 0.5), 0.0), maxq)
            w = tl.load(w_base + k * stride_wc, mask=rmask & active, other=0.0)
            e = w - code
            earlier = (offs_c < k)[None, :]        # strictly lower: only the columns left of k
            # L1[k, :] loaded as [1, BLOCK_C], in the tile's layout (a 1-D load would be converted via shared memory)
            lrow = tl.load(l_base + k * stride_lk + offs_c[None, :] * stride_lj, mask=earlier, other=0.0)
            tile = tl.where(earlier, tile + e[:, None] * lrow, tile)

        # column k was last changed before it was rounded: the tile holds every A1[:, k] that was rounded
        codes = tl.minimum(tl.maximum(tl.math.floor(tile + 0.5), 0.0), maxq)
        wt = tl.load(W_ptr + mat * stride_wb + offs_c[None, :] * stride_wc + offs_r[:, None] * stride_wr,
                     mask=mask2, other=0.0)
        errs = wt - codes
        tl.store(Q_ptr + mat * stride_qb + offs_c[None, :] * stride_qc + offs_r[:, None] * stride_qr, codes,
                 mask=mask2)
        tl.store(E_ptr + mat * stride_eb + offs_c[None, :] * stride_ec + offs_r[:, None] * stride_er, errs,
                 mask=mask2)


def launch_config(rows_total: int, block_c: int) -> tuple[int, int]:
    """``(BLOCK_R, num_warps)``: GPTQ's choice (:func:`refquant.backends.gptq_kernels.launch_config`, one warp per
    program so the column extraction is warp shuffles only), with ``rows_total`` the rows of all matrices."""
    block_r = CONFIG["block_r"] or (4 if block_c <= 128 else 2)
    if CONFIG["block_r"] is None:
        while block_r > 1 and -(-rows_total // block_r) < 264:
            block_r //= 2
    return block_r, CONFIG["num_warps"] or 1


@dataclass(frozen=True)
class LaunchPlan:
    """The programs of a batch: program ``p`` rounds rows ``row0[p] .. row0[p] + block_r - 1`` of matrix
    ``mat[p]`` (int32 device tensors built once on the host from known sizes: no device sync); ``rows[j]``
    is the number of valid rows of matrix ``j``."""

    mat: torch.Tensor
    row0: torch.Tensor
    rows: torch.Tensor
    block_r: int
    num_warps: int


def launch_plan(rows: list[int], blocksize: int, device) -> LaunchPlan:
    """The :class:`LaunchPlan` of a batch with ``rows[j]`` valid rows in matrix ``j`` (blocks of <= ``blocksize``
    columns)."""
    rows = [int(r) for r in rows]
    block_r, num_warps = launch_config(sum(rows), max(16, triton.next_power_of_2(int(blocksize))))
    mats, starts = [], []
    for j, r in enumerate(rows):
        for s in range(0, r, block_r):
            mats.append(j)
            starts.append(s)

    def dev(v):
        return torch.tensor(v, dtype=torch.int32).to(device)

    return LaunchPlan(dev(mats), dev(starts), dev(rows), block_r, num_warps)


def ldlq_block_triton(A1, W1, L1, maxq: int, codes_out, err_out, plan: LaunchPlan) -> None:
    """The block loop as one Triton launch (see module doc)."""
    n, ncols, rows = A1.shape
    if int(plan.mat.shape[0]) == 0:  # no valid rows at all
        return
    block_c = max(16, triton.next_power_of_2(ncols))
    _ldlq_block_kernel[(int(plan.mat.shape[0]),)](
        A1, A1.stride(0), A1.stride(1), A1.stride(2),
        W1, W1.stride(0), W1.stride(1), W1.stride(2),
        L1, L1.stride(0), L1.stride(1), L1.stride(2),
        codes_out, codes_out.stride(0), codes_out.stride(1), codes_out.stride(2),
        err_out, err_out.stride(0), err_out.stride(1), err_out.stride(2),
        plan.mat, plan.row0, plan.rows,
        ncols, float(maxq),
        BLOCK_R=plan.block_r, BLOCK_C=block_c, num_warps=plan.num_warps,
        enable_fp_fusion=False,
    )


def ldlq_block_torch(A1, W1, L1, maxq: int, codes_out, err_out) -> None:
    """The block loop in plain torch ops (CPU/CI path), column by column; ``A1`` is used as scratch."""
    for k in range(A1.shape[1] - 1, -1, -1):
        c = codes_out[:, k, :]
        torch.add(A1[:, k, :], 0.5, out=c)
        c.floor_().clamp_(0, maxq)
        e = err_out[:, k, :]
        torch.sub(W1[:, k, :], c, out=e)
        if k:
            A1[:, :k, :] += L1[:, k, :k].unsqueeze(-1) * e.unsqueeze(1)


_TRITON_BROKEN = False


def use_kernel(device: torch.device, blocksize: int, use_triton: bool | None) -> bool:
    """Whether a batch on ``device`` should be rounded with the kernel (``use_triton=None``: auto -- on CUDA, or
    on CPU in Triton's interpreter mode, for blocks of at most :data:`MAX_BLOCK_C` columns)."""
    if use_triton is not None:
        if use_triton and not HAVE_TRITON:
            raise RuntimeError("use_triton=True but Triton is not installed (pip install triton); "
                               "pass use_triton=None.")
        return bool(use_triton)
    return triton_usable(device) and int(blocksize) <= MAX_BLOCK_C and not _TRITON_BROKEN


def ldlq_block(A1, W1, L1, maxq: int, codes_out, err_out, plan: LaunchPlan | None = None,
               use_triton: bool | None = None) -> bool:
    """Round one block: the Triton kernel when a ``plan`` is given, else torch ops.

    Args:
        A1: (n, ncols, rows) view of the accumulated coordinates of the block (the torch path overwrites it).
        W1: (n, ncols, rows) view of the clamped grid coordinates; A1's dtype (float32 or float64).
        L1: (n, ncols, ncols) view of the LDL factor's diagonal block (only ``j < k`` is read).
        codes_out, err_out: (n, ncols, rows) outputs in A1's dtype.
        plan: :func:`launch_plan` of the batch (kernel path only; rows beyond a matrix's count are skipped
            and their outputs left as they are).
        use_triton: False forces the torch path; True re-raises a kernel failure.
    In auto mode a Triton failure is logged once and the torch path is used from then on. Returns whether
    the kernel ran.
    """
    global _TRITON_BROKEN
    if plan is not None and use_triton is not False and not (use_triton is None and _TRITON_BROKEN):
        try:
            ldlq_block_triton(A1, W1, L1, maxq, codes_out, err_out, plan)
            return True
        except Exception:
            if use_triton:
                raise
            _TRITON_BROKEN = True
            log.warning("Triton LDLQ block kernel failed; using the torch fallback from now on", exc_info=True)
    ldlq_block_torch(A1, W1, L1, maxq, codes_out, err_out)
    return False

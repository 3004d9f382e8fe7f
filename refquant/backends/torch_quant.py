"""QuantOps and GPTQOps of the "torch" backend: the reference's algorithms in float32/float64 torch.

* Quantizer: the three range rules of :mod:`refquant.spec.quantizer` (gptq / awq / absmax, MSE search,
  per-tensor), written once here for torch tensors (reducing over the last dim, so that all groups
  of a matrix are one call); the AWQ searches of :mod:`.equalization_ops` use them too.
* RTN: :func:`refquant.spec.rtn.rtn` in fp32.
* Hessian: streaming ``H = 2/n_sequences * sum x x^T`` in fp32 (bf16/fp16 inputs: bf16 GEMM with
  fp32 output on CUDA when torch has ``out_dtype``, else upcast per chunk).
* GPTQ: :func:`refquant.spec.gptq.gptq` step for step (dead columns, relative damping, stable act-order
  permutation, static groups, group params from W rather than the block buffer, per-channel params
  from the full rows before dead zeroing, the same argument checks, escalation and error type), with:
  ``U = P inv(chol(P H P)) P`` (one Cholesky + one triangular inverse), all group params that start
  in a block computed at the block start, the intra-block loop as one Triton launch per block
  (:mod:`.gptq_kernels`; plain torch ops on CPU), and the lazy update as matmuls at two levels
  (``LAZY_SUPERBLOCK_BLOCKS``) in :func:`work_dtype`.

fp32 matmuls run with TF32/bf16 internal precision off (:func:`ieee_fp32`, which only touches the
flags when they are not already IEEE and restores them exactly). :class:`TorchQuantOps` and
:class:`TorchGPTQOps` are the mixins of :class:`refquant.backends.torch_backend.TorchBackend`
(protocols :class:`~refquant.backends.protocols.QuantOps`, :class:`~refquant.backends.protocols.GPTQOps`).
See ``docs/backends.md``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    from . import BackendUnavailable

    raise BackendUnavailable(
        "the 'torch' backend needs PyTorch: pip install torch (CPU wheel: pip install 'refquant[torch]')."
    ) from e

from ..spec._checks import check_finite, check_matrix, check_square
from ..spec.formats import QuantizedWeight
from ..spec.gptq import HessianNotPositiveDefinite, check_gptq_args, not_positive_definite_message
from ..spec.hessian import check_batch
from ..spec.quantizer import QuantSpec, check_spec

from . import gptq_kernels
from .numpy_quant import check_shared

log = logging.getLogger("refquant")

__all__ = [
    "TorchQuantOps",
    "TorchGPTQOps",
    "TorchHessianAccumulator",
    "find_params",
    "group_params",
    "quantize",
    "dequantize",
    "div_exact",
    "upper_cholesky_of_inverse",
    "work_dtype",
    "ieee_fp32",
]


# --------------------------------------------------------------------------------------------
# Inputs (validation: refquant.spec's checks, which take torch tensors)
# --------------------------------------------------------------------------------------------

def _as_tensor(x, name: str):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if type(x).__module__.startswith("cupy"):
        return torch.from_dlpack(x)
    raise ValueError(f"{name} must be a torch tensor (or a NumPy/CuPy array); got {type(x).__name__}.")


def _weight_fp32(W, name: str = "W", device=None, dtype=torch.float32):
    """Validated float32 (or ``dtype``) copy of a weight (never aliases the caller's tensor)."""
    W = _as_tensor(W, name)
    check_matrix(W, name)
    if not W.is_floating_point():
        W = W.double()
    return W.to(device=device if device is not None else W.device, dtype=dtype, copy=True)


# --------------------------------------------------------------------------------------------
# Matmul precision guard
# --------------------------------------------------------------------------------------------

def _read(fn):
    try:
        return fn()
    except (RuntimeError, AttributeError):
        return None


@contextlib.contextmanager
def ieee_fp32():
    """Full-precision float32 matmuls (no TF32 / bf16 internals) inside the block.

    In the default state (no one asked for TF32) nothing is touched. Otherwise the flags are set to
    IEEE and, on exit, restored to exactly what they were: the legacy setting
    (``torch.set_float32_matmul_precision`` / ``allow_tf32``) and the per-backend
    ``fp32_precision`` values of cuBLAS and oneDNN. Like every torch precision flag this is process
    global while the block runs (do not run other fp32 matmuls concurrently in other threads).
    """
    cm = torch.backends.cuda.matmul
    mk = getattr(torch.backends.mkldnn, "matmul", None)
    legacy = _read(torch.get_float32_matmul_precision)  # None: torch reports a mixed legacy/new state
    cuda_new = _read(lambda: cm.fp32_precision)
    mk_new = _read(lambda: mk.fp32_precision) if mk is not None else None
    needed = legacy != "highest" or cuda_new == "tf32" or mk_new in ("tf32", "bf16")
    if not needed:
        yield
        return
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")  # legacy flag + cuBLAS/oneDNN matmul -> ieee

        def undo():
            torch.set_float32_matmul_precision(legacy)
            if cuda_new is not None:
                cm.fp32_precision = cuda_new
            if mk_new is not None:
                mk.fp32_precision = mk_new
    else:  # mixed state: only the new-API values are readable; change and restore those
        if cuda_new is not None:
            cm.fp32_precision = "ieee"
        if mk_new is not None and mk_new in ("tf32", "bf16"):
            mk.fp32_precision = "ieee"

        def undo():
            if cuda_new is not None:
                cm.fp32_precision = cuda_new
            if mk_new is not None and mk_new in ("tf32", "bf16"):
                mk.fp32_precision = mk_new
    try:
        yield
    finally:
        undo()


# --------------------------------------------------------------------------------------------
# The shared quantizer, torch version (reduces over the last dim)
# --------------------------------------------------------------------------------------------

def div_exact(x, c):
    """``x / c`` correctly rounded for a Python number ``c``.

    On CUDA, torch computes ``tensor / python_scalar`` as ``tensor * (1 / c)`` -- two roundings, an ulp
    off the IEEE quotient the reference (NumPy) gets. That ulp decides exact rounding ties: the awq
    zero point ``round(-xmin / scale)`` of a symmetrically clipped group is ``round(maxq / 2)`` exactly,
    and a scale one ulp off flips it (measured on the H200: AWQ clip-search errors off by up to 80%,
    8% of clip choices changed). Dividing by a device tensor takes the true-division path; the
    divisor is made once per (value, dtype, device) and reused: building it from a Python number is a
    host-to-device copy, which synchronizes the stream (GPTQ computes group parameters once per
    128-column block, so a fresh copy there kept the GPU idle while the host caught up).
    """
    key = (float(c), x.dtype, x.device)
    divisor = _DIVISORS.get(key)
    if divisor is None:
        divisor = _DIVISORS[key] = torch.tensor(c, dtype=x.dtype, device=x.device)
    return x / divisor


_DIVISORS: dict = {}


def find_params(x, spec: QuantSpec):
    """``(scale, zero)`` of :func:`refquant.quantizer.find_params` for ``x`` of shape (..., n), as float32.

    Reduces over the last dim (so ``x`` may be (rows, n) or (rows, n_groups, group_size)); with
    ``spec.per_tensor`` one pair over all of ``x`` (2-D only), repeated per row.

    The parameters (a few numbers per row/group) are computed in float64 from the exact min/max and
    then stored as float32: ``zero`` is then exactly the reference's and ``scale`` is the reference's
    rounded once to float32. In float32 arithmetic ``-xmin / scale`` lands on either side of exact
    ties -- e.g. every all-zero row or group (range [-1, 1]) has ``zero = round(maxq / 2)``, which
    float64 rounds to ``(maxq + 1) / 2`` and float32 to ``(maxq - 1) / 2``. Per-weight math
    (quantize, GPTQ updates) stays float32. The MSE search, which quantizes every weight per
    candidate, runs in float64 as well.
    """
    maxq = spec.maxq
    if spec.per_tensor:
        if x.ndim != 2:
            raise ValueError("per_tensor parameters need a 2-D matrix.")
        s, z = find_params(x.reshape(1, -1), QuantSpec(**{**spec.__dict__, "per_tensor": False}))
        return s.expand(x.shape[0]).clone(), z.expand(x.shape[0]).clone()
    if spec.rule == "awq":
        scale, zero = _params_awq(x, maxq)
    elif spec.rule == "absmax":
        scale, zero = _params_absmax(x, int(spec.bits))
    else:
        scale, zero = _params_gptq(x, spec)
    out = torch.float64 if x.dtype == torch.float64 else torch.float32  # GPTQ's fp64 working copies keep fp64
    return scale.to(out), zero.to(out)


def _params_gptq(x, spec: QuantSpec):
    maxq = spec.maxq
    xmin = torch.clamp(x.amin(dim=-1).double(), max=0)
    xmax = torch.clamp(x.amax(dim=-1).double(), min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale = div_exact(xmax - xmin, maxq)
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    if spec.mse:
        x = x.double()
        best = torch.full_like(scale, math.inf)
        for i in range(int(spec.maxshrink * spec.grid)):
            p = 1 - i / spec.grid
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = div_exact(xmax1 - xmin1, maxq)
            zero1 = zero if spec.sym else torch.round(-xmin1 / scale1)
            q = dequantize(quantize(x, scale1[..., None], zero1[..., None], maxq), scale1[..., None], zero1[..., None])
            err = ((q - x).abs() ** spec.norm).sum(dim=-1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, scale1, scale)
            zero = torch.where(better, zero1, zero)
    return scale, zero


def _params_awq(x, maxq: int):
    xmax, xmin = x.amax(dim=-1).double(), x.amin(dim=-1).double()
    scale = div_exact(torch.clamp(xmax - xmin, min=1e-5), maxq)
    zero = torch.clamp(-torch.round(xmin / scale), 0, maxq)
    return scale, zero


def _params_absmax(x, bits: int):
    qmax = 2 ** (bits - 1) - 1
    scale = div_exact(torch.clamp(x.abs().amax(dim=-1).double(), min=1e-5), qmax)
    return scale, torch.full_like(scale, float(qmax))


def quantize(x, scale, zero, maxq: int):
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` as floats (round half to even)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q, scale, zero):
    """``scale * (q - zero)``."""
    return scale * (q - zero)


def group_params(W, spec: QuantSpec, group_size: int):
    """Params of consecutive column groups of ``W`` (rows, n): (rows, ceil(n / group_size)) each.

    The last group holds the ``n % group_size`` remaining columns, as in the reference.
    """
    rows, n = W.shape
    full = n // group_size
    parts_s, parts_z = [], []
    if full:
        s, z = find_params(W[:, : full * group_size].reshape(rows, full, group_size), spec)
        parts_s.append(s)
        parts_z.append(z)
    if n % group_size:
        s, z = find_params(W[:, full * group_size:], spec)
        parts_s.append(s[:, None])
        parts_z.append(z[:, None])
    if len(parts_s) == 1:
        return parts_s[0], parts_z[0]
    return torch.cat(parts_s, dim=1), torch.cat(parts_z, dim=1)


def _quantize_by_groups(W, S, Z, group_size: int | None, maxq: int):
    """Codes of W (rows, n) with per-(row, group) params, consecutive groups (no (rows, n) gathers)."""
    rows, n = W.shape
    if group_size is None:
        return quantize(W, S[:, :1], Z[:, :1], maxq)
    out = torch.empty_like(W)
    full = n // group_size
    if full:
        Wg = W[:, : full * group_size].reshape(rows, full, group_size)
        out[:, : full * group_size] = quantize(Wg, S[:, :full, None], Z[:, :full, None], maxq).reshape(rows, -1)
    if n % group_size:
        out[:, full * group_size:] = quantize(W[:, full * group_size:], S[:, full:], Z[:, full:], maxq)
    return out


# --------------------------------------------------------------------------------------------
# Hessian
# --------------------------------------------------------------------------------------------

_PROBES: dict = {}


def _probe_once(name: str, device, dtype, probe) -> bool:
    """Once per (name, device, dtype): does ``probe()`` succeed and return True? (torch builds differ in
    which GEMM forms exist; a probe that raises counts as no.)"""
    key = (name, str(device), dtype)
    if key not in _PROBES:
        try:
            _PROBES[key] = bool(probe())
        except (TypeError, RuntimeError, NotImplementedError):
            _PROBES[key] = False
    return _PROBES[key]


def _out_dtype_works(device, dtype) -> bool:
    """Does ``torch.addmm(..., out_dtype=float32)`` exist and agree with upcasting?"""

    def probe():
        gen = torch.Generator(device="cpu").manual_seed(1234)  # private: the global RNG is untouched
        X = torch.randn(96, 40, generator=gen).to(device=device, dtype=dtype)
        H0 = torch.randn(40, 40, generator=gen).to(device)
        got = torch.addmm(H0, X.t(), X, beta=0.5, alpha=0.25, out_dtype=torch.float32)
        Xf = X.float()
        want = torch.addmm(H0, Xf.t(), Xf, beta=0.5, alpha=0.25)
        return got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-4)

    return _probe_once("addmm out_dtype", device, dtype, probe)


def _inplace_out_dtype_works(device, dtype) -> bool:
    """Does ``torch.addmm(C, A, B, out_dtype=float32, out=C)`` update a contiguous C in place correctly?"""

    def probe():
        gen = torch.Generator(device="cpu").manual_seed(4321)  # private: the global RNG is untouched
        A = torch.randn(96, 40, generator=gen).to(device=device, dtype=dtype)
        B = torch.randn(24, 40, generator=gen).to(device=device, dtype=dtype)
        C = torch.randn(96, 24, generator=gen).to(device)
        want = torch.addmm(C, A, B.t(), alpha=-1.0, out_dtype=torch.float32)
        got = C.clone()
        r = torch.addmm(got, A, B.t(), alpha=-1.0, out_dtype=torch.float32, out=got)
        return r.data_ptr() == got.data_ptr() and torch.allclose(got, want, rtol=1e-5, atol=1e-4)

    return _probe_once("addmm out_dtype in place", device, dtype, probe)


def _addmm_lowp(H, Xa, Xb, beta: float, alpha: float):
    """``beta * H + alpha * Xa^T Xb`` as a bf16/fp16 GEMM with fp32 output, or None if torch lacks it."""
    if not _out_dtype_works(Xa.device, Xa.dtype):
        return None
    return torch.addmm(H, Xa.t(), Xb, beta=beta, alpha=alpha, out_dtype=torch.float32)


def triangle_blocks(n: int, block: int, min_spans: int = 1) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``max(min_spans, ceil(n / block))`` near-equal spans (multiples of 128 where possible)."""
    k = max(min_spans, -(-n // block), 1)
    step = -(-n // k)
    if step > 128:
        step = -(-step // 128) * 128
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class TorchHessianAccumulator:
    """Streaming GPTQ Hessian in float32: ``H = 2 / n_sequences * sum over tokens of x x^T``.

    The reference's running mean (:class:`refquant.HessianAccumulator`): for a batch of ``b``
    sequences, ``H <- H * n / (n + b) + 2 / (n + b) * X^T X``. ``X`` is (batch, tokens, in_features)
    or (tokens, in_features) (= one sequence), any float dtype, moved to the accumulator's device.
    fp32 inputs: one fp32 GEMM (TF32 off). bf16/fp16 on CUDA: a bf16/fp16 GEMM with fp32 output
    (products exact, fp32 accumulation); otherwise upcast to fp32 per chunk of tokens.

    ``H`` is symmetric, so for ``in_features >= triangle_block`` only the blocks on and below the
    diagonal are accumulated (``X_i^T X_j``, ``i >= j``, at least two spans of at most ``triangle_block``,
    :func:`triangle_blocks`): 75% of the GEMM work at 4096 and 8192 columns, 62.5% at 14336, 57% at 28672
    (bf16 GEMMs with fp32 output on an H200: ~800 TFLOP/s at 4096-wide blocks, ~660 at 2048). Each entry is the same dot product over the same tokens
    as in the full GEMM; the upper triangle is mirrored from the lower one when ``H`` is read, so
    ``H`` is exactly symmetric (the full GEMM's two halves may differ in the last bit).
    """

    chunk_bytes = 256 * 2**20  # fp32 bytes per upcast chunk
    triangle_block = 4096      # largest span of the blocked (lower-triangle) accumulation

    def __init__(self, in_features: int, device=None, triangle_block: int | None = None):
        if int(in_features) < 1:
            raise ValueError(f"in_features must be >= 1; got {in_features}.")
        self.in_features = int(in_features)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._H = torch.zeros((self.in_features, self.in_features), dtype=torch.float32, device=self.device)
        self.nsamples = 0
        n, b = self.in_features, int(triangle_block or self.triangle_block)
        self.spans = triangle_blocks(n, b, min_spans=2) if n >= b else [(0, n)]
        self._mirrored = True

    @property
    def H(self):
        """The accumulated Hessian (float32, full and symmetric)."""
        if not self._mirrored:
            with torch.no_grad():
                for i, (a0, a1) in enumerate(self.spans):
                    for b0, b1 in self.spans[:i]:
                        self._H[b0:b1, a0:a1].copy_(self._H[a0:a1, b0:b1].t())
                    D = self._H[a0:a1, a0:a1]  # diagonal block: its upper triangle from its lower one
                    D.copy_(D.tril() + D.tril(-1).t())
            self._mirrored = True
        return self._H

    def add_batch(self, X) -> None:
        X = _as_tensor(X, "calibration input X") if not isinstance(X, torch.Tensor) else X.detach()
        check_batch(X, self.in_features)  # the reference's shape checks; finiteness below, on the device
        batch = 1 if X.ndim == 2 else int(X.shape[0])
        X = X.to(self.device).reshape(-1, self.in_features)
        if not X.is_floating_point():
            X = X.double()
        check_finite(X, "calibration input X")
        beta = self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        alpha = 2 / self.nsamples
        with torch.no_grad(), ieee_fp32():
            for i, (a0, a1) in enumerate(self.spans):
                for b0, b1 in self.spans[:i + 1]:
                    self._update(self._H[a0:a1, b0:b1], X[:, a0:a1], X[:, b0:b1], beta, alpha)
        self._mirrored = len(self.spans) == 1

    def _update(self, Hb, Xa, Xb, beta: float, alpha: float) -> None:
        """``Hb <- beta * Hb + alpha * Xa^T Xb`` in place (a block of H, or all of it)."""
        if Xa.dtype == torch.float32:
            Hb.addmm_(Xa.t(), Xb, beta=beta, alpha=alpha)
            return
        if Xa.device.type == "cuda" and Xa.dtype in (torch.bfloat16, torch.float16):
            out = _addmm_lowp(Hb, Xa, Xb, beta, alpha)
            if out is not None:
                Hb.copy_(out)
                return
        step = max(1, self.chunk_bytes // (4 * self.in_features))
        for k, start in enumerate(range(0, Xa.shape[0], step)):
            ca, cb = Xa[start:start + step].float(), Xb[start:start + step].float()
            Hb.addmm_(ca.t(), cb, beta=beta if k == 0 else 1.0, alpha=alpha)


# --------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------

FP64_FACTOR_MAX = 16384
"""Largest in_features for which GPTQ works in float64 (factorization of H, U, the column loop and
the lazy updates); above it (LLaMA3-70B down_proj, n = 28672) float32, which keeps the workspace
(U and its factorization: 2 n^2 doubles otherwise) inside the 70B memory budget.

Why float64: in float32 the column loop amplifies rounding through ill-conditioned Hessians -- on
three golden cases (a rank-deficient H, 8-bit grids) fp32 GPTQ kept only 98.6-99.85% of the fp64
reference's codes (rule: 99.9%), fp64 keeps 100%. On Hopper FP64 matmul throughput equals IEEE
FP32's (~67 TFLOP/s), so the cost is the memory of the working copies."""


def work_dtype(in_features: int):
    """GPTQ's working precision for a matrix with ``in_features`` columns (see FP64_FACTOR_MAX)."""
    return torch.float64 if in_features <= FP64_FACTOR_MAX else torch.float32
SOLVE_CHUNK = 2048


def upper_cholesky_of_inverse(H):
    """``U`` upper triangular with ``H^-1 = U^T U`` (in ``work_dtype(n)``), or None when H is not positive definite.

    With ``P`` the reversal permutation and ``L = chol(P H P)`` (lower): ``H = (P L P)(P L P)^T``
    with ``P L P`` upper triangular, so ``H^-1 = U^T U`` for ``U = (P L P)^-1 = P L^-1 P`` (upper,
    positive diagonal, hence *the* Cholesky factor the original gets from chol -> cholesky_inverse
    -> chol(upper)). One Cholesky and one triangular solve instead of two Choleskys and an inverse.

    Computed in :func:`work_dtype` (float64 up to ``FP64_FACTOR_MAX``); ``L^-1`` is solved in column
    chunks written straight into ``U``, so the workspace is ``L`` plus one chunk.
    """
    return _upper_from_reversed(lambda: H.flip(0, 1).to(work_dtype(H.shape[0])))


def _upper_from_reversed(make_A):
    """:func:`upper_cholesky_of_inverse` of ``H`` given ``make_A() -> P H P`` in the working dtype.

    ``A`` is built here and dropped right after the factorization, so it never coexists with ``U``.
    """
    A = make_A()
    n = A.shape[0]
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return None
    U = torch.empty((n, n), dtype=L.dtype, device=L.device)
    for j0 in range(0, n, SOLVE_CHUNK):
        j1 = min(j0 + SOLVE_CHUNK, n)
        # columns j0..j1 of L^-1 are zero above row j0: solve only with the trailing block L[j0:, j0:]
        # (a third of the full solves' work over all chunks; the zero rows contribute exact zeros)
        rhs = torch.zeros((n - j0, j1 - j0), dtype=L.dtype, device=L.device)
        rhs.fill_diagonal_(1.0)
        X = torch.linalg.solve_triangular(L[j0:, j0:], rhs, upper=False)  # rows j0.., columns j0..j1 of L^-1
        U[:n - j0, n - j1:n - j0] = X.flip(0, 1)                            # U = P L^-1 P (the rest: triu_ below)
        del rhs, X
    del L
    U.triu_()  # exact zeros below the diagonal (the kernel relies on U[i, :i] == 0)
    if not bool(torch.isfinite(U).all()) or not bool((U.diagonal() > 0).all()):
        return None
    return U


@dataclass
class _Prepared:
    """What GPTQ derives from H alone (shared by every matrix quantized with it)."""

    U: torch.Tensor            # (cols, cols) in work_dtype(cols), upper, processing order
    perm: torch.Tensor | None  # processing order -> original column (None: identity)
    dead: torch.Tensor         # (cols,) bool, original order
    any_dead: bool
    percdamp: float


def _prepare(H, cols: int, device, percdamp: float, act_order: bool, max_percdamp, percdamp_step,
             shape_text: str) -> _Prepared:
    """Dead columns, act-order permutation and damping of ``H`` (as the reference), then ``U``.

    The damped, permuted matrix is gathered straight in reversed order (``P H_perm P``, what
    :func:`upper_cholesky_of_inverse` factors) from the caller's ``H``: one working copy alive next to
    the Cholesky factor, not three (at 14336 columns in float64 each copy is 1.6 GB). A failed
    Cholesky regathers it with the next damping.
    """
    H = _as_tensor(H, "H")
    check_square(H, cols, "H")
    src = H.to(device)  # the caller's matrix (no copy when already there); only read below
    work = work_dtype(cols)
    diag0 = src.diagonal().to(work).double().clone()  # the diagonal as the working copy holds it (a copy: the
    # caller's float64 H must not get its dead diagonal set to 1 below)
    dead = diag0 == 0
    any_dead = bool(dead.any())
    if any_dead:
        diag0[dead] = 1
    perm = torch.argsort(-diag0, stable=True) if act_order else None  # ties: lower column first (as the reference)
    order = perm if perm is not None else torch.arange(cols, device=src.device)
    mean_diag = float(diag0[order].mean())
    rev = order.flip(0)
    current = percdamp

    def damped_reversed():
        # P H_perm P; index_select per dim (src[rev[:, None], rev[None, :]] would materialize two
        # broadcast int64 (n, n) index tensors: 13 GB at n = 28672)
        A = src.flip(0, 1) if perm is None else src.index_select(0, rev).index_select(1, rev)
        A = A.to(work)
        A.diagonal().copy_(diag0[rev] + current * mean_diag)  # damped diagonal (rounded once to fp32 above FP64_FACTOR_MAX)
        return A

    while True:
        U = _upper_from_reversed(damped_reversed)
        if U is not None:
            return _Prepared(U, perm, dead, any_dead, current)
        nxt = current + percdamp_step
        if max_percdamp is None or nxt > max_percdamp + 1e-12:
            raise HessianNotPositiveDefinite(not_positive_definite_message(shape_text, current, mean_diag))
        log.warning("GPTQ %s: Cholesky failed with percdamp=%g; retrying with percdamp=%g", shape_text, current, nxt)
        current = nxt


LAZY_SUPERBLOCK_BLOCKS = 4
"""GPTQ's lazy update at two levels: super-blocks of ``LAZY_SUPERBLOCK_BLOCKS * blocksize`` columns.

After each block ``[i1, i2)`` only the rest of its super-block ``[s0, s1)`` is updated
(``W[:, i2:s1] -= Err1 @ U[i1:i2, i2:s1]``, so the next block and its group params see every earlier
update); the columns after the super-block get one update at its end
(``W[:, s1:] -= Err_s @ U[s0:s1, s1:]``, ``Err_s`` = its blocks' ``Err1`` side by side).

Why: a GEMM with inner dimension K = 128 runs far below peak (float64 on an H200: ~20 TFLOP/s, the
largest part of the solve); K = 512 does 4x the work per read/write of the updated columns, so it runs
closer to peak. Equal to the one-level update in exact arithmetic (the same sum, grouped differently):
results differ only by rounding in the trailing columns' updates. Dynamic groups that reach past the
super-block get its pending updates (on a copy) for their params. 1 = the one-level update (bitwise
the results before this change)."""


def _gptq_rows(W, prep: _Prepared, spec: QuantSpec, blocksize: int, static_groups: bool, use_triton):
    """GPTQ on the working copy ``W`` (rows, cols; :func:`work_dtype`), original column order (modified in place).

    Blocks of ``blocksize`` columns as the reference; the lazy updates at two levels (see
    ``LAZY_SUPERBLOCK_BLOCKS``). Returns ``(codes uint8, scale, zero, g_idx, row_loss float64)`` in
    original column order.
    """
    rows, cols = W.shape
    gs, maxq = spec.group_size, spec.maxq
    dev = W.device
    if gs is None:
        sc, zc = find_params(W, spec)  # full rows, before dead zeroing
        S, Z = sc[:, None].contiguous(), zc[:, None].contiguous()
    if prep.any_dead:
        W[:, prep.dead] = 0
    if static_groups:
        S, Z = group_params(W, spec, gs)  # original column order, after dead zeroing
        S, Z = S.contiguous(), Z.contiguous()
    perm = prep.perm
    if perm is not None:
        W = W[:, perm]
    order = perm if perm is not None else torch.arange(cols, device=dev)
    if gs is None:
        gidx = torch.zeros(cols, dtype=torch.int64, device=dev)
    elif static_groups:
        gidx = order // gs
    else:
        gidx = torch.arange(cols, device=dev) // gs
        n_groups = -(-cols // gs)
        S = torch.empty((rows, n_groups), dtype=W.dtype, device=dev)
        Z = torch.empty((rows, n_groups), dtype=W.dtype, device=dev)

    U = prep.U
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=dev)
    row_loss = torch.zeros(rows, dtype=torch.float64, device=dev)
    width = min(LAZY_SUPERBLOCK_BLOCKS * blocksize, cols)
    Es = torch.empty((rows, width), dtype=W.dtype, device=dev)  # the super-block's Err1 blocks, side by side
    for s0 in range(0, cols, width):
        s1 = min(s0 + width, cols)
        for i1 in range(s0, s1, blocksize):
            i2 = min(i1 + blocksize, s1)
            if gs is not None and not static_groups:
                g1, g2 = -(-i1 // gs), -(-i2 // gs)  # groups starting in [i1, i2)
                if g1 < g2:  # params from W with every earlier block's update but none of this one's
                    c0, c1 = g1 * gs, min(g2 * gs, cols)
                    X = W[:, c0:c1]
                    if c1 > s1 and i1 > s0:  # the groups reach past the super-block: add its pending updates
                        X = X.clone()
                        X[:, s1 - c0:].addmm_(Es[:, :i1 - s0], U[s0:i1, s1:c1], alpha=-1)
                    s, z = group_params(X, spec, gs)
                    S[:, g1:g2] = s
                    Z[:, g1:g2] = z
            E = Es[:, i1 - s0:i2 - s0]
            gptq_kernels.block_update(W[:, i1:i2], U[i1:i2, i1:i2], S, Z, gidx[i1:i2], maxq, codes[:, i1:i2], E,
                                      use_triton=use_triton)
            row_loss += (E * E).sum(dim=1, dtype=torch.float64)
            if i2 < s1:  # level 1: the rest of the super-block (K = blocksize)
                W[:, i2:s1].addmm_(E, U[i1:i2, i2:s1], alpha=-1)
        if s1 < cols:  # level 2: all later columns, one GEMM with K = super-block width
            W[:, s1:].addmm_(Es[:, :s1 - s0], U[s0:s1, s1:], alpha=-1)
    row_loss *= 0.5  # sum of (w - q)^2 / U_jj^2 / 2

    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        gidx = gidx[invperm]
    return codes, S, Z, gidx, row_loss


def _result(codes, S, Z, gidx, spec, loss: float, prep: _Prepared, cols: int) -> QuantizedWeight:
    perm = prep.perm if prep.perm is not None else torch.arange(cols, device=codes.device)
    # stored as float32 (the working copy may be float64): codes uint8 + fp32 scale/zero per (row, group)
    return QuantizedWeight(codes=codes, scale=S.float(), zero=Z.float(), g_idx=gidx, spec=spec,
                           info={"loss": loss, "percdamp": prep.percdamp, "perm": perm})


# --------------------------------------------------------------------------------------------
# The operation families (mixins of TorchBackend)
# --------------------------------------------------------------------------------------------

class TorchQuantOps:
    """:class:`~refquant.backends.protocols.QuantOps` in torch: RTN in float32 and tensor <-> NumPy moves."""

    @staticmethod
    def asarray(x, device=None, dtype=None):
        """A torch tensor of ``x`` (NumPy, CuPy or torch input) on ``device``."""
        t = _as_tensor(x, "x")
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

    def rtn(self, W, spec: QuantSpec) -> QuantizedWeight:
        """:func:`refquant.rtn` in float32: codes uint8, scale/zero fp32 (rows, n_groups), g_idx int64."""
        check_spec(spec)
        with torch.no_grad():
            W = _weight_fp32(W)
            rows, cols = W.shape
            gs = spec.group_size
            if gs is None:
                s, z = find_params(W, spec)
                S, Z = s[:, None], z[:, None]
            else:
                S, Z = group_params(W, spec, gs)
            codes = _quantize_by_groups(W, S, Z, gs, spec.maxq).to(torch.uint8)
            g_idx = torch.arange(cols, device=W.device) // gs if gs is not None else torch.zeros(
                cols, dtype=torch.int64, device=W.device)
            return QuantizedWeight(codes, S.contiguous(), Z.contiguous(), g_idx, spec)

    def to_numpy(self, x):
        """A NumPy array of ``x`` (bf16/fp16 tensors as float32, which holds them exactly)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
        return np.asarray(x)

    def like(self, a, ref):
        """A float32 tensor of ``a`` on ``ref``'s device (small vectors back from the reference)."""
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=ref.device)


class TorchGPTQOps:
    """:class:`~refquant.backends.protocols.GPTQOps` in torch: float32 Hessians, GPTQ in :func:`work_dtype`."""

    def hessian(self, X):
        """:func:`refquant.hessian` in float32 on X's device."""
        X = _as_tensor(X, "X")
        if X.ndim < 2:
            raise ValueError(
                f"X must have shape (..., tokens, in_features) with at least 2 dims; got {tuple(X.shape)}."
            )
        acc = TorchHessianAccumulator(X.shape[-1], device=X.device)
        acc.add_batch(X if X.ndim <= 3 else X.reshape(X.shape[0], -1, X.shape[-1]))
        return acc.H

    def hessian_accumulator(self, in_features: int, device=None) -> TorchHessianAccumulator:
        return TorchHessianAccumulator(in_features, device)

    def gptq(self, W, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
             static_groups: bool = False, *, max_percdamp: float | None = None, percdamp_step: float = 0.01,
             use_triton: bool | None = None) -> QuantizedWeight:
        """:func:`refquant.gptq` in float32 on W's device (H is moved there).

        ``use_triton``: None = the Triton block kernel when usable (CUDA), False = torch ops,
        True = Triton or fail. Returns codes uint8, scale/zero fp32, g_idx int64; ``info`` has
        ``loss`` (float), ``percdamp`` and ``perm`` (int64 tensor).
        """
        check_gptq_args(spec, blocksize, percdamp, act_order, static_groups)
        with torch.no_grad(), ieee_fp32():
            W = _weight_fp32(W)
            W = W.to(work_dtype(W.shape[1]))
            rows, cols = W.shape
            prep = _prepare(H, cols, W.device, percdamp, act_order, max_percdamp, percdamp_step, f"{rows}x{cols}")
            codes, S, Z, gidx, row_loss = _gptq_rows(W, prep, spec, int(blocksize), static_groups, use_triton)
            return _result(codes, S, Z, gidx, spec, float(row_loss.sum()), prep, cols)

    def gptq_shared(self, Ws, H, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                    act_order: bool = False, static_groups: bool = False, *, max_percdamp: float | None = None,
                    percdamp_step: float = 0.01, use_triton: bool | None = None) -> list[QuantizedWeight]:
        """Several matrices that share one Hessian (e.g. q/k/v, gate/up) in one GPTQ pass.

        H is damped and factored once; rows of all matrices are concatenated (rows are independent
        given U) and split again. ``per_tensor`` specs couple the rows of a matrix, so those loop
        over the matrices (still with one factorization). Equal to separate :meth:`gptq` calls.
        """
        check_gptq_args(spec, blocksize, percdamp, act_order, static_groups)
        cols = check_shared(Ws)
        with torch.no_grad(), ieee_fp32():
            device = _as_tensor(Ws[0], "Ws[0]").device
            mats = [_weight_fp32(W, f"Ws[{k}]", device=device, dtype=work_dtype(cols)) for k, W in enumerate(Ws)]
            shape_text = ", ".join(f"{m.shape[0]}x{cols}" for m in mats)
            prep = _prepare(H, cols, device, percdamp, act_order, max_percdamp, percdamp_step, shape_text)
            if spec.per_tensor:
                out = []
                for m in mats:
                    codes, S, Z, gidx, row_loss = _gptq_rows(m, prep, spec, int(blocksize), static_groups, use_triton)
                    out.append(_result(codes, S, Z, gidx, spec, float(row_loss.sum()), prep, cols))
                return out
            sizes = [m.shape[0] for m in mats]
            Wcat = torch.cat(mats, dim=0)
            del mats
            codes, S, Z, gidx, row_loss = _gptq_rows(Wcat, prep, spec, int(blocksize), static_groups, use_triton)
            losses = [float(x.sum()) for x in row_loss.split(sizes)]
            return [
                _result(c.contiguous(), s.contiguous(), z.contiguous(), gidx, spec, loss, prep, cols)
                for c, s, z, loss in zip(codes.split(sizes), S.split(sizes), Z.split(sizes), losses)
            ]

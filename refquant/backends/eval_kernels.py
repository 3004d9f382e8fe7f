"""Fused elementwise kernels of the evaluator's forward (``refquant.evaluate._forward``) in Triton.

transformers' LLaMA layer runs its elementwise work as chains of small torch kernels, each a round
trip through memory (in bf16 on an H200 ~30 % of the evaluation's GPU time, the rest GEMMs):

* RMSNorm: cast to float32, square, mean, add eps, rsqrt, multiply, cast back, multiply by the gain
  (``LlamaRMSNorm``: ~150 kB of traffic per token at hidden size 4096);
* RoPE: ``x * cos + cat(-x2, x1) * sin`` on q and k (negate, concatenate, two products, a sum);
* the MLP's ``silu(gate) * up`` (two kernels);
* AWQ's block-output error ``sum((a - b)^2)`` (upcasts, difference, square, sum: five passes).

Each is one kernel here, a program per token row, with the same arithmetic in the same order:
every intermediate that torch rounds to the activation dtype (bf16/fp16) is rounded here too
(``.to(dtype)``), statistics in float32, FMA contraction off (``enable_fp_fusion=False``) so a
product is rounded before the sum as in separate torch ops, IEEE division (``div_rn``, as CUDA
compiles torch's ``/``). What can still differ: ``exp``/``rsqrt`` (Triton's approximate
instructions vs CUDA's ``expf``/``rsqrtf``, a few float32 ulps) and the order of the RMSNorm's
sum, so a result may differ from torch's in the last bit of a bf16 value, rarely. The torch
functions below are the reference (CPU/CI and the fallback); ``tests/test_eval_kernels.py`` runs the
kernels in Triton's interpreter against them and compiles them for sm_90 ahead of time.
"""
from __future__ import annotations

import logging
import os

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

#: ``REFQUANT_EVAL_TRITON=0`` (or ``CONFIG["enabled"] = False``) keeps the torch ops
CONFIG = {"enabled": os.environ.get("REFQUANT_EVAL_TRITON", "1") not in ("0", "", "false", "no")}
_BROKEN: list[str] = []


def usable(device: torch.device) -> bool:
    """Whether the fused kernels run for tensors on ``device`` (CUDA with Triton, or Triton's interpreter
    on the CPU), are enabled, and have not failed before in this process."""
    return bool(CONFIG["enabled"]) and not _BROKEN and triton_usable(torch.device(device))


def _failed(what: str, err: Exception) -> None:
    _BROKEN.append(f"{what}: {type(err).__name__}: {err}")
    log.warning("evaluator: the fused Triton %s kernel failed (%s: %s); the torch ops run from now on "
                "(REFQUANT_EVAL_TRITON=0 skips the kernels).", what, type(err).__name__, str(err)[:300])


# ---------------------------------------------------------------------------------------------
# the reference arithmetic in torch ops


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``: float32 statistics, cast back, times the gain."""
    xf = x.to(torch.float32)
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` on a projection output ``x`` [B, T, n_heads * head_dim] with
    ``cos``/``sin`` [B, T, head_dim]; returns [B, n_heads, T, head_dim] (a transposed view of [B, T, ...])."""
    B, T = x.shape[:2]
    xh = x.view(B, T, n_heads, head_dim).transpose(1, 2)
    half = head_dim // 2
    c, s = cos[:, None], sin[:, None]
    return xh * c + torch.cat((-xh[..., half:], xh[..., :half]), dim=-1) * s


def silu_mul_torch(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``LlamaMLP``'s ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU."""
    return torch.nn.functional.silu(g) * u


def sq_err_sum_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum((a - b)^2)`` as a float64 scalar tensor: the difference and its square in float32 (float64
    when ``a`` is float64), summed in float64 -- AWQ's block-output error of one candidate."""
    wd = torch.float64 if a.dtype == torch.float64 else torch.float32
    d = a.to(wd) - b.to(wd)
    return (d * d).sum(dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Triton kernels


if HAVE_TRITON:

    @triton.jit
    def _rnd(x, dt: tl.constexpr):
        # float32 x rounded to dtype dt (round to nearest even), returned as float32. bf16 by bits
        # (Triton's interpreter truncates a float32 -> bf16 cast; the GPU rounds: both agree with this)
        if dt == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            return u.to(tl.float32, bitcast=True)
        elif dt == tl.float16:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rms_norm_kernel(X, W, OUT, stride_x, stride_o, n_cols, inv_n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < n_cols
        x = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) * inv_n                                     # mean: sum x (1/n), as ATen
        rstd = _div_rn(1.0, tl.sqrt_rn(var + eps), False)
        y = _rnd(x * rstd, X.dtype.element_ty)                                  # cast back, as torch
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        out = _rnd(w * y, OUT.dtype.element_ty)                                  # gain x normed, rounded once
        tl.store(OUT + row * stride_o + offs, out.to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(X, COS, SIN, OUT, stride_x, stride_c, n_heads,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        j = tl.arange(0, HALF)[None, :]
        m = (h < n_heads) & (j < HALF)
        dt = X.dtype.element_ty
        base = X + tok * stride_x + h * (2 * HALF) + j
        x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
        cb = COS + tok * stride_c + j
        sb = SIN + tok * stride_c + j
        c1 = tl.load(cb).to(tl.float32)
        c2 = tl.load(cb + HALF).to(tl.float32)
        s1 = tl.load(sb).to(tl.float32)
        s2 = tl.load(sb + HALF).to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype as torch does
        o1 = _rnd(_rnd(x1 * c1, dt) + _rnd((-x2) * s1, dt), dt).to(dt)
        o2 = _rnd(_rnd(x2 * c2, dt) + _rnd(x1 * s2, dt), dt).to(dt)
        ob = OUT + tok * stride_x + h * (2 * HALF) + j
        tl.store(ob, o1, mask=m)
        tl.store(ob + HALF, o2, mask=m)

    @triton.jit
    def _silu_mul_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        s = _rnd(_div_rn(g, 1.0 + tl.exp(-g), False), G.dtype.element_ty)      # silu, rounded as torch's
        tl.store(OUT + offs, _rnd(s * u, OUT.dtype.element_ty).to(OUT.dtype.element_ty), mask=m)


    @triton.jit
    def _sq_err_kernel(A, B, OUT, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        d = tl.load(A + offs, mask=m, other=0.0).to(tl.float32) - tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + pid, tl.sum((d * d).to(tl.float64), axis=0))                 # d*d rounded to fp32, as torch


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((x2.shape[0], H), dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight.contiguous(), out, x2.stride(0), out.stride(0), H, 1.0 / H, float(eps),
                                         BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=False)
    return out.view(*x.shape[:-1], H)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    B, T = x.shape[:2]
    x = x.contiguous()
    cos = cos.to(x.dtype).expand(B, T, head_dim).contiguous()
    sin = sin.to(x.dtype).expand(B, T, head_dim).contiguous()
    out = torch.empty_like(x)
    if B * T:
        block_h = triton.next_power_of_2(n_heads)
        _rope_kernel[(B * T,)](x, cos, sin, out, n_heads * head_dim, head_dim, n_heads,
                               HALF=head_dim // 2, BLOCK_H=block_h, num_warps=_num_warps(block_h * head_dim),
                               enable_fp_fusion=False)
    return out.view(B, T, n_heads, head_dim).transpose(1, 2)


def silu_mul_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    g, u = g.contiguous(), u.contiguous()
    out = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    n = g.numel()
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, block),)](g, u, out, n, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out


def sq_err_sum_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous().view(-1), b.contiguous().view(-1)
    block = 4096
    parts = torch.empty(triton.cdiv(a.numel(), block), dtype=torch.float64, device=a.device)
    if a.numel():
        _sq_err_kernel[(parts.numel(),)](a, b, parts, a.numel(), BLOCK=block, num_warps=8, enable_fp_fusion=False)
    return parts.sum()


# ---------------------------------------------------------------------------------------------
# dispatch: the kernel where usable, else (or after a failure, logged once) the torch ops


def rope_supported(head_dim: int) -> bool:
    half = head_dim // 2
    return head_dim % 2 == 0 and half >= 1 and (half & (half - 1)) == 0


def rms_norm(x, weight, eps):
    if usable(x.device) and x.dtype == weight.dtype:
        try:
            return rms_norm_triton(x, weight, eps)
        except Exception as e:  # a compile/launch failure: fall back, loudly
            _failed("RMSNorm", e)
    return rms_norm_torch(x, weight, eps)


def rope(x, cos, sin, n_heads: int, head_dim: int):
    if usable(x.device) and rope_supported(head_dim) and cos.dtype == x.dtype:
        try:
            return rope_triton(x, cos, sin, n_heads, head_dim)
        except Exception as e:
            _failed("RoPE", e)
    return rope_torch(x, cos, sin, n_heads, head_dim)


def silu_mul(g, u):
    if usable(g.device) and g.dtype == u.dtype:
        try:
            return silu_mul_triton(g, u)
        except Exception as e:
            _failed("SiLU-mul", e)
    return silu_mul_torch(g, u)


def sq_err_sum(a, b):
    """``sum((a - b)^2)`` (float64 scalar tensor): one pass over two bf16/fp16 tensors on CUDA instead of
    five (two upcasts, the difference, the square, the sum); the same float32 difference and square,
    the float64 sum in another order (a last-bit difference)."""
    if a.shape != b.shape:
        raise ValueError(f"sq_err_sum: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}.")
    if usable(a.device) and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16, torch.float32):
        try:
            return sq_err_sum_triton(a, b)
        except Exception as e:
            _failed("squared-error sum", e)
    return sq_err_sum_torch(a, b)


__all__ = ["CONFIG", "usable", "rms_norm", "rope", "silu_mul", "sq_err_sum", "rms_norm_torch", "rope_torch",
           "silu_mul_torch", "sq_err_sum_torch", "rms_norm_triton", "rope_triton", "silu_mul_triton",
           "sq_err_sum_triton", "interpreting"]

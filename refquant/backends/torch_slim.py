"""SliMOps of the "torch" backend: :mod:`refquant.spec.slim` on torch tensors, fast on CUDA.

* Allocation search (:func:`refquant.spec.slim.slim_search`): the trials ``k = 1 .. n_groups//2 - 1``
  are nested (trial ``k`` moves one more group down and one more up than trial ``k - 1``), so the
  quantized output of trial ``k`` is that of trial ``k - 1`` plus two (tokens x 128) x (128 x out)
  products -- ``X W_hat_k^T = X W_hat_{k-1}^T + X_g (Q_new - Q_old)_g^T`` for the two groups that
  change. The samples are batched (``chunk`` sequences at a time), the outputs and the KL are
  float32. Float32 inputs: every product in IEEE fp32. bf16/fp16 inputs (the model dtype of a GPU
  run, as the original's fp16 search): the products are bf16/fp16 GEMMs with float32 outputs
  (exact products, fp32 accumulation) where torch has ``out_dtype``, else upcast per chunk; the
  quantized weights are then rounded to the input dtype, as the original's fp16 ``tmp``.
  Salience, Choleskys and the re-ranking in float64.
* Quantizer (:func:`refquant.spec.slim.slim_llm`): GPTQ in the working dtype of
  :func:`refquant.backends.torch_quant.work_dtype` (float64 up to 16384 columns) with the damping /
  dead-column preparation of the GPTQ twin; SQC's 101 range factors evaluated at once per group
  (float64; the first strict minimum, as the sequential search); the column loop of a group of
  width >= 2 is the GPTQ block kernel (Triton on CUDA) with that group's parameters; 1-bit groups
  run the binarizer column loop in torch ops.

Results: :class:`refquant.spec.slim.SliMSearch` with host NumPy arrays; :class:`refquant.MixedWeight`
of this backend's tensors (float32 scale / zero, uint8 codes).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..spec._checks import check_finite, check_matrix, check_square
from ..spec.formats import MixedWeight
from ..spec.gptq import HessianNotPositiveDefinite, not_positive_definite_message
from ..spec.quantizer import QuantSpec
from ..spec.slim import (KL_CLAMP, NORM, PERCDAMP, SALIENCE_DAMP, Z_THRESHOLD, SliMSearch, allocation,
                         check_allocation_size, check_slim_args, check_target_bits, n_groups_of, range_factors,
                         salience_order)
from . import gptq_kernels
from .torch_quant import (_as_tensor, _out_dtype_works, _prepare, div_exact, group_params, ieee_fp32,
                          upper_cholesky_of_inverse, work_dtype)

__all__ = ["TorchSliMOps"]

#: Bytes of float32 working memory one sample chunk of the search may take on CUDA (outputs, softmax, KL).
SEARCH_BYTES = 8 * 2**30


def _salience_hessian(H, damp: float, device):
    H = _as_tensor(H, "H").to(device=device, dtype=torch.float64, copy=True)
    d = H.diagonal()
    d[d == 0] = 1
    d += damp
    return H


def _group_salience(W64, U, gs: int) -> np.ndarray:
    v = (W64 ** 2 / U.diagonal().to(torch.float64)[None, :] ** 2).sum(dim=0)
    cols = W64.shape[1]
    return np.array([float(v[c:c + gs].sum()) for c in range(0, cols, gs)])


def _rtn_groups(Wf, b: int, gs: int):
    """``block_quantize`` of every group at width ``b`` (Wf float32/float64), same dtype."""
    rows, cols = Wf.shape
    out = torch.empty_like(Wf)
    for c in range(0, cols, gs):
        w = Wf[:, c:c + gs]
        if b == 1:
            scale, zero = w.abs().mean(dim=1, keepdim=True), w.mean(dim=1, keepdim=True)
            out[:, c:c + gs] = torch.sign(w - zero) * scale + zero
    if b >= 2:
        spec = QuantSpec(bits=b)
        S, Z = group_params(Wf, spec, gs)
        g = torch.arange(cols, device=Wf.device) // gs
        S, Z = S[:, g].to(Wf.dtype), Z[:, g].to(Wf.dtype)
        out = S * (torch.clamp(torch.round(Wf / S) + Z, 0, spec.maxq) - Z)
    return out


class _MM:
    """``C + alpha * A @ B^T`` with float32 output: fp32 IEEE, or a bf16/fp16 GEMM with fp32 output."""

    def __init__(self, dtype, device):
        self.lowp = dtype in (torch.bfloat16, torch.float16)
        self.native = self.lowp and device.type == "cuda" and _out_dtype_works(device, dtype)
        self.dtype = dtype if self.lowp else torch.float32

    def weight(self, Q):
        return Q.to(self.dtype)

    def __call__(self, C, A, B, alpha: float = 1.0):
        if self.native:
            return torch.addmm(C, A, B.t(), alpha=alpha, out_dtype=torch.float32)
        return torch.addmm(C, A.float(), B.float().t(), alpha=alpha)


def _log_p(logits):
    return torch.softmax(logits, dim=-1).clamp_min_(KL_CLAMP).log_()


def search_errors(W, X, order, bits: int, gs: int, chunk: int | None = None) -> np.ndarray:
    """(n_samples, n_trials) KL errors of the nested trials (see the module doc)."""
    n_samples, tokens, cols = X.shape
    rows = W.shape[0]
    n_groups = len(order)
    n_trials = n_groups // 2 - 1
    dev = W.device
    mm = _MM(X.dtype, dev)
    Wf = W.to(torch.float32)
    Q = {b: mm.weight(_rtn_groups(Wf, b, gs)) for b in (bits - 1, bits, bits + 1)}
    Wm = mm.weight(W)
    if chunk is None:
        per = tokens * rows * 4 * 5
        chunk = max(1, min(n_samples, (SEARCH_BYTES if dev.type == "cuda" else 2**28) // max(per, 1)))
    errors = torch.empty((n_samples, n_trials), dtype=torch.float64)
    with torch.no_grad(), ieee_fp32():
        for s0 in range(0, n_samples, chunk):
            Xc = X[s0:s0 + chunk].to(device=dev)
            Xc = Xc if mm.lowp else Xc.to(torch.float32)
            B = Xc.shape[0]
            Xf = Xc.reshape(B * tokens, cols)
            zero = torch.zeros((B * tokens, rows), dtype=torch.float32, device=dev)
            logp = _log_p(mm(zero, Xf, Wm).view(B, tokens, rows))
            cur = mm(zero, Xf, Q[bits])
            for k in range(1, n_trials + 1):
                for g, b in ((int(order[k - 1]), bits - 1), (int(order[n_groups - k]), bits + 1)):
                    c0, c1 = g * gs, min(g * gs + gs, cols)
                    Xg = Xf[:, c0:c1]
                    cur = mm(cur, Xg, Q[b][:, c0:c1])
                    cur = mm(cur, Xg, Q[bits][:, c0:c1], alpha=-1.0)
                lp = _log_p(cur.view(B, tokens, rows))
                kl = (lp.exp() * (lp - logp)).sum(dim=(1, 2))
                errors[s0:s0 + B, k - 1] = kl.double().cpu()
                del lp
            del cur, logp, zero, Xf, Xc
    return errors.numpy()


def _upper_or_raise(H, shape):
    U = upper_cholesky_of_inverse(H)
    if U is None:
        raise HessianNotPositiveDefinite(not_positive_definite_message(
            f"{shape[0]}x{shape[1]}", 0.0, float(H.diagonal().mean())))
    return U


def _salient_mask(F):
    if F.numel() < 2:
        return torch.zeros_like(F, dtype=torch.bool)
    z = (F - F.mean()) / F.std()
    out = F[z.abs() > Z_THRESHOLD]
    if out.numel() == 0:
        return torch.zeros_like(F, dtype=torch.bool)
    return F >= out.min()


FACTOR_CHUNK_ELEMS = 2**26


def _sqc_params(w, d, b: int, sym: bool, lam: float):
    """SQC's (scale, zero) per row in float64 (all range factors at once, chunked by memory)."""
    maxq = 2 ** b - 1
    w = w.to(torch.float64)
    salient = _salient_mask(w ** 2 / d.to(torch.float64)[None, :] ** 2)
    xmin = torch.clamp(w.amin(dim=1), max=0)
    xmax = torch.clamp(w.amax(dim=1), min=0)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    p = torch.as_tensor(range_factors(), dtype=torch.float64, device=w.device)[:, None]
    xmin1, xmax1 = p * xmin[None, :], p * xmax[None, :]
    scale1 = div_exact(xmax1 - xmin1, maxq)
    if sym:
        zero1 = torch.full_like(scale1, (maxq + 1) / 2)
    else:
        zero1 = torch.round(-xmin1 / scale1)
    err = torch.empty_like(scale1)
    step = max(1, FACTOR_CHUNK_ELEMS // max(w.numel(), 1))
    for i in range(0, p.shape[0], step):
        s, z = scale1[i:i + step, :, None], zero1[i:i + step, :, None]
        e = (s * (torch.clamp(torch.round(w[None] / s) + z, 0, maxq) - z) - w[None]).abs() ** NORM
        err[i:i + step] = torch.where(salient[None], 0.0, e).sum(dim=2) + lam * torch.where(salient[None], e, 0.0).sum(dim=2)
    idx = torch.argmin(err, dim=0)  # the first minimum = the sequential strict-improvement search
    r = torch.arange(w.shape[0], device=w.device)
    return scale1[idx, r], zero1[idx, r]


def _binary_block(W1, U1, scale, zero, codes_out, err_out):
    W1 = W1.clone()
    for i in range(W1.shape[1]):
        w = W1[:, i]
        sign = torch.sign(w - zero)
        q = sign * scale + zero
        codes_out[:, i] = (sign + 1).to(torch.uint8)
        err = (w - q) / U1[i, i]
        W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
        err_out[:, i] = err


class TorchSliMOps:
    """:class:`~refquant.backends.protocols.SliMOps` in torch (see the module doc)."""

    def slim_search(self, W, H, X, *, bits, group_size=128, chunk=None) -> SliMSearch:
        W = _as_tensor(W, "W")
        check_matrix(W, "W")
        rows, cols = W.shape
        check_square(_as_tensor(H, "H"), cols, "H")
        bits = check_target_bits(bits)
        n_groups = n_groups_of(cols, group_size)
        check_allocation_size(n_groups, cols, group_size)
        X = _as_tensor(X, "X")
        if X.ndim != 3 or X.shape[2] != cols or X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"X must be the layer's calibration input, shape (n_samples, tokens, {cols}); got "
                             f"{tuple(X.shape)}.")
        if not X.is_floating_point():
            X = X.double()
        check_finite(X, "X")
        dev = W.device
        W64 = W.to(torch.float64)
        Hs = _salience_hessian(H, SALIENCE_DAMP, dev)
        with torch.no_grad(), ieee_fp32():
            S = _group_salience(W64, _upper_or_raise(Hs, W.shape), group_size)
        order = salience_order(S)
        errors = search_errors(W, X, order, bits, group_size, chunk)
        k = int(np.argmin(errors.mean(axis=0))) + 1
        with torch.no_grad(), ieee_fp32():
            prep = _prepare(Hs, cols, dev, PERCDAMP, False, None, 0.01, f"{rows}x{cols}")
            S2 = _group_salience(W64, prep.U, group_size)
        return SliMSearch(errors=errors, k=k, search_bits=allocation(order, k, bits),
                          group_bits=allocation(salience_order(S2), k, bits), salience=S, applied_salience=S2)

    def slim_allocate(self, W, H, X, *, bits, group_size=128):
        return self.slim_search(W, H, X, bits=bits, group_size=group_size).group_bits

    def slim_llm(self, W, H, *, bits, group_bits, group_size=128, percdamp=0.01, lambda_salience=1.0,
                 sym_quirk=True, salience_damp=0.01, use_triton=None) -> MixedWeight:
        W = _as_tensor(W, "W")
        check_matrix(W, "W")
        rows, cols = W.shape
        H = _as_tensor(H, "H")
        check_square(H, cols, "H")
        gb_in = group_bits.detach().cpu().numpy() if isinstance(group_bits, torch.Tensor) else np.asarray(group_bits)
        bits, gb = check_slim_args(bits, gb_in, cols, group_size, percdamp, lambda_salience, sym_quirk,
                                   salience_damp)
        dev = W.device
        work = work_dtype(cols)
        Wk = W.to(device=dev, dtype=work, copy=True)
        if salience_damp > 0:
            H = _salience_hessian(H, float(salience_damp), dev)
        n_groups = len(gb)
        codes = torch.empty((rows, cols), dtype=torch.uint8, device=dev)
        S = torch.empty((rows, n_groups), dtype=work, device=dev)
        Z = torch.empty((rows, n_groups), dtype=work, device=dev)
        loss = torch.zeros((), dtype=torch.float64, device=dev)
        sym = bool(sym_quirk)
        with torch.no_grad(), ieee_fp32():
            prep = _prepare(H, cols, dev, float(percdamp), False, None, 0.01, f"{rows}x{cols}")
            if prep.any_dead:
                Wk[:, prep.dead] = 0
            U = prep.U
            err = torch.empty((rows, min(group_size, cols)), dtype=work, device=dev)
            zeros_gidx = torch.zeros(group_size, dtype=torch.int64, device=dev)
            for g, c0 in enumerate(range(0, cols, group_size)):
                c1 = min(c0 + group_size, cols)
                n = c1 - c0
                b = int(gb[g])
                if b >= bits:
                    sym = False
                W1, U1, E = Wk[:, c0:c1], U[c0:c1, c0:c1], err[:, :n]
                if b == 1:
                    scale, zero = W1.abs().mean(dim=1), W1.mean(dim=1)
                    S[:, g], Z[:, g] = scale, zero
                    _binary_block(W1, U1, scale, zero, codes[:, c0:c1], E)
                else:
                    scale, zero = _sqc_params(W1, U1.diagonal(), b, sym, float(lambda_salience))
                    S[:, g], Z[:, g] = scale.to(work), zero.to(work)
                    gptq_kernels.block_update(W1, U1, S[:, g:g + 1], Z[:, g:g + 1], zeros_gidx[:n], 2 ** b - 1,
                                              codes[:, c0:c1], E, use_triton=use_triton)
                loss += (E.double() ** 2).sum() / 2
                if c1 < cols:
                    Wk[:, c1:].addmm_(E, U[c0:c1, c1:], alpha=-1)
        return MixedWeight(codes=codes, scale=S.float(), zero=Z.float(),
                           group_bits=torch.as_tensor(gb, dtype=torch.int64), group_size=int(group_size),
                           info={"loss": float(loss), "percdamp": prep.percdamp})

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
  Per trial ONE GEMM updates the running output in place (the two groups' new and negated old
  blocks side by side, K = 4 x 128; :func:`_trial_updates`) and ONE Triton launch scores every
  token row (:func:`refquant.backends.slim_kernels.kl_rows`: the clamped-softmax KL against the
  stored FP ``logP``); the errors stay on the device until the linear is done (no sync per trial).
  Salience, Choleskys and the re-ranking in float64; the H-derived factors are memoized per H
  tensor (the linears of one input share them, ``slim_llm`` reuses the search's; see ``_h_cached``).
  docs/performance.md has the traffic count.
* Quantizer (:func:`refquant.spec.slim.slim_llm`): GPTQ in the working dtype of
  :func:`refquant.backends.torch_quant.work_dtype` (float64 up to 16384 columns) with the damping /
  dead-column preparation of the GPTQ twin; SQC's 101 range factors evaluated at once per group
  (float64; the first strict minimum, as the sequential search); the column loop of a group of
  width >= 2 is the GPTQ block kernel (Triton on CUDA) with that group's parameters; 1-bit groups
  run the binarizer column loop as one Triton launch on CUDA (``slim_kernels.binary_block_triton``,
  bitwise equal to the torch ops); SQC's factor search is one Triton launch per group on CUDA.

Results: :class:`refquant.spec.slim.SliMSearch` with host NumPy arrays; :class:`refquant.MixedWeight`
of this backend's tensors (float32 scale / zero, uint8 codes).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from ..spec._checks import check_finite, check_matrix, check_square
from ..spec.formats import MixedWeight
from ..spec.gptq import HessianNotPositiveDefinite, not_positive_definite_message
from ..spec.quantizer import QuantSpec
from ..spec.slim import (NORM, PERCDAMP, SALIENCE_DAMP, Z_THRESHOLD, SliMSearch, allocation,
                         check_allocation_size, check_slim_args, check_target_bits, n_groups_of, range_factors,
                         salience_order)
from . import gptq_kernels, slim_kernels
from .torch_quant import (_as_tensor, _inplace_out_dtype_works, _out_dtype_works, _prepare, div_exact, group_params,
                          ieee_fp32, upper_cholesky_of_inverse, work_dtype)

__all__ = ["TorchSliMOps"]

#: Bytes of float32 working memory one sample chunk of the search may take on CUDA (outputs, softmax, KL).
SEARCH_BYTES = 4 * 2**30


def _salience_hessian(H, damp: float, device):
    H = _as_tensor(H, "H").to(device=device, dtype=torch.float64, copy=True)
    d = H.diagonal()
    d[d == 0] = 1
    d += damp
    return H


def _group_salience(W64, d, gs: int) -> np.ndarray:
    """Per-group ``sum W^2 / d^2`` (``d`` = diag(U)); one host transfer."""
    v = (W64 ** 2 / d.to(torch.float64)[None, :] ** 2).sum(dim=0)
    cols = W64.shape[1]
    nf = cols // gs
    parts = [v[:nf * gs].view(nf, gs).sum(dim=1)] if nf else []
    if cols % gs:
        parts.append(v[nf * gs:].sum().reshape(1))
    return torch.cat(parts).cpu().numpy()


def _rtn_groups(Wf, b: int, gs: int):
    """``block_quantize`` of every group at width ``b`` (Wf float32/float64), same dtype."""
    rows, cols = Wf.shape
    if b == 1:
        out = torch.empty_like(Wf)
        nf = cols // gs
        for c0, c1, n in ((0, nf * gs, nf), (nf * gs, cols, 1)):
            if c1 > c0:
                w = Wf[:, c0:c1].reshape(rows, n, (c1 - c0) // n)
                scale, zero = w.abs().mean(dim=2, keepdim=True), w.mean(dim=2, keepdim=True)
                out[:, c0:c1] = (torch.sign(w - zero) * scale + zero).reshape(rows, c1 - c0)
        return out
    spec = QuantSpec(bits=b)
    S, Z = group_params(Wf, spec, gs)
    g = torch.arange(cols, device=Wf.device) // gs
    S, Z = S[:, g].to(Wf.dtype), Z[:, g].to(Wf.dtype)
    return S * (torch.clamp(torch.round(Wf / S) + Z, 0, spec.maxq) - Z)


class _MM:
    """``C += alpha * A @ B^T`` into a float32 ``C``: fp32 IEEE, or a bf16/fp16 GEMM with fp32 output.

    In place where torch can (fp32 ``addmm_``; the bf16 GEMM with ``out=C`` where it exists), else a
    new tensor: callers use the returned tensor.
    """

    def __init__(self, dtype, device):
        self.lowp = dtype in (torch.bfloat16, torch.float16)
        self.native = self.lowp and device.type == "cuda" and _out_dtype_works(device, dtype)
        self.inplace = self.native and _inplace_out_dtype_works(device, dtype)
        self.dtype = dtype if self.lowp else torch.float32

    def weight(self, Q):
        return Q.to(self.dtype)

    def __call__(self, C, A, B, alpha: float = 1.0):
        if self.native:
            if self.inplace:
                return torch.addmm(C, A, B.t(), alpha=alpha, out_dtype=torch.float32, out=C)
            return torch.addmm(C, A, B.t(), alpha=alpha, out_dtype=torch.float32)
        return C.addmm_(A.float(), B.float().t(), alpha=alpha)


def _trial_updates(Q, order, bits: int, gs: int, cols: int, device):
    """Per trial ``k``: the input columns and the weight block of its one GEMM update.

    Trial ``k`` moves group ``lo = order[k-1]`` from ``bits`` to ``bits - 1`` and ``hi = order[-k]``
    to ``bits + 1``: ``Y_k = Y_{k-1} + [X_lo X_lo X_hi X_hi] [Q-_lo; -Q_lo; Q+_hi; -Q_hi]^T`` -- one
    GEMM with K = 4 x 128 (negation and the duplicated columns are exact), every product exact in
    the fp32 accumulator as in the four separate updates.
    """
    n_groups = len(order)
    out = []
    for k in range(1, n_groups // 2):
        idx, blocks = [], []
        for g, b in ((int(order[k - 1]), bits - 1), (int(order[n_groups - k]), bits + 1)):
            c0, c1 = g * gs, min(g * gs + gs, cols)
            cols_g = torch.arange(c0, c1, device=device)
            idx += [cols_g, cols_g]
            blocks += [Q[b][:, c0:c1], -Q[bits][:, c0:c1]]
        out.append((torch.cat(idx), torch.cat(blocks, dim=1).contiguous()))
    return out


def search_errors(W, X, order, bits: int, gs: int, chunk: int | None = None, use_triton: bool | None = None
                  ) -> np.ndarray:
    """(n_samples, n_trials) KL errors of the nested trials (see the module doc)."""
    n_samples, tokens, cols = X.shape
    rows = W.shape[0]
    n_groups = len(order)
    n_trials = n_groups // 2 - 1
    dev = W.device
    mm = _MM(X.dtype, dev)
    Wf = W.to(torch.float32)
    Q = {b: mm.weight(_rtn_groups(Wf, b, gs)) for b in (bits - 1, bits, bits + 1)}
    updates = _trial_updates(Q, order, bits, gs, cols, dev)
    Qb = Q[bits]
    del Q, Wf
    Wm = mm.weight(W)
    if chunk is None:
        per = tokens * rows * 4 * 3  # logP, the running output, one transient (out-of-place GEMM / torch KL)
        chunk = max(1, min(n_samples, (SEARCH_BYTES if dev.type == "cuda" else 2**28) // max(per, 1)))
    errors = torch.empty((n_samples, n_trials), dtype=torch.float64, device=dev)
    with torch.no_grad(), ieee_fp32():
        for s0 in range(0, n_samples, chunk):
            Xc = X[s0:s0 + chunk].to(device=dev)
            Xc = Xc if mm.lowp else Xc.to(torch.float32)
            B = Xc.shape[0]
            Xf = Xc.reshape(B * tokens, cols)
            logp = mm(torch.zeros((B * tokens, rows), dtype=torch.float32, device=dev), Xf, Wm)
            logp = slim_kernels.log_p(logp, out=logp, use_triton=use_triton)
            cur = mm(torch.zeros((B * tokens, rows), dtype=torch.float32, device=dev), Xf, Qb)
            for k, (idx, Bk) in enumerate(updates):
                cur = mm(cur, Xf.index_select(1, idx), Bk)
                kl = slim_kernels.kl_rows(cur, logp, use_triton=use_triton)
                errors[s0:s0 + B, k] = kl.view(B, tokens).double().sum(dim=1)
                del kl
            del cur, logp, Xf, Xc
    return errors.cpu().numpy()


def _upper_or_raise(H, shape):
    U = upper_cholesky_of_inverse(H)
    if U is None:
        raise HessianNotPositiveDefinite(not_positive_definite_message(
            f"{shape[0]}x{shape[1]}", 0.0, float(H.diagonal().mean())))
    return U


def _salient_mask(F):
    """``F >= min{F : |z(F)| > 2}`` (unbiased std); all False when no element has ``|z| > 2``. No host sync."""
    if F.numel() < 2:
        return torch.zeros_like(F, dtype=torch.bool)
    z = (F - F.mean()) / F.std()
    threshold = torch.where(z.abs() > Z_THRESHOLD, F, torch.inf).amin()  # +inf when there is no outlier
    return F >= threshold


FACTOR_CHUNK_ELEMS = 2**26


_FACTORS: dict = {}


def _range_factors_on(device):
    key = str(device)
    if key not in _FACTORS:
        _FACTORS[key] = torch.as_tensor(range_factors(), dtype=torch.float64, device=device)
    return _FACTORS[key]


def _sqc_params(w, d, b: int, sym: bool, lam: float, use_triton=None):
    """SQC's (scale, zero) per row in float64: one Triton launch per block on CUDA
    (:func:`refquant.backends.slim_kernels.sqc_search`), else all range factors at once in torch ops
    (chunked by memory)."""
    maxq = 2 ** b - 1
    w = w.to(torch.float64)
    salient = _salient_mask(w ** 2 / d.to(torch.float64)[None, :] ** 2)
    xmin = torch.clamp(w.amin(dim=1), max=0)
    xmax = torch.clamp(w.amax(dim=1), min=0)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    if slim_kernels.sqc_usable(w, use_triton):
        try:
            return slim_kernels.sqc_search(w, salient, xmin, xmax, _range_factors_on(w.device), maxq, sym, lam, NORM)
        except Exception:
            if use_triton:
                raise
            slim_kernels.mark_broken("sqc")
    p = _range_factors_on(w.device)[:, None]
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


def _binary_block(W1, U1, scale, zero, codes_out, err_out, use_triton=None):
    """The 1-bit group's column loop: one Triton launch on CUDA, else torch ops (bitwise the same)."""
    if slim_kernels.binary_block_usable(W1, use_triton):
        try:
            return slim_kernels.binary_block_triton(W1, U1, scale, zero, codes_out, err_out)
        except Exception:
            if use_triton:
                raise
            slim_kernels.mark_broken("binary")
    W1 = W1.clone()
    for i in range(W1.shape[1]):
        w = W1[:, i]
        sign = torch.sign(w - zero)
        q = sign * scale + zero
        codes_out[:, i] = (sign + 1).to(torch.uint8)
        err = (w - q) / U1[i, i]
        W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
        err_out[:, i] = err


def _drop_entry(cache: dict, key, token: int) -> None:
    ent = cache.get(key)
    if ent is not None and id(ent) == token:
        del cache[key]


class TorchSliMOps:
    """:class:`~refquant.backends.protocols.SliMOps` in torch (see the module doc)."""

    # H-derived factors are memoized on the last H tensor (q/k/v and gate/up share one H, and
    # slim_llm needs the factor slim_search computed): keyed by the tensor itself (a weak reference,
    # so the entry dies with H), its version counter (an in-place change misses) and the damping.
    def _h_cached(self, H, key, make):
        """``make()``, memoized for the caller's tensor ``H`` (not a detached alias: those die with the call)."""
        if not isinstance(H, torch.Tensor):
            return make()
        cache = self.__dict__.setdefault("_slim_h_cache", {})
        ent = cache.get(key)
        if ent is not None and ent["ref"]() is H and ent["version"] == H._version:
            return ent["value"]
        value = make()
        try:
            ref = weakref.ref(H)
        except TypeError:
            return value
        cache[key] = {"ref": ref, "version": H._version, "value": value}
        token = id(cache[key])
        weakref.finalize(H, _drop_entry, cache, key, token)
        return value

    def slim_search(self, W, H, X, *, bits, group_size=128, chunk=None) -> SliMSearch:
        W = _as_tensor(W, "W")
        check_matrix(W, "W")
        rows, cols = W.shape
        H_key, H = H, _as_tensor(H, "H")
        check_square(H, cols, "H")
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
        shape_text = f"{rows}x{cols}"
        with torch.no_grad(), ieee_fp32():
            d1 = self._h_cached(H_key, ("salience", str(dev), SALIENCE_DAMP), lambda: _upper_or_raise(
                _salience_hessian(H, SALIENCE_DAMP, dev), W.shape).diagonal().clone())
            S = _group_salience(W64, d1, group_size)
        order = salience_order(S)
        errors = search_errors(W, X, order, bits, group_size, chunk)
        k = int(np.argmin(errors.mean(axis=0))) + 1
        with torch.no_grad(), ieee_fp32():
            prep = self._h_cached(H_key, ("prepared", str(dev), SALIENCE_DAMP, PERCDAMP), lambda: _prepare(
                _salience_hessian(H, SALIENCE_DAMP, dev), cols, dev, PERCDAMP, False, None, 0.01, shape_text))
            S2 = _group_salience(W64, prep.U.diagonal(), group_size)
        return SliMSearch(errors=errors, k=k, search_bits=allocation(order, k, bits),
                          group_bits=allocation(salience_order(S2), k, bits), salience=S, applied_salience=S2)

    def slim_allocate(self, W, H, X, *, bits, group_size=128):
        return self.slim_search(W, H, X, bits=bits, group_size=group_size).group_bits

    def slim_llm(self, W, H, *, bits, group_bits, group_size=128, percdamp=0.01, lambda_salience=1.0,
                 sym_quirk=True, salience_damp=0.01, use_triton=None) -> MixedWeight:
        W = _as_tensor(W, "W")
        check_matrix(W, "W")
        rows, cols = W.shape
        H_key, H = H, _as_tensor(H, "H")
        check_square(H, cols, "H")
        gb_in = group_bits.detach().cpu().numpy() if isinstance(group_bits, torch.Tensor) else np.asarray(group_bits)
        bits, gb = check_slim_args(bits, gb_in, cols, group_size, percdamp, lambda_salience, sym_quirk,
                                   salience_damp)
        dev = W.device
        work = work_dtype(cols)
        Wk = W.to(device=dev, dtype=work, copy=True)
        n_groups = len(gb)
        codes = torch.empty((rows, cols), dtype=torch.uint8, device=dev)
        S = torch.empty((rows, n_groups), dtype=work, device=dev)
        Z = torch.empty((rows, n_groups), dtype=work, device=dev)
        loss = torch.zeros((), dtype=torch.float64, device=dev)
        sym = bool(sym_quirk)
        with torch.no_grad(), ieee_fp32():
            sd, pd = float(salience_damp), float(percdamp)
            prep = self._h_cached(H_key, ("prepared", str(dev), sd, pd), lambda: _prepare(
                _salience_hessian(H, sd, dev) if sd > 0 else H, cols, dev, pd, False, None, 0.01, f"{rows}x{cols}"))
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
                    _binary_block(W1, U1, scale, zero, codes[:, c0:c1], E, use_triton)
                else:
                    scale, zero = _sqc_params(W1, U1.diagonal(), b, sym, float(lambda_salience), use_triton)
                    S[:, g], Z[:, g] = scale.to(work), zero.to(work)
                    gptq_kernels.block_update(W1, U1, S[:, g:g + 1], Z[:, g:g + 1], zeros_gidx[:n], 2 ** b - 1,
                                              codes[:, c0:c1], E, use_triton=use_triton)
                loss += (E.double() ** 2).sum() / 2
                if c1 < cols:
                    Wk[:, c1:].addmm_(E, U[c0:c1, c1:], alpha=-1)
        return MixedWeight(codes=codes, scale=S.float(), zero=Z.float(),
                           group_bits=torch.as_tensor(gb, dtype=torch.int64), group_size=int(group_size),
                           info={"loss": float(loss), "percdamp": prep.percdamp})

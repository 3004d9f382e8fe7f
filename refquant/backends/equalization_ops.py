"""Backend operations of the equalization methods (SmoothQuant, AWQ, AWEQ) for the layer-wise pipeline.

Two families (:mod:`refquant.backends.protocols`), each a mixin per backend: ``EqualizationOps``
(:class:`NumpyEqualizationOps`, :class:`TorchEqualizationOps`) and ``AWQOps`` (:class:`NumpyAWQOps`,
:class:`TorchAWQOps`; the protocol includes EqualizationOps). The methods' wiring units
(``refquant/methods/{smoothquant,awq,aweq}.py``) call only these, so one method runs on both backends.

=================================  ===========================================================
op                                 reference (the numpy backend calls exactly this)
=================================  ===========================================================
``smooth_scales(absmax, Ws, a)``   :func:`refquant.smoothquant.smooth_scales`
``equalization_scales(r, Ws)``     :func:`refquant.aweq.equalization_scales` (eq. (10))
``bias_correction(W, W_q, m)``     :func:`refquant.aweq.bias_correction` (eq. (15))
``scale_weight(W, s)``             :func:`refquant.equalize.scale_weight` (``W diag(s)``)
``fold_into_norm(g, s)``           :func:`refquant.equalize.fold_into_norm` (``gamma / s``)
``fold_into_linear(W, s, b)``      :func:`refquant.equalize.fold_into_linear` (last rows ``/ s``)
``awq_search_scale(X, Ws, ...)``   :func:`refquant.awq.search_scale` (``block=None``: linear block)
``awq_search_scale_stats(...)``    :func:`refquant.awq.search_scale` on the kept inputs of a
                                   linear group (the statistics named by ``awq_linear_stats()``)
``awq_search_clip(X, W, spec)``    :func:`refquant.awq.search_clip`
``apply_clip(W, max_val, gs)``     :func:`refquant.awq.apply_clip`
=================================  ===========================================================

Torch versions (on the weights' device):

* per-channel vector math (``smooth_scales``, ``equalization_scales``, the AWQ candidate scales)
  runs the reference on NumPy copies of the *vectors* (the weights are reduced to their column
  max / min on the device first), so the scales are bit-identical to the reference given the same
  statistics; ``duo_scaling``'s ``w_mean`` (opt-in) is :func:`refquant.awq.weight_mean` itself, on
  float64 host copies of the weights;
* weight transforms (scaling, folding, clipping) are elementwise in float64 and returned in the
  working dtype (float32, or float64 for float64 inputs); the runner stores them in the model dtype;
* ``bias_correction``: ``-(W_q - W) E[x]`` as a float64 matrix-vector product;
* the AWQ searches evaluate their candidates' weights ``Q(W diag(s)) diag(s)^-1`` and
  ``Q(clip(W))`` in float64 with the reference's elementwise arithmetic (:func:`_fake_quant64`), so
  on the same inputs they reproduce the reference's candidates bit for bit. This matters: a clip
  below both extremes of a group makes llm-awq's zero point ``round(maxq / 2)`` an exact tie, and
  float32 rounding would resolve it differently from the reference for many candidates;
* AWQ scale search over a block (attention, MLP): the block runs natively (the model's dtype, bf16
  on a GPU) on chunks of sequences; the original output is kept once in the activation dtype and the
  squared error is summed chunk by chunk (never a full float32 copy of the output);
* AWQ scale search of a single linear (``down_proj``; ``o_proj`` without GQA):
  ``mean((X W^T - X W_hat^T)^2) = tr(D S D^T) / (N out)`` with ``D = W_hat - W`` and the Gram
  ``S = sum_t x_t x_t^T`` (accumulated in float32 -- the pipeline's Hessian statistic --, the
  quadratic form in float64) -- the same number in exact arithmetic, with no (N, out) output and no
  kept input (an 8B ``down_proj`` input of 128 x 2048 tokens is 7.5 GB in bf16; its Gram 0.8 GB);
* AWQ clip search: per (row, group) ``mean_t (x_g . d_g)^2 = d_g^T G_g d_g / T`` with the per-group
  Gram ``G_g`` of the sampled tokens, float64 (``out x in x group_size`` per candidate).

Parity with the reference: ``tests/test_backends_equalization.py`` and the golden cases
(``refquant/golden.py``, rules ``smoothquant``, ``awq``, ``aweq``).
"""
from __future__ import annotations

import numpy as np

from ..spec import aweq as _aweq
from ..spec import awq as _awq
from ..spec import equalize as _eq
from ..spec import smoothquant as _sq
from ..spec.quantizer import QuantSpec, group_slices

from ..spec._checks import check_finite, check_matrix
from .numpy_quant import as_numpy


# --------------------------------------------------------------------------------------------- numpy


def _np(x):
    return None if x is None else as_numpy(x)


class NumpyEqualizationOps:
    """:class:`~refquant.backends.protocols.EqualizationOps` of the reference (float64 NumPy)."""

    def smooth_scales(self, x_absmax, Ws, alpha):
        return _sq.smooth_scales(_np(x_absmax), [_np(W) for W in Ws], alpha)

    def equalization_scales(self, x_range, Ws):
        return _aweq.equalization_scales(_np(x_range), [_np(W) for W in Ws])

    def bias_correction(self, W, W_q, x_mean):
        return _aweq.bias_correction(_np(W), _np(W_q), _np(x_mean))

    def scale_weight(self, W, s):
        return _eq.scale_weight(_np(W), _np(s))

    def fold_into_norm(self, norm_weight, s):
        return _eq.fold_into_norm(_np(norm_weight), _np(s))

    def fold_into_linear(self, W_prev, s, b_prev=None):
        return _eq.fold_into_linear(_np(W_prev), _np(s), _np(b_prev))


class NumpyAWQOps:
    """:class:`~refquant.backends.protocols.AWQOps` (without the :class:`NumpyEqualizationOps` part)."""

    def awq_linear_stats(self):
        """Statistics :meth:`awq_search_scale_stats` needs for a linear group: the kept inputs."""
        return ("inputs",)

    def awq_search_scale(self, X, Ws, spec, block=None, n_grid=_awq.N_GRID, duo_scaling=False, chunk=None):
        """:func:`refquant.awq.search_scale` (``chunk`` is a hint for the fast backends, unused)."""
        return _awq.search_scale(_np(X), [_np(W) for W in Ws], spec, block=block, n_grid=n_grid,
                                 duo_scaling=duo_scaling)

    def awq_search_scale_stats(self, stats, Ws, spec, n_grid=_awq.N_GRID, duo_scaling=False, n_sequences=None):
        return _awq.search_scale(stats.inputs, [_np(W) for W in Ws], spec, n_grid=n_grid, duo_scaling=duo_scaling)

    def awq_search_clip(self, X, W, spec, n_grid=_awq.CLIP_N_GRID, max_shrink=_awq.CLIP_MAX_SHRINK,
                        n_sample_tokens=_awq.CLIP_N_SAMPLE_TOKENS):
        return _awq.search_clip(_np(X), _np(W), spec, n_grid=n_grid, max_shrink=max_shrink,
                                n_sample_tokens=n_sample_tokens)

    def apply_clip(self, W, max_val, group_size):
        return _awq.apply_clip(_np(W), _np(max_val), group_size)


# --------------------------------------------------------------------------------------------- torch

try:
    import torch
except ImportError:  # the numpy backend works without torch
    torch = None

if torch is not None:
    from . import eval_kernels
    from . import torch_quant as _tq

    def _t(x, device=None, dtype=None):
        """A torch tensor of ``x`` (NumPy arrays become tensors on ``device``)."""
        if isinstance(x, torch.Tensor):
            t = x.detach()
        else:
            t = torch.as_tensor(np.asarray(x))
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

    def _host(x):
        """Float64 NumPy copy of a (small) tensor or array."""
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", torch.float64).numpy()
        return np.asarray(x, dtype=np.float64)

    def _work_dtype(*xs):
        return torch.float64 if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in xs) else torch.float32

    def _check_weights(Ws):
        """Tensors of ``Ws`` and their in_features (:func:`refquant.spec.equalize.check_weights`)."""
        mats = [_t(W) for W in Ws] if isinstance(Ws, (list, tuple)) else Ws
        return mats, _eq.check_weights(mats)

    def _col_max_min(Ws, absolute: bool):
        """Per input column the max (and min) over all rows of all ``Ws``, float64 on the host."""
        mats, _ = _check_weights(Ws)
        with torch.no_grad():
            if absolute:
                m = torch.stack([W.abs().amax(dim=0) for W in mats]).amax(dim=0)
                return _host(m), None
            hi = torch.stack([W.amax(dim=0) for W in mats]).amax(dim=0)
            lo = torch.stack([W.amin(dim=0) for W in mats]).amin(dim=0)
            return _host(hi), _host(lo)

    def _check_vec(s, n: int, name: str = "s"):
        """A positive finite scale vector of length ``n`` (checked on a host copy; it is small)."""
        s = _t(s)
        _eq.check_scales(_host(s) if s.ndim == 1 else s.cpu().numpy(), n, name)
        return s

    def _clip(W, m, group_size):
        """Clamp per (row, group); full groups in one call."""
        dt = _work_dtype(W)
        with torch.no_grad():
            rows, n = W.shape
            out = W.to(dt, copy=True)
            m = m.to(dt)
            gs = n if group_size is None else int(group_size)
            full = n // gs
            if full:
                view = out[:, : full * gs].view(rows, full, gs)
                mf = m[:, :full, None]
                torch.clamp(view, -mf, mf, out=view)
            if n % gs:
                out[:, full * gs:] = torch.clamp(out[:, full * gs:], -m[:, full:], m[:, full:])
            return out

    # ---- SmoothQuant / AWEQ ---------------------------------------------------------------------
    class TorchEqualizationOps:
        """:class:`~refquant.backends.protocols.EqualizationOps` in torch, on the weights' device.

        Per-channel vector math: the reference on host copies of the vectors. Weight transforms:
        float64 elementwise, returned in the working dtype.
        """

        def smooth_scales(self, x_absmax, Ws, alpha):
            """:func:`refquant.smoothquant.smooth_scales`; float64 tensor on the weights' device."""
            w_absmax, _ = _col_max_min(Ws, absolute=True)
            # max_j |W[r, j]| over the rows of a one-row matrix holding the column absmax is that absmax
            s = _sq.smooth_scales(_host(x_absmax), [w_absmax[None, :]], alpha)
            return torch.as_tensor(s, dtype=torch.float64, device=_t(Ws[0]).device)

        def equalization_scales(self, x_range, Ws):
            """:func:`refquant.aweq.equalization_scales`; float64 tensor on the weights' device."""
            hi, lo = _col_max_min(Ws, absolute=False)
            s = _aweq.equalization_scales(_host(x_range), [np.stack([hi, lo])])  # range of [max; min] = max - min
            return torch.as_tensor(s, dtype=torch.float64, device=_t(Ws[0]).device)

        def bias_correction(self, W, W_q, x_mean):
            """``-(W_q - W) E[x]`` (eq. (15)) as a float64 product on the weights' device."""
            W, W_q = _t(W), _t(W_q)
            check_matrix(W, "W")
            check_matrix(W_q, "W_q")
            if W.shape != W_q.shape:
                raise ValueError(f"W {tuple(W.shape)} and W_q {tuple(W_q.shape)} must have the same shape.")
            m = _t(x_mean, device=W.device)
            if m.ndim != 1 or m.shape[0] != W.shape[1]:
                raise ValueError(f"x_mean must be 1-D of length in_features={W.shape[1]}; got shape {tuple(m.shape)}.")
            check_finite(m, "x_mean")
            with torch.no_grad():
                eps = W_q.to(W.device).double() - W.double()
                return -(eps @ m.double())

        def scale_weight(self, W, s):
            W = _t(W)
            check_matrix(W, "W")
            s = _check_vec(s, W.shape[1])
            with torch.no_grad():
                return (W.double() * s.to(W.device, torch.float64)[None, :]).to(_work_dtype(W))

        def fold_into_norm(self, norm_weight, s):
            g = _t(norm_weight)
            if g.ndim != 1 or g.shape[0] == 0:
                raise ValueError(f"norm_weight must be the 1-D gain of the norm (hidden_size,); got shape {tuple(g.shape)}.")
            check_finite(g, "norm_weight")
            s = _check_vec(s, g.shape[0])
            with torch.no_grad():
                return (g.double() / s.to(g.device, torch.float64)).to(_work_dtype(g))

        def fold_into_linear(self, W_prev, s, b_prev=None):
            W = _t(W_prev)
            check_matrix(W, "W_prev")
            s = _t(s)
            k = s.shape[0] if s.ndim == 1 else -1
            if k < 1 or k > W.shape[0]:
                raise ValueError(f"s has {k} entries but W_prev has {W.shape[0]} output rows: the scaled channels are the "
                                 "last len(s) outputs of the previous linear, so 1 <= len(s) <= out_features.")
            s = _check_vec(s, k).to(W.device, torch.float64)
            dt = _work_dtype(W)
            with torch.no_grad():
                out = W.double()
                out[W.shape[0] - k:] /= s[:, None]
                out = out.to(dt)
                if b_prev is None:
                    return out, None
                b = _t(b_prev, device=W.device)
                if b.ndim != 1 or b.shape[0] != W.shape[0]:
                    raise ValueError(f"b_prev must be 1-D of length out_features={W.shape[0]}; got {tuple(b.shape)}.")
                b = b.double()
                b[b.shape[0] - k:] /= s
                return out, b.to(dt)

    # ---- AWQ ----------------------------------------------------------------------------------
    def _params64(x, spec: QuantSpec):
        """Scale and zero of the shared quantizer for ``x`` (..., n) in float64 (the reference's arithmetic)."""
        if spec.per_tensor:
            sc, z = _params64(x.reshape(1, -1), QuantSpec(**{**spec.__dict__, "per_tensor": False}))
            return sc.expand(x.shape[0]), z.expand(x.shape[0])
        if spec.rule == "awq":
            return _tq._params_awq(x, spec.maxq)
        if spec.rule == "absmax":
            return _tq._params_absmax(x, int(spec.bits))
        return _tq._params_gptq(x, spec)

    def _fake_quant64(W, spec: QuantSpec):
        """``rtn(W, spec).dequantize()`` of the reference in float64 torch, for the searches.

        Every step is elementwise IEEE arithmetic (min/max, division, round-half-even, clamp, product),
        so for the same float64 ``W`` this is the reference's ``W_hat`` bit for bit. The searches use it
        (their candidates differ by less than float32 rounding near ties: a symmetric clip makes the
        awq zero point ``round(maxq / 2)`` an exact tie); the final quantization is the backend's
        float32 :meth:`rtn`.
        """
        W = W.double()
        rows, n = W.shape
        maxq = spec.maxq
        gs = spec.group_size
        if gs is None or spec.per_tensor:
            sc, z = _params64(W, spec)
            sc, z = sc[:, None], z[:, None]
            return _tq.dequantize(_tq.quantize(W, sc, z, maxq), sc, z)
        out = torch.empty_like(W)
        full = n // gs
        if full:
            Wg = W[:, : full * gs].reshape(rows, full, gs)
            sc, z = _params64(Wg, spec)
            sc, z = sc[..., None], z[..., None]
            out[:, : full * gs] = _tq.dequantize(_tq.quantize(Wg, sc, z, maxq), sc, z).reshape(rows, full * gs)
        if n % gs:
            tail = W[:, full * gs:]
            sc, z = _params64(tail, spec)
            sc, z = sc[:, None], z[:, None]
            out[:, full * gs:] = _tq.dequantize(_tq.quantize(tail, sc, z, maxq), sc, z)
        return out

    def _fake_quant_scaled(W, s, spec: QuantSpec, out_dtype):
        """``Q(W diag(s)) diag(s)^-1`` (:func:`refquant.awq.scaled_fake_quant`) in float64, cast to ``out_dtype``."""
        return (_fake_quant64(W.double() * s[None, :], spec) / s[None, :]).to(out_dtype)

    def _grid_search(x_mean, mats, spec, n_grid, duo_scaling, loss_of):
        """The grid loop of :func:`refquant.awq.search_scale`; ``loss_of(weights) -> float``.

        ``duo_scaling``'s ``w_mean`` is the reference's (:func:`refquant.spec.awq.weight_mean` on
        float64 host copies of the weights: opt-in, once per search).
        """
        w_mean = _awq.weight_mean([_host(W) for W in mats], spec.group_size) if duo_scaling else None
        device = mats[0].device
        losses = np.empty(n_grid, dtype=np.float64)
        best_loss, best_k, best_s = float("inf"), -1, None
        for k in range(n_grid):
            s_np = _awq.candidate_scales(x_mean, k / n_grid, w_mean)  # the reference, on the host
            s = torch.as_tensor(s_np, dtype=torch.float64, device=device)
            loss = float(loss_of([_fake_quant_scaled(W, s, spec, W.dtype) for W in mats]))
            losses[k] = loss
            if loss < best_loss:
                best_loss, best_k, best_s = loss, k, s
        if best_k < 0:
            raise ValueError(f"AWQ scale search found no finite loss (losses: {losses.tolist()}); check block and inputs.")
        return _awq.ScaleSearchResult(scales=best_s, best_ratio=best_k / n_grid, losses=losses)

    def _chunks(X, chunk):
        n = X.shape[0]
        step = n if not chunk else max(1, int(chunk))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _gram_loss(S, n_tokens: int, mats, weights):
        """``sum_i tr(D_i S D_i^T) / (N sum_i out_i)``, ``D_i = W_hat_i - W_i``, in float64.

        ``S`` is float64. The quadratic form sums ``in_features``-long products with cancellation; in
        float32 its relative error reaches ~n eps (5e-4 at n = 4096 on the golden cases), which moves
        near-tied grid points. On an H100/H200 float64 GEMMs run at the float32 (non-tensor) rate.
        """
        total = 0.0
        out_total = 0
        for W, W_hat in zip(mats, weights):
            D = W_hat.double() - W.double()
            total += float(_quadratic_form(D, S))
            out_total += W.shape[0]
        return total / (n_tokens * out_total)

    def _quadratic_form(D, S, block: int = 2048):
        """``tr(D S D^T)`` for symmetric ``S`` from the blocks on and below its diagonal.

        With column spans ``i`` of :func:`refquant.backends.torch_quant.triangle_blocks`:
        ``sum_i <D_i S_ii, D_i> + 2 sum_{j<i} <D_i S_ij, D_j>`` -- the same sum, ~57% of the GEMM work of
        ``((D @ S) * D).sum()`` at 14336 columns (S's upper blocks are never read); float64 sums in
        another order."""
        spans = _tq.triangle_blocks(S.shape[0], block) if S.shape[0] >= 2 * block else [(0, S.shape[0])]
        total = torch.zeros((), dtype=torch.float64, device=D.device)
        for a0, a1 in spans:
            P = D[:, a0:a1] @ S[a0:a1, :a1]  # (rows, a1): row block i of S, columns j <= i
            total += (P[:, a0:a1] * D[:, a0:a1]).sum()
            if a0:
                total += 2 * (P[:, :a0] * D[:, :a0]).sum()
        return total

    def _checked(out, what):
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"block must return a tensor; got {type(out).__name__}.")
        check_finite(out, f"block output with {what}")
        return out

    class TorchAWQOps:
        """:class:`~refquant.backends.protocols.AWQOps` in torch (without the :class:`TorchEqualizationOps` part).

        The searches evaluate their candidates in float64 with the reference's elementwise arithmetic
        (:func:`_fake_quant64`); see the module docstring.
        """

        def awq_linear_stats(self):
            """Statistics :meth:`awq_search_scale_stats` needs for a linear group: Hessian (Gram) and mean |x|."""
            return ("H", "mean_abs")

        def awq_search_scale(self, X, Ws, spec, block=None, n_grid=_awq.N_GRID, duo_scaling=False, chunk=None):
            """:func:`refquant.awq.search_scale` in torch.

            ``block(X_chunk, weights) -> output`` is evaluated on chunks of ``chunk`` sequences (the first
            dim of ``X``); ``block=None`` is the reference's linear block, evaluated through the Gram of
            ``X``. Returns a :class:`refquant.awq.ScaleSearchResult` with ``scales`` a float64 tensor on
            the weights' device and ``losses`` a NumPy array.
            """
            mats, n = _check_weights(Ws)
            _awq._check_spec(spec)
            n_grid = _awq.check_grid(n_grid)
            X = _t(X)
            _eq.check_activations(X, n)
            if X.ndim == 1:
                X = X[None, :]
            if X.ndim == 2:
                X = X[None]
            device = mats[0].device
            parts = _chunks(X, chunk)
            with torch.no_grad():
                abs_sum = torch.zeros(n, dtype=torch.float64, device=device)
                for p in parts:
                    xc = X[p].to(device).reshape(-1, n).abs()
                    abs_sum += (xc if xc.dtype == torch.float64 else xc.float()).sum(dim=0).double()
                n_tokens = X.numel() // n
                x_mean = _host(abs_sum / n_tokens)
                if block is None:
                    S = torch.zeros(n, n, dtype=torch.float32, device=device)
                    with _tq.ieee_fp32():
                        for p in parts:
                            xc = X[p].to(device).reshape(-1, n)
                            if xc.dtype == torch.float64:
                                S = S.double()
                            S.addmm_(xc.t(), xc.to(S.dtype))
                    S = S.double()
                    return _grid_search(x_mean, mats, spec, n_grid, duo_scaling,
                                        lambda weights: _gram_loss(S, n_tokens, mats, weights))
                org = [_checked(block(X[p], mats), "the original weights") for p in parts]
                numel = sum(o.numel() for o in org)

                def loss_of(weights):
                    acc = torch.zeros((), dtype=torch.float64, device=org[0].device)  # one host sync per candidate
                    for p, o in zip(parts, org):
                        out = block(X[p], weights)
                        if tuple(out.shape) != tuple(o.shape):
                            raise ValueError(f"block returned shape {tuple(out.shape)} for the quantized weights but "
                                             f"{tuple(o.shape)} for the originals.")
                        acc += eval_kernels.sq_err_sum(o, out)
                    acc = float(acc)
                    if not np.isfinite(acc):
                        raise ValueError("block output with a candidate scale is not finite (NaN or Inf); check block and "
                                         "inputs.")
                    return acc / numel

                return _grid_search(x_mean, mats, spec, n_grid, duo_scaling, loss_of)

        def awq_search_scale_stats(self, stats, Ws, spec, n_grid=_awq.N_GRID, duo_scaling=False, n_sequences=None):
            """Linear-group scale search from the pipeline statistics (``H = 2/n_seq sum x x^T``, mean |x|).

            ``sum x x^T = H n_sequences / 2``; the loss is the reference's ``mean((X W^T - X W_hat^T)^2)``.
            """
            mats, n = _check_weights(Ws)
            _awq._check_spec(spec)
            n_grid = _awq.check_grid(n_grid)
            if n_sequences is None or int(n_sequences) < 1:
                raise ValueError("n_sequences (calibration sequences behind H) is needed to undo H's 2/n scaling.")
            S = stats.H.to(mats[0].device, torch.float64) * (float(n_sequences) / 2.0)
            x_mean = _host(stats.mean_abs)
            n_tokens = int(stats.tokens)
            with torch.no_grad():
                return _grid_search(x_mean, mats, spec, n_grid, duo_scaling,
                                    lambda weights: _gram_loss(S, n_tokens, mats, weights))

        def awq_search_clip(self, X, W, spec, n_grid=_awq.CLIP_N_GRID, max_shrink=_awq.CLIP_MAX_SHRINK,
                            n_sample_tokens=_awq.CLIP_N_SAMPLE_TOKENS):
            """:func:`refquant.awq.search_clip` with per-group Grams of the sampled tokens (float32).

            Returns a :class:`refquant.awq.ClipSearchResult`: ``max_val`` float64 (out, n_groups) and
            ``losses`` float64 (n_candidates, out, n_groups), on W's device.
            """
            W = _t(W)
            check_matrix(W, "W")
            _awq.check_clip_args(spec, n_grid, max_shrink, n_sample_tokens)
            n_grid = int(n_grid)
            X = _t(X)
            rows, n = W.shape
            _eq.check_activations(X, n)
            with torch.no_grad():
                tokens = X.reshape(-1, n)
                stride = max(1, tokens.shape[0] // int(n_sample_tokens))
                tokens = tokens[0::stride].to(W.device, torch.float64)
                T = tokens.shape[0]
                slices = group_slices(n, spec.group_size)
                Wf = W.double()
                grams = [tokens[:, c].t() @ tokens[:, c] for c in slices]  # per group (gs, gs), float64
                org_max = torch.stack([Wf[:, c].abs().amax(dim=1) for c in slices], dim=1)  # (rows, G)
                n_cand = int(max_shrink * n_grid)
                losses = torch.empty((n_cand, rows, len(slices)), dtype=torch.float64, device=W.device)
                best = org_max.clone()
                min_errs = torch.full_like(org_max, _awq.CLIP_ERR_INIT)
                # groups of equal width are batched: (G, rows, gs) @ (G, gs, gs)
                full = [g for g, c in enumerate(slices) if c.stop - c.start == slices[0].stop - slices[0].start]
                rest = [g for g in range(len(slices)) if g not in full]
                G_full = torch.stack([grams[g] for g in full]) if full else None
                for i in range(n_cand):
                    max_val = org_max * (1 - i / n_grid)
                    W_c = _clip(Wf, max_val, spec.group_size)
                    D = _fake_quant64(W_c, spec) - Wf
                    err = torch.empty((rows, len(slices)), dtype=torch.float64, device=W.device)
                    if full:
                        gs = slices[0].stop - slices[0].start
                        Dg = D[:, : len(full) * gs].reshape(rows, len(full), gs).transpose(0, 1)  # (G, rows, gs)
                        err[:, full] = ((Dg @ G_full) * Dg).sum(dim=-1).t() / T
                    for g in rest:
                        d = D[:, slices[g]]
                        err[:, g] = ((d @ grams[g]) * d).sum(dim=-1) / T
                    losses[i] = err
                    better = err < min_errs
                    min_errs = torch.where(better, err, min_errs)
                    best = torch.where(better, max_val, best)
                return _awq.ClipSearchResult(max_val=best, losses=losses)

        def apply_clip(self, W, max_val, group_size):
            """:func:`refquant.awq.apply_clip`: clamp per (row, group) to ``[-max_val, max_val]``."""
            W = _t(W)
            check_matrix(W, "W")
            slices = group_slices(W.shape[1], group_size)
            m = _t(max_val, device=W.device)
            if tuple(m.shape) != (W.shape[0], len(slices)):
                raise ValueError(f"max_val must have shape (out_features, n_groups) = {(W.shape[0], len(slices))}; "
                                 f"got {tuple(m.shape)}.")
            check_finite(m, "max_val")
            if bool((m < 0).any()):
                raise ValueError("max_val must be >= 0 (it is a symmetric clipping threshold).")
            return _clip(W, m, group_size)
